"""reft_rs: Representation Finetuning (ReFT) and Representation Editing (RED)
with a Rust core.

The package follows the parts users install:

    positions, spans, config, errors   torch-free; mirror the Rust core
    io/           checkpoints, pyreft/RED/control-vector files, datasets on disk,
                  pretrained models
    engine/       CPU inference in Rust without torch: Engine, Scheduler,
                  SamplingParams
    model/        the torch path: ReftModel, its hooks, interventions, merging,
                  gradient checkpointing, the prefix cache
    training/     datasets and collators, the Trainer, evaluation, metrics, plots
    experiments/  methods to tune, sweeps, comparisons, steering, subspaces,
                  the quickstart
    serve/        the OpenAI-compatible server
    cli/          the ``reft-rs`` command

Errors derive from :class:`reft_rs.ReftError` (see :mod:`reft_rs.errors`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import TYPE_CHECKING, Any

from . import (
    _environment,  # noqa: F401  (first: sets the variables the extension reads)
    io,
    positions,
    spans,
)
from ._core import FORMAT_VERSION, MASKED, __version__
from .config import InterventionConfig, ReftConfig
from .engine import Engine, SamplingParams, Scheduler
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

if TYPE_CHECKING:
    from . import experiments, model, training
    from .model import ReftModel, get_reft_model
    from .training import ReftDataCollator, ReftDataset, ReftTrainer, make_dataset, train

# The torch path loads on first use, so that `import reft_rs` needs no torch.
_LAZY = {
    "ReftModel": "model",
    "get_reft_model": "model",
    "ReftTrainer": "training",
    "train": "training",
    "ReftDataCollator": "training",
    "ReftDataset": "training",
    "make_dataset": "training",
    "model": None,
    "training": None,
    "experiments": None,
    "serve": None,
    "cli": None,
}

# Where the modules of release 0.1's flat layout live now. The old paths keep
# working for one release, with a DeprecationWarning naming the new one.
MOVED = {
    "checkpoint": "io.checkpoint",
    "convert": "io.convert",
    "control_vector": "io.control_vector",
    "records": "io.records",
    "pretrained": "io.pretrained",
    "scheduler": "engine.scheduler",
    "sampling": "engine.sampling",
    "interventions": "model.interventions",
    "layout": "model.layout",
    "merge": "model.merge",
    "recompute": "model.gradient_checkpointing",
    "prefix_cache": "model.prefix_cache",
    "data": "training.data",
    "trainer": "training.trainer",
    "evaluation": "training.evaluation",
    "metrics": "training.metrics",
    "plot": "training.plot",
    "methods": "experiments.methods",
    "sweep": "experiments.sweep",
    "compare": "experiments.compare",
    "steering": "experiments.steering",
    "subspace": "experiments.subspace",
    "quickstart": "experiments.quickstart",
}


def _moved(old: str) -> Any:
    new = f"{__name__}.{MOVED[old]}"
    warnings.warn(
        f"{__name__}.{old} is now {new}; the old path goes away in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return importlib.import_module(new)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import reft_rs.<old>`` with the module at its new path (the
    same module object, so that patches and isinstance checks agree)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package, _, old = fullname.rpartition(".")
        if package != __name__ or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: Any) -> Any:
        return _moved(spec.name.rpartition(".")[2])

    def exec_module(self, module: Any) -> None:
        pass


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name in MOVED:
        return _moved(name)
    if name not in _LAZY:
        raise AttributeError(f"module 'reft_rs' has no attribute {name!r}")
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
    "ConfigError",
    "IncompatibleModelError",
    "FORMAT_VERSION",
    "MASKED",
    "PositionSpec",
    "io",
    "engine",
    "model",
    "training",
    "experiments",
    "serve",
    "cli",
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
