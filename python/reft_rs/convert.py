"""Importers: pyreft checkpoints and RED's ``delta_vector.pth`` to reft_rs checkpoints.

Both formats are read without unpickling code: JSON for pyreft's config, and
``torch.load(weights_only=True)`` for the tensor files, which refuses anything
but tensors and plain containers.

pyreft (0.1.0, on pyvene) writes a folder with ``config.json`` (its
``representations`` as positional lists: layer, component, unit,
max_number_of_units, low_rank_dimension, ...; ``intervention_types`` as class
names) and one ``intkey_<key>.bin`` per intervention. It records neither the
positions, nor dropout, activation or the base model's size; pass them.

RED (Wu et al. 2024) saves ``{module}.delta_vector.activation_scaling`` and
``...activation_bias`` for each module it wraps (``down_proj`` in Llama);
each becomes a ``red`` intervention on exactly that module's output.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .config import InterventionConfig, ReftConfig
from .errors import CheckpointNotFoundError, ConfigError, InvalidCheckpointError

__all__ = ["from_pyreft", "from_red"]

_PYREFT_TYPES = {
    "LoreftIntervention": "loreft",
    "NoreftIntervention": "noreft",
    "DireftIntervention": "direft",
    "NodireftIntervention": "nodireft",
    "ConsreftIntervention": "consreft",
    "LobireftIntervention": "lobireft",
}
_PYREFT_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension")


def _identity(
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
    config = getattr(base_model, "config", base_model)
    identity = {
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "model_type": str(getattr(config, "model_type", "") or ""),
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
    }
    return identity, False


def _save(
    dst: Any, config: ReftConfig, identity: dict[str, Any], inferred: bool, tensors: dict[str, torch.Tensor]
) -> None:
    if inferred:
        config.metadata["base_model_inferred"] = True
        warnings.warn(
            f"the source does not record the base model; recorded hidden size {identity['hidden_size']} "
            f"and at least {identity['num_hidden_layers']} layers (pass base_model= to record it exactly)",
            stacklevel=3,
        )
    checkpoint.save(dst, config.to_checkpoint(identity), tensors)


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad files
        raise InvalidCheckpointError(f"cannot read {path} as a tensor file: {error}", path) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidCheckpointError(f"{path} does not hold a dict of tensors", path)
    return dict(state)


def _orthogonal_weight(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The ``[d, r]`` weight of torch's ``orthogonal`` parametrization, rebuilt
    from its stored internals by loading them into the same parametrization."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(original.shape, dtype=original.dtype))
    nn.utils.parametrizations.orthogonal(holder)
    holder.load_state_dict(
        {"parametrizations.weight.original": original, "parametrizations.weight.0.base": base}
    )
    with torch.no_grad():
        return holder.weight.detach().clone()


def _pyreft_rotation(state: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    """R (``[r, d]``, orthonormal rows) from a pyreft intervention's state."""
    if "rotate_layer" in state:  # LoReFT saves the weight itself
        return state["rotate_layer"].T
    original = state.get("rotate_layer.parametrizations.weight.original")
    base = state.get("rotate_layer.parametrizations.weight.0.base")
    if original is None or base is None:
        raise InvalidCheckpointError(f"{where} has no rotation (rotate_layer) tensors", where)
    return _orthogonal_weight(original, base).T


def _pyreft_tensors(kind: str, state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    def need(name: str) -> torch.Tensor:
        if name not in state:
            raise InvalidCheckpointError(f"{where} lacks {name!r} (has {sorted(state)})", where)
        return state[name]

    if kind == "loreft":
        return {"rotation": _pyreft_rotation(state, where), "weight": need("weight"), "bias": need("bias")}
    if kind == "direft":
        return {
            "rotation": _pyreft_rotation(state, where),
            "weight": need("learned_source.weight"),
            "bias": need("learned_source.bias"),
        }
    if kind in ("consreft", "lobireft"):
        return {"rotation": _pyreft_rotation(state, where), "bias": need("learned_source")}
    tensors = {
        "weight": need("learned_source.weight"),
        "bias": need("learned_source.bias"),
        "projection_weight": need("proj_layer.weight"),
    }
    if kind == "noreft" and "proj_layer.bias" in state:
        tensors["projection_bias"] = state["proj_layer.bias"]
    return tensors


def _common_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values()}
    # pyreft keeps W and b in bfloat16 beside a float32 R; widening is exact.
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _pyreft_key_files(folder: str, representation: list[Any], counter: dict[tuple, int]) -> str:
    layer, component, unit, units = representation[:4]
    proposal = (layer, component, unit, units)
    collision = counter.get(proposal, -1) + 1
    counter[proposal] = collision
    for key in (
        f"layer_{layer}_comp_{component}_unit_{unit}_nunit_{units}#{collision}",
        f"layer.{layer}.repr.{component}.unit.{unit}.nunit.{units}#{collision}",
    ):
        if os.path.exists(os.path.join(folder, f"intkey_{key}.bin")):
            return key
    raise CheckpointNotFoundError(
        f"no intkey_*.bin file in {folder} for layer {layer} {component} (intervention {collision})",
        folder,
    )


def from_pyreft(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    base_model: Any = None,
    positions: str | None = None,
    share_weights: bool | None = None,
    dropout: float = 0.0,
    activation: str = "identity",
) -> ReftConfig:
    """Converts a pyreft checkpoint folder into a reft_rs checkpoint.

    Args:
        src: pyreft's folder (``config.json`` + ``intkey_*.bin``).
        dst: Where to write the reft_rs checkpoint.
        base_model: The model trained on, its config, or a dict with
            ``hidden_size`` and ``num_hidden_layers``. pyreft records
            neither; without it they are inferred (the tensors' width, at
            least one past the highest layer used) and marked as such, and
            ``ReftModel.from_pretrained`` accepts any model they fit.
        positions: The position spec used in training (pyreft does not
            record it); defaults to ``"l1"`` with a warning.
        share_weights: Whether prefix and suffix shared weights; by default
            inferred: two interventions per layer and component mean they
            did not.
        dropout, activation: The training options pyreft does not record.

    Returns:
        The :class:`ReftConfig` written. Interventions keep pyreft's order
        (its sorted keys); with unshared weights its first half are the prefix
        interventions and the second half the suffix ones, as pyreft lays
        out its locations.
    """
    src = os.fspath(src)
    config_path = os.path.join(src, "config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"checkpoint file not found: {config_path}", config_path) from None
    except json.JSONDecodeError as error:
        raise InvalidCheckpointError(f"{config_path} is not valid JSON: {error}", config_path) from None
    representations = saved.get("representations")
    type_names = saved.get("intervention_types")
    if (
        not isinstance(representations, list)
        or not isinstance(type_names, list)
        or len(representations) != len(type_names)
    ):
        raise InvalidCheckpointError(
            f"{config_path} is not a pyreft config (needs matching representations and intervention_types)",
            config_path,
        )
    if positions is None:
        warnings.warn(
            "pyreft checkpoints do not record positions; assuming 'l1' (pass positions=)", stacklevel=2
        )
        positions = "l1"
    entries = []
    counter: dict[tuple, int] = {}
    for representation, type_name in zip(representations, type_names):
        if isinstance(representation, Mapping):
            representation = [representation.get(field) for field in _PYREFT_FIELDS]
        match = re.search(r"(\w+Intervention)", str(type_name))
        kind = _PYREFT_TYPES.get(match.group(1) if match else "")
        if kind is None:
            raise InvalidCheckpointError(
                f"{config_path}: intervention type {type_name!r} has no reft_rs equivalent "
                f"(known: {', '.join(_PYREFT_TYPES)})",
                config_path,
            )
        key = _pyreft_key_files(src, representation, counter)
        entries.append((key, kind, representation))
    order = saved.get("sorted_keys")
    if isinstance(order, list) and sorted(order) == sorted(e[0] for e in entries):
        entries.sort(key=lambda e: order.index(e[0]))
    placements = [(r[0], r[1]) for _, _, r in entries]
    loaded = {key: _load_tensors(os.path.join(src, f"intkey_{key}.bin")) for key, _, _ in entries}
    converted_all = {
        key: _pyreft_tensors(kind, loaded[key], os.path.join(src, f"intkey_{key}.bin"))
        for key, kind, _ in entries
    }
    first = next(iter(converted_all.values()))
    width_seen = first.get("rotation", first.get("weight")).shape[1]
    class_path = re.search(r"transformers\.models\.(\w+)\.", str(saved.get("model_type", "")))
    identity, inferred = _identity(
        base_model,
        hidden_size=int(width_seen),
        layers=1 + max(int(r[0]) for _, _, r in entries),
        model_type=class_path.group(1) if class_path else "",
    )
    if share_weights is None:
        share_weights = all(placements.count(p) == 1 for p in placements)
    half = len(entries) // 2
    interventions, tensors = [], {}
    for index, (key, kind, representation) in enumerate(entries):
        converted = converted_all[key]
        dtype = _common_dtype(converted)
        rank = converted["bias"].shape[0] if "bias" in converted else converted["weight"].shape[0]
        width = (converted.get("rotation", converted.get("weight"))).shape[1]
        name = re.sub(r"[^A-Za-z0-9_-]", "_", key)
        item = InterventionConfig(
            layer=int(representation[0]),
            type=kind,
            component=str(representation[1]),
            positions=positions,
            low_rank_dimension=int(rank),
            share_weights=share_weights,
            group=0,
            activation=activation if kind in ("loreft", "noreft", "direft", "nodireft") else "identity",
            dropout=dropout,
            dtype=str(dtype).removeprefix("torch."),
            projection_bias="projection_bias" in converted,
            embed_dim=None if width == identity["hidden_size"] else int(width),
            name=name,
        )
        if item.group_count() == 2:
            item.group = 0 if index < half else 1
        interventions.append(item)
        for parameter, value in converted.items():
            tensors[f"{name}.{parameter}"] = value.to(dtype).contiguous()
    config = ReftConfig(interventions, metadata={"converted_from": "pyreft", "source": src})
    _save(dst, config, identity, inferred, tensors)
    return config


def from_red(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    base_model: Any = None,
) -> ReftConfig:
    """Converts RED's ``delta_vector.pth`` into a reft_rs checkpoint.

    Args:
        src: The ``.pth`` file, or a folder holding ``delta_vector.pth``.
        dst: Where to write the reft_rs checkpoint.
        base_model: The model RED was trained on (or its config, or a dict
            with ``hidden_size`` and ``num_hidden_layers``); inferred from the
            file when not given, as in :func:`from_pyreft`.

    Returns:
        The :class:`ReftConfig` written: one ``red`` intervention per wrapped
        module, on that module's output (``module_path``), every token.
    """
    src = os.fspath(src)
    path = os.path.join(src, "delta_vector.pth") if os.path.isdir(src) else src
    state = _load_tensors(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.fullmatch(r"(?:base_model\.)?(.+)\.delta_vector\.(activation_\w+)", key)
        if match is None:
            raise InvalidCheckpointError(f"{path}: unexpected tensor {key!r} (not a RED delta vector)", path)
        modules.setdefault(match.group(1), {})[match.group(2)] = value
    if not modules:
        raise InvalidCheckpointError(f"{path} holds no RED delta vectors", path)
    layer_of = {}
    for module_path in modules:
        numbers = re.findall(r"\.(\d+)\.", f".{module_path}.")
        if not numbers:
            raise InvalidCheckpointError(f"{path}: cannot tell the layer of {module_path!r}", path)
        layer_of[module_path] = int(numbers[0])
    widths = {
        parts.get("activation_scaling", parts.get("activation_bias")).shape[-1] for parts in modules.values()
    }
    identity, inferred = _identity(base_model, hidden_size=max(widths), layers=1 + max(layer_of.values()))
    interventions, tensors = [], {}
    for module_path, parts in modules.items():
        if "activation_ln" in "".join(parts):
            raise InvalidCheckpointError(
                f"{path}: RED's layer-norm variant ({module_path}) has no reft_rs equivalent", path
            )
        reference = parts.get("activation_scaling", parts.get("activation_bias"))
        width = reference.shape[-1]
        scale = parts.get("activation_scaling", torch.ones_like(reference)).reshape(width)
        bias = parts.get("activation_bias", torch.zeros_like(reference)).reshape(width)
        attention = re.search(r"attn|attention|o_proj", module_path) is not None
        name = "red_" + re.sub(r"[^A-Za-z0-9_-]", "_", module_path)
        interventions.append(
            InterventionConfig(
                layer=layer_of[module_path],
                type="red",
                component="attention_output" if attention else "mlp_output",
                module_path=module_path,
                dtype=str(scale.dtype).removeprefix("torch."),
                embed_dim=None if width == identity["hidden_size"] else int(width),
                name=name,
            )
        )
        tensors[f"{name}.scale"] = scale.contiguous()
        tensors[f"{name}.bias"] = bias.to(scale.dtype).contiguous()
    config = ReftConfig(interventions, metadata={"converted_from": "red", "source": path})
    _save(dst, config, identity, inferred, tensors)
    return config
