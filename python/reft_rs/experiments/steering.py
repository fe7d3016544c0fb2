"""Steering vectors from contrastive pairs, saved as ``steer`` checkpoints.

Given pairs of prompts that differ in one property (formal and casual
replies, say), the states of each pair are read at a layer's output and
compared; the vector that separates them becomes a ``steer`` intervention
(h + αv on every token) at that layer. The checkpoint runs in torch, the
Rust engine and the server like any other, and ``strength`` scales it at
inference (negative reverses it).

Methods, for the pairs' states p_i and n_i at one layer:

* ``mean_difference``: v = mean(p_i) − mean(n_i).
* ``pca``: the first principal direction u of the differences
  d_i = p_i − n_i (the top right-singular vector of the matrix of d_i,
  uncentred, so a shift shared by the pairs counts), with its sign chosen
  so that the positives project above the negatives, and scaled by that
  gap: v = u · (mean(p_i·u) − mean(n_i·u)), so that α = 1 moves the
  negatives' mean projection onto the positives'.

States are read at each prompt's last token (``read="last"``) or averaged
over its tokens (``read="mean"``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..config import InterventionConfig, ReftConfig
from ..errors import ConfigError
from ..io import checkpoint
from ..model.layout import find_layers, model_dimensions, resolve

__all__ = ["compute_steering_vectors", "save_steering_vectors", "steering_checkpoint"]

Method = Literal["mean_difference", "pca"]
Read = Literal["last", "mean"]


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    ids = []
    for text in texts:
        if not isinstance(text, str) or not text:
            raise ConfigError(f"each prompt must be a non-empty string, found {text!r}")
        encoded = tokenizer(text)["input_ids"]
        if not encoded:
            raise ConfigError(f"the prompt {text!r} encodes to no tokens")
        ids.append(list(encoded))
    return ids


@torch.no_grad()
def _states(
    model: nn.Module,
    ids: list[list[int]],
    layers: Sequence[int],
    component: str,
    read: Read,
    batch_size: int,
) -> dict[int, np.ndarray]:
    """``{layer: (prompts, d)}`` float64 states at each layer's ``component``."""
    stack = find_layers(model)
    sites = {
        layer: resolve(model, InterventionConfig(layer=layer, type="steer", component=component), stack)
        for layer in layers
    }
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int, edits_input: bool) -> Any:
        def hook(module: nn.Module, args: tuple, *rest: Any) -> None:
            if edits_input:
                value = args[0] if args else rest[0]["hidden_states"]
            else:
                value = rest[0]
                value = value[0] if isinstance(value, tuple) else value
            captured[layer] = value.detach()

        return hook

    handles = []
    for layer, site in sites.items():
        if site.edits_input:
            handles.append(site.module.register_forward_pre_hook(hook_for(layer, True), with_kwargs=True))
        else:
            handles.append(site.module.register_forward_hook(hook_for(layer, False)))
    device = next(model.parameters()).device
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            width = max(len(row) for row in chunk)
            # Right-padded: each prompt's tokens keep positions 0, 1, ...
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, tokens in enumerate(chunk):
                input_ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
            for layer in layers:
                states = captured[layer].to(torch.float64).cpu()
                if read == "last":
                    last = mask.sum(dim=1) - 1
                    picked = states[torch.arange(len(chunk)), last]
                else:
                    weights = mask.to(torch.float64).unsqueeze(-1)
                    picked = (states * weights).sum(dim=1) / weights.sum(dim=1)
                out[layer].append(picked.numpy())
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def _vector(positive: np.ndarray, negative: np.ndarray, method: Method) -> np.ndarray:
    if method == "mean_difference":
        return positive.mean(axis=0) - negative.mean(axis=0)
    differences = positive - negative
    _, _, vt = np.linalg.svd(differences, full_matrices=False)
    direction = vt[0]
    gap = float((positive @ direction).mean() - (negative @ direction).mean())
    if gap < 0:
        direction, gap = -direction, -gap
    return direction * gap


def compute_steering_vectors(
    model: nn.Module,
    tokenizer: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Sequence[int],
    *,
    method: Method = "mean_difference",
    read: Read = "last",
    component: str = "block_output",
    batch_size: int = 8,
) -> dict[int, np.ndarray]:
    """One steering vector per layer from pairs of prompts (see the module notes).

    Args:
        model: A Hugging Face model (frozen; nothing is changed).
        tokenizer: Its tokenizer; prompts are encoded as given (apply a chat
            template first if the vectors are for chat).
        positive, negative: The pairs, ``positive[i]`` against ``negative[i]``.
        layers: Layer indices, from 0.
        method: ``mean_difference`` or ``pca``.
        read: ``last`` (each prompt's last token) or ``mean`` (all its tokens).
        component: Where the states are read, and where the vectors act.

    Returns:
        ``{layer: float32 vector}``.
    """
    if method not in ("mean_difference", "pca"):
        raise ConfigError(f"method must be 'mean_difference' or 'pca', found {method!r}")
    if read not in ("last", "mean"):
        raise ConfigError(f"read must be 'last' or 'mean', found {read!r}")
    if len(positive) != len(negative) or not positive:
        raise ConfigError(
            f"give as many negative prompts as positive ones, at least one (found {len(positive)} "
            f"and {len(negative)})"
        )
    if method == "pca" and len(positive) < 2:
        raise ConfigError("the pca method needs at least two pairs")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, found {batch_size}")
    layers = list(dict.fromkeys(int(layer) for layer in layers))
    if not layers:
        raise ConfigError("give at least one layer")
    _, num_layers = model_dimensions(model)
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ConfigError(
                f"layer {layer} does not exist; the model has {num_layers} layers (0..{num_layers - 1})"
            )
    ids = _encode(tokenizer, list(positive) + list(negative))
    states = _states(model, ids, layers, component, read, batch_size)
    n = len(positive)
    return {layer: _vector(s[:n], s[n:], method).astype(np.float32) for layer, s in states.items()}


def save_steering_vectors(
    model: nn.Module,
    vectors: Mapping[int, np.ndarray],
    path: str | os.PathLike[str],
    *,
    component: str = "block_output",
    alpha: float = 1.0,
    metadata: Mapping[str, Any] | None = None,
) -> ReftConfig:
    """Saves ``{layer: vector}`` as a ``steer`` checkpoint for ``model``."""
    config = ReftConfig(
        [
            InterventionConfig(
                layer=int(layer), type="steer", component=component, positions="all", alpha=alpha
            )
            for layer in sorted(vectors)
        ],
        metadata=dict(metadata or {}),
    )
    hidden_size, _ = model_dimensions(model)
    tensors = {}
    for item in config.interventions:
        vector = np.asarray(vectors[item.layer], dtype=np.float32).reshape(-1)
        if vector.size != hidden_size:
            raise ConfigError(
                f"layer {item.layer}: a vector of {vector.size} values for states of {hidden_size}"
            )
        tensors[f"{item.name}.vector"] = vector
    identity, _ = checkpoint.base_identity(model, hidden_size=hidden_size, layers=0)
    checkpoint.save(path, config.to_checkpoint(identity), tensors)
    return config


def steering_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: Sequence[int],
    path: str | os.PathLike[str],
    *,
    method: Method = "mean_difference",
    read: Read = "last",
    component: str = "block_output",
    alpha: float = 1.0,
    batch_size: int = 8,
) -> ReftConfig:
    """:func:`compute_steering_vectors` then :func:`save_steering_vectors`."""
    vectors = compute_steering_vectors(
        model,
        tokenizer,
        positive,
        negative,
        layers,
        method=method,
        read=read,
        component=component,
        batch_size=batch_size,
    )
    metadata = {"steering": {"method": method, "read": read, "pairs": len(positive)}}
    return save_steering_vectors(model, vectors, path, component=component, alpha=alpha, metadata=metadata)
