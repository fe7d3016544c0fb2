"""Generation settings, one named type from the server to the Rust engine,
and the argument checks the engine's front ends share (no torch).

:class:`SamplingParams` is what :meth:`reft_rs.Engine.generate`, the
:class:`reft_rs.Scheduler` and ``reft-rs serve`` hand to the Rust engine,
which reads its fields by name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

__all__ = ["SamplingParams"]


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum`` (no bools), else InvalidArgumentError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, found {value!r}")
    return int(value)


def check_token_ids(name: str, ids: Any) -> list[int]:
    """A flat sequence of token ids as a list of ints that fit 32 bits."""
    array = np.asarray(ids)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise InvalidArgumentError(
            f"{name} must be a flat sequence of token ids, found {array.dtype} {array.shape}"
        )
    if array.size and (array.min() < 0 or array.max() >= 2**32):
        raise InvalidArgumentError(f"{name} holds a negative or too large token id")
    return array.astype(np.uint32).tolist()


def check_adapter(adapter: Any) -> str | None:
    """A loaded adapter's name, or None for the engine's own checkpoint."""
    if adapter is None or isinstance(adapter, str):
        return adapter
    raise InvalidArgumentError(f"adapter must be a name or None, found {type(adapter).__name__}")


def check_strength(strength: Any) -> float:
    """The edit strength α as a finite float."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"strength must be a number, found {strength!r}") from None
    if not math.isfinite(value):
        raise InvalidArgumentError(f"strength must be a finite number, found {strength!r}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is continued; checked and normalised when made.

    Args:
        max_new_tokens: Most new tokens.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k, top_p: Sampling filters (None: off).
        seed: Sampling seed: the same seed gives the same tokens.
        stop: Text(s) that end the generation; the result is cut before the
            first one.
        intervene_on_generated: Also edit every generated token with the
            checkpoint's interventions.
        ignore_eos: Keep generating past end-of-sequence tokens.
        strength: The edit strength α: each edited state becomes
            h + α·(Φ(h) − h).

    Raises:
        InvalidArgumentError: A setting of the wrong type or range.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | Sequence[str] | None = ()
    intervene_on_generated: bool = False
    ignore_eos: bool = False
    strength: float = 1.0

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("max_new_tokens", check_count("max_new_tokens", self.max_new_tokens, 0))
        if self.top_k is not None:
            put("top_k", check_count("top_k", self.top_k, 1))
        if self.seed is not None:
            put("seed", check_count("seed", self.seed, 0))
        try:
            put("temperature", float(self.temperature))
            put("top_p", None if self.top_p is None else float(self.top_p))
        except (TypeError, ValueError) as error:
            raise InvalidArgumentError(f"temperature and top_p must be numbers: {error}") from None
        stop = self.stop
        stops = (stop,) if isinstance(stop, str) else tuple(str(s) for s in (stop or ()))
        put("stop", stops)
        put("intervene_on_generated", bool(self.intervene_on_generated))
        put("ignore_eos", bool(self.ignore_eos))
        put("strength", check_strength(self.strength))
