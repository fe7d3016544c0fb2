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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..positions import IGNORE_INDEX

if TYPE_CHECKING:
    from .hooks import Hooked

__all__ = ["PrefixCache", "applies", "cached_forward"]

_GIB = 1 << 30


def applies(reft_model: Hooked) -> str | None:
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
    if getattr(model_config, "vision_config", None) is not None:
        return "a vision-language model's prompts hold images, whose features the prefix pass would not see"
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
    reft_model: Hooked,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    sources: list[torch.Tensor | None],
    store: PrefixCache | None,
    kwargs: dict[str, Any],
) -> Any | None:
    """The model's output for the batch with each row's prefix read from a KV
    cache, or ``None`` when there is no prefix to cache (the caller then runs
    the full pass).

    Each row's first ``k`` real tokens (``k`` from :func:`prefix_bounds`)
    go to the cache, right-aligned so that every row's remaining tokens start
    at the first column of the pass with gradients; the output's logits
    cover those remaining tokens, right-padded."""
    device = input_ids.device
    batch, length = input_ids.shape
    real = attention_mask.bool()
    counts = real.sum(dim=1)
    starts = real.long().argmax(dim=1)
    columns = torch.arange(length, device=device)
    contiguous = (real == ((columns >= starts[:, None]) & (columns < (starts + counts)[:, None]))).all()
    if not bool(contiguous) or bool((counts == 0).any()):
        return None  # padding inside a row: not a layout this reads
    bounds = prefix_bounds(sources, attention_mask, labels)
    cached = (bounds - starts).clamp(min=0)
    widest = int(cached.max())
    if widest < 1:
        return None
    rest = counts - cached
    width = int(rest.max())
    model = reft_model.model
    name = _cache_argument(model)
    pad = 0

    def gather_rows(values: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, size: int, fill: int):
        """``values[b, offsets[b] + j]`` for ``j < lengths[b]``, else ``fill``: ``(batch, size)``."""
        index = offsets[:, None] + torch.arange(size, device=device)[None, :]
        keep = torch.arange(size, device=device)[None, :] < lengths[:, None]
        taken = values.gather(1, index.clamp(max=length - 1))
        return torch.where(keep, taken, torch.full_like(taken, fill)), keep

    prefix_ids, prefix_keep = gather_rows(input_ids, starts, cached, widest, pad)
    cache = None
    if store is not None:
        cache = _from_store(reft_model, prefix_ids, prefix_keep, cached, widest, store)
    if cache is None:
        layers = _prefix_layers(model, prefix_ids, prefix_keep)
        if layers is None:
            return None
        cache = _dynamic_cache([_right_align(k, v, cached, widest) for k, v in layers])
    suffix_ids, suffix_keep = gather_rows(input_ids, starts + cached, rest, width, pad)
    aligned = torch.arange(widest, device=device)[None, :] >= (widest - cached)[:, None]
    mask = torch.cat([aligned, suffix_keep], dim=1).to(attention_mask.dtype)
    positions = cached[:, None] + torch.arange(width, device=device)[None, :]
    kwargs = dict(kwargs)
    kwargs.pop("position_ids", None)
    kwargs[name] = cache
    kwargs["use_cache"] = True
    if labels is not None:
        if labels.dim() == 2 and labels.shape == input_ids.shape:  # token labels follow their tokens
            kwargs["labels"], _ = gather_rows(labels, starts + cached, rest, width, IGNORE_INDEX)
        else:  # a classifier's labels stay whole
            kwargs["labels"] = labels
    # The hooks see positions relative to the cache: column c of the batch
    # is column c - start - cached of the pass, after `widest` cached columns.
    shift = (widest - starts - cached)[:, None]
    moved = [
        None if source is None else torch.where(source >= 0, source + shift, source) for source in sources
    ]
    return reft_model.call_with_edits(
        moved,
        input_ids=suffix_ids,
        attention_mask=mask,
        position_ids=positions,
        **kwargs,
    )


def _prefix_layers(model: Any, prefix_ids: torch.Tensor, keep: torch.Tensor) -> list | None:
    """Per layer keys and values of right-padded prefixes, computed without gradients."""
    positions = torch.arange(prefix_ids.shape[1], device=prefix_ids.device).expand_as(prefix_ids)
    with torch.no_grad():
        out = model(input_ids=prefix_ids, attention_mask=keep.long(), position_ids=positions, use_cache=True)
    cache = _output_cache(out)
    if not _storable(cache):
        return None
    return _layers_of(cache)


def _right_align(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, width: int):
    """Each row's first ``lengths[b]`` entries moved to the end of ``width``
    columns, zeros before them (masked out by the attention mask)."""
    columns = torch.arange(width, device=keys.device)
    source = columns[None, :] - (width - lengths)[:, None]
    keep = source >= 0
    index = source.clamp(min=0)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
    mask = keep[:, None, :, None]
    return (
        torch.where(mask, keys.gather(2, index), torch.zeros((), dtype=keys.dtype, device=keys.device)),
        torch.where(mask, values.gather(2, index), torch.zeros((), dtype=values.dtype, device=values.device)),
    )


def _from_store(
    reft_model: Hooked,
    prefix_ids: torch.Tensor,
    keep: torch.Tensor,
    cached: torch.Tensor,
    widest: int,
    store: PrefixCache,
) -> Any | None:
    """The batch's prefix cache assembled from stored rows (computing and
    offering those missing), or ``None`` when the model's cache cannot be
    stored (not a plain dynamic cache)."""
    ids = prefix_ids.detach().to("cpu").numpy()
    lengths = cached.to("cpu").numpy()
    keys = [np.ascontiguousarray(ids[row, : int(lengths[row])]).tobytes() for row in range(len(ids))]
    rows: list[tuple[torch.Tensor, ...] | None] = [store.lookup(key) for key in keys]
    missing = [row for row, value in enumerate(rows) if value is None]
    if missing:
        store.misses += len(missing)
        span = int(lengths[missing].max())
        layers = _prefix_layers(reft_model.model, prefix_ids[missing, :span], keep[missing, :span])
        if layers is None:
            return None
        for slot, row in enumerate(missing):
            own = int(lengths[row])
            # one example's own prefix, as a copy (not a view of the batch)
            rows[row] = tuple(t[slot : slot + 1, :, :own].clone() for pair in layers for t in pair)
            store.offer(keys[row], rows[row])
    store.hits += len(rows) - len(missing)
    count = len(rows[0]) // 2
    layers = []
    for index in range(count):
        stacked = []
        for part in (0, 1):
            pieces = []
            for row in rows:
                tensor = row[2 * index + part]
                gap = widest - tensor.shape[2]
                if gap:
                    zeros = tensor.new_zeros(tensor.shape[0], tensor.shape[1], gap, tensor.shape[3])
                    tensor = torch.cat([zeros, tensor], dim=2)
                pieces.append(tensor)
            stacked.append(torch.cat(pieces))
        layers.append((stacked[0], stacked[1]))
    return _dynamic_cache(layers)
