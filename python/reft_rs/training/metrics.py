"""Metrics and their direction, with no torch: shared by training-time
selection (:mod:`reft_rs.training.evaluation`), ``reft-rs eval`` and comparisons.

| metric | scores | better |
|---|---|---|
| ``loss`` | the model's own loss (per label token, or per example) | lower |
| ``accuracy`` | a classifier's argmax against its labels | higher |
| ``exact_match`` | a reply equal to the reference (case and spacing ignored) | higher |
| ``contains`` | the reference found inside the reply | higher |

A metric may also be a callable of the model; its direction is then given
beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["METRICS", "Metric", "greater_is_better", "normalize_answer", "reply_matches"]

#: The named metrics and whether a higher score is better.
METRICS = {"loss": False, "accuracy": True, "exact_match": True, "contains": True}

Metric = str | Callable[[Any], float]


def normalize_answer(text: str) -> str:
    """Case- and space-insensitive form of an answer."""
    return " ".join(text.split()).casefold()


def reply_matches(metric: str, reply: str, expected: str) -> bool:
    """Whether ``reply`` scores for ``expected`` under ``exact_match`` or ``contains``."""
    got, want = normalize_answer(reply), normalize_answer(expected)
    if metric == "exact_match":
        return got == want
    if metric == "contains":
        return want in got
    raise ConfigError(f"{metric!r} does not score replies (exact_match or contains do)")


def greater_is_better(metric: Metric, declared: bool | None = None) -> bool:
    """Whether a higher score of ``metric`` is better (``declared`` for a callable)."""
    if callable(metric):
        if declared is None:
            raise ConfigError("a callable metric needs greater_is_better=True or False beside it")
        return bool(declared)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of: {', '.join(METRICS)} or a callable")
    return METRICS[metric]
