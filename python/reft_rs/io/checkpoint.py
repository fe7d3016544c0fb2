"""The reft_rs checkpoint format.

A checkpoint is a folder with two files, modelled on peft's adapter layout:

- ``reft_config.json``: the format version, the library version, the base
  model's identity (``name_or_path``, ``model_type``, ``hidden_size``,
  ``num_hidden_layers``) and one entry per intervention with everything
  needed to rebuild it exactly (type, layer, component, positions, rank,
  activation, dropout, dtype, bias flags, share_weights, position group);
- ``reft_model.safetensors``: the tensors, keyed ``{intervention}.{parameter}``.

No pickle is ever involved. Saving is atomic: an interrupted save leaves the
previous checkpoint loadable. Loading checks the config, the format version,
the tensor file's integrity and every tensor's dtype and shape against the
config, and raises a :class:`reft_rs.CheckpointError` subclass naming the
file and the problem. The Rust core owns the format; the CPU engine reads the
same files.

Example::

    config = {
        "base_model": {"name_or_path": "gpt2", "model_type": "gpt2",
                       "hidden_size": 768, "num_hidden_layers": 12},
        "interventions": [{"name": "steer_l6", "type": "steer", "layer": 6,
                           "component": "block_output", "positions": "all"}],
    }
    save("my-steer", config, {"steer_l6.vector": np.ones(768, np.float32)})
    config, tensors = load("my-steer")
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from .. import _core
from .._core import CONFIG_FILE, FORMAT_VERSION, TENSORS_FILE
from ..errors import ConfigError, InvalidCheckpointError, MissingDependencyError

__all__ = [
    "CONFIG_FILE",
    "holds_checkpoint",
    "read_for_model",
    "read_layout",
    "TENSORS_FILE",
    "FORMAT_VERSION",
    "save",
    "load",
    "normalize_config",
    "expected_tensors",
    "base_identity",
    "save_converted",
]

# The dtypes a checkpoint tensor may have: the core's table.
_NUMPY_DTYPES = frozenset(_core.schema()["tensor_dtypes"])


def _config_json(config: Mapping[str, Any]) -> str:
    if not isinstance(config, Mapping):
        raise InvalidCheckpointError(f"a checkpoint config is a dict, found {type(config).__name__}")
    try:
        return json.dumps(config)
    except (TypeError, ValueError) as error:
        raise InvalidCheckpointError(f"the config cannot be written as JSON: {error}") from None


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Checks a config and returns it with every default filled in.

    Raises:
        InvalidCheckpointError: A missing or unknown field, an unknown
            intervention type, a layer past the model, a rank larger than the
            hidden size, duplicate names, ...
    """
    return json.loads(_core.normalize_config(_config_json(config)))


def expected_tensors(config: Mapping[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensors a config calls for, as ``(key, dtype, shape)``, in config order.

    Example::

        >>> expected_tensors(config)
        [('steer_l6.vector', 'float32', (768,))]
    """
    return [(key, dtype, tuple(shape)) for key, dtype, shape in _core.config_parameters(_config_json(config))]


def _torch_module() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _tensor_bytes(name: str, tensor: Any) -> tuple[str, list[int], np.ndarray]:
    """``(dtype name, shape, uint8 bytes)`` of a numpy array or torch tensor."""
    torch = _torch_module() if not isinstance(tensor, np.ndarray) else None
    if torch is not None and isinstance(tensor, torch.Tensor):
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _NUMPY_DTYPES:
            raise InvalidCheckpointError(
                f"tensor {name!r} has dtype {tensor.dtype}, which checkpoints do not hold"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        return dtype, list(tensor.shape), data.view(torch.uint8).numpy()
    if not isinstance(tensor, np.ndarray):
        raise InvalidCheckpointError(
            f"tensor {name!r} must be a numpy array or torch tensor, found {type(tensor).__name__}"
        )
    if tensor.dtype.name not in _NUMPY_DTYPES:
        raise InvalidCheckpointError(
            f"tensor {name!r} has dtype {tensor.dtype}, which checkpoints do not hold"
        )
    array = tensor
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    return array.dtype.name, list(array.shape), array.reshape(-1).view(np.uint8)


def holds_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether the folder ``path`` holds a checkpoint's files (complete or
    not), so that writing one there would replace it."""
    return any(os.path.exists(os.path.join(os.fspath(path), name)) for name in (CONFIG_FILE, TENSORS_FILE))


def save(path: str | os.PathLike[str], config: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
    """Saves a checkpoint folder, atomically.

    Args:
        path: The folder; created if needed. An existing checkpoint there is
            replaced only once the new one is complete on disk.
        config: The checkpoint config (``base_model``, ``interventions``,
            optional ``metadata`` and ``extra_tensors``). ``format_version``
            and ``library_version`` are filled in.
        tensors: Exactly the tensors the config calls for (see
            :func:`expected_tensors`), numpy arrays or torch tensors, with
            the dtype each intervention declares.

    Raises:
        InvalidCheckpointError: The config is invalid or the tensors disagree
            with it; nothing is written.
        CheckpointIOError: The files could not be written.
    """
    if not isinstance(tensors, Mapping):
        raise InvalidCheckpointError(f"tensors must be a dict of arrays, found {type(tensors).__name__}")
    items = []
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise InvalidCheckpointError(f"tensor names must be strings, found {name!r}")
        dtype, shape, data = _tensor_bytes(name, tensor)
        items.append((name, dtype, shape, data))
    _core.save_checkpoint(os.fspath(path), _config_json(config), items)


def _numpy_dtype(name: str) -> np.dtype:
    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError:
        raise MissingDependencyError(
            "this checkpoint holds bfloat16 tensors, which numpy represents only with the "
            "ml_dtypes package: pip install ml_dtypes, or load with framework='torch'"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def _read(path: str | os.PathLike[str]) -> tuple[str, list[Any], bool]:
    """The core's checked read of a checkpoint, warning (at the caller's
    caller) when an interrupted save left the previous one to be read."""
    config_json, raw, recovered = _core.load_checkpoint(os.fspath(path))
    if recovered:
        warnings.warn(
            f"the last save to {os.fspath(path)} was interrupted; loaded the previous checkpoint",
            RuntimeWarning,
            stacklevel=3,
        )
    return config_json, raw, recovered


def load(
    path: str | os.PathLike[str], *, framework: Literal["numpy", "torch"] = "numpy"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads and checks a checkpoint folder.

    Args:
        path: The checkpoint folder.
        framework: ``"numpy"`` (arrays; bfloat16 needs ``ml_dtypes``) or
            ``"torch"`` (CPU tensors).

    Returns:
        ``(config, tensors)``: the config with every default filled in, and
        the tensors by key, bit-identical to what was saved.

    Raises:
        CheckpointNotFoundError: The folder or one of its files is missing.
        InvalidCheckpointError: The config is invalid (a missing field, an
            unknown intervention type, ...).
        CorruptCheckpointError: The tensor file is damaged or disagrees
            with the config.
        UnsupportedFormatError: The checkpoint is newer than this reft_rs.
    """
    if framework not in ("numpy", "torch"):
        raise ValueError(f"framework must be 'numpy' or 'torch', found {framework!r}")
    config_json, raw, recovered = _read(path)
    tensors: dict[str, Any] = {}
    if framework == "torch":
        import torch

        for key, dtype, shape, data in raw:
            torch_dtype = getattr(torch, dtype)
            if len(data) == 0:
                tensors[key] = torch.empty(shape, dtype=torch_dtype)
            else:
                tensors[key] = torch.frombuffer(data, dtype=torch_dtype).reshape(shape)
    else:
        for key, dtype, shape, data in raw:
            tensors[key] = np.frombuffer(data, dtype=_numpy_dtype(dtype)).reshape(shape)
    return json.loads(config_json), tensors


def read_for_model(
    path: str | os.PathLike[str],
    *,
    hidden_size: int | None,
    num_hidden_layers: int | None,
    model_type: str | None,
    strict: bool = True,
    stacklevel: int = 2,
) -> tuple[Any, dict[str, Any]]:
    """A checkpoint for a model of these dimensions: its
    :class:`reft_rs.ReftConfig` and torch tensors, checked against the model
    by the engine's rule (sizes must agree; another model type is refused
    unless ``strict=False``, then warned about). The one reader behind
    ``ReftModel.from_pretrained``, ``load_adapter`` and the Trainer's resume.

    Raises:
        IncompatibleModelError: The checkpoint was made for another model.
        CheckpointError: As :func:`load`.
    """
    from ..config import ReftConfig

    config, tensors = load(path, framework="torch")
    base = config["base_model"]
    # Converted checkpoints may only know a lower bound on the layer count.
    inferred = bool(config.get("metadata", {}).get("base_model_inferred"))
    for warning in _core.check_fits(
        (base["name_or_path"], base["model_type"], base["hidden_size"], base["num_hidden_layers"]),
        os.fspath(path),
        inferred=inferred,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        model_type=model_type,
        strict=strict,
    ):
        warnings.warn(warning, stacklevel=stacklevel)
    reft_config = ReftConfig.from_checkpoint(config)
    reft_config.metadata.pop("base_model_inferred", None)  # the model's identity is known now
    return reft_config, tensors


def read_layout(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], list[tuple[str, str, tuple[int, ...]]]]:
    """A checkpoint's config and its tensors' ``(key, dtype, shape)``,
    checked as :func:`load` checks them (warning the same way after an
    interrupted save) without keeping the tensors' bytes."""
    config_json, raw, _ = _read(path)
    return json.loads(config_json), [(key, dtype, tuple(shape)) for key, dtype, shape, _ in raw]


def base_identity(
    base_model: Any, *, hidden_size: int, layers: int, model_type: str = ""
) -> tuple[dict[str, Any], bool]:
    """The base-model identity of a converted checkpoint, and whether it was
    inferred from the source files rather than given.

    From a model, its config or a dict when given; otherwise the width of the
    tensors, the source's model type if it names one, and ``layers`` (one past
    the highest layer used) as the least number of layers the model has.
    """
    if base_model is None:
        identity = {
            "name_or_path": "",
            "model_type": model_type,
            "hidden_size": hidden_size,
            "num_hidden_layers": layers,
        }
        return identity, True
    if isinstance(base_model, Mapping):
        missing = {"hidden_size", "num_hidden_layers"} - set(base_model)
        if missing:
            raise ConfigError(f"base_model lacks {sorted(missing)}")
        identity = {
            "name_or_path": str(base_model.get("name_or_path", "")),
            "model_type": str(base_model.get("model_type", "")),
            "hidden_size": int(base_model["hidden_size"]),
            "num_hidden_layers": int(base_model["num_hidden_layers"]),
        }
        return identity, False
    if hasattr(base_model, "config"):  # a model: the rule saved adapters use
        from ..model.layout import model_identity

        return model_identity(base_model), False
    identity = {
        "name_or_path": str(getattr(base_model, "_name_or_path", "") or ""),
        "model_type": str(getattr(base_model, "model_type", "") or ""),
        "hidden_size": int(base_model.hidden_size),
        "num_hidden_layers": int(base_model.num_hidden_layers),
    }
    return identity, False


def save_converted(
    path: str | os.PathLike[str],
    config: Any,
    identity: Mapping[str, Any],
    inferred: bool,
    tensors: Mapping[str, Any],
) -> None:
    """Saves a checkpoint converted from another tool's files (a
    :class:`reft_rs.ReftConfig` and the identity :func:`base_identity` gave),
    marking and warning when the base model was inferred from the files."""
    if inferred:
        config.metadata["base_model_inferred"] = True
        warnings.warn(
            f"the source does not record the base model; recorded hidden size {identity['hidden_size']} "
            f"and at least {identity['num_hidden_layers']} layers (pass base_model= to record it exactly)",
            stacklevel=3,
        )
    save(path, config.to_checkpoint(dict(identity)), tensors)
