"""Choosing well: methods to tune, searches, honest comparisons, steering and
what a trained intervention learned.

    methods     :class:`ReftMethod`, :class:`LoraMethod`, the search space and
                the task they are fitted on (one home for sweep and compare)
    sweep       a hyperparameter search with Optuna, resumable, best on the dev set
    compare     ReFT against LoRA and baselines on one split, with intervals
    steering    steering vectors from contrastive pairs
    subspace    the subspaces a LoReFT learned and the size of its edits
    quickstart  the first job: SmolLM2 learns a reply style

The modules load on first use (``reft_rs.experiments.sweep``); ``sweep`` and
``compare`` import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

MODULES = ("methods", "sweep", "compare", "steering", "subspace", "quickstart")
__all__ = list(MODULES)


def __getattr__(name: str) -> Any:
    if name not in MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f".{name}", __name__)
