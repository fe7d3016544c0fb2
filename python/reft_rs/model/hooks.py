"""The forward hooks of a :class:`~reft_rs.model.ReftModel` and the call state
they share.

A ReftModel puts one :class:`Hook` on the whole model (a pre-hook that notes
where each forward call's tokens start, so that cached generation steps
find their positions) and one on each module an adapter edits. The hooks do
nothing outside a call of the ReftModel: :class:`Calls` holds the call in
progress on each thread, and a hook reads it to know which tokens to edit.

:class:`Hooked` is the interface through which this folder's helpers
(``merge``, ``gradient_checkpointing``, ``prefix_cache``) and the hooks work
with a ReftModel; none of them touches its private state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from ..config import ReftConfig
from .interventions import inference_call

__all__ = ["CallState", "Calls", "Hook", "Hooked", "cache_length"]


@dataclasses.dataclass
class CallState:
    """What the hooks need during one call of the model (or one generate)."""

    #: Per intervention: absolute token positions ``(batch, positions)`` on the
    #: model's device, -1 for unused slots; ``None`` for every-token interventions.
    sources: list[torch.Tensor | None]
    #: Generation: the padded prompt length; later tokens are generated ones.
    #: Generation is inference: dropout is off whatever the training mode.
    prompt_length: int | None = None
    intervene_generated: bool = False
    #: Edit strength α: each edited state becomes h + α·(Φ(h) − h).
    strength: float = 1.0
    #: The tokens of the current forward call start at this position...
    offset: int = 0
    #: ...and this call's flat gather indices, by source tensor.
    indices: dict[int, torch.Tensor | None] = dataclasses.field(default_factory=dict)


class Calls:
    """The calls of one ReftModel in progress, one per thread (a dict by
    thread id rather than a ``threading.local``, so that a deep copy of the
    model works), and whether the wrapped model recomputes layers in the
    backward pass (gradient checkpointing)."""

    def __init__(self) -> None:
        self.states: dict[int, CallState] = {}
        #: Set by :mod:`reft_rs.model.gradient_checkpointing`.
        self.recomputing = False

    @property
    def current(self) -> CallState | None:
        """This thread's call in progress, if any."""
        return self.states.get(threading.get_ident())

    @contextlib.contextmanager
    def running(self, state: CallState, rotations: list[Any]) -> Iterator[None]:
        """Runs one call with ``state``; ``rotations`` (the interventions'
        orthogonal parametrizations) are computed once for the whole call."""
        thread = threading.get_ident()
        if thread in self.states:
            raise RuntimeError("a ReftModel cannot be called from inside one of its own calls")
        self.states[thread] = state
        try:
            if self.recomputing and torch.is_grad_enabled():
                # Each hook computes its R, so that a recomputed layer runs
                # exactly the operations it ran the first time.
                rotations = []
            with inference_call(rotations):
                yield
        finally:
            del self.states[thread]

    @contextlib.contextmanager
    def replaying(self, state: CallState) -> Iterator[None]:
        """Runs with ``state`` as this thread's call: a checkpointed layer
        recomputed in the backward pass edits as it did in the forward one
        (each hook computing its own R)."""
        thread = threading.get_ident()
        self.states[thread] = state
        try:
            with inference_call([]):
                yield
        finally:
            self.states.pop(thread, None)


class Hooked(Protocol):
    """What the hooks and the helpers need of a ReftModel."""

    model: nn.Module
    calls: Calls

    @property
    def reft_config(self) -> ReftConfig: ...

    @property
    def interventions(self) -> nn.ModuleList: ...

    @property
    def device(self) -> torch.device: ...

    def site_paths(self) -> list[str]: ...

    def edit_hidden(self, adapter: str, indices: list[int], hidden: torch.Tensor) -> torch.Tensor | None: ...

    def call_with_edits(
        self, sources: list[torch.Tensor | None], strength: float = 1.0, **kwargs: Any
    ) -> Any: ...

    def remove_hooks(self) -> nn.Module: ...


def cache_length(kwargs: Mapping[str, Any]) -> int:
    """Tokens already in the KV cache when a forward call starts.

    The cache is ``past_key_values`` up to transformers 5.23 and ``cache``
    from 5.24 on (which also stops passing ``cache_position``)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = kwargs.get("cache")
    if cache is not None:
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    return 0


class Hook:
    """A hook of a ReftModel: ``call`` (a pre-hook on the whole model) notes
    where each forward call's tokens start; ``output`` and ``input`` edit a
    module's output or input for one adapter, through
    :meth:`Hooked.edit_hidden`. A hook refers to its model, so a deep copy of
    the model carries working hooks of its own."""

    def __init__(self, owner: Hooked, kind: str, indices: list[int], adapter: str | None) -> None:
        self.owner = owner
        self.kind = kind
        self.indices = indices
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: tuple, *rest: Any) -> Any:
        state = self.owner.calls.current
        if state is None:
            return None
        if self.kind == "call":
            state.offset = cache_length(rest[0])
            state.indices.clear()
            return None
        assert self.adapter is not None
        if self.kind == "output":
            output = rest[0]
            edited = self.owner.edit_hidden(self.adapter, self.indices, _hidden_of(output))
            return None if edited is None else _with_hidden(output, edited)
        kwargs = rest[0]
        hidden = args[0] if args else kwargs["hidden_states"]
        edited = self.owner.edit_hidden(self.adapter, self.indices, hidden)
        if edited is None:
            return None
        if args:
            return (edited, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edited}


def _hidden_of(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _with_hidden(value: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *value[1:]) if isinstance(value, tuple) else hidden
