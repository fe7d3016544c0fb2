"""The interventions as torch modules.

Each module maps hidden states ``h`` (any leading shape, last dimension d) to
the edited states ``Φ(h)``, computed in the parameter dtype (float32 by
default); the caller casts back to the model's dtype. Notation: r the rank,
R ∈ ℝ^{r×d} with orthonormal rows, W ∈ ℝ^{r×d}, b ∈ ℝʳ.

| type | Φ(h) |
|---|---|
| ``loreft`` | h + Rᵀ(act(Wh + b) − Rh) |
| ``noreft`` | h + W₂ᵀ(act(W₁h + b₁) − (W₂h + b₂)) |
| ``direft`` | h + Rᵀ act(Wh + b) |
| ``nodireft`` | h + W₂ᵀ act(W₁h + b₁) |
| ``consreft`` | h + Rᵀ(b − Rh) |
| ``lobireft`` | h + Rᵀ b |
| ``red`` | s ⊙ h + b |
| ``steer`` | h + α v |

R is kept orthonormal by construction: it is the orthonormal factor of an
unconstrained parameter (a QR decomposition, sign-fixed so the map is
smooth), computed once per forward pass while training and once per model
call in inference. That costs one small QR per intervention per step, where
pyreft's orthogonal parametrization rebuilds a Householder product several
times.

Which parameters each type has (names, shapes in r and d, which bias flags
apply) is the Rust core's table (:func:`reft_rs._core.parameter_layout`),
the one the checkpoint format checks files against.

The edit is computed in the parameter dtype (float32 by default, whatever
the model's) and cast back to the model's dtype by the caller. Parameters
stored in half precision (``float16``, ``bfloat16``) are widened to float32
for the computation (exactly: every half value is a float32 value), so the
edit is rounded once, when cast back; the CPU engine computes the same way,
and the two paths agree to float32 rounding whatever the parameter dtype.

Dropout, when set, applies to the whole output ``Φ(h)`` during training, as
pyreft does; never during generation.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .. import _core
from ..config import DTYPES, InterventionConfig
from ..errors import ConfigError

__all__ = ["Intervention", "OrthonormalRows", "build_intervention", "inference_call", "orthonormalize"]

_ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "gelu": nn.functional.gelu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """The ``(r, d)`` matrix with orthonormal rows that QR gives for ``matrix``
    (or a batch of them, ``(..., r, d)``).

    Rows are orthonormalized in order (Gram-Schmidt's result, computed by
    Householder QR), with signs chosen so each row keeps a positive
    component along its input row; the map is smooth, so gradients flow.
    Half-precision inputs are computed in float32 and cast back.
    """
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    q, r = torch.linalg.qr(work.transpose(-2, -1), mode="reduced")
    diagonal = torch.diagonal(r, dim1=-2, dim2=-1)
    signs = torch.where(diagonal < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs.unsqueeze(-2)).transpose(-2, -1).to(matrix.dtype)


class _CallContext(threading.local):
    """The ReftModel call in progress on this thread; each thread has its
    own, so models may run from several threads at once."""

    # A fresh number per call, or None. Inference caches R for the length of
    # one call: parameters cannot change inside it, while between calls an
    # optimizer may have changed them without a trace (fused optimizers do
    # not bump tensors' version counters).
    current_call: int | None = None
    # R of every rotation of the model in the call, by id(module), computed
    # up front in one batched QR (and one batched backward).
    precomputed: dict[int, torch.Tensor] = {}  # noqa: RUF012 - replaced, never mutated


_context = _CallContext()
_calls = itertools.count()


def _orthonormalize_all(modules: Sequence[OrthonormalRows]) -> dict[int, torch.Tensor]:
    grad = torch.is_grad_enabled()
    groups: dict[tuple, list[OrthonormalRows]] = {}
    for module in modules:
        base = module.base
        groups.setdefault((tuple(base.shape), base.dtype, base.device), []).append(module)
    result: dict[int, torch.Tensor] = {}
    for members in groups.values():
        bases = [m.base if grad and m.base.requires_grad else m.base.detach() for m in members]
        rotations = orthonormalize(torch.stack(bases)) if len(bases) > 1 else orthonormalize(bases[0])[None]
        for module, rotation in zip(members, rotations.unbind(0)):
            result[id(module)] = rotation
    return result


@contextlib.contextmanager
def inference_call(rotations: Sequence[OrthonormalRows] = ()) -> Iterator[None]:
    """Marks one model call: every R is computed once, at its start, for all
    of ``rotations`` together (one batched QR)."""
    previous = (_context.current_call, _context.precomputed)
    _context.current_call = next(_calls)
    _context.precomputed = _orthonormalize_all(rotations) if rotations else {}
    try:
        yield
    finally:
        _context.current_call, _context.precomputed = previous


class OrthonormalRows(nn.Module):
    """A matrix R ∈ ℝ^{rank×dim} with orthonormal rows, trained freely.

    The trainable parameter ``base`` is unconstrained; ``R = orthonormalize(base)``.
    With gradients enabled R is recomputed on each call (once per forward
    pass); without them it is computed once per :func:`inference_call`.
    """

    def __init__(
        self,
        rank: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
        initialize: bool = True,
    ) -> None:
        super().__init__()
        if rank > dim:
            raise ValueError(f"rank {rank} cannot exceed the hidden size {dim}")
        self.base = nn.Parameter(torch.empty(rank, dim, dtype=dtype, device=device))
        if initialize:
            with torch.no_grad():
                init = torch.empty(rank, dim, dtype=torch.float32, device=device)
                nn.init.orthogonal_(init)
                self.base.copy_(orthonormalize(init).to(dtype))
        self._cached: torch.Tensor | None = None
        self._cached_call: int | None = None

    def forward(self) -> torch.Tensor:
        precomputed = _context.precomputed.get(id(self))
        if precomputed is not None:
            return precomputed
        if torch.is_grad_enabled() and self.base.requires_grad:
            return orthonormalize(self.base)
        call = _context.current_call
        if call is None:
            return orthonormalize(self.base.detach())
        cached, cached_call = self._cached, self._cached_call  # one read: other threads may set them
        if cached_call != call or cached is None:
            cached = orthonormalize(self.base.detach())
            self._cached, self._cached_call = cached, call
        return cached

    @torch.no_grad()
    def set(self, rotation: torch.Tensor, base: torch.Tensor | None = None) -> None:
        """Sets the parameter from a checkpoint: ``base`` (the unconstrained
        matrix R was computed from) when the checkpoint has it, so that R comes
        out bit for bit as saved; otherwise R itself, whose rows are already
        orthonormal (R is then reproduced to rounding)."""
        for value in (rotation, base):
            if value is not None and value.shape != self.base.shape:
                raise ValueError(
                    f"rotation has shape {tuple(value.shape)}, expected {tuple(self.base.shape)}"
                )
        self.base.copy_(rotation if base is None else base)
        self._cached = None


def _linear_init(
    rows: int, dim: int, dtype: torch.dtype, device: torch.device | None
) -> tuple[nn.Parameter, nn.Parameter]:
    """W and b drawn as ``nn.Linear(dim, rows)`` draws them: U(±1/√dim)."""
    bound = 1.0 / math.sqrt(dim)
    weight = nn.Parameter(torch.empty(rows, dim, dtype=dtype, device=device).uniform_(-bound, bound))
    bias = nn.Parameter(torch.empty(rows, dtype=dtype, device=device).uniform_(-bound, bound))
    return weight, bias


class Intervention(nn.Module):
    """One intervention of any type (see the module docstring for the formulas).

    Args:
        config: What to build.
        dim: Width d of the edited hidden state.
        device: Where to put the parameters.

    Parameters by type: ``rotation`` (an :class:`OrthonormalRows`; R), ``weight``
    and ``bias`` (W, b), ``projection_weight`` / ``projection_bias`` (W₂,
    b₂), ``scale`` and ``bias`` for ``red``, ``vector`` for ``steer``.
    """

    def __init__(
        self,
        config: InterventionConfig,
        dim: int,
        device: torch.device | None = None,
        *,
        initialize: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.kind = config.type
        self.dim = dim
        dtype = getattr(torch, config.dtype)
        rank = config.low_rank_dimension or 0
        self.activation = _ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        layout = dict(_core.parameter_layout(config.type, config.bias, config.projection_bias))
        self._layout = tuple(layout)
        extent = {"rank": rank, "width": dim}
        self.rotation: OrthonormalRows | None = None
        if "rotation" in layout:
            self.rotation = OrthonormalRows(rank, dim, dtype, device, initialize)
        # Starting values (the draws are in a fixed order, so seeded runs repeat):
        # W, b and W₂, b₂ as nn.Linear draws them; the constant biases of
        # consreft/lobireft uniform in [0, 1) as pyreft's; RED the identity;
        # a steering vector zero.
        if "weight" in layout:
            weight, bias = _linear_init(rank, dim, dtype, device)
            self.weight = weight
            self.bias = bias if "bias" in layout else None
        if "projection_weight" in layout:
            weight, bias = _linear_init(rank, dim, dtype, device)
            self.projection_weight = weight
            self.projection_bias = bias if "projection_bias" in layout else None
        if "bias" in layout and "weight" not in layout and "scale" not in layout:
            self.bias = nn.Parameter(torch.rand(rank, dtype=dtype, device=device))
        if "scale" in layout:
            self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
            self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        if "vector" in layout:
            self.vector = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        for name, extents in layout.items():
            value = self.rotation.base if name == "rotation" else getattr(self, name, None)
            expected = tuple(extent[e] for e in extents)
            if value is None or tuple(value.shape) != expected:
                raise AssertionError(f"{config.type}: parameter {name} does not follow the core's layout")
        if not config.trainable:
            self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (they move together: see :meth:`parameter_dtype_name`)."""
        return next(self.parameters()).dtype

    def parameter_dtype_name(self) -> str:
        """The parameters' dtype as a checkpoint names it, checking that they
        share one (a model moved with ``.to(torch.bfloat16)`` moves them all)."""
        dtypes = {p.dtype for p in self.parameters()}
        if len(dtypes) != 1:
            raise ConfigError(
                f"{self.config.name}: the parameters have mixed dtypes "
                f"({', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}); "
                "move the whole intervention with .to(dtype) before saving"
            )
        name = str(dtypes.pop()).removeprefix("torch.")
        if name not in DTYPES:
            raise ConfigError(
                f"{self.config.name}: parameters of dtype {name} cannot be saved (checkpoints hold {', '.join(DTYPES)})"
            )
        return name

    def _project(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``h Wᵀ + b``, fused into one ``addmm`` for the usual 2-D rows."""
        if bias is not None and h.dim() == 2:
            return torch.addmm(bias, h, weight.T)
        out = h @ weight.T
        return out if bias is None else out + bias

    def _add_back(self, h: torch.Tensor, edit: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``h + edit · basis`` (that is, h + basisᵀ edit per row), fused when 2-D."""
        if h.dim() == 2:
            return torch.addmm(h, edit, basis)
        return h + edit @ basis

    def _source(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """act(Wh + b)."""
        return self.activation(self._project(h, weight, bias))

    def _parameters_as(self, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        """Every parameter (R computed) in ``dtype``: a no-op cast unless they are half precision."""
        values: dict[str, torch.Tensor | None] = {}
        for name in ("weight", "bias", "projection_weight", "projection_bias", "scale", "vector"):
            value = getattr(self, name, None)
            values[name] = None if value is None else value.to(dtype)
        values["rotation"] = None if self.rotation is None else self.rotation().to(dtype)
        return values

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """Φ(h) without dropout, for ``h`` already in the compute dtype
        (:attr:`compute_dtype`)."""
        kind = self.kind
        p = self._parameters_as(h.dtype)
        r = p["rotation"]
        if kind == "loreft":
            if self.config.activation == "identity":
                # Wh + b − Rh = (W − R)h + b: one projection instead of two.
                return self._add_back(h, self._project(h, p["weight"] - r, p["bias"]), r)
            return self._add_back(h, self._source(h, p["weight"], p["bias"]) - h @ r.T, r)
        if kind == "direft":
            return self._add_back(h, self._source(h, p["weight"], p["bias"]), r)
        if kind == "consreft":
            return self._add_back(h, p["bias"] - h @ r.T, r)
        if kind == "lobireft":
            return h + p["bias"] @ r
        if kind == "noreft":
            projected = self._project(h, p["projection_weight"], p["projection_bias"])
            source = self._source(h, p["weight"], p["bias"])
            return self._add_back(h, source - projected, p["projection_weight"])
        if kind == "nodireft":
            return self._add_back(h, self._source(h, p["weight"], p["bias"]), p["projection_weight"])
        if kind == "red":
            return h * p["scale"] + p["bias"]
        return h + self.config.alpha * p["vector"]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the edit is computed in: the parameters', widened to at
        least float32."""
        return torch.promote_types(self.dtype, torch.float32)

    def forward(self, hidden: torch.Tensor, *, dropout: bool = True) -> torch.Tensor:
        """Φ(hidden) in the compute dtype, with dropout while training (unless
        ``dropout=False``, as in generation)."""
        output = self.edit(hidden.to(self.compute_dtype))
        if dropout and self.dropout is not None:
            output = self.dropout(output)
        return output

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters under their checkpoint names: R itself as
        ``rotation`` (what inference uses), and ``rotation_base``, the
        unconstrained matrix R is computed from, so that a reloaded model
        reproduces R bit for bit and training resumes exactly."""
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.rotation is not None:
                tensors["rotation"] = self.rotation()
                tensors["rotation_base"] = self.rotation.base.detach()
            for name in self._layout:
                if name != "rotation":
                    tensors[name] = getattr(self, name).detach()
        return tensors

    @torch.no_grad()
    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Sets every parameter from :meth:`checkpoint_tensors`-style names."""
        tensors = dict(tensors)
        base = tensors.pop("rotation_base", None)
        expected = self.parameter_names()
        if set(tensors) != expected or (base is not None and self.rotation is None):
            raise ValueError(
                f"{self.config.name}: expected tensors {sorted(expected)}, found {sorted(tensors)}"
            )
        for name, value in tensors.items():
            if name == "rotation":
                self.rotation.set(
                    value.to(self.rotation.base.device, self.rotation.base.dtype),
                    base=None
                    if base is None
                    else base.to(self.rotation.base.device, self.rotation.base.dtype),
                )
            else:
                parameter = getattr(self, name)
                if parameter.shape != value.shape:
                    raise ValueError(
                        f"{self.config.name}.{name}: shape {tuple(value.shape)}, expected {tuple(parameter.shape)}"
                    )
                parameter.copy_(value)

    def parameter_names(self) -> set[str]:
        """The checkpoint names of this intervention's parameters (the core's layout)."""
        return set(self._layout)

    def parameter_count(self) -> int:
        """Trainable values as the ReFT paper counts them (R counts r·d)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        rank = f", rank={self.config.low_rank_dimension}" if self.config.low_rank_dimension else ""
        return f"{self.kind}, dim={self.dim}{rank}, dtype={self.config.dtype}"


def build_intervention(
    config: InterventionConfig, dim: int, device: torch.device | None = None
) -> Intervention:
    """Builds the module for ``config`` with hidden width ``dim``."""
    return Intervention(config, dim, device)
