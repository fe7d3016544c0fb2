"""Finding the module an intervention hooks, for any Hugging Face layout.

No table per model class: the layer stack is the ``nn.ModuleList`` whose
length is the config's ``num_hidden_layers`` (``model.layers`` in
Llama/Mistral/Qwen/Gemma decoders, ``transformer.h`` in GPT-2,
``encoder.layer`` in BERT/RoBERTa), and a layer's feed-forward and attention
blocks are its children with the conventional names (``mlp``,
``feed_forward``, ``ffn``, or BERT's ``output``; ``self_attn``, ``attn``,
``attention``). Anything else takes an explicit ``module_path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import InterventionConfig
from ..errors import IncompatibleModelError

__all__ = ["HookSite", "find_layers", "resolve"]

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block", "output")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


@dataclass(frozen=True)
class HookSite:
    """A module and whether its input or its output is edited."""

    path: str
    module: nn.Module
    edits_input: bool


def model_dimensions(model: nn.Module) -> tuple[int, int]:
    """``(hidden_size, num_hidden_layers)`` from a Hugging Face config."""
    config = getattr(model, "config", None)
    try:
        return int(config.hidden_size), int(config.num_hidden_layers)
    except (AttributeError, TypeError):
        raise IncompatibleModelError(
            "the model has no config with hidden_size and num_hidden_layers; "
            "give every intervention a module_path and embed_dim"
        ) from None


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records about the base model (``base_model``): its
    name or path, type and dimensions. The one rule, for saved adapters and
    converted checkpoints alike."""
    config = getattr(model, "config", None)
    hidden_size, num_layers = model_dimensions(model)
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""),
        "model_type": str(getattr(config, "model_type", "") or type(model).__name__),
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
    }


#: Where Hugging Face sequence classifiers keep their head.
HEAD_NAMES = ("score", "classifier")


def find_head(model: nn.Module) -> nn.Module:
    """A sequence classifier's head (``score`` or ``classifier``)."""
    from ..errors import ConfigError

    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ConfigError(
        f"trainable_head is set but {type(model).__name__} has no classification head "
        f"(looked for: {', '.join(HEAD_NAMES)})"
    )


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers and its dotted path."""
    _, num_layers = model_dimensions(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if not candidates:
        raise IncompatibleModelError(
            f"found no list of {num_layers} layers in {type(model).__name__}; "
            "give the interventions an explicit module_path"
        )
    return min(candidates, key=lambda item: item[0].count("."))


def _child(layer: nn.Module, names: tuple[str, ...], what: str, layer_path: str) -> tuple[str, nn.Module]:
    for name in names:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return name, child
    children = ", ".join(name for name, _ in layer.named_children())
    raise IncompatibleModelError(
        f"cannot find the {what} block of {layer_path} (children: {children}); "
        "give the intervention an explicit module_path"
    )


def resolve(
    model: nn.Module, config: InterventionConfig, layers: tuple[str, nn.ModuleList] | None = None
) -> HookSite:
    """Where ``config`` hooks into ``model``; ``layers`` is :func:`find_layers`'s
    answer when the caller already has it."""
    edits_input = config.component == "block_input"
    if config.module_path is not None:
        path = config.module_path.replace("{layer}", str(config.layer))
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise IncompatibleModelError(f"{config.name}: the model has no module {path!r}") from None
        return HookSite(path, module, edits_input)
    layers_path, layers = layers if layers is not None else find_layers(model)
    if config.layer >= len(layers):
        raise IncompatibleModelError(
            f"{config.name}: layer {config.layer} does not exist; the model has {len(layers)} layers"
        )
    layer_path = f"{layers_path}.{config.layer}" if layers_path else str(config.layer)
    layer = layers[config.layer]
    if config.component in ("block_output", "block_input"):
        return HookSite(layer_path, layer, edits_input)
    names, what = (
        (_MLP_NAMES, "feed-forward") if config.component == "mlp_output" else (_ATTENTION_NAMES, "attention")
    )
    name, module = _child(layer, names, what, layer_path)
    return HookSite(f"{layer_path}.{name}", module, False)
