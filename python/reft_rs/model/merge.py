"""Folding an adapter into the model's weights: ``ReftModel.merge_and_unload``.

An edit folds exactly when it is an affine map of the output of one
projection, on every token: ``red`` (s ⊙ y + b) and ``steer`` (y + αv) at
``mlp_output`` or ``attention_output``, where y = Wx + c is the output
projection of that block. Then s ⊙ (Wx + c) + b = (diag(s) W) x + (s ⊙ c + b),
and likewise for the steering vector, so the projection takes the new
weight and bias and the hooks go.

Which projection gives the block's output is not guessed from names: one
forward pass of the frozen model (in eval mode, on a few tokens) checks
that the block's output is exactly one of its linear layers' outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from .hooks import Hooked

__all__ = ["merge_and_unload"]

_FOLDABLE_COMPONENTS = ("mlp_output", "attention_output")


def _refusal(item: Any) -> str | None:
    """Why an intervention cannot fold into a weight, or ``None``."""
    if item.type not in ("red", "steer"):
        return (
            f"{item.name} ({item.type}) edits a low-rank subspace of chosen token positions, "
            "which no weight of the model computes"
        )
    if not item.every_token:
        return f"{item.name} edits positions {item.positions!r} only, and a weight acts on every token"
    if item.module_path is not None:
        return f"{item.name} edits the module {item.module_path!r}, not a standard component"
    if item.tower is not None:
        return f"{item.name} edits the {item.tower} of an encoder-decoder; merging covers one-stack models"
    if item.component not in _FOLDABLE_COMPONENTS:
        return (
            f"{item.name} edits {item.component}, which sums the residual stream with a block's "
            "output; only mlp_output and attention_output are one projection's output"
        )
    return None


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with its weight transposed.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _output_projection(reft_model: Hooked, sites: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """For each block, the linear layer whose output is exactly the block's."""
    model = reft_model.model
    seen: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def record(key: tuple[str, str]) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            seen[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    candidates: dict[str, list[str]] = {}
    for path, block in sites.items():
        handles.append(block.register_forward_hook(record((path, ""))))
        for name, child in block.named_modules():
            if name and _is_linear(child):
                candidates.setdefault(path, []).append(name)
                handles.append(child.register_forward_hook(record((path, name))))
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.arange(4, device=reft_model.device).remainder(vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    found: dict[str, nn.Module] = {}
    for path, block in sites.items():
        out = seen.get((path, ""))
        match = [
            name
            for name in candidates.get(path, [])
            if out is not None
            and (path, name) in seen
            and seen[(path, name)].shape == out.shape
            and torch.equal(seen[(path, name)], out)
        ]
        if not match:
            raise ConfigError(
                f"cannot merge: the output of {path} is not the output of one of its linear layers "
                "(a norm or residual follows the projection), so no weight can hold the edit"
            )
        found[path] = block.get_submodule(match[-1])
    return found


@torch.no_grad()
def _fold(projection: nn.Module, scale: torch.Tensor | None, shift: torch.Tensor) -> None:
    """y ↦ scale ⊙ y + shift folded into ``projection`` (computed in float64)."""
    weight = projection.weight
    transposed = not isinstance(projection, nn.Linear)  # Conv1D: y = x W + c, W is (in, out)
    w = weight.detach().to(torch.float64)
    bias = projection.bias
    c = (
        torch.zeros(w.shape[1] if transposed else w.shape[0], dtype=torch.float64, device=w.device)
        if bias is None
        else bias.detach().to(torch.float64)
    )
    if scale is not None:
        s = scale.to(torch.float64)
        w = w * (s.unsqueeze(0) if transposed else s.unsqueeze(1))
        c = c * s
    c = c + shift.to(torch.float64)
    weight.copy_(w.to(weight.dtype))
    if bias is None:
        projection.bias = nn.Parameter(c.to(weight.dtype), requires_grad=False)
    else:
        bias.copy_(c.to(bias.dtype))


def merge_and_unload(reft_model: Hooked) -> nn.Module:
    """See :meth:`reft_rs.ReftModel.merge_and_unload`."""
    config = reft_model.reft_config
    refusals = [reason for reason in map(_refusal, config.interventions) if reason]
    if refusals:
        raise ConfigError("cannot merge this adapter into the weights: " + "; ".join(refusals))
    paths = reft_model.site_paths()
    sites = {path: reft_model.model.get_submodule(path) for path in dict.fromkeys(paths)}
    projections = _output_projection(reft_model, sites)
    # In the order the hooks apply them, each edit after the previous one.
    for item, intervention, path in zip(config.interventions, reft_model.interventions, paths):
        values = intervention.checkpoint_tensors()
        if item.type == "red":
            _fold(projections[path], values["scale"], values["bias"])
        else:
            _fold(projections[path], None, item.alpha * values["vector"].to(torch.float64))
    return reft_model.remove_hooks()
