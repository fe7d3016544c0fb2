"""Type stubs of the private extension module ``reft_rs._core``.

Checked against the built module in CI with ``python -m mypy.stubtest reft_rs._core``.
"""

from collections.abc import Sequence
from os import PathLike
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "MASKED",
    "CONFIG_FILE",
    "TENSORS_FILE",
    "PositionSpec",
    "locate",
    "locate_char_spans",
    "gather",
    "scatter",
    "normalize_config",
    "config_parameters",
    "save_checkpoint",
    "load_checkpoint",
]
__version__: str
FORMAT_VERSION: int
MASKED: int
CONFIG_FILE: str
TENSORS_FILE: str

@final
class PositionSpec:
    """A parsed position spec (``f7+l7``, ``f5``, ``l3``, ``all``, or token indices)."""

    def __new__(cls, spec: str | Sequence[int] | PositionSpec) -> PositionSpec: ...
    @property
    def kind(self) -> str: ...
    @property
    def first(self) -> int: ...
    @property
    def last(self) -> int: ...
    @property
    def indices(self) -> list[int] | None: ...
    def group_count(self, share_weights: bool = False) -> int: ...
    def width(self, share_weights: bool = False) -> int | None: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

def locate(
    lengths: npt.NDArray[np.int64],
    spec: str | Sequence[int] | PositionSpec,
    *,
    share_weights: bool = False,
    include_last: bool = True,
    padding_side: str = "right",
    padded_length: int | None = None,
    sequence_lengths: npt.NDArray[np.int64] | None = None,
    parallel: bool = True,
) -> npt.NDArray[np.int64]: ...
def locate_char_spans(
    token_offsets: npt.NDArray[np.int64],
    token_counts: npt.NDArray[np.int64],
    char_spans: npt.NDArray[np.int64],
    *,
    max_positions: int | None = None,
    padding_side: str = "right",
    padded_length: int | None = None,
    sequence_lengths: npt.NDArray[np.int64] | None = None,
    parallel: bool = True,
) -> npt.NDArray[np.int64]: ...
def gather(
    hidden: npt.NDArray[Any], locations: npt.NDArray[np.int64], *, parallel: bool = True
) -> npt.NDArray[Any]: ...
def scatter(
    hidden: npt.NDArray[Any],
    locations: npt.NDArray[np.int64],
    values: npt.NDArray[Any],
    *,
    parallel: bool = True,
) -> None: ...
def normalize_config(config_json: str) -> str: ...
def config_parameters(config_json: str) -> list[tuple[str, str, list[int]]]: ...
def save_checkpoint(
    path: str | PathLike[str],
    config_json: str,
    tensors: list[tuple[str, str, list[int], npt.NDArray[np.uint8]]],
) -> None: ...
def load_checkpoint(
    path: str | PathLike[str],
) -> tuple[str, list[tuple[str, str, list[int], bytearray]], bool]: ...
