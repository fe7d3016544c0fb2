"""reft_rs: Representation Finetuning (ReFT) and Representation Editing (RED)
with a Rust core.

Modules:
    positions: which token positions each intervention edits, for a whole
        dataset at once (:func:`reft_rs.positions.locate`).
    spans: gather hidden states at those positions and scatter edits back.
    checkpoint: the checkpoint format (``reft_config.json`` +
        ``reft_model.safetensors``), written atomically and checked on load.

Errors derive from :class:`reft_rs.ReftError` (see :mod:`reft_rs.errors`).
"""

from __future__ import annotations

from . import checkpoint, positions, spans
from ._core import FORMAT_VERSION, MASKED, __version__
from .errors import (
    CheckpointError,
    CheckpointIOError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidCheckpointError,
    LocationError,
    MissingDependencyError,
    PositionError,
    ReftError,
    ReftMemoryError,
    ShapeError,
    UnsupportedFormatError,
)
from .positions import PositionSpec

__all__ = [
    "__version__",
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
]
