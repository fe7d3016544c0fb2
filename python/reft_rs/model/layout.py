"""Finding the module an intervention hooks, for any Hugging Face layout.

No table per model class: the layer stack is the ``nn.ModuleList`` whose
length is the config's ``num_hidden_layers`` (``model.layers`` in
Llama/Mistral/Qwen/Gemma decoders, ``transformer.h`` in GPT-2,
``encoder.layer`` in BERT/RoBERTa), and a layer's feed-forward and attention
blocks are its children with the conventional names (``mlp``,
``feed_forward``, ``ffn``, or BERT's ``output``; ``self_attn``, ``attn``,
``attention``). Anything else takes an explicit ``module_path``.

An encoder-decoder (``config.is_encoder_decoder``: T5, BART, mT5, ...) has
two stacks, and each intervention names its ``tower``: the stack is the
list of layers inside ``model.get_encoder()`` or ``model.get_decoder()``
as long as that stack's depth (``encoder_layers``/``num_layers``,
``decoder_layers``/``num_decoder_layers``). Their blocks are found by the
same names one level down as well (T5 keeps them in ``layer.N``:
``SelfAttention``, ``EncDecAttention``, ``DenseReluDense``; BART's
feed-forward block has no module of its own, so its output is ``fc2``'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import InterventionConfig
from ..errors import IncompatibleModelError

__all__ = [
    "HookSite",
    "find_layers",
    "image_token_id",
    "is_encoder_decoder",
    "resolve",
    "stack_depth",
    "stack_width",
    "vision_config",
]

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block", "output", "DenseReluDense", "fc2")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "SelfAttention")
_CROSS_ATTENTION_NAMES = (
    "encoder_attn",
    "EncDecAttention",
    "crossattention",
    "cross_attn",
    "cross_attention",
)
#: The depth of each stack of an encoder-decoder, by the config's names for it.
_DEPTH_NAMES = {
    "encoder": ("encoder_layers", "num_layers", "num_hidden_layers"),
    "decoder": ("decoder_layers", "num_decoder_layers", "num_layers", "num_hidden_layers"),
}
#: A vision-language model's vision encoder and language model, by their
#: conventional attribute names (LLaVA, Gemma 3: ``vision_tower``; Qwen2-VL:
#: ``visual``; Idefics3 / SmolVLM: ``vision_model``).
_VISION_NAMES = ("vision_tower", "visual", "vision_model")
_LANGUAGE_NAMES = ("language_model", "text_model")
#: Its projector from the vision encoder's states to the language model's
#: image tokens (LLaVA, Gemma 3: ``multi_modal_projector``; Idefics3 /
#: SmolVLM: ``connector``; Qwen2-VL: ``visual.merger``).
_PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger")


@dataclass(frozen=True)
class HookSite:
    """A module and whether its input or its output is edited."""

    path: str
    module: nn.Module
    edits_input: bool


def vision_config(model: nn.Module) -> Any:
    """A vision-language model's vision config, else ``None``."""
    return getattr(getattr(model, "config", None), "vision_config", None)


def image_token_id(model: nn.Module) -> int | None:
    """The id of a vision-language model's image placeholder token."""
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def model_dimensions(model: nn.Module) -> tuple[int, int]:
    """``(hidden_size, num_hidden_layers)`` from a Hugging Face config (a
    vision-language model's language model's)."""
    config = getattr(model, "config", None)
    if vision_config(model) is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    try:
        return int(config.hidden_size), int(config.num_hidden_layers)
    except (AttributeError, TypeError):
        raise IncompatibleModelError(
            "the model has no config with hidden_size and num_hidden_layers; "
            "give every intervention a module_path and embed_dim"
        ) from None


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` has an encoder and a decoder (T5, BART, ...)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def stack_depth(model: nn.Module, tower: str | None) -> int:
    """How many layers the stack ``tower`` of ``model`` has (``None``: the
    model's one stack)."""
    _, num_layers = model_dimensions(model)
    vision = vision_config(model)
    if tower == "projector":
        return 1
    if tower == "vision" and vision is not None:
        for name in ("num_hidden_layers", "depth"):
            value = getattr(vision, name, None)
            if isinstance(value, int) and value > 0:
                return value
    if tower is None or not is_encoder_decoder(model):
        return num_layers
    config = model.config
    for name in _DEPTH_NAMES[tower]:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return num_layers


def stack_width(model: nn.Module, tower: str | None) -> int:
    """The width of the states the stack ``tower`` passes between its layers
    (a vision encoder's, Qwen2-VL's ``embed_dim``, differ from the language
    model's hidden size)."""
    vision = vision_config(model)
    if tower == "vision" and vision is not None:
        for name in ("embed_dim", "hidden_size"):
            value = getattr(vision, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return model_dimensions(model)[0]


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records about the base model (``base_model``): its
    name or path, type and dimensions (an encoder-decoder's decoder depth
    too). The one rule, for saved adapters and converted checkpoints alike."""
    config = getattr(model, "config", None)
    hidden_size, num_layers = model_dimensions(model)
    identity: dict[str, Any] = {
        "name_or_path": str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""),
        "model_type": str(getattr(config, "model_type", "") or type(model).__name__),
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
    }
    if is_encoder_decoder(model):
        identity["num_hidden_layers"] = stack_depth(model, "encoder")
        identity["num_decoder_layers"] = stack_depth(model, "decoder")
    if vision_config(model) is not None:
        identity["num_vision_layers"] = stack_depth(model, "vision")
    return identity


def _named(model: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The shallowest submodule whose own name is one of ``names``."""
    found = [
        (path, module) for path, module in model.named_modules() if path and path.rsplit(".", 1)[-1] in names
    ]
    return min(found, key=lambda item: item[0].count(".")) if found else None


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


def find_layers(model: nn.Module, tower: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers and its dotted path; on an
    encoder-decoder, the stack of ``tower`` (which must then be given)."""
    num_layers = stack_depth(model, tower)
    root_path, root = "", model
    if vision_config(model) is not None:
        if tower not in (None, "vision"):
            raise IncompatibleModelError(
                f"tower={tower!r}: {type(model).__name__} is a vision-language model; its stacks are "
                "the language model (no tower) and tower='vision' (and its projector, tower='projector')"
            )
        found = _named(model, _VISION_NAMES if tower == "vision" else _LANGUAGE_NAMES)
        if found is None:
            what = "vision encoder" if tower == "vision" else "language model"
            raise IncompatibleModelError(
                f"cannot find the {what} of {type(model).__name__}; give the interventions a module_path"
            )
        root_path, root = found
    elif tower == "vision":
        raise IncompatibleModelError(
            f"tower='vision' names a vision-language model's vision encoder, but {type(model).__name__} "
            "has none; leave tower unset"
        )
    elif is_encoder_decoder(model):
        if tower is None:
            raise IncompatibleModelError(
                f"{type(model).__name__} is an encoder-decoder: give each intervention a tower, "
                "tower='encoder' or tower='decoder' (or a component such as 'encoder.block_output')"
            )
        getter = getattr(model, f"get_{tower}", None)
        stack = getter() if callable(getter) else None
        if not isinstance(stack, nn.Module):
            raise IncompatibleModelError(f"{type(model).__name__} has no get_{tower}() giving its {tower}")
        root = stack
        root_path = next((name for name, module in model.named_modules() if module is stack), "")
    elif tower is not None:
        raise IncompatibleModelError(
            f"tower={tower!r} names a stack of an encoder-decoder, but {type(model).__name__} has one "
            "stack of layers; leave tower unset"
        )
    candidates = [
        (name, module)
        for name, module in root.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if not candidates:
        where = f"the {tower} of " if tower else ""
        raise IncompatibleModelError(
            f"found no list of {num_layers} layers in {where}{type(model).__name__}; "
            "give the interventions an explicit module_path"
        )
    name, layers = min(candidates, key=lambda item: item[0].count("."))
    return ".".join(part for part in (root_path, name) if part), layers


def _child(layer: nn.Module, names: tuple[str, ...], what: str, layer_path: str) -> tuple[str, nn.Module]:
    """The block of ``layer`` named by the first of ``names`` found among its
    children, else the shallowest descendant so named (T5's ``layer.0.SelfAttention``)."""
    for name in names:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return name, child
    found = [
        (path, module) for path, module in layer.named_modules() if path and path.rsplit(".", 1)[-1] in names
    ]
    if found:
        return min(found, key=lambda item: (item[0].count("."), names.index(item[0].rsplit(".", 1)[-1])))
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
    if config.tower == "projector" and config.module_path is None:
        found = _named(model, _PROJECTOR_NAMES) if vision_config(model) is not None else None
        if found is None:
            raise IncompatibleModelError(
                f"{config.name}: {type(model).__name__} has no vision-language projector "
                f"(looked for: {', '.join(_PROJECTOR_NAMES)}); give a module_path"
            )
        return HookSite(found[0], found[1], False)
    if config.module_path is not None:
        path = config.module_path.replace("{layer}", str(config.layer))
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise IncompatibleModelError(f"{config.name}: the model has no module {path!r}") from None
        return HookSite(path, module, edits_input)
    layers_path, layers = layers if layers is not None else find_layers(model, config.tower)
    if config.layer >= len(layers):
        stack = f"the {config.tower}" if config.tower else "the model"
        raise IncompatibleModelError(
            f"{config.name}: layer {config.layer} does not exist; {stack} has {len(layers)} layers"
        )
    layer_path = f"{layers_path}.{config.layer}" if layers_path else str(config.layer)
    layer = layers[config.layer]
    if config.component in ("block_output", "block_input"):
        return HookSite(layer_path, layer, edits_input)
    names, what = {
        "mlp_output": (_MLP_NAMES, "feed-forward"),
        "attention_output": (_ATTENTION_NAMES, "attention"),
        "cross_attention_output": (_CROSS_ATTENTION_NAMES, "cross-attention"),
    }[config.component]
    name, module = _child(layer, names, what, layer_path)
    return HookSite(f"{layer_path}.{name}", module, False)
