"""What to intervene on: :class:`InterventionConfig` and :class:`ReftConfig`.

These dataclasses need no torch. They are checked when built, so a mistake
(an unknown type, a bad position spec, a rank of 0) fails at once with a
clear :class:`reft_rs.ConfigError`; placement against a real model (layer
count, hidden size) is checked by :func:`reft_rs.get_reft_model`.

Example::

    from reft_rs import ReftConfig, InterventionConfig

    # LoReFT rank 4 at the first and last 7 prompt tokens of four layers,
    # a prefix and a suffix intervention per layer (pyreft's layout):
    config = ReftConfig.for_layers([3, 9, 18, 24], low_rank_dimension=4, positions="f7+l7")

    # or one by one, any number per layer:
    config = ReftConfig([
        InterventionConfig(layer=8, type="loreft", low_rank_dimension=2, positions="l1"),
        InterventionConfig(layer=8, type="red"),
    ])
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _core
from ._core import PositionSpec
from .errors import ConfigError

__all__ = [
    "ACTIVATIONS",
    "COMPONENTS",
    "DTYPES",
    "INTERVENTION_TYPES",
    "LOW_RANK_TYPES",
    "TOWERS",
    "InterventionConfig",
    "ReftConfig",
]

# The schema belongs to the Rust core (the one owner of the checkpoint
# format); these are its tables, read once.
_SCHEMA = _core.schema()
#: Intervention types, in the spec's order.
INTERVENTION_TYPES = tuple(_SCHEMA["types"])
#: Types with a rank r (all but ``red`` and ``steer``).
LOW_RANK_TYPES = frozenset(name for name, kind in _SCHEMA["types"].items() if kind["low_rank"])
#: Where in a layer an intervention acts.
COMPONENTS = tuple(_SCHEMA["components"])
#: The stacks of an encoder-decoder an intervention may name.
TOWERS = tuple(_SCHEMA["towers"])
#: Activations of the learned source.
ACTIVATIONS = tuple(_SCHEMA["activations"])
#: Parameter dtypes.
DTYPES = tuple(_SCHEMA["dtypes"])
#: Types whose learned source is ``act(Wh + b)``, so ``bias`` may be turned off.
SOURCE_TYPES = frozenset(name for name, kind in _SCHEMA["types"].items() if kind["source"])


def _json_value(value: Any) -> Any:
    """numpy scalars (an ``np.int64`` layer, say) as the Python numbers they hold."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not a JSON value")


@dataclass
class InterventionConfig:
    """One intervention: where it acts and what it computes.

    Args:
        layer: Layer index, from 0.
        type: ``loreft`` (default), ``noreft``, ``direft``, ``nodireft``,
            ``consreft``, ``lobireft``, ``red`` or ``steer``.
        component: ``block_output`` (the residual stream after the layer,
            default), ``block_input``, ``mlp_output``, ``attention_output``,
            or on an encoder-decoder's decoder ``cross_attention_output``
            (its attention over the encoder's states). The tower may be
            written as a prefix: ``"encoder.block_output"``.
        tower: On an encoder-decoder (T5, BART, ...), the stack ``layer``
            counts in: ``"encoder"`` (positions count over the encoder's
            input) or ``"decoder"`` (positions count over the decoder's
            prompt-side tokens: its start token and any forced prefix).
            On a vision-language model (LLaVA, Qwen2-VL, Idefics3, Gemma 3)
            ``None`` is the language model and ``"vision"`` the vision
            encoder, whose every patch is edited (positions ``"all"``, at
            the encoder's own width); ``"projector"`` (layer 0,
            ``block_output``) edits every image feature the projector hands
            the language model. ``None`` for models with one stack.
        positions: Prompt positions edited: ``"f7+l7"``, ``"l1"``, ``"all"``,
            a list of indices... Defaults to ``"l1"`` (the last prompt token)
            for the ReFT types and ``"all"`` for ``red`` and ``steer``.
            ``"all"`` edits every token the model sees, prompt and generated.
            On a vision-language model the forms count over the prompt's
            text tokens only, and ``"image"``, ``"image:l4"``,
            ``"image:f2+l2"``... over its image tokens only.
        low_rank_dimension: Rank r of the ReFT types (required for them).
        share_weights: One intervention for both ends of ``f{p}+l{s}``
            instead of a prefix and a suffix one.
        group: Which position group this intervention reads (0 prefix or
            shared, 1 suffix). Leave ``None`` on a two-group spec to get both
            interventions from one config (see :class:`ReftConfig`).
        activation: Applied to the learned source ``Wh + b``: ``identity``,
            ``relu``, ``gelu``, ``gelu_tanh``, ``silu``, ``tanh``, ``sigmoid``.
        dropout: Dropout on the edited state during training (pyreft's
            placement: on the whole output).
        dtype: Parameter dtype, ``float32`` by default whatever the model's;
            the edit is computed in it and cast back.
        bias: Whether ``Wh + b`` has its bias b (the source types).
        projection_bias: ``noreft`` only: the bias b₂ of ``W₂h + b₂``.
        alpha: ``steer`` only: the scale of the steering vector.
        trainable: Whether the parameters train (``False`` freezes them, e.g.
            a fixed steering vector).
        embed_dim: Width of the edited state when it differs from the
            model's hidden size (explicit module paths only).
        module_path: Dotted path of the module to hook, for models whose
            layout is not recognised; ``{layer}`` is replaced by ``layer``
            (``"transformer.blocks.{layer}.ffn"``). The component then only
            says whether the module's input (``block_input``) or output is
            edited.
        name: Unique name; generated from the placement when ``None``.
        include_last: Whether the position spec may choose the last prompt
            token (``True``, the ReFT paper's scripts) or leaves it out
            (``False``, pyreft's library datasets). Recorded in checkpoints
            and used by training data, ``forward``, ``generate`` and the
            engine alike.

    Every field is checked by the Rust core when the config is built (the
    same check that saving and loading run), raising :class:`ConfigError`.
    """

    layer: int
    type: str = "loreft"
    component: str = "block_output"
    tower: str | None = None
    positions: str | list[int] | None = None
    low_rank_dimension: int | None = None
    share_weights: bool = False
    group: int | None = None
    activation: str = "identity"
    dropout: float = 0.0
    dtype: str = "float32"
    bias: bool = True
    projection_bias: bool = False
    alpha: float = 1.0
    trainable: bool = True
    embed_dim: int | None = None
    module_path: str | None = None
    name: str | None = None
    include_last: bool = True

    def __post_init__(self) -> None:
        entry = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in entry.items():  # JSON, the way into the core, has no NaN or infinity
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, found {value}")
        try:
            text = json.dumps(entry, default=_json_value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"intervention fields must be plain values: {error}") from None
        normalized = json.loads(_core.normalize_intervention(text))
        for name, value in normalized.items():
            if getattr(self, name) != value or type(getattr(self, name)) is not type(value):
                object.__setattr__(self, name, value)

    @property
    def position_spec(self) -> PositionSpec:
        """The parsed :class:`reft_rs.PositionSpec`."""
        return PositionSpec(self.positions)

    @property
    def every_token(self) -> bool:
        """True for ``positions="all"``: every token is edited, no locations needed."""
        return self.positions == "all"

    def group_count(self) -> int:
        """Position groups of this intervention's spec."""
        return self.position_spec.group_count(self.share_weights)

    def default_name(self) -> str:
        where = f"{self.tower}_" if self.tower else ""
        name = f"{where}layer_{self.layer}_{self.component}_{self.type}"
        if self.group_count() > 1:
            name += "_prefix" if self.group == 0 else "_suffix"
        return name

    def to_checkpoint(self) -> dict[str, Any]:
        """This intervention as a ``reft_config.json`` entry."""
        entry = dataclasses.asdict(self)
        entry["group"] = self.group or 0
        if entry["tower"] is None:  # one-stack models: the entry reads as before towers existed
            del entry["tower"]
        return entry

    @classmethod
    def from_checkpoint(cls, entry: Mapping[str, Any]) -> InterventionConfig:
        """Rebuilds an intervention from a ``reft_config.json`` entry."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in entry.items() if key in known})


@dataclass
class ReftConfig:
    """A set of interventions, applied in order.

    An :class:`InterventionConfig` with an unshared two-sided spec
    (``"f7+l7"``) and ``group=None`` stands for two interventions, a prefix
    one and a suffix one; it is expanded here.

    Args:
        interventions: The interventions (or one).
        trainable_head: For sequence classification: also train the model's
            classification head (``score`` / ``classifier``); it is saved in
            the checkpoint.
        metadata: Free-form information stored in checkpoints.
    """

    interventions: list[InterventionConfig] = field(default_factory=list)
    trainable_head: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.interventions, InterventionConfig):
            self.interventions = [self.interventions]
        expanded: list[InterventionConfig] = []
        for item in self.interventions:
            if isinstance(item, Mapping):
                item = InterventionConfig(**item)
            if not isinstance(item, InterventionConfig):
                raise ConfigError(
                    f"interventions must be InterventionConfig objects, found {type(item).__name__}"
                )
            if item.group is None and item.group_count() > 1:
                expanded.extend(dataclasses.replace(item, group=g) for g in range(item.group_count()))
            else:
                expanded.append(item)
        if not expanded:
            raise ConfigError("a ReftConfig needs at least one intervention")
        names: set[str] = set()
        for item in expanded:
            if item.name is None:
                base = item.default_name()
                name, counter = base, 1
                while name in names:
                    name, counter = f"{base}_{counter}", counter + 1
                item.name = name
            if item.name in names:
                raise ConfigError(f"two interventions are named {item.name!r}")
            names.add(item.name)
            if item.group is None:
                item.group = 0
        self.interventions = expanded

    @classmethod
    def for_layers(
        cls,
        layers: Iterable[int],
        *,
        type: str = "loreft",
        low_rank_dimension: int | None = 4,
        positions: str | list[int] | None = "f7+l7",
        share_weights: bool = False,
        component: str = "block_output",
        trainable_head: bool = False,
        **options: Any,
    ) -> ReftConfig:
        """The same intervention at several layers, in pyreft's order.

        With an unshared two-sided spec there are two interventions per
        layer, listed group by group: the prefix interventions of every
        layer, then the suffix ones.

        Args:
            layers: Layer indices.
            type, low_rank_dimension, positions, share_weights, component:
                As in :class:`InterventionConfig`; ``low_rank_dimension`` is
                ignored for ``red`` and ``steer``.
            trainable_head: As in :class:`ReftConfig`.
            options: Further :class:`InterventionConfig` fields (dropout, ...).
        """
        layers = list(layers)
        if type not in LOW_RANK_TYPES:
            low_rank_dimension = None
            if positions == "f7+l7":
                positions = "all"
        probe = InterventionConfig(
            layer=layers[0] if layers else 0,
            type=type,
            component=component,
            positions=positions,
            low_rank_dimension=low_rank_dimension,
            share_weights=share_weights,
            **options,
        )
        interventions = [
            dataclasses.replace(probe, layer=layer, group=group)
            for group in range(probe.group_count())
            for layer in layers
        ]
        return cls(interventions, trainable_head=trainable_head)

    @property
    def position_interventions(self) -> list[int]:
        """Indices of the interventions that read locations (not ``"all"``)."""
        return [i for i, item in enumerate(self.interventions) if not item.every_token]

    def shared_positions(self) -> tuple[str, bool, bool] | None:
        """``(positions, share_weights, include_last)`` shared by every
        intervention that reads locations, or ``None`` if there are none.
        Raises if they differ, since one grouped locations array cannot
        serve them all."""
        specs = {
            (item.positions, item.share_weights, item.include_last)
            for item in (self.interventions[i] for i in self.position_interventions)
        }
        if not specs:
            return None
        if len(specs) > 1:
            described = sorted(
                f"{positions!r} (share_weights={shared}, include_last={last})"
                for positions, shared, last in specs
            )
            raise ConfigError(
                f"the interventions use different position rules ({', '.join(described)}); "
                "pass one locations row per intervention instead"
            )
        return specs.pop()

    def to_checkpoint(self, base_model: Mapping[str, Any]) -> dict[str, Any]:
        """The ``reft_config.json`` contents for a model of the given identity."""
        config: dict[str, Any] = {
            "base_model": dict(base_model),
            "interventions": [item.to_checkpoint() for item in self.interventions],
            "metadata": {**self.metadata, "trainable_head": self.trainable_head},
        }
        return config

    @classmethod
    def from_checkpoint(cls, config: Mapping[str, Any]) -> ReftConfig:
        """Rebuilds the config stored in a checkpoint."""
        metadata = dict(config.get("metadata") or {})
        trainable_head = bool(metadata.pop("trainable_head", False))
        items = [InterventionConfig.from_checkpoint(entry) for entry in config["interventions"]]
        return cls(items, trainable_head=trainable_head, metadata=metadata)
