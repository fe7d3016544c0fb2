"""Importers: pyreft checkpoints and RED's ``delta_vector.pth`` to reft_rs checkpoints.

Both formats are read without unpickling code: JSON for pyreft's config, and
``torch.load(weights_only=True)`` for the tensor files, which refuses anything
but tensors and plain containers.

pyreft (0.1.0, on pyvene) writes a folder with ``config.json`` (its
``representations`` as positional lists: layer, component, unit,
max_number_of_units, low_rank_dimension, ...; ``intervention_types`` as class
names) and one ``intkey_<key>.bin`` per intervention, keyed by pyvene's rule
(``layer_{l}_comp_{c}_unit_pos_nunit_1#{k}`` from pyvene 0.1.7 on,
``layer.{l}.comp.{c}.unit.pos.nunit.1#{k}`` before, ``k`` counting repeats
of the same placement in the order of ``representations``). It records
neither the positions, nor dropout, activation or the base model's size;
pass them.

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

from .. import _core
from ..config import SOURCE_TYPES, InterventionConfig, ReftConfig
from ..errors import CheckpointNotFoundError, ConfigError, InvalidCheckpointError, MissingDependencyError
from . import checkpoint
from .checkpoint import base_identity as _identity

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


#: The first torch whose ``torch.load(weights_only=True)`` cannot be made to
#: run code (CVE-2025-32434 bypasses it in earlier releases).
SAFE_TORCH = (2, 6)


def _torch_version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    if _torch_version(torch.__version__) < SAFE_TORCH:
        raise MissingDependencyError(
            f"reading {os.path.basename(path)} needs torch >= {SAFE_TORCH[0]}.{SAFE_TORCH[1]} "
            f"(torch {torch.__version__} is installed): before it, torch.load(weights_only=True) "
            "can be made to run code from the file (CVE-2025-32434). "
            "pip install 'torch>=2.6', or convert the file on a machine that has it"
        )
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
    for name, value in (("original", original), ("0.base", base)):
        _check_matrix(value, f"rotate_layer.parametrizations.weight.{name}", where)
    hidden, rank = original.shape
    if hidden < rank or base.shape != (hidden, hidden):
        raise InvalidCheckpointError(
            f"{where}: the rotation's parametrization tensors have shapes {list(original.shape)} and "
            f"{list(base.shape)}; torch's orthogonal parametrization saves [hidden, rank] and "
            "[hidden, hidden]",
            where,
        )
    return _orthogonal_weight(original, base).T


def _check_matrix(value: torch.Tensor, name: str, where: str, axes: int = 2) -> None:
    """A real floating tensor with ``axes`` axes, none of them empty."""
    if not value.is_floating_point():
        raise InvalidCheckpointError(
            f"{where}: {name} holds {value.dtype}, not floating-point numbers", where
        )
    if value.dim() != axes or 0 in value.shape:
        expected = "[rank, hidden]" if axes == 2 else "[rank]"
        raise InvalidCheckpointError(
            f"{where}: {name} has shape {list(value.shape)}; the intervention needs {expected}", where
        )


def _check_pyreft_shapes(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """The converted tensors of one intervention agree on its rank and width."""
    for name, value in tensors.items():
        _check_matrix(value, name, where, axes=1 if name in ("bias", "projection_bias") else 2)
    ranks = {name: value.shape[0] for name, value in tensors.items()}
    widths = {name: value.shape[1] for name, value in tensors.items() if value.dim() == 2}
    if len(set(ranks.values())) != 1 or len(set(widths.values())) != 1:
        shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in tensors.items())
        raise InvalidCheckpointError(f"{where}: the tensors disagree on rank or width ({shapes})", where)


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


def _pyreft_checked(kind: str, state: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The reft_rs tensors of one pyreft intervention, their shapes checked."""
    tensors = _pyreft_tensors(kind, state, where)
    unused = {}
    if kind == "nodireft" and "proj_layer.bias" in state:
        # pyreft's NoDiReFT builds this bias but its forward uses only the
        # weight: a damaged one is still a damaged file.
        unused["projection_bias"] = state["proj_layer.bias"]
    _check_pyreft_shapes({**tensors, **unused}, where)
    return tensors


def _common_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values()}
    # pyreft keeps W and b in bfloat16 beside a float32 R; widening is exact.
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


_PYREFT_COMPONENTS = ("block_output", "block_input", "mlp_output", "attention_output")


def _pyreft_representations(
    saved: Mapping[str, Any], config_path: str
) -> list[tuple[int, str, str, int, Any]]:
    """``(layer, component, unit, max_number_of_units, low_rank_dimension)``
    of each entry of pyreft's ``representations``, checked, in their order."""

    def bad(reason: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(f"{config_path}: {reason}", config_path)

    representations = saved.get("representations")
    type_names = saved.get("intervention_types")
    if not isinstance(representations, list) or not isinstance(type_names, list):
        raise bad("not a pyreft config (needs representations and intervention_types lists)")
    if not representations:
        raise bad("the representations list is empty: there is nothing to convert")
    if len(representations) != len(type_names):
        raise bad(f"{len(representations)} representations but {len(type_names)} intervention_types")
    out = []
    for index, representation in enumerate(representations):
        if isinstance(representation, Mapping):
            representation = [representation.get(name) for name in _PYREFT_FIELDS]
        if not isinstance(representation, list) or len(representation) < 4:
            raise bad(f"representations[{index}] is not a pyreft representation: {representation!r}")
        layer, component, unit, units = representation[:4]
        rank = representation[4] if len(representation) > 4 else None
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise bad(f"representations[{index}]: layer must be a non-negative integer, found {layer!r}")
        if not isinstance(component, str) or not isinstance(unit, str):
            raise bad(f"representations[{index}]: component and unit must be strings")
        if isinstance(units, bool) or not isinstance(units, int):
            raise bad(f"representations[{index}]: max_number_of_units must be an integer, found {units!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise bad(
                f"representations[{index}]: low_rank_dimension must be a positive integer, found {rank!r}"
            )
        out.append((layer, component, unit, units, rank))
    return out


def _pyreft_keys(representations: list[tuple[int, str, str, int, Any]]) -> list[tuple[str, str]]:
    """Each representation's key under pyvene's two naming rules: 0.1.7 on
    (``layer_{l}_comp_{c}_unit_{u}_nunit_{n}#{k}``, dots in the component
    and unit turned into ``_``) and up to 0.1.6
    (``layer.{l}.comp.{c}.unit.{u}.nunit.{n}#{k}``). ``k`` counts earlier
    representations with the same key, from 0; a component given as a module
    path has no layer in its key."""
    counters: tuple[dict[str, int], dict[str, int]] = ({}, {})
    keys = []
    for layer, component, unit, units, _ in representations:
        if "." in component:
            proposals = (
                f"comp_{component.replace('.', '_')}_unit_{unit.replace('.', '_')}_nunit_{units}",
                f"comp.{component}.unit.{unit}.nunit.{units}",
            )
        else:
            proposals = (
                f"layer_{layer}_comp_{component}_unit_{unit.replace('.', '_')}_nunit_{units}",
                f"layer.{layer}.comp.{component}.unit.{unit}.nunit.{units}",
            )
        pair = []
        for proposal, counter in zip(proposals, counters):
            counter[proposal] = counter.get(proposal, -1) + 1
            pair.append(f"{proposal}#{counter[proposal]}")
        keys.append((pair[0], pair[1]))
    return keys


def _pyreft_file(folder: str, keys: tuple[str, str], where: str) -> tuple[str, str]:
    """``(key, path)`` of the tensor file of one intervention, which must lie
    in ``folder`` itself (keys come from the config: a component such as
    ``../x`` must not reach outside)."""
    root = os.path.realpath(folder)
    for key in keys:
        name = f"intkey_{key}.bin"
        path = os.path.join(root, name)
        if (
            os.sep in name
            or (os.altsep and os.altsep in name)
            or os.path.dirname(os.path.realpath(path)) != root
        ):
            raise InvalidCheckpointError(f"{where}: the key {key!r} names a file outside {folder}", folder)
        if os.path.isfile(path):
            return key, path
    raise CheckpointNotFoundError(
        f"no tensor file for {where} in {folder} (looked for intkey_{keys[0]}.bin and intkey_{keys[1]}.bin)",
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
    include_last: bool = True,
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
            inferred: an intervention placed twice (same layer and
            component) means they did not.
        dropout, activation: The training options pyreft does not record.
        include_last: ``False`` for a model trained on pyreft's library
            datasets, which leave the last prompt token out of the positions
            (its example scripts keep it: the default).

    Returns:
        The :class:`ReftConfig` written. Interventions keep the order of
        pyreft's ``representations`` list, the order pyreft reads its
        locations in when it loads a checkpoint. With an unshared two-sided
        spec (``f7+l7``) pyreft gives the first half of that list the first
        positions and the second half the last ones, whatever their layers;
        so does the conversion. ``metadata["pyreft"]`` records which pyreft
        key became which intervention and position group.

    Raises:
        InvalidCheckpointError: Not a pyreft folder, a representation that
            reft_rs cannot express, or an odd number of interventions for an
            unshared two-sided spec.
        CheckpointNotFoundError: A missing ``config.json`` or tensor file.
    """
    src = os.fspath(src)
    config_path = os.path.join(src, "config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"checkpoint file not found: {config_path}", config_path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidCheckpointError(f"{config_path} is not valid JSON: {error}", config_path) from None
    if not isinstance(saved, Mapping):
        raise InvalidCheckpointError(f"{config_path} is not a pyreft config (not a JSON object)", config_path)
    representations = _pyreft_representations(saved, config_path)
    if positions is None:
        warnings.warn(
            "pyreft checkpoints do not record positions; assuming 'l1' (pass positions=)", stacklevel=2
        )
        positions = "l1"
    kinds = []
    for index, ((layer, component, unit, units, _), type_name) in enumerate(
        zip(representations, saved["intervention_types"])
    ):
        where = f"representations[{index}] (layer {layer}, {component})"
        match = re.search(r"(\w+Intervention)", str(type_name))
        kind = _PYREFT_TYPES.get(match.group(1) if match else "")
        if kind is None:
            raise InvalidCheckpointError(
                f"{config_path}: {where}: intervention type {type_name!r} has no reft_rs equivalent "
                f"(known: {', '.join(_PYREFT_TYPES)})",
                config_path,
            )
        if component not in _PYREFT_COMPONENTS:
            raise InvalidCheckpointError(
                f"{config_path}: {where}: component {component!r} has no reft_rs equivalent "
                f"(known: {', '.join(_PYREFT_COMPONENTS)})",
                config_path,
            )
        if unit != "pos" or units != 1:
            raise InvalidCheckpointError(
                f"{config_path}: {where}: unit {unit!r} with {units} units is not a token-position "
                "intervention (reft_rs converts unit 'pos', 1 unit)",
                config_path,
            )
        kinds.append(kind)
    files = [
        _pyreft_file(src, keys, f"representations[{index}]")
        for index, keys in enumerate(_pyreft_keys(representations))
    ]
    order = saved.get("sorted_keys")
    if isinstance(order, list) and order != [key for key, _ in files]:
        warnings.warn(
            f"{config_path}: sorted_keys list the interventions in another order than representations; "
            "pyreft reads locations in the order of representations when it loads a checkpoint, and so "
            "does this conversion (a model trained with its own sort order may have used the other)",
            stacklevel=2,
        )
    converted_all = [
        _pyreft_checked(kind, _load_tensors(path), path) for kind, (_, path) in zip(kinds, files)
    ]
    width_seen = converted_all[0].get("rotation", converted_all[0].get("weight")).shape[1]
    class_path = re.search(r"transformers\.models\.(\w+)\.", str(saved.get("model_type", "")))
    identity, inferred = _identity(
        base_model,
        hidden_size=int(width_seen),
        layers=1 + max(r[0] for r in representations),
        model_type=class_path.group(1) if class_path else "",
    )
    placements = [(r[0], r[1]) for r in representations]
    if share_weights is None:
        share_weights = len(set(placements)) == len(placements)
    try:
        groups = _core.PositionSpec(positions).group_count(share_weights)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"positions: {error}") from None
    count = len(representations)
    if groups == 2 and count % 2:
        raise InvalidCheckpointError(
            f"{config_path}: {count} interventions cannot be split into pyreft's prefix and suffix halves "
            f"for the unshared spec {positions!r}; an unshared two-sided spec needs an even number "
            "(pass share_weights=True if they were shared)",
            config_path,
        )
    interventions, tensors, mapping, names = [], {}, [], set()
    for index, ((key, _), kind, representation, converted) in enumerate(
        zip(files, kinds, representations, converted_all)
    ):
        layer, component, _, _, recorded_rank = representation
        dtype = _common_dtype(converted)
        rank = converted["bias"].shape[0] if "bias" in converted else converted["weight"].shape[0]
        if recorded_rank is not None and recorded_rank != rank:
            raise InvalidCheckpointError(
                f"{config_path}: representations[{index}] records rank {recorded_rank}, "
                f"but intkey_{key}.bin holds rank {rank}",
                config_path,
            )
        width = (converted.get("rotation", converted.get("weight"))).shape[1]
        base_name = re.sub(r"[^A-Za-z0-9_-]", "_", key)
        name, suffix = base_name, 1
        while name in names:
            name, suffix = f"{base_name}_{suffix}", suffix + 1
        names.add(name)
        # pyreft's rule: the first half of the representations read the
        # first positions, the second half the last ones.
        group = (0 if index < count // 2 else 1) if groups == 2 else 0
        item = InterventionConfig(
            layer=int(layer),
            type=kind,
            component=component,
            positions=positions,
            low_rank_dimension=int(rank),
            share_weights=share_weights,
            group=group,
            activation=activation if kind in SOURCE_TYPES else "identity",
            dropout=dropout,
            dtype=str(dtype).removeprefix("torch."),
            projection_bias="projection_bias" in converted,
            embed_dim=None if width == identity["hidden_size"] else int(width),
            name=name,
            include_last=include_last,
        )
        interventions.append(item)
        mapping.append({"key": key, "intervention": name, "group": group, "type": kind})
        for parameter, value in converted.items():
            tensors[f"{name}.{parameter}"] = value.to(dtype).contiguous()
    config = ReftConfig(
        interventions, metadata={"converted_from": "pyreft", "source": src, "pyreft_keys": mapping}
    )
    checkpoint.save_converted(dst, config, identity, inferred, tensors)
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
        if (
            not value.is_floating_point()
            or value.dim() == 0
            or value.shape[-1] == 0
            or any(size != 1 for size in value.shape[:-1])
        ):
            raise InvalidCheckpointError(
                f"{path}: {key} has shape {list(value.shape)} and dtype {value.dtype}; RED saves a "
                "floating-point [1, hidden] vector",
                path,
            )
        modules.setdefault(match.group(1), {})[match.group(2)] = value
    for module_path, parts in modules.items():
        if len({value.shape[-1] for value in parts.values()}) != 1:
            shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in parts.items())
            raise InvalidCheckpointError(f"{path}: {module_path}'s vectors differ in width ({shapes})", path)
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
    checkpoint.save_converted(dst, config, identity, inferred, tensors)
    return config
