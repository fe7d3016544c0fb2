"""reft_rs: Representation Finetuning (ReFT) and Representation Editing (RED)
with a Rust core.

Modules:
    positions: which token positions each intervention edits, for a whole
        dataset at once (:func:`reft_rs.positions.locate`).
    spans: gather hidden states at those positions and scatter edits back.
    checkpoint: the checkpoint format (``reft_config.json`` +
        ``reft_model.safetensors``), written atomically and checked on load.
    Engine: CPU inference in Rust with interventions, without torch.
    Scheduler: continuous batching of requests with many adapters over one Engine.

Errors derive from :class:`reft_rs.ReftError` (see :mod:`reft_rs.errors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import (
    _environment,  # noqa: F401  (first: sets the variables the extension reads)
    checkpoint,
    positions,
    spans,
)
from ._core import FORMAT_VERSION, MASKED, __version__
from .config import InterventionConfig, ReftConfig
from .engine import Engine
from .errors import (
    BusyError,
    CheckpointError,
    CheckpointIOError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DatasetError,
    EngineError,
    IncompatibleModelError,
    InvalidArgumentError,
    InvalidCheckpointError,
    LocationError,
    MissingDependencyError,
    ModelLoadError,
    ModelNotFoundError,
    PositionError,
    ReftError,
    ReftMemoryError,
    ShapeError,
    TokenizerError,
    UnsupportedFormatError,
    UnsupportedModelError,
)
from .positions import PositionSpec
from .sampling import SamplingParams
from .scheduler import Scheduler

if TYPE_CHECKING:
    from . import compare, convert, evaluation, methods, metrics, plot, prefix_cache, subspace, sweep
    from .data import ReftDataCollator, ReftDataset, make_dataset
    from .model import ReftModel, get_reft_model
    from .trainer import ReftTrainer, train

# The torch path loads on first use, so that `import reft_rs` needs no torch.
_LAZY = {
    "ReftModel": "model",
    "get_reft_model": "model",
    "ReftTrainer": "trainer",
    "train": "trainer",
    "ReftDataCollator": "data",
    "ReftDataset": "data",
    "make_dataset": "data",
    "convert": None,
    "interventions": None,
    "pretrained": None,
    "evaluation": None,
    "prefix_cache": None,
    "plot": None,
    "metrics": None,
    "sweep": None,
    "methods": None,
    "compare": None,
    "subspace": None,
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'reft_rs' has no attribute {name!r}")
    import importlib

    module_name = _LAZY[name]
    module = importlib.import_module(f".{module_name or name}", __name__)
    value = module if module_name is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "ReftConfig",
    "InterventionConfig",
    "ReftModel",
    "get_reft_model",
    "ReftTrainer",
    "train",
    "ReftDataCollator",
    "ReftDataset",
    "make_dataset",
    "convert",
    "interventions",
    "pretrained",
    "evaluation",
    "prefix_cache",
    "plot",
    "metrics",
    "sweep",
    "methods",
    "compare",
    "subspace",
    "ConfigError",
    "IncompatibleModelError",
    "FORMAT_VERSION",
    "MASKED",
    "PositionSpec",
    "checkpoint",
    "positions",
    "spans",
    "ReftError",
    "PositionError",
    "ShapeError",
    "LocationError",
    "ReftMemoryError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointIOError",
    "InvalidCheckpointError",
    "CorruptCheckpointError",
    "UnsupportedFormatError",
    "MissingDependencyError",
    "Engine",
    "Scheduler",
    "SamplingParams",
    "ModelLoadError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "InvalidArgumentError",
    "TokenizerError",
    "BusyError",
    "EngineError",
    "DatasetError",
]
