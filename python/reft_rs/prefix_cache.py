"""Prefix-cached training: exact, and far cheaper when the interventions edit
only the end of the prompt.

Under causal attention a token's hidden states depend on the tokens before
it alone. When no intervention edits a row's first ``c`` tokens (``l{s}``
specs, negative indices), those tokens' states are the frozen model's, and
the loss needs nothing from them but their keys and values. So the frozen
model runs over the first ``C`` columns of the batch without gradients
(``C``: the least such ``c`` of its rows, and never past a row's last prompt
token), and the forward and backward pass covers the remaining columns
only, reading the prefix from the KV cache. Losses and gradients are those
of the full pass, to float rounding.

A :class:`PrefixCache` also keeps each example's prefix keys and values
from one epoch to the next (looked up by the prefix's token ids), within a
memory budget: later epochs then skip the prefix entirely. When the budget
is full, the rows it cannot hold are recomputed per batch, as without a
store.

It applies to decoder-only models (causal LMs, and sequence classifiers that
pool the last token) whose interventions read locations; an every-token
intervention (``all``: RED, steering vectors) edits the prefix too, and then
nothing is cached. :func:`applies` says why not.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

__all__ = ["PrefixCache", "applies", "cached_forward"]

IGNORE_INDEX = -100
_GIB = 1 << 30


def applies(reft_model: Any) -> str | None:
    """``None`` when prefix caching can run on ``reft_model``, else the reason it cannot."""
    config = reft_model.reft_config
    if any(item.every_token for item in config.interventions):
        return "an intervention edits every token (positions 'all'), the prefix included"
    if not config.position_interventions:
        return "no intervention reads locations"
    model = reft_model.model
    model_config = getattr(model, "config", None)
    if model_config is None or getattr(model_config, "is_encoder_decoder", False):
        return "the model is not a decoder-only transformer"
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - transformers is in the torch extra
        return "transformers is not installed"
    model_type = getattr(model_config, "model_type", None)
    causal = model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if not causal or (masked and not getattr(model_config, "is_decoder", False)):
        return f"{model_type or type(model).__name__} does not attend causally"
    if _cache_argument(model) is None:
        return f"{type(model).__name__}.forward takes no KV cache"
    return None


def _cache_argument(model: Any) -> str | None:
    """The name the model's forward takes its KV cache by (``cache`` from
    transformers 5.24, ``past_key_values`` before)."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


def _output_cache(output: Any) -> Any:
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    raise RuntimeError("the model returned no KV cache")


def prefix_bounds(
    sources: list[torch.Tensor | None],
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
) -> torch.Tensor:
    """Per row, how many leading columns can be cached: up to the first
    column any intervention edits, and never past the row's last prompt
    token (whose logits predict the first label; for a classifier, the last
    token, which it pools)."""
    batch, length = attention_mask.shape
    columns = torch.arange(length, device=attention_mask.device)
    real = attention_mask.bool()
    last_real = torch.where(real, columns, -1).amax(dim=1)
    if labels is not None and labels.dim() == 2:
        labelled = (labels != IGNORE_INDEX) & real
        first_label = torch.where(labelled, columns, length).amin(dim=1)
        bound = torch.where(labelled.any(dim=1), first_label - 1, last_real)
    else:
        bound = last_real
    for source in sources:
        if source is None:
            continue
        edited = torch.where(source >= 0, source, length).amin(dim=1)
        bound = torch.minimum(bound, edited)
    return bound.clamp(min=0)


class PrefixCache:
    """Keeps each example's prefix keys and values across epochs.

    Args:
        memory: Budget in bytes for the stored keys and values (on the
            model's device); rows past it are recomputed per batch.

    Attributes:
        stored_bytes: Bytes held now.
        hits, misses: Rows served from the store, and rows computed.
        full: Whether the budget has refused a row.
    """

    def __init__(self, memory: int = 2 * _GIB) -> None:
        if memory < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes, found {memory}")
        self.memory = int(memory)
        self.stored_bytes = 0
        self.hits = 0
        self.misses = 0
        self.full = False
        self._store: dict[bytes, tuple[torch.Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def __bool__(self) -> bool:  # an empty store still asks for caching
        return True

    def clear(self) -> None:
        self._store.clear()
        self.stored_bytes = 0

    def describe(self) -> str:
        """One line: rows stored, memory, hit rate."""
        total = self.hits + self.misses
        rate = f"{self.hits / total:.0%}" if total else "-"
        state = ", budget full" if self.full else ""
        return (
            f"prefix cache: {len(self)} prefixes, {self.stored_bytes / (1 << 20):.1f} MiB of "
            f"{self.memory / (1 << 20):.0f} MiB, {rate} of rows served from it{state}"
        )

    def lookup(self, key: bytes) -> tuple[torch.Tensor, ...] | None:
        return self._store.get(key)

    def offer(self, key: bytes, layers: tuple[torch.Tensor, ...]) -> None:
        if key in self._store:
            return
        size = sum(t.numel() * t.element_size() for t in layers)
        if self.stored_bytes + size > self.memory:
            self.full = True
            return
        self._store[key] = layers
        self.stored_bytes += size


def _layers_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` of a dynamic KV cache, ``[batch, heads, length, dim]``."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def _dynamic_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def _storable(cache: Any) -> bool:
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover
        return False
    if type(cache) is not DynamicCache:
        return False
    layers = getattr(cache, "layers", None)
    return layers is None or all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def cached_forward(
    reft_model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    sources: list[torch.Tensor | None],
    store: PrefixCache | None,
    kwargs: dict[str, Any],
) -> Any | None:
    """The model's output for the batch with its prefix read from a KV cache,
    or ``None`` when there is no prefix to cache (the caller then runs the
    full pass). The output's logits cover the columns after the prefix."""
    bounds = prefix_bounds(sources, attention_mask, labels)
    columns = int(bounds.min())
    if columns < 1:
        return None
    model = reft_model.model
    name = _cache_argument(model)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    right_padded = bool(attention_mask[:, 0].all())
    cache = None
    if store is not None and right_padded:
        cache = _from_store(reft_model, input_ids, attention_mask, positions, bounds, columns, store, name)
    if cache is None:
        with torch.no_grad():
            out = model(
                input_ids=input_ids[:, :columns],
                attention_mask=attention_mask[:, :columns],
                position_ids=positions[:, :columns],
                use_cache=True,
            )
        cache = _output_cache(out)
    kwargs = dict(kwargs)
    kwargs.pop("position_ids", None)
    kwargs[name] = cache
    kwargs["use_cache"] = True
    if labels is not None:  # token labels lose their prefix; a classifier's stay whole
        kwargs["labels"] = (
            labels[:, columns:] if labels.dim() == 2 and labels.shape == input_ids.shape else labels
        )
    return reft_model._call_model(
        sources,
        input_ids=input_ids[:, columns:],
        attention_mask=attention_mask,
        position_ids=positions[:, columns:],
        **kwargs,
    )


def _from_store(
    reft_model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    bounds: torch.Tensor,
    columns: int,
    store: PrefixCache,
    name: str,
) -> Any | None:
    """The batch's prefix cache assembled from stored rows (computing and
    offering those missing), or ``None`` when a row cannot be served."""
    ids = input_ids.detach().to("cpu").numpy()
    lengths = bounds.to("cpu").numpy()
    keys = [np.ascontiguousarray(ids[row, : int(lengths[row])]).tobytes() for row in range(len(ids))]
    rows = [store.lookup(key) for key in keys]
    missing = [row for row, value in enumerate(rows) if value is None]
    if missing:
        store.misses += len(missing)
        widest = int(lengths[missing].max())
        with torch.no_grad():
            out = reft_model.model(
                input_ids=input_ids[missing, :widest],
                attention_mask=attention_mask[missing, :widest],
                position_ids=positions[missing, :widest],
                use_cache=True,
            )
        cache = _output_cache(out)
        if not _storable(cache):
            return None
        layers = _layers_of(cache)
        for slot, row in enumerate(missing):
            own = int(lengths[row])
            # one example's own prefix, as a copy (not a view of the batch)
            rows[row] = tuple(t[slot : slot + 1, :, :own].clone() for pair in layers for t in pair)
            store.offer(keys[row], rows[row])
    store.hits += len(rows) - len(missing)
    count = len(rows[0]) // 2
    layers = []
    for index in range(count):
        keys_batch = torch.cat([row[2 * index][:, :, :columns] for row in rows])
        values_batch = torch.cat([row[2 * index + 1][:, :, :columns] for row in rows])
        layers.append((keys_batch, values_batch))
    return _dynamic_cache(layers)
