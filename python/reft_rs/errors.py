"""The exceptions reft_rs raises.

Every error reft_rs raises on purpose derives from :class:`ReftError`, and
each subclass also derives from the built-in exception that fits it, so code
may catch either: a bad position spec is a ``ValueError`` too, a missing
checkpoint file a ``FileNotFoundError``.

Example::

    try:
        reft_rs.positions.locate([5, 9], "f-1")
    except reft_rs.PositionError as error:   # or ValueError
        print(error)  # invalid position spec "f-1": the count after 'f' ...
"""

from __future__ import annotations

__all__ = [
    "ReftError",
    "PositionError",
    "ShapeError",
    "LocationError",
    "ReftMemoryError",
    "ConfigError",
    "IncompatibleModelError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointIOError",
    "InvalidCheckpointError",
    "CorruptCheckpointError",
    "UnsupportedFormatError",
    "MissingDependencyError",
    "ModelLoadError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "InvalidArgumentError",
    "TokenizerError",
    "EngineError",
    "BusyError",
    "DatasetError",
]


class ReftError(Exception):
    """Base class of every error reft_rs raises on purpose.

    Args:
        message: What went wrong, naming the offending input.
        path: The file the error concerns, if any (also ``self.path``).
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        if path is not None and isinstance(self, OSError):
            self.filename = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[type[ReftError], tuple[str, str | None]]:
        return (type(self), (str(self), self.path))


class PositionError(ReftError, ValueError):
    """A position spec that cannot be parsed, or position inputs that disagree
    (a negative length, a padded length shorter than a sequence, ...)."""


class ShapeError(ReftError, ValueError):
    """Arrays whose shapes do not fit together (hidden sizes, batch sizes)."""


class LocationError(ReftError, IndexError):
    """A location that points outside its sequence."""


class ReftMemoryError(ReftError, MemoryError):
    """An output array too large for the memory available."""


class ConfigError(ReftError, ValueError):
    """An intervention config that cannot be right: an unknown type or
    component, a bad position spec, a layer the model does not have, a rank
    larger than the hidden size."""


class IncompatibleModelError(ReftError, ValueError):
    """A checkpoint or config that does not fit the model it is applied to
    (hidden size, layer count or model type differ, a layer cannot be found)."""


class CheckpointError(ReftError):
    """Base class of checkpoint problems; ``path`` names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder or one of its files does not exist."""


class CheckpointIOError(CheckpointError, OSError):
    """Reading or writing a checkpoint failed at the operating-system level."""


class InvalidCheckpointError(CheckpointError, ValueError):
    """A checkpoint config or tensor set that is invalid: a missing or unknown
    field, an unknown intervention type, a layer past the model, tensors that
    disagree with the config. Raised on save and on load."""


class CorruptCheckpointError(InvalidCheckpointError):
    """A damaged checkpoint file: truncated, not safetensors, holding tensors
    of the wrong shape or dtype, or left from an interrupted save."""


class UnsupportedFormatError(CheckpointError, ValueError):
    """A checkpoint written in a newer format than this reft_rs reads."""


class MissingDependencyError(ReftError, ImportError):
    """An optional package needed for the requested operation is missing."""


class ModelLoadError(ReftError, ValueError):
    """A model folder or file the engine cannot load: a bad ``config.json``,
    missing or misshapen weights, an unreadable GGUF file."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model folder or file that does not exist."""


class UnsupportedModelError(ModelLoadError):
    """A model whose architecture (``model_type``) the engine does not implement."""


class InvalidArgumentError(ReftError, ValueError):
    """An argument outside its range: a token id past the vocabulary, a
    negative temperature, ``top_p`` outside (0, 1], ..."""


class TokenizerError(ReftError, ValueError):
    """Text that cannot be turned into tokens or back: no ``tokenizer.json``,
    a chat template that fails, a model without a chat template."""


class EngineError(ReftError, RuntimeError):
    """The engine's tensor backend failed (a bug, or memory exhausted)."""


class BusyError(ReftError, RuntimeError):
    """Work refused for now because too much is queued already (a
    scheduler's ``max_waiting``); retrying later may succeed."""


class DatasetError(ReftError, ValueError):
    """A dataset file is missing, malformed (the message gives the line) or
    lacks the fields it needs."""
