"""Type stubs of the private extension module ``reft_rs._core``.

Checked against the built module in CI with ``python -m mypy.stubtest reft_rs._core``.
"""

from collections.abc import Sequence
from os import PathLike
from typing import Any, final

import numpy as np
import numpy.typing as npt

from .engine.sampling import SamplingParams

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "MASKED",
    "CONFIG_FILE",
    "TENSORS_FILE",
    "_panic_for_tests",
    "PositionSpec",
    "Engine",
    "Scheduler",
    "TokenStream",
    "BatchTokenizer",
    "locate",
    "locate_char_spans",
    "locate_in_tokens",
    "gather",
    "scatter",
    "pad_rows",
    "schema",
    "parameter_layout",
    "normalize_intervention",
    "check_placement",
    "check_fits",
    "normalize_config",
    "config_parameters",
    "save_checkpoint",
    "load_checkpoint",
    "read_gguf_tensor",
    "kernel_isa",
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
    def images(self) -> bool: ...
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
def locate_in_tokens(
    tokens: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    spec: str | Sequence[int] | PositionSpec,
    image_token: int,
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
def schema() -> dict[str, Any]: ...
def parameter_layout(kind: str, bias: bool, projection_bias: bool) -> list[tuple[str, list[str]]]: ...
def normalize_intervention(entry_json: str) -> str: ...
def check_placement(name: str, layer: int, rank: int | None, width: int, num_hidden_layers: int) -> None: ...
def check_fits(
    base: tuple[str, str, int, int],
    source: str,
    *,
    inferred: bool,
    hidden_size: int | None,
    num_hidden_layers: int | None,
    model_type: str | None,
    strict: bool,
) -> list[str]: ...
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
def _panic_for_tests(message: str) -> None: ...

#: A reft_rs.SamplingParams: its fields are read by name.
_GenerateArgs = SamplingParams

@final
class Engine:
    def __new__(
        cls,
        model_path: str | PathLike[str],
        reft: str | PathLike[str] | None = None,
        threads: int | None = None,
        dequantize: bool = False,
        int8_activations: bool = False,
    ) -> Engine: ...
    def add_adapter(self, name: str, path: str | PathLike[str]) -> None: ...
    def remove_adapter(self, name: str) -> None: ...
    def adapters(self) -> list[tuple[str, str]]: ...
    def logits(
        self, token_ids: list[int], adapter: str | None = None, strength: float = 1.0
    ) -> npt.NDArray[np.float32]: ...
    def generate_ids(
        self, prompts: list[list[int]], options: _GenerateArgs, adapters: list[str | None] = ...
    ) -> list[list[int]]: ...
    def generate_text(
        self,
        prompts: list[str],
        options: _GenerateArgs,
        add_special_tokens: bool,
        adapters: list[str | None] = ...,
    ) -> list[str]: ...
    def stream_ids(
        self, prompt: list[int], options: _GenerateArgs, adapter: str | None = None
    ) -> TokenStream: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...
    def apply_chat_template(self, messages_json: str, add_generation_prompt: bool = True) -> str: ...
    @property
    def model_info(self) -> tuple[str, int, int, int, bool]: ...
    @property
    def context_length(self) -> int: ...
    @property
    def has_tokenizer(self) -> bool: ...
    @property
    def has_chat_template(self) -> bool: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def reft_config_json(self) -> str | None: ...

#: (id, token, finish, error, logits)
_Event = tuple[int, int | None, str | None, str | None, npt.NDArray[np.float32] | None, str]

@final
class Scheduler:
    def __new__(
        cls,
        engine: Engine,
        max_batch: int,
        kv_cache_bytes: int,
        max_prefill_tokens: int,
        max_waiting: int,
    ) -> Scheduler: ...
    def submit(
        self,
        prompt: list[int],
        options: _GenerateArgs,
        adapter: str | None = None,
        return_logits: bool = False,
        client: str | None = None,
    ) -> int: ...
    def cancel(self, id: int) -> None: ...
    def step(self) -> list[_Event]: ...
    def wait(self, timeout: float) -> bool: ...
    @property
    def has_work(self) -> bool: ...
    @property
    def load(self) -> tuple[int, int, int]: ...
    def kv_bytes(self, tokens: int) -> int: ...
    @property
    def limits(self) -> tuple[int, int, int, int]: ...

@final
class TokenStream:
    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> tuple[int | None, str]: ...

@final
class BatchTokenizer:
    @staticmethod
    def from_json(json: str) -> BatchTokenizer: ...
    @staticmethod
    def from_file(path: str | PathLike[str]) -> BatchTokenizer: ...
    @property
    def fast_path(self) -> bool: ...
    def encode_batch(
        self, texts: list[str], add_special_tokens: bool = False
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]: ...
    def encode_pairs(
        self,
        prompts: list[str],
        responses: list[str] | None,
        affixes: tuple[str, str, str, str],
        prompt_special_tokens: bool,
        max_length: int | None = None,
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...

def pad_rows(
    tokens: npt.NDArray[np.int32],
    offsets: npt.NDArray[np.int64],
    prompt_lengths: npt.NDArray[np.int64] | None,
    indices: npt.NDArray[np.int64],
    width: int,
    pad_token_id: int,
    left: bool,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64] | None]: ...
def read_gguf_tensor(path: str, name: str) -> tuple[list[int], npt.NDArray[np.float32]]: ...
def kernel_isa() -> str: ...
