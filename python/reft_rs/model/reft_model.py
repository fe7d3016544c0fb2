"""A frozen Hugging Face model with interventions attached: :class:`ReftModel`.

Interventions act through forward hooks (pre-hooks for ``block_input``)
that reft_rs registers and removes itself; hooks that other code put on the
model are never touched. The hooks do nothing unless the model is called
through the :class:`ReftModel` (``reft_model(...)``, ``reft_model.generate``),
so ``reft_model.model`` still behaves as the original model.

Locations (which tokens each intervention edits) are integer arrays of shape
``(num_interventions, batch, positions)`` with -1 in unused slots, or the
grouped ``(groups, batch, positions)`` array from
:func:`reft_rs.positions.locate`, mapped to interventions by their ``group``.
They are moved to the model's device once per call; each hook gathers the
chosen states with ``index_select``, edits them and writes them back with
``index_copy``, so masked slots and every other token are left untouched.
Each group's row indices are computed once per call and shared by the
interventions of every layer.
Interventions whose positions are ``"all"`` (RED, steering vectors) edit every
token and need no locations.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _core
from ..config import InterventionConfig, ReftConfig
from ..errors import ConfigError, IncompatibleModelError, InvalidCheckpointError, LocationError, ShapeError
from ..io import checkpoint
from ..positions import IGNORE_INDEX, locate, locate_in_tokens
from . import gradient_checkpointing, merge
from .hooks import Calls, CallState, Hook
from .interventions import Intervention, inference_call
from .layout import (
    HookSite,
    find_head,
    find_layers,
    image_token_id,
    is_encoder_decoder,
    model_dimensions,
    model_identity,
    resolve,
    stack_depth,
    stack_width,
    vision_config,
)
from .prefix_cache import PrefixCache, applies, cached_forward

__all__ = ["ReftModel", "get_reft_model"]


class ReftModel(nn.Module):
    """A frozen model plus interventions. Build it with :func:`get_reft_model`.

    Args:
        model: The model; its parameters are frozen.
        config: The interventions.
        initialize: Draw the interventions' starting values (``False`` leaves
            them uninitialised, for callers that load them right away).

    Attributes:
        model: The wrapped Hugging Face model (frozen).
        reft_config: The :class:`ReftConfig`.
        interventions: One :class:`reft_rs.model.interventions.Intervention` per
            config entry, in order.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ReftConfig,
        *,
        initialize: bool = True,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        self.model = model
        #: Every adapter's interventions, by name; one is active at a time.
        self.adapters = nn.ModuleDict()
        self._configs: dict[str, ReftConfig] = {}
        self._adapter_sites: dict[str, dict[int, str]] = {}
        self._adapter_hooks: dict[str, list[tuple[nn.Module, int]]] = {}
        self._trainable: dict[str, bool] = {}
        self._active_name = adapter_name
        self._disabled = False
        self.head: nn.Module | None = None
        #: The call in progress on each thread (one model may be called from
        #: several threads at once), read by the hooks.
        self.calls = Calls()
        # (module, hook id) pairs of the hook on the whole model. The hooks are
        # objects that refer back to this model, so a deep copy of the
        # ReftModel carries working hooks of its own.
        self._hook_ids: list[tuple[nn.Module, int]] = []
        self._add(adapter_name, config, initialize=initialize)  # checks the config first
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        handle = self.model.register_forward_pre_hook(Hook(self, "call", [], None), with_kwargs=True)
        self._hook_ids.append((self.model, handle.id))
        self._set_trainable()
        parameters = inspect.signature(model.forward).parameters
        self._accepts_position_ids = "position_ids" in parameters
        self._takes_any_keyword = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    # ------------------------------------------------------------------ adapters

    @property
    def interventions(self) -> nn.ModuleList:
        """The active adapter's interventions, one per config entry, in order."""
        return self.adapters[self._active_name]

    @property
    def reft_config(self) -> ReftConfig:
        """The active adapter's :class:`ReftConfig`."""
        return self._configs[self._active_name]

    @property
    def active_adapter(self) -> str:
        """The name of the adapter that edits the model's calls."""
        return self._active_name

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter's name, in the order they were added."""
        return list(self._configs)

    @property
    def _sites(self) -> dict[int, str]:
        return self._adapter_sites[self._active_name]

    def _add(self, name: str, config: ReftConfig, *, initialize: bool) -> None:
        """Builds and hooks an adapter (not made active)."""
        if not isinstance(name, str) or not name or any(c in name for c in "./\\:\0"):
            # save_pretrained writes adapter `name` to path/name: a name that
            # is a path would write outside the folder.
            raise ConfigError(
                f"an adapter name must be a non-empty string without '.', '/', '\\', ':' "
                f"or NUL (it names a subfolder when saved), found {name!r}"
            )
        if name in self._configs:
            raise ConfigError(f"an adapter named {name!r} already exists; delete_adapter it first")
        model = self.model
        hidden_size, _ = _dimensions_or_none(model)
        for item in config.interventions:
            if item.embed_dim is None and hidden_size is None:
                raise ConfigError(f"{item.name}: the model has no hidden_size; set embed_dim")
        if self._configs and (config.trainable_head or self.head is not None):
            raise ConfigError(
                f"adapter {name!r}: an adapter that trains the model's classification head cannot sit "
                "beside another adapter (they would share one head); load it on its own model"
            )
        _validate_against_model(model, config)
        for item in config.interventions:
            if item.tower == "vision" and item.embed_dim is None and item.module_path is None:
                # The vision encoder's width, recorded so that the checkpoint
                # says the shape of its tensors.
                item.embed_dim = stack_width(model, "vision")
        device = _device_of(model)
        self.adapters[name] = nn.ModuleList(
            Intervention(item, item.embed_dim or hidden_size, device, initialize=initialize)
            for item in config.interventions
        )
        self._configs[name] = config
        self._trainable[name] = True
        if config.trainable_head:
            self.head = find_head(model)
        self._register_hooks(name)

    def add_adapter(
        self, adapter_name: str, config: ReftConfig | InterventionConfig | Sequence[InterventionConfig]
    ) -> None:
        """Adds a fresh, trainable adapter; :meth:`set_adapter` makes it the active one.

        Raises:
            ConfigError: The name is taken or invalid, or the config does not
                fit the model.
        """
        self._add(adapter_name, _as_config(config), initialize=True)
        self._set_trainable()

    def load_adapter(
        self,
        path: str | os.PathLike[str],
        adapter_name: str,
        *,
        is_trainable: bool = False,
        strict: bool = True,
    ) -> None:
        """Loads a saved checkpoint as another adapter of this model (not made
        active; see :meth:`set_adapter`). Its parameters are frozen unless
        ``is_trainable``.

        Raises:
            IncompatibleModelError: The checkpoint does not fit the model.
            CheckpointError: The checkpoint is missing or damaged.
            ConfigError: The name is taken or invalid.
        """
        reft_config, tensors = _read_checkpoint(self.model, path, strict)
        self._add(adapter_name, reft_config, initialize=False)
        try:
            self.load_tensors(tensors, adapter_name=adapter_name)
        except Exception:
            self._drop(adapter_name)
            raise
        self._trainable[adapter_name] = is_trainable
        self._set_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Makes ``adapter_name`` the adapter that edits the model's calls (and
        the one that trains: the others are frozen)."""
        self._require(adapter_name)
        self._active_name = adapter_name
        self.__dict__.pop("_prefix_cache_blocker", None)
        self._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter, its hooks and its parameters. Deleting the
        active adapter makes the first remaining one active."""
        self._require(adapter_name)
        if len(self._configs) == 1:
            raise ConfigError(
                f"{adapter_name!r} is the only adapter; remove_hooks() gives the model back instead"
            )
        self._drop(adapter_name)
        if adapter_name == self._active_name:
            self.set_adapter(next(iter(self._configs)))

    def _drop(self, name: str) -> None:
        _remove(self._adapter_hooks.pop(name, []))
        del self.adapters[name]
        for table in (self._configs, self._adapter_sites, self._trainable):
            table.pop(name, None)

    def _require(self, name: str) -> None:
        if name not in self._configs:
            raise ConfigError(f"no adapter named {name!r}; the adapters are {self.adapter_names}")

    def _set_trainable(self) -> None:
        """Only the active adapter trains, and only if it was made trainable."""
        for name, interventions in self.adapters.items():
            train = name == self._active_name and self._trainable[name]
            for intervention in interventions:
                intervention.requires_grad_(train and intervention.config.trainable)
        if self.head is not None:
            self.head.requires_grad_(self._trainable[self._active_name])

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model gives the base model's exact outputs
        (the hooks stay registered and do nothing); the edits come back after it.

        Example::

            with reft_model.disable_adapter():
                base_logits = reft_model(input_ids).logits
        """
        previous = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = previous

    # ------------------------------------------------------------------ activation checkpointing

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Turns on the wrapped model's gradient (activation) checkpointing so
        that the edits are replayed exactly when layers are recomputed
        (what ``TrainingArguments(gradient_checkpointing=True)`` calls)."""
        gradient_checkpointing.enable(self, gradient_checkpointing_kwargs, kwargs)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """The newer name of :meth:`gradient_checkpointing_enable` (transformers 5.x)."""
        gradient_checkpointing.enable(self, activation_checkpointing_kwargs, kwargs)

    def gradient_checkpointing_disable(self) -> None:
        gradient_checkpointing.disable(self)

    def activation_checkpointing_disable(self) -> None:
        gradient_checkpointing.disable(self)

    # ------------------------------------------------------------------ attributes

    def __getattr__(self, name: str) -> Any:
        """Parameters, buffers and modules, then, as peft does, the wrapped
        model's own attributes (``reft_model.generation_config``, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or (name.startswith("__") and name.endswith("__")):
                raise
            model = super().__getattr__("model")
            return getattr(model, name)

    # ------------------------------------------------------------------ hooks

    def _register_hooks(self, name: str) -> None:
        sites: dict[tuple[int, bool], tuple[HookSite, list[int]]] = {}
        stacks: dict[str | None, tuple[str, nn.ModuleList]] = {}
        for index, item in enumerate(self._configs[name].interventions):
            if item.module_path is None and item.tower != "projector" and item.tower not in stacks:
                stacks[item.tower] = find_layers(self.model, item.tower)
            site = resolve(self.model, item, stacks.get(item.tower))
            key = (id(site.module), site.edits_input)
            sites.setdefault(key, (site, []))[1].append(index)
        handles = self._adapter_hooks.setdefault(name, [])
        for site, indices in sites.values():
            hook = Hook(self, "input" if site.edits_input else "output", indices, name)
            if site.edits_input:
                handle = site.module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                handle = site.module.register_forward_hook(hook)
            handles.append((site.module, handle.id))
        self._adapter_sites[name] = {
            index: site.path for site, indices in sites.values() for index in indices
        }

    def _apply_one(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        intervention = self.interventions[index]
        if hidden.shape[-1] != intervention.dim:
            raise ShapeError(
                f"{intervention.config.name}: {self._sites[index]} gives states of width "
                f"{hidden.shape[-1]}, but the intervention edits width {intervention.dim}"
            )
        state = self.calls.current
        assert state is not None
        dropout = state.prompt_length is None  # never while generating
        strength = state.strength
        if intervention.config.every_token:
            return _scaled(hidden, intervention(hidden, dropout=dropout), strength).to(hidden.dtype)
        source = state.sources[index]
        # An encoder reads the whole input in one call, before any decoding.
        encoder = intervention.config.tower == "encoder"
        if source is not None:
            flat = self._flat_indices(source, hidden.shape[0], hidden.shape[1], encoder)
            if flat is not None:
                hidden = _edit_rows(hidden, flat, intervention, dropout, strength)
        if state.intervene_generated and state.prompt_length is not None and not encoder:
            start = max(state.prompt_length - state.offset, 0)
            if start < hidden.shape[1]:
                tail = hidden[:, start:]
                generated = _scaled(tail, intervention(tail, dropout=False), strength).to(hidden.dtype)
                hidden = torch.cat([hidden[:, :start], generated], dim=1)
        return hidden

    def _flat_indices(
        self, source: torch.Tensor, batch: int, length: int, encoder: bool = False
    ) -> torch.Tensor | None:
        """Rows of the flattened ``(batch * length, d)`` states that ``source``
        chooses in this forward call, or ``None`` if none. Computed once per
        call for each group (one host sync on an accelerator). ``encoder``:
        the states are an encoder's, whose tokens always start at 0."""
        state = self.calls.current
        key = id(source)
        if key not in state.indices:
            offset = 0 if encoder else state.offset
            if not encoder and state.prompt_length is not None and offset >= state.prompt_length:
                state.indices[key] = None  # a decoding step: the prompt is in the cache
            else:
                local = source - offset
                valid = (source >= 0) & (local >= 0) & (local < length)
                rows = torch.arange(batch, device=source.device).unsqueeze(1) * length
                chosen = torch.masked_select(rows + local, valid)
                state.indices[key] = chosen if chosen.numel() else None
        return state.indices[key]

    # ------------------------------------------------------------------ for the package's helpers
    # The hooks, gradient checkpointing (gradient_checkpointing.py), merging
    # (merge.py) and prefix caching (prefix_cache.py) work through these and
    # ``calls``: the interface hooks.Hooked names.

    def site_paths(self) -> list[str]:
        """The module path each intervention of the active adapter edits, in
        config order."""
        return [self._sites[index] for index in range(len(self.reft_config.interventions))]

    def call_with_edits(
        self, sources: list[torch.Tensor | None], strength: float = 1.0, **kwargs: Any
    ) -> Any:
        """The wrapped model called with the interventions active at
        ``sources`` (per intervention: absolute positions, or ``None``)."""
        with self._active(CallState(sources, strength=strength)):
            return self.model(**kwargs)

    def edit_hidden(self, adapter: str, indices: list[int], hidden: torch.Tensor) -> torch.Tensor | None:
        """``hidden`` edited by the interventions at ``indices`` of ``adapter``,
        or ``None`` when that adapter is not the active one or adapters are
        disabled."""
        if self._disabled or adapter != self._active_name:
            return None
        for index in indices:
            hidden = self._apply_one(index, hidden)
        return hidden

    def _active(self, state: CallState) -> contextlib.AbstractContextManager[None]:
        rotations = [i.rotation for i in self.interventions if i.rotation is not None]
        return self.calls.running(state, rotations)

    # ------------------------------------------------------------------ locations

    def _prepare_sources(
        self, locations: Any, batch: int, streams: Mapping[str | None, _Tokens]
    ) -> list[torch.Tensor | None]:
        """Per intervention, the absolute positions it edits (``None``: every
        token, or none). ``streams``: the tokens each stack reads, by tower
        (``None`` for a one-stack model); each intervention's positions
        count over its own stack's tokens."""
        config = self.reft_config
        sources: list[torch.Tensor | None] = [None] * len(config.interventions)
        positional = config.position_interventions
        if not positional:
            return sources
        device = _device_of(self.model)

        def stream_of(index: int) -> _Tokens:
            return streams[config.interventions[index].tower if None not in streams else None]

        if locations is None:
            # One tensor object per group, shared by its interventions: the
            # hooks compute each group's indices once per call.
            groups: dict[tuple[str | None, str, bool, bool, int], torch.Tensor] = {}
            for index in positional:
                item = config.interventions[index]
                tokens = stream_of(index)
                rule = (item.tower, item.positions, item.share_weights, item.include_last)
                if (*rule, item.group) not in groups:
                    array = torch.from_numpy(
                        tokens.locate(item.positions, item.share_weights, item.include_last)
                    ).to(device)
                    for group in range(array.shape[0]):
                        groups[(*rule, group)] = array[group]
                sources[index] = groups[(*rule, item.group)]
            return sources
        tensor = (
            torch.from_numpy(locations) if isinstance(locations, np.ndarray) else torch.as_tensor(locations)
        )
        if tensor.dim() != 3 or tensor.shape[1] != batch:
            raise ShapeError(
                f"locations must have shape (interventions or groups, batch={batch}, positions), "
                f"found {tuple(tensor.shape)}"
            )
        if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
            raise ShapeError(f"locations must hold integers, found {tensor.dtype}")
        tensor = tensor.to(device=device, dtype=torch.long, non_blocking=True)
        rows = tensor.shape[0]
        views = list(tensor.unbind(0))
        if rows == len(config.interventions):
            for index in positional:
                sources[index] = views[index]
        elif rows == len(positional):
            for row, index in enumerate(positional):
                sources[index] = views[row]
        else:
            groups_count = 1 + max(config.interventions[i].group for i in positional)
            if rows != groups_count:
                raise ShapeError(
                    f"locations have {rows} rows; expected one per intervention ({len(config.interventions)}), "
                    f"one per intervention that reads locations ({len(positional)}), "
                    f"or one per position group ({groups_count})"
                )
            config.shared_positions()
            if len({config.interventions[i].tower for i in positional}) > 1:
                raise ShapeError(
                    "the interventions edit both the encoder and the decoder, whose tokens differ: "
                    "pass one locations row per intervention instead of one per position group"
                )
            for index in positional:
                sources[index] = views[config.interventions[index].group]
        checked: set[int] = set()
        for index in positional:
            source = sources[index]
            if source is None or id(source) in checked:
                continue
            checked.add(id(source))
            length = stream_of(index).length
            bad = (source < -1) | (source >= length)
            if source.numel() and bool(bad.any()):
                where = f" of the {config.interventions[index].tower}" if None not in streams else ""
                raise LocationError(
                    f"a location is {source[bad][0].item()}, outside the {length} tokens{where} "
                    "of the batch (and not -1)"
                )
        return sources

    def _position_ids(
        self, attention_mask: torch.Tensor | None, kwargs: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """Positions counted over real tokens, for left-padded batches (not
        for vision-language models, which number positions their own way)."""
        if attention_mask is None or "position_ids" in kwargs or not self._accepts_position_ids:
            return None
        if vision_config(self.model) is not None:
            return None
        if attention_mask.dim() != 2 or not bool((attention_mask[:, 0] == 0).any()):
            return None
        embeddings = getattr(getattr(self.model, "base_model", self.model), "embeddings", None)
        if getattr(embeddings, "padding_idx", None) is not None:
            return None  # RoBERTa-style models number positions from the input ids themselves
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    # ------------------------------------------------------------------ calls

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        locations: torch.Tensor | np.ndarray | None = None,
        prefix_cache: bool | PrefixCache | None = None,
        strength: float = 1.0,
        **kwargs: Any,
    ) -> Any:
        """Runs the model with the interventions.

        Args:
            input_ids, attention_mask, labels: As for the wrapped model; with
                token labels the loss covers the labelled (response) tokens.
            locations: ``(num_interventions, batch, positions)`` or the grouped
                ``(groups, batch, positions)`` array of
                :func:`reft_rs.positions.locate`; -1 marks unused slots.
                When ``None``, the prompt is taken to be the tokens before the
                first label (or the whole input without labels) and
                positions are chosen from each intervention's spec.
            prefix_cache: ``True`` (or a :class:`reft_rs.model.prefix_cache.PrefixCache`
                keeping prefixes across calls) runs the columns that no
                intervention edits, up to each row's last prompt token,
                through the frozen model without gradients and the rest
                with them (:mod:`reft_rs.model.prefix_cache`): the same loss and
                gradients, for much less work. The output's logits then
                cover the columns after the cached prefix. Ignored where it
                does not apply (see :func:`reft_rs.model.prefix_cache.applies`).
            strength: The edit strength α: each edited state becomes
                h + α·(Φ(h) − h) (1 the trained edit, 0 the base model,
                negative reverses a steering vector).
            kwargs: Passed to the wrapped model (``inputs_embeds``, ...).

        Returns:
            The wrapped model's output.
        """
        strength = _check_strength(strength)
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if reference is None:
            raise ValueError("pass input_ids or inputs_embeds")
        batch, length = reference.shape[0], reference.shape[1]
        streams = self._streams(batch, length, input_ids, attention_mask, labels, kwargs, generating=False)
        sources = self._prepare_sources(locations, batch, streams)
        position_ids = self._position_ids(attention_mask, kwargs)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if labels is not None:
            kwargs["labels"] = labels
        if "num_items_in_batch" in kwargs and not self.accepts_loss_kwargs:
            kwargs.pop("num_items_in_batch")
        if prefix_cache and strength == 1.0 and input_ids is not None and self.prefix_cache_blocker() is None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            store = prefix_cache if isinstance(prefix_cache, PrefixCache) else None
            extra = {k: v for k, v in kwargs.items() if k != "labels"}
            out = cached_forward(self, input_ids, attention_mask, labels, sources, store, extra)
            if out is not None:
                return out
        return self.call_with_edits(
            sources, input_ids=input_ids, attention_mask=attention_mask, strength=strength, **kwargs
        )

    def _streams(
        self,
        batch: int,
        length: int,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        kwargs: Mapping[str, Any],
        *,
        generating: bool,
    ) -> dict[str | None, _Tokens]:
        """The tokens each stack reads in this call, by tower: an
        encoder-decoder's encoder input and decoder tokens (when generating,
        its prompt: the start token alone unless decoder_input_ids says
        more), else the one stack's (a prompt up to the first label, or the
        whole input when generating)."""
        if is_encoder_decoder(self.model):
            start = self._decoder_start(kwargs) if generating else None
            return {
                "encoder": _Tokens(batch, length, attention_mask),
                "decoder": _decoder_tokens(batch, labels, kwargs, start),
            }
        tokens = _Tokens(
            batch,
            length,
            attention_mask,
            labels,
            prompt_only=generating,
            input_ids=input_ids,
            image_token=image_token_id(self.model),
        )
        return {None: tokens}

    def _decoder_start(self, kwargs: Mapping[str, Any]) -> int | None:
        """The decoder start token ``generate`` will use."""
        for source in (kwargs, getattr(self.model, "generation_config", None), self.model.config):
            value = (
                source.get("decoder_start_token_id")
                if isinstance(source, Mapping)
                else getattr(source, "decoder_start_token_id", None)
            )
            if isinstance(value, int):
                return value
        return None

    def prefix_cache_blocker(self) -> str | None:
        """Why prefix caching cannot run on this model, or ``None`` when it can."""
        if not hasattr(self, "_prefix_cache_blocker"):
            self._prefix_cache_blocker = applies(self)
        return self._prefix_cache_blocker

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        locations: torch.Tensor | np.ndarray | None = None,
        intervene_on_generated: bool = False,
        strength: float = 1.0,
        **kwargs: Any,
    ) -> Any:
        """Generates with the interventions applied.

        The prompt is edited in the prefill pass; generated tokens see the
        edits through the KV cache. With ``use_cache=False`` the prompt is
        edited again on every step, so the result is the same. Batches must
        be left-padded (as for any decoder-only generation).

        Args:
            input_ids: The prompts, ``(batch, length)``.
            attention_mask: Defaults to all ones.
            locations: As in :meth:`forward`; by default chosen from each
                intervention's spec over each prompt.
            intervene_on_generated: Also edit every generated token with the
                position-based interventions (``"all"`` ones always do).
            strength: The edit strength α, as in :meth:`forward`.
            kwargs: Passed to the wrapped model's ``generate``.
        """
        strength = _check_strength(strength)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, length = input_ids.shape
        streams = self._streams(batch, length, input_ids, attention_mask, None, kwargs, generating=True)
        # An encoder-decoder's generated tokens follow its decoder's prompt.
        prompt_length = streams["decoder"].length if "decoder" in streams else length
        sources = self._prepare_sources(locations, batch, streams)
        state = CallState(
            sources,
            prompt_length=prompt_length,
            intervene_generated=intervene_on_generated,
            strength=strength,
        )
        with self._active(state):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------ the rest

    @property
    def config(self) -> Any:
        """The wrapped model's config (what Hugging Face tools expect here)."""
        return self.model.config

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the wrapped model takes ``num_items_in_batch`` (the Trainer asks)."""
        declared = getattr(self.model, "accepts_loss_kwargs", None)
        return self._takes_any_keyword if declared is None else bool(declared)

    @property
    def main_input_name(self) -> str:
        return getattr(self.model, "main_input_name", "input_ids")

    @property
    def device(self) -> torch.device:
        return _device_of(self.model)

    def trainable_parameter_count(self) -> int:
        """Trainable values, counted as the ReFT paper counts them."""
        count = sum(item.parameter_count() for item in self.interventions if item.config.trainable)
        if self.head is not None:
            count += sum(p.numel() for p in self.head.parameters())
        return count

    def print_trainable_parameters(self) -> None:
        """Prints ``trainable params: … || all params: … || trainable%: …`` (peft's format)."""
        trainable = self.trainable_parameter_count()
        total = sum(p.numel() for p in self.model.parameters()) + sum(
            item.parameter_count() for item in self.interventions
        )
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def remove_hooks(self) -> nn.Module:
        """Detaches the interventions from the model and returns the model as it was.

        Only reft_rs's own hooks are removed; hooks others registered stay.
        """
        for handles in self._adapter_hooks.values():
            _remove(handles)
        _remove(self._hook_ids)
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as peft's method returns them:
        the values an optimizer would train (the active adapter's, unless
        it was loaded frozen) and every value of the model and its adapters."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters()) + sum(
            p.numel() for p in self.adapters.parameters()
        )
        return trainable, total

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors alone (the active one by default), under the
        names its checkpoint file uses, on the CPU."""
        return self.checkpoint_tensors(adapter_name)

    def merge_and_unload(self) -> nn.Module:
        """Folds the active adapter into the weights and returns the plain model.

        Only edits that are an affine map of a projection's output fold
        exactly: ``red`` and ``steer`` on every token at ``mlp_output`` or
        ``attention_output`` become the output projection's new weight and
        bias. Any other intervention is refused with the reason (it edits
        chosen positions, or states that no single weight produces).

        Raises:
            ConfigError: An intervention that cannot be folded; nothing is changed.
        """
        return merge.merge_and_unload(self)

    def base_model_identity(self) -> dict[str, Any]:
        """What a checkpoint records about the model."""
        return model_identity(self.model)

    def checkpoint_tensors(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Every saved tensor of an adapter (the active one by default) by
        checkpoint key, on the CPU."""
        name = self._active_name if adapter_name is None else adapter_name
        self._require(name)
        interventions = self.adapters[name]
        tensors: dict[str, torch.Tensor] = {}
        rotations = [i.rotation for i in interventions if i.rotation is not None]
        with torch.no_grad(), inference_call(rotations):  # every R in one batched QR
            for intervention in interventions:
                for name, value in intervention.checkpoint_tensors().items():
                    tensors[f"{intervention.config.name}.{name}"] = value.detach().to("cpu")
        if self.head is not None:
            for name, value in self.head.named_parameters():
                tensors[f"head.{name}"] = value.detach().to("cpu")
        return tensors

    def save_pretrained(
        self,
        path: str | os.PathLike[str],
        metadata: Mapping[str, Any] | None = None,
        adapter_names: str | Sequence[str] | None = None,
    ) -> None:
        """Saves an adapter's interventions (and a trainable head) as a reft_rs checkpoint.

        The folder gets ``reft_config.json`` and ``reft_model.safetensors``,
        written atomically; see :mod:`reft_rs.io.checkpoint`. Besides each R the
        file keeps the unconstrained matrix it is computed from (declared as
        an extra tensor), so reloading reproduces outputs bit for bit and
        training resumes exactly.

        Args:
            path: The folder.
            metadata: Stored in the config's ``metadata``.
            adapter_names: Which adapters: by default the active one, saved in
                ``path``. Named adapters are saved as peft lays them out:
                ``default`` in ``path``, any other in ``path/<name>``.
        """
        if adapter_names is None:
            self._save_one(self._active_name, path, metadata)
            return
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._require(name)
        for name in names:
            target = path if name == "default" else os.path.join(os.fspath(path), name)
            self._save_one(name, target, metadata)

    def _save_one(self, name: str, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None) -> None:
        # The parameters' dtype as they are now (after a .to(dtype), say), so
        # that the config and the tensor file always agree.
        for intervention in self.adapters[name]:
            intervention.config.dtype = intervention.parameter_dtype_name()
        config = self._configs[name].to_checkpoint(self.base_model_identity())
        if metadata:
            config["metadata"].update(metadata)
        tensors = self.checkpoint_tensors(name)
        config["extra_tensors"] = [
            key for key in tensors if key.startswith("head.") or key.endswith(".rotation_base")
        ]
        checkpoint.save(path, config, tensors)

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Sets an adapter's interventions (the active one's by default, and
        the head) from checkpoint tensors."""
        adapter = self._active_name if adapter_name is None else adapter_name
        self._require(adapter)
        by_intervention: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            owner, _, name = key.partition(".")
            by_intervention.setdefault(owner, {})[name] = value
        for intervention in self.adapters[adapter]:
            intervention.load_checkpoint_tensors(by_intervention.pop(intervention.config.name, {}))
        head = by_intervention.pop("head", None)
        if head is not None:
            if self.head is None:
                raise InvalidCheckpointError("the checkpoint holds a head but the config trains none")
            self.head.load_state_dict(head)
        if by_intervention:
            raise InvalidCheckpointError(f"tensors for unknown interventions: {sorted(by_intervention)}")

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | os.PathLike[str],
        *,
        adapter_name: str = "default",
        is_trainable: bool = False,
        strict: bool = True,
    ) -> ReftModel:
        """Attaches a saved checkpoint's interventions to ``model``.

        Args:
            model: The base model the checkpoint was trained on.
            path: The checkpoint folder.
            adapter_name: The adapter's name on the model.
            is_trainable: Leave the loaded parameters trainable (as peft,
                they are frozen by default).
            strict: Refuse a different ``model_type`` (hidden size and layer
                count must always match); ``False`` only warns.

        Raises:
            IncompatibleModelError: The checkpoint does not fit the model.
            CheckpointError: The checkpoint is missing or damaged.
        """
        reft_config, tensors = _read_checkpoint(model, path, strict)
        # Every parameter is about to be overwritten: skip the random start.
        reft_model = cls(model, reft_config, initialize=False, adapter_name=adapter_name)
        reft_model.load_tensors(tensors)
        reft_model._trainable[adapter_name] = is_trainable
        reft_model._set_trainable()
        return reft_model


def _read_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], strict: bool
) -> tuple[ReftConfig, dict[str, torch.Tensor]]:
    """A checkpoint's config and tensors, checked against ``model``."""
    hidden_size, num_layers = _dimensions_or_none(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return checkpoint.read_for_model(
        path,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        model_type=str(model_type) if model_type else None,
        strict=strict,
        stacklevel=4,
    )


def _as_config(config: ReftConfig | InterventionConfig | Sequence[InterventionConfig]) -> ReftConfig:
    if isinstance(config, ReftConfig):
        return config
    return ReftConfig(list(config) if isinstance(config, Sequence) else [config])


def _remove(handles: list[tuple[nn.Module, int]]) -> None:
    """Removes hooks by id from every registry of their modules."""
    for module, hook_id in handles:
        for registry in (
            module._forward_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_hooks_always_called,
            module._forward_pre_hooks,
            module._forward_pre_hooks_with_kwargs,
        ):
            registry.pop(hook_id, None)
    handles.clear()


def get_reft_model(
    model: nn.Module, config: ReftConfig | InterventionConfig | Sequence[InterventionConfig]
) -> ReftModel:
    """Freezes ``model`` and attaches the interventions of ``config``.

    Args:
        model: A Hugging Face model (causal LM, sequence classification, or a
            bare encoder/decoder); any other ``nn.Module`` works when every
            intervention has a ``module_path`` and ``embed_dim``.
        config: A :class:`ReftConfig`, or interventions to make one from.

    Returns:
        The :class:`ReftModel`. Its trainable parameters are the
        interventions' (and the head's, with ``trainable_head``).

    Raises:
        ConfigError: A layer the model does not have, a rank larger than the
            hidden size, ...
        IncompatibleModelError: A component that cannot be found.

    Example::

        reft_model = reft_rs.get_reft_model(model, reft_rs.ReftConfig.for_layers([4, 8]))
        reft_model.print_trainable_parameters()
    """
    return ReftModel(model, _as_config(config))


# ---------------------------------------------------------------------- helpers


def _scaled(hidden: torch.Tensor, edited: torch.Tensor, strength: float) -> torch.Tensor:
    """h + α·(Φ(h) − h) in Φ(h)'s dtype; Φ(h) itself at α = 1."""
    if strength == 1.0:
        return edited
    h = hidden.to(edited.dtype)
    return h + strength * (edited - h)


def _check_strength(strength: float) -> float:
    value = float(strength)
    if not np.isfinite(value):
        raise ConfigError(f"strength must be a finite number, found {strength!r}")
    return value


def _edit_rows(
    hidden: torch.Tensor,
    flat: torch.Tensor,
    intervention: Intervention,
    dropout: bool = True,
    strength: float = 1.0,
) -> torch.Tensor:
    """``hidden`` with the rows at ``flat`` (indices into the flattened batch)
    replaced by their edited values; every other row is left as it was."""
    batch, length, width = hidden.shape
    rows = hidden.reshape(batch * length, width)
    chosen = rows.index_select(0, flat)
    edited = _scaled(chosen, intervention(chosen, dropout=dropout), strength).to(hidden.dtype)
    return rows.index_copy(0, flat, edited).view(batch, length, width)


class _Tokens:
    """The tokens one stack of layers reads in a call: their padded length,
    and (measured only when positions must be chosen) each row's prompt
    length, padding side and real-token count.

    ``labels``: token labels aligned with these tokens (a decoder-only
    model's), so that the prompt ends at the first labelled token.
    ``decoder_labels``: an encoder-decoder's labels, which the decoder's
    position i predicts; its prompt is the start token and any forced
    prefix (labels -100) before the first labelled token, up to the token
    that predicts it."""

    def __init__(
        self,
        batch: int,
        length: int,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        *,
        prompt_only: bool = True,
        decoder_labels: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        image_token: int | None = None,
    ) -> None:
        self.batch, self.length = batch, length
        self.attention_mask, self.labels = attention_mask, labels
        self.prompt_only, self.decoder_labels = prompt_only, decoder_labels
        # A vision-language model's prompts: positions count over their text
        # (or, for image specs, their image tokens), found in the ids.
        self.input_ids = input_ids
        self.image_token = image_token

    def locate(self, positions: str, share_weights: bool, include_last: bool) -> np.ndarray:
        """The ``(groups, batch, width)`` positions ``positions`` chooses here."""
        lengths, padding_side, sequence = self.measured
        options = {
            "share_weights": share_weights,
            "include_last": include_last,
            "padding_side": padding_side,
            "padded_length": self.length,
            "sequence_lengths": sequence,
        }
        if self.image_token is None:
            return locate(lengths, positions, **options)
        if self.input_ids is None:
            raise LocationError(
                "a vision-language model's positions are found in its input ids (text and image tokens "
                "apart); call it with input_ids rather than inputs_embeds, or pass locations="
            )
        return locate_in_tokens(self.rows, lengths, positions, self.image_token, **options)

    @functools.cached_property
    def measured(self) -> tuple[np.ndarray, str, np.ndarray]:
        """Each row's prompt length, the padding side and each row's
        real-token count (measured once per call, on the host)."""
        prompts, side, sequence = _prompt_lengths(
            self.attention_mask, self.labels, self.batch, self.length, self.prompt_only
        )
        if self.decoder_labels is not None and self.decoder_labels.dim() == 2:
            labelled = self.decoder_labels.detach().to("cpu").numpy() != IGNORE_INDEX
            first = np.where(labelled.any(axis=1), labelled.argmax(axis=1), self.length - 1)
            prompts = np.minimum(first + 1, sequence).astype(np.int64)
        return prompts, side, sequence

    @functools.cached_property
    def rows(self) -> list[np.ndarray]:
        """Each row's real token ids (a vision-language prompt's), unpadded."""
        _, padding_side, sequence = self.measured
        ids = self.input_ids.detach().to("cpu").numpy()
        return [
            row[self.length - real :] if padding_side == "left" else row[:real]
            for row, real in zip(ids, sequence.tolist())
        ]


def _decoder_tokens(
    batch: int, labels: torch.Tensor | None, kwargs: Mapping[str, Any], start: int | None = None
) -> _Tokens:
    """The tokens an encoder-decoder's decoder reads in a call: its given
    inputs (``decoder_input_ids`` / ``decoder_inputs_embeds``), else the
    labels shifted right (what the model builds from them), else its start
    token alone (generation). ``start``: when generating, the start token
    that ``generate`` puts before ``decoder_input_ids`` that do not begin
    with it."""
    given = kwargs.get("decoder_input_ids")
    mask = kwargs.get("decoder_attention_mask")
    if given is not None and start is not None and bool((given[:, 0] != start).all()):
        # transformers' generate prepends the start token (and a 1 to the mask).
        given = torch.cat([torch.full_like(given[:, :1], start), given], dim=1)
        if mask is not None:
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    if given is None:
        given = kwargs.get("decoder_inputs_embeds")
    if given is None:
        given = labels
    length = int(given.shape[1]) if given is not None else 1
    return _Tokens(batch, length, mask, decoder_labels=labels)


def _prompt_lengths(
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    batch: int,
    length: int,
    prompt_only: bool,
) -> tuple[np.ndarray, str, np.ndarray]:
    """Prompt lengths, padding side and sequence lengths of a batch, when the
    caller gave no locations: the prompt ends at the first labelled token."""
    if attention_mask is None:
        mask = np.ones((batch, length), dtype=bool)
    else:
        mask = attention_mask.detach().to("cpu").numpy().astype(bool)
    sequence = mask.sum(axis=1).astype(np.int64)
    left = bool((~mask[:, 0]).any()) and bool(mask[:, -1].all())
    padding_side = "left" if left else "right"
    if prompt_only or labels is None or labels.dim() != 2:
        return sequence, padding_side, sequence
    labelled = (labels.detach().to("cpu").numpy() != IGNORE_INDEX) & mask
    first = np.where(labelled.any(axis=1), labelled.argmax(axis=1), length)
    start = length - sequence if left else np.zeros(batch, dtype=np.int64)
    prompts = (first - start).clip(min=0).astype(np.int64)
    empty = np.flatnonzero((prompts == 0) & (sequence > 0))
    if empty.size:
        raise ConfigError(
            f"the labels of row {int(empty[0])} cover its first token, so it has no prompt: "
            "the positions are counted from the end of the prompt (the tokens labelled -100), "
            "so nothing would be edited and the loss would have no gradient. Mask the prompt "
            "with -100 in the labels (labels = input_ids labels every token; make_dataset masks "
            "the prompt), or pass locations= to choose the positions yourself"
        )
    return prompts, padding_side, sequence


def _device_of(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _dimensions_or_none(model: nn.Module) -> tuple[int | None, int | None]:
    try:
        return model_dimensions(model)
    except IncompatibleModelError:
        return None, None


def _check_vision_layer(model: nn.Module, item: InterventionConfig) -> None:
    """Refuses a vision-encoder layer past the one whose states the model
    reads as image features (LLaVA's ``vision_feature_layer``, -2 by
    default: an edit there would change nothing)."""
    chosen = getattr(model.config, "vision_feature_layer", None)
    if not isinstance(chosen, int) or isinstance(chosen, bool):
        return
    depth = stack_depth(model, "vision")
    # hidden_states[k] is the output of layer k - 1 (0: the embeddings).
    last_read = (depth + 1 + chosen if chosen < 0 else chosen) - 1
    if item.layer > last_read:
        raise ConfigError(
            f"{item.name}: vision layer {item.layer} comes after layer {last_read}, whose output "
            f"{type(model).__name__} reads as its image features (vision_feature_layer={chosen}); "
            "an edit there would change nothing"
        )


def _validate_against_model(model: nn.Module, config: ReftConfig) -> None:
    """Checks layers and ranks against the model (each stack of an
    encoder-decoder against its own depth), with the core's rule (the one
    checkpoints are checked with)."""
    hidden_size, num_layers = _dimensions_or_none(model)
    if is_encoder_decoder(model):
        towers: set[str | None] = {"encoder", "decoder"}
    else:
        towers = {None, "vision", "projector"} if vision_config(model) is not None else {None}
    for item in config.interventions:
        if item.tower not in towers:
            if item.module_path is not None and is_encoder_decoder(model):
                raise IncompatibleModelError(
                    f"{item.name}: on an encoder-decoder every intervention names its tower, also with "
                    "a module_path (its positions count over that stack's tokens)"
                )
            if item.module_path is None:
                if item.tower == "projector":
                    resolve(model, item)  # raises: the model has no projector
                find_layers(model, item.tower)  # raises, naming what is missing or extra
        if item.position_spec.images and image_token_id(model) is None:
            raise IncompatibleModelError(
                f"{item.name}: positions {item.positions!r} choose a vision-language model's image tokens, "
                f"and {type(model).__name__} has no image token"
            )
        width = item.embed_dim or hidden_size
        # Without a recognised layout only explicit module paths are used.
        if num_layers is None:
            layers = item.layer + 1
        else:
            layers = stack_depth(model, item.tower)
        _core.check_placement(item.name, item.layer, item.low_rank_dimension, width, layers)
        if item.tower == "vision" and item.module_path is None:
            _check_vision_layer(model, item)
