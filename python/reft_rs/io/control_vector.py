"""llama.cpp control vectors in and out: ``steer`` checkpoints as GGUF files.

A control-vector file (llama.cpp's ``--control-vector``, repeng's
``export_gguf``) is a GGUF file with ``general.architecture =
controlvector``, ``controlvector.model_hint`` (the model type),
``controlvector.layer_count`` and one float32 1-D tensor ``direction.N``
per steered layer.

Layer numbering, read from llama.cpp's source: the loader
(``common_control_vector_load_one``) puts ``direction.N`` at offset
``n_embd * (N - 1)`` of its buffer and refuses ``N = 0``; the adapter
(``llama_adapter_cvec::apply``) fills layer ``il``'s tensor from offset
``n_embd * (il - 1)`` for ``il = 1 .. n_layer - 1``; and each layer's graph
adds that tensor to its output after the feed-forward residual
(``build_cvec(cur, il)`` before ``l_out``). So ``direction.N`` is added to
the output of 0-based layer ``N`` on every token, which is a ``steer``
intervention at layer ``N``, ``block_output``, positions ``all``. Layer 0
cannot be expressed, and several tensors for one layer add up (llama.cpp
sums them).

Reading needs only numpy and the ``gguf`` package, not torch.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ..config import InterventionConfig, ReftConfig
from ..errors import ConfigError, InvalidCheckpointError, MissingDependencyError
from . import checkpoint

__all__ = ["export_control_vector", "import_control_vector", "read_control_vector"]

_DIRECTION = re.compile(r"direction\.([0-9]+)")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError(
            "control-vector files are read and written with the gguf package: pip install gguf"
        ) from None
    return gguf


def _string_field(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (UnicodeDecodeError, IndexError, TypeError):
        return None


def read_control_vector(path: str | os.PathLike[str]) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """The directions of a control-vector file by llama.cpp layer, and its metadata.

    Returns:
        ``({layer: float32 vector}, {"model_hint": ..., "architecture": ...})``.

    Raises:
        InvalidCheckpointError: Not a GGUF file, a tensor that is not
            ``direction.N`` (N ≥ 1), not float32, not 1-D, or of another width.
    """
    gguf = _gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidCheckpointError(f"{path}: no such control-vector file", path)
    try:
        reader = gguf.GGUFReader(path, "r")
        tensors = list(reader.tensors)
    except Exception as error:  # the reader raises many kinds on damaged files
        raise InvalidCheckpointError(f"{path}: not a readable GGUF file ({error})", path) from None
    architecture = _string_field(reader, "general.architecture")
    if architecture not in (None, "controlvector"):
        raise InvalidCheckpointError(
            f"{path}: general.architecture is {architecture!r}, not 'controlvector' (is this a model file?)",
            path,
        )
    directions: dict[int, np.ndarray] = {}
    width = None
    for tensor in tensors:
        match = _DIRECTION.fullmatch(tensor.name)
        if match is None:
            raise InvalidCheckpointError(f"{path}: tensor {tensor.name!r} is not named direction.N", path)
        layer = int(match.group(1))
        if layer == 0:
            raise InvalidCheckpointError(
                f"{path}: direction.0 names no layer (llama.cpp numbers from 1)", path
            )
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise InvalidCheckpointError(f"{path}: {tensor.name} is not float32", path)
        shape = [int(n) for n in tensor.shape]
        if len(shape) != 1:
            raise InvalidCheckpointError(f"{path}: {tensor.name} has shape {shape}, not one dimension", path)
        values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if values.size != shape[0]:
            raise InvalidCheckpointError(f"{path}: {tensor.name} is cut short", path)
        if width is None:
            width = values.size
        elif values.size != width:
            raise InvalidCheckpointError(
                f"{path}: {tensor.name} has {values.size} values, the others {width}", path
            )
        if not np.isfinite(values).all():
            raise InvalidCheckpointError(f"{path}: {tensor.name} holds NaN or infinite values", path)
        # Several directions for one layer add up, as in llama.cpp.
        directions[layer] = directions[layer] + values if layer in directions else values.copy()
    if not directions:
        raise InvalidCheckpointError(f"{path}: no direction tensors", path)
    meta = {"architecture": architecture, "model_hint": _string_field(reader, "controlvector.model_hint")}
    return dict(sorted(directions.items())), meta


def import_control_vector(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    base_model: Any = None,
) -> ReftConfig:
    """Writes a control-vector file as a reft_rs ``steer`` checkpoint.

    Args:
        path: The ``.gguf`` control-vector file.
        output: The checkpoint folder to write.
        base_model: The model it steers (a model, its config, or a dict with
            ``hidden_size`` and ``num_hidden_layers``); otherwise the file's
            width and model hint are recorded, with one past the highest
            layer as the least number of layers.

    Returns:
        The checkpoint's config: one ``steer`` per layer, ``block_output``,
        every token, ``alpha = 1``.
    """
    directions, meta = read_control_vector(path)
    width = next(iter(directions.values())).size
    identity, inferred = checkpoint.base_identity(
        base_model, hidden_size=width, layers=max(directions) + 1, model_type=meta["model_hint"] or ""
    )
    if identity["hidden_size"] != width:
        raise ConfigError(
            f"{os.fspath(path)}: the directions have {width} values, the model's states {identity['hidden_size']}"
        )
    if max(directions) >= identity["num_hidden_layers"]:
        raise ConfigError(
            f"{os.fspath(path)}: direction.{max(directions)} steers a layer the model "
            f"({identity['num_hidden_layers']} layers) does not have"
        )
    config = ReftConfig(
        [
            InterventionConfig(layer=layer, type="steer", component="block_output", positions="all")
            for layer in directions
        ],
        metadata={"source": "llama.cpp control vector", "model_hint": meta["model_hint"] or ""},
    )
    tensors = {f"{item.name}.vector": directions[item.layer] for item in config.interventions}
    checkpoint.save_converted(output, config, identity, inferred, tensors)
    return config


def export_control_vector(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    model_hint: str | None = None,
) -> dict[int, np.ndarray]:
    """Writes a ``steer`` checkpoint as a llama.cpp control-vector file.

    Every intervention must be a ``steer`` at ``block_output`` on every
    token, at layer 1 or above (llama.cpp has no direction for layer 0);
    each direction is α·v, and steers on one layer are summed.

    Returns:
        The directions written, by layer.

    Raises:
        ConfigError: An intervention llama.cpp cannot express.
    """
    gguf = _gguf()
    config, tensors = checkpoint.load(source)
    directions: dict[int, np.ndarray] = {}
    for item in config["interventions"]:
        name, kind = item["name"], item["type"]
        if kind != "steer" or item.get("component") != "block_output" or item.get("positions") != "all":
            raise ConfigError(
                f"{name}: llama.cpp control vectors add a vector to a layer's output on every token; "
                f"this intervention is {kind} at {item.get('component')} on positions {item.get('positions')!r}"
            )
        if item.get("module_path"):
            raise ConfigError(f"{name}: edits the module {item['module_path']!r}, not a layer's output")
        layer = int(item["layer"])
        if layer == 0:
            raise ConfigError(f"{name}: llama.cpp control vectors cannot steer layer 0 (they number from 1)")
        vector = np.asarray(tensors[f"{name}.vector"], dtype=np.float64) * float(item.get("alpha", 1.0))
        directions[layer] = directions.get(layer, 0.0) + vector
    if not directions:
        raise ConfigError(f"{os.fspath(source)}: the checkpoint has no interventions")
    hint = model_hint if model_hint is not None else str(config["base_model"].get("model_type", ""))
    out = {layer: np.ascontiguousarray(v, dtype=np.float32) for layer, v in sorted(directions.items())}
    path = os.fspath(path)
    staged = f"{path}.partial"
    writer = gguf.GGUFWriter(staged, "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(out))
    for layer, vector in out.items():
        writer.add_tensor(f"direction.{layer}", vector)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(staged, path)
    return out
