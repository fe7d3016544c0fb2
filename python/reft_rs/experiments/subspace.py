"""What the learned subspaces encode.

- :func:`logit_lens`: the tokens each basis row of an intervention (R, or
  W₂ of the non-orthogonal types) and each row of its source W promotes and
  suppresses when read out through the model's own unembedding, its final
  norm applied first (the logit lens).
- :func:`edit_statistics`: over a dataset, per intervention, the mean size
  of the edit ‖Φ(h) − h‖ beside ‖h‖, and the share of ‖h‖² that lies in
  the subspace (‖Bh‖² / ‖h‖² for an orthonormal basis B of its rows).
- :func:`principal_angles`: the angles between two subspaces (of two
  checkpoints, or of two layers), and :func:`overlap` their mean cos².

``reft-rs inspect CHECKPOINT --subspace`` prints them, ``--json`` writes
them, ``--plot`` draws the overlap of every pair of interventions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import IncompatibleModelError

__all__ = ["basis", "edit_statistics", "logit_lens", "overlap", "principal_angles"]


def basis(intervention: Any) -> torch.Tensor | None:
    """The rows spanning an intervention's subspace (``[r, d]``): R, or W₂
    for ``noreft``/``nodireft``; ``None`` for ``red`` and ``steer`` (whose
    ``steer`` vector is returned as one row)."""
    with torch.no_grad():
        if intervention.rotation is not None:
            return intervention.rotation().detach().float()
        if getattr(intervention, "projection_weight", None) is not None:
            return intervention.projection_weight.detach().float()
        if getattr(intervention, "vector", None) is not None:
            return intervention.vector.detach().float()[None]
    return None


def orthonormal(rows: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (rows) of the row space of ``rows``."""
    q, _ = torch.linalg.qr(rows.double().T)
    return q.T


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The principal angles, in degrees, ascending, between the row spaces
    of ``a`` (``[r1, d]``) and ``b`` (``[r2, d]``): arccos of the singular
    values of ``QaQbᵀ``."""
    if a.shape[-1] != b.shape[-1]:
        raise IncompatibleModelError(
            f"subspaces of widths {a.shape[-1]} and {b.shape[-1]} cannot be compared"
        )
    singular = torch.linalg.svdvals(orthonormal(a) @ orthonormal(b).T).clamp(-1.0, 1.0)
    return np.degrees(np.arccos(singular.numpy()))  # singular values descend, so angles ascend


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cos² of the principal angles: 1 for the same subspace, 0 for orthogonal ones."""
    cosines = np.cos(np.radians(principal_angles(a, b)))
    return float(np.mean(cosines**2))


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The norm before the unembedding (``model.norm``, ``transformer.ln_f``, ...)."""
    for path in (
        "model.norm",
        "transformer.ln_f",
        "model.final_layernorm",
        "gpt_neox.final_layer_norm",
        "norm",
    ):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Module):
            return module
    return None


def logit_lens(reft_model: Any, tokenizer: Any = None, *, top_k: int = 10) -> list[dict[str, Any]]:
    """Per intervention, the tokens its rows promote and suppress.

    Each row v is read as ``unembed(final_norm(v))`` (the model's output
    embedding); the ``top_k`` largest logits are the tokens it promotes, the
    smallest those it suppresses. Rows: ``basis`` (R or W₂, or the steering
    vector) and ``source`` (W of the types that have it).
    """
    model = reft_model.model
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None or not hasattr(unembed, "weight"):
        raise IncompatibleModelError(f"{type(model).__name__} has no output embedding to read tokens through")
    norm = _final_norm(model)
    weight = unembed.weight.detach().float()
    out = []
    for intervention in reft_model.interventions:
        entry: dict[str, Any] = {"name": intervention.config.name, "type": intervention.kind}
        rows = {"basis": basis(intervention)}
        if getattr(intervention, "weight", None) is not None:
            rows["source"] = intervention.weight.detach().float()
        for label, matrix in rows.items():
            if matrix is None or matrix.shape[-1] != weight.shape[-1]:
                continue
            entry[label] = [_row_tokens(vector, norm, weight, tokenizer, top_k) for vector in matrix]
        out.append(entry)
    return out


def _row_tokens(
    vector: torch.Tensor, norm: nn.Module | None, weight: torch.Tensor, tokenizer: Any, top_k: int
) -> dict[str, Any]:
    with torch.no_grad():
        state = vector.to(weight.device)
        if norm is not None:
            parameter = next(norm.parameters(), None)
            dtype = parameter.dtype if parameter is not None else state.dtype
            state = norm(state.to(dtype)[None, None])[0, 0].float()
        logits = weight @ state
        top = torch.topk(logits, top_k)
        bottom = torch.topk(-logits, top_k)

    def named(ids: torch.Tensor) -> list[Any]:
        ids = ids.tolist()
        return [tokenizer.decode([i]) for i in ids] if tokenizer is not None else ids

    return {
        "promotes": named(top.indices),
        "promotes_ids": top.indices.tolist(),
        "suppresses": named(bottom.indices),
        "suppresses_ids": bottom.indices.tolist(),
    }


def edit_statistics(reft_model: Any, batches: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per intervention, over every state it edits in ``batches`` (dicts of
    ``input_ids``, ``attention_mask``, ``locations``...): the count of edited
    states, mean ‖Φ(h) − h‖, mean ‖h‖ and the share of ‖h‖² in its subspace."""
    sums = [
        {"count": 0, "edit": 0.0, "norm": 0.0, "inside": 0.0, "energy": 0.0} for _ in reft_model.interventions
    ]
    bases = []
    for intervention in reft_model.interventions:
        rows = basis(intervention)
        bases.append(None if rows is None else orthonormal(rows).float())

    def recorder(index: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            h = args[0].detach().float().reshape(-1, args[0].shape[-1])
            edited = output.detach().float().reshape(-1, output.shape[-1])
            total = sums[index]
            total["count"] += h.shape[0]
            total["edit"] += float((edited - h).norm(dim=-1).sum())
            total["norm"] += float(h.norm(dim=-1).sum())
            if bases[index] is not None:
                total["inside"] += float(((h @ bases[index].T) ** 2).sum())
                total["energy"] += float((h**2).sum())

        return hook

    handles = [m.register_forward_hook(recorder(i)) for i, m in enumerate(reft_model.interventions)]
    was_training = reft_model.training
    reft_model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                device = reft_model.device
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                inputs.pop("labels", None)
                reft_model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        reft_model.train(was_training)
    out = []
    for intervention, total in zip(reft_model.interventions, sums):
        count = total["count"]
        out.append(
            {
                "name": intervention.config.name,
                "states": count,
                "mean_edit_norm": total["edit"] / count if count else None,
                "mean_state_norm": total["norm"] / count if count else None,
                "subspace_share": total["inside"] / total["energy"] if total["energy"] else None,
            }
        )
    return out


def overlap_matrix(
    named: Sequence[tuple[str, torch.Tensor | None]],
) -> tuple[list[str], np.ndarray]:
    """Names and the matrix of :func:`overlap` for every pair of subspaces."""
    kept = [(n, b) for n, b in named if b is not None]
    names = [n for n, _ in kept]
    matrix = np.zeros((len(kept), len(kept)))
    for i, (_, a) in enumerate(kept):
        for j, (_, b) in enumerate(kept):
            matrix[i, j] = overlap(a, b) if a.shape[-1] == b.shape[-1] else np.nan
    return names, matrix


def heatmap(names: Sequence[str], matrix: np.ndarray, path: Any, *, title: str) -> Any:
    """The overlap matrix as a PNG heatmap."""
    from ..training.plot import figure

    fig = figure()
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="mean cos² of the principal angles")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return fig
