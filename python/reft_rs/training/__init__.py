"""Training with torch: datasets and collators, the Trainer, evaluation.

    data        :class:`ReftDataset`, :func:`make_dataset`, the collator and
                streamed epochs
    trainer     :class:`ReftTrainer` and :func:`train` (a plain loop or the
                ``transformers`` Trainer), checkpoint selection on a dev set
    evaluation  :func:`evaluate`: loss, accuracy or exact match on a dataset
    metrics     the metric names and which way is better (torch-free)
    plot        training curves with matplotlib (torch-free)

The torch names load on first use, so that ``metrics`` and ``plot`` import
without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data import ReftDataCollator, ReftDataset, make_dataset
    from .evaluation import evaluate
    from .trainer import ReftTrainer, train

_HOMES = {
    "ReftDataCollator": "data",
    "ReftDataset": "data",
    "make_dataset": "data",
    "evaluate": "evaluation",
    "ReftTrainer": "trainer",
    "train": "trainer",
}
__all__ = ["ReftDataCollator", "ReftDataset", "ReftTrainer", "evaluate", "make_dataset", "train"]


MODULES = ("data", "trainer", "evaluation", "metrics", "plot")


def __getattr__(name: str) -> Any:
    if name in MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
