"""The torch path: a Hugging Face model with interventions at chosen layers and
positions.

    reft_model              :class:`ReftModel` (adapters, forward, generate,
                            save/load) and :func:`get_reft_model`
    hooks                   the call state the forward hooks share, and the
                            interface that the helpers below use
    interventions           LoReFT, RED, DiReFT and the other intervention types
    layout                  where each model family keeps its layers and heads
    merge                   folding a RED or bias edit into the base weights
    gradient_checkpointing  replaying the edits when layers are recomputed
    prefix_cache            reusing a shared prompt's keys and values

``ReftModel`` and ``get_reft_model`` load on first use, so that the
torch-free modules of this folder import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .reft_model import ReftModel, get_reft_model

__all__ = ["ReftModel", "get_reft_model"]


MODULES = (
    "reft_model",
    "hooks",
    "interventions",
    "layout",
    "merge",
    "gradient_checkpointing",
    "prefix_cache",
)


def __getattr__(name: str) -> Any:
    if name in MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".reft_model", __name__), name)
