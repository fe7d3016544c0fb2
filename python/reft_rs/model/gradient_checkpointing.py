"""Activation (gradient) checkpointing through a :class:`~reft_rs.ReftModel`.

A checkpointed layer is run twice: once in the forward pass, keeping only
its inputs, and again in the backward pass to rebuild what the gradients
need. The edits must happen the second time exactly as the first, but by
then the model call that set them up has returned. So each checkpointing
function of the wrapped model is wrapped: it notes the call's state (which
positions each intervention edits, where the call's tokens start) when the
layer first runs, and puts that state back while the layer is replayed.

While checkpointing is on, each intervention computes its R inside the
layer that uses it (not once up front for all of them), so that the replay
runs the same operations as the first pass. Both of torch's modes work
(``use_reentrant`` true or false).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .hooks import Hooked

__all__ = ["disable", "enable"]


class _Replaying:
    """A model's checkpointing function, wrapped to replay the edits."""

    def __init__(self, owner: Hooked, inner: Callable[..., Any]) -> None:
        self.owner = owner
        self.inner = inner
        #: Layers replayed with the edits so far.
        self.replays = 0

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        state = owner.calls.current
        if state is None:
            return self.inner(function, *args, **kwargs)
        # The indices computed so far are shared; any computed inside the
        # layer are computed again, the same, on the replay.
        saved = dataclasses.replace(state, indices=dict(state.indices))

        def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
            if owner.calls.current is not None:  # the first pass, inside the call
                return function(*inner_args, **inner_kwargs)
            self.replays += 1
            with owner.calls.replaying(saved):
                return function(*inner_args, **inner_kwargs)

        return self.inner(run, *args, **kwargs)


def enable(owner: Hooked, options: dict[str, Any] | None, extra: dict[str, Any]) -> None:
    """Turns checkpointing on in the wrapped model and wraps its functions."""
    model = owner.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} does not support gradient checkpointing "
            "(transformers marks it with supports_gradient_checkpointing)"
        )
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **extra)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **extra)
    if (options or {}).get("use_reentrant", True) and getattr(model, "_require_grads_hook", None) is None:
        # torch's reentrant mode passes gradients only to inputs that need
        # them, and a frozen model's hidden states do not: make the
        # embeddings' output need one, as peft does (transformers 5.x does
        # it itself; 4.5x only for peft models).
        enable_input_grads = getattr(model, "enable_input_require_grads", None)
        if enable_input_grads is not None:
            enable_input_grads()
    wrapped = 0
    for module in model.modules():
        inner = module.__dict__.get("_gradient_checkpointing_func")
        if inner is None:
            continue
        if not isinstance(inner, _Replaying):
            module._gradient_checkpointing_func = _Replaying(owner, inner)
        wrapped += 1
    if not wrapped:
        raise ConfigError(f"{type(model).__name__} set no checkpointing function on its layers")
    owner.calls.recomputing = True


def disable(owner: Hooked) -> None:
    model = owner.model
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    owner.calls.recomputing = False
