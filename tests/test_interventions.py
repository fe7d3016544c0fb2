"""Each intervention type against its formula written plainly in torch."""

from __future__ import annotations

import math
import types

import pytest

torch = pytest.importorskip("torch")

from reft_rs import ConfigError, InterventionConfig, ReftConfig  # noqa: E402
from reft_rs.model.interventions import Intervention, orthonormalize  # noqa: E402

TYPES = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft", "red", "steer"]
LOW_RANK = {"loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"}
DIM, RANK = 24, 5
ACTS = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "tanh": torch.tanh,
}


def make(kind, **options):
    config = InterventionConfig(
        layer=0,
        type=kind,
        low_rank_dimension=RANK if kind in LOW_RANK else None,
        **options,
    )
    intervention = Intervention(config, DIM)
    with torch.no_grad():  # red and steer start as the identity; give them something to do
        for name in ("scale", "vector"):
            if hasattr(intervention, name):
                getattr(intervention, name).normal_()
        if kind == "red":
            intervention.bias.normal_()
    return intervention


def expected(intervention, h):
    """Φ(h) from the formulas of SPEC section 1, with plain tensors."""
    kind = intervention.kind
    act = ACTS[intervention.config.activation]
    p = {name: value.detach() for name, value in intervention.checkpoint_tensors().items()}
    rank = intervention.config.low_rank_dimension or 0
    b = p.get("bias", h.new_zeros(rank))
    if kind == "loreft":
        R, W = p["rotation"], p["weight"]
        return h + R.T @ (act(W @ h + b) - R @ h)
    if kind == "noreft":
        W1, W2 = p["weight"], p["projection_weight"]
        b2 = p.get("projection_bias", h.new_zeros(rank))
        return h + W2.T @ (act(W1 @ h + b) - (W2 @ h + b2))
    if kind == "direft":
        return h + p["rotation"].T @ act(p["weight"] @ h + b)
    if kind == "nodireft":
        return h + p["projection_weight"].T @ act(p["weight"] @ h + b)
    if kind == "consreft":
        R = p["rotation"]
        return h + R.T @ (b - R @ h)
    if kind == "lobireft":
        return h + p["rotation"].T @ b
    if kind == "red":
        return p["scale"] * h + p["bias"]
    return h + intervention.config.alpha * p["vector"]


FORMULA_CASES = [(kind, "identity") for kind in TYPES] + [
    (kind, activation)
    for kind in ("loreft", "noreft", "direft", "nodireft")
    for activation in ("relu", "gelu", "tanh")
]


@pytest.mark.parametrize(("kind", "activation"), FORMULA_CASES)
def test_every_type_matches_its_formula(kind, activation):
    torch.manual_seed(0)
    options = {"dtype": "float64", "activation": activation}
    if kind == "noreft":
        options["projection_bias"] = True
    if kind == "steer":
        options["alpha"] = 1.5
    intervention = make(kind, **options).eval()
    states = torch.randn(3, 4, DIM, dtype=torch.float64)
    got = intervention(states)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(
                got[i, j], expected(intervention, states[i, j]), rtol=1e-12, atol=1e-12
            )


@pytest.mark.parametrize("kind", ["loreft", "direft", "noreft", "nodireft"])
def test_bias_can_be_turned_off(kind):
    intervention = make(kind, bias=False, dtype="float64")
    assert "bias" not in intervention.checkpoint_tensors()
    states = torch.randn(2, DIM, dtype=torch.float64)
    torch.testing.assert_close(intervention(states)[0], expected(intervention, states[0]))


def test_initialisation_follows_the_spec():
    torch.manual_seed(1)
    loreft = make("loreft")
    bound = 1 / math.sqrt(DIM)
    assert loreft.weight.abs().max() <= bound and loreft.bias.abs().max() <= bound
    R = loreft.rotation()
    torch.testing.assert_close(R @ R.T, torch.eye(RANK), atol=1e-6, rtol=0)
    for kind in ("consreft", "lobireft"):
        b = make(kind).bias
        assert (b >= 0).all() and (b < 1).all()
    red = Intervention(InterventionConfig(layer=0, type="red"), DIM)
    assert (red.scale == 1).all() and (red.bias == 0).all()
    steer = Intervention(InterventionConfig(layer=0, type="steer"), DIM)
    assert (steer.vector == 0).all()


@pytest.mark.parametrize("kind", ["loreft", "direft", "consreft", "lobireft"])
def test_rotation_stays_orthonormal_through_training(kind):
    torch.manual_seed(2)
    intervention = make(kind)
    optimizer = torch.optim.Adam(intervention.parameters(), lr=0.05)
    target = torch.randn(16, DIM)
    states = torch.randn(16, DIM)
    for _ in range(300):
        optimizer.zero_grad()
        loss = ((intervention(states) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
    R = intervention.rotation()
    assert (R @ R.T - torch.eye(RANK)).abs().max() < 1e-5
    assert loss.item() < ((states - target) ** 2).mean().item()  # it did learn


def test_rotation_is_computed_once_per_forward_and_once_per_inference_call(monkeypatch):
    from reft_rs.model import interventions as module

    calls = []
    original = module.orthonormalize

    def counting(matrix):
        calls.append(1)
        return original(matrix)

    intervention = make("loreft")
    monkeypatch.setattr(module, "orthonormalize", counting)
    states = torch.randn(4, DIM)
    intervention(states).sum().backward()
    assert len(calls) == 1
    calls.clear()
    with torch.no_grad(), module.inference_call():
        first = intervention(states)
        second = intervention(states)
    assert len(calls) == 1 and torch.equal(first, second)
    with torch.no_grad():
        intervention.rotation.base.add_(0.01)  # between calls anything may change
        with module.inference_call():
            intervention(states)
    assert len(calls) == 2


def test_a_fused_optimizer_step_is_seen_by_inference():
    intervention = make("loreft")
    states = torch.randn(4, DIM)
    optimizer = torch.optim.AdamW(intervention.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        with torch.no_grad():
            from reft_rs.model.interventions import inference_call

            with inference_call():
                before = intervention.rotation()
        intervention(states).pow(2).sum().backward()
        optimizer.step()
        with torch.no_grad(), inference_call():
            after = intervention.rotation()
        assert not torch.equal(before, after)
        torch.testing.assert_close(after, orthonormalize(intervention.rotation.base.detach()), rtol=0, atol=0)


def test_orthonormalize_keeps_orthonormal_rows_nearly_fixed():
    torch.manual_seed(3)
    R = orthonormalize(torch.randn(RANK, DIM, dtype=torch.float64))
    torch.testing.assert_close(orthonormalize(R), R, atol=1e-12, rtol=0)
    half = orthonormalize(torch.randn(RANK, DIM).to(torch.bfloat16))
    assert half.dtype == torch.bfloat16


def test_dropout_applies_to_the_whole_output_in_training_only():
    intervention = make("loreft", dropout=0.5)
    states = torch.randn(64, DIM)
    intervention.eval()
    clean = intervention(states)
    intervention.train()
    torch.manual_seed(4)
    noisy = intervention(states)
    torch.manual_seed(4)
    reference = torch.nn.functional.dropout(clean, 0.5, training=True)
    torch.testing.assert_close(noisy, reference)
    assert (noisy == 0).float().mean() > 0.3


def test_parameters_default_to_float32_and_keep_their_dtype():
    intervention = make("loreft")
    assert all(p.dtype == torch.float32 for p in intervention.parameters())
    out = intervention(torch.randn(2, DIM, dtype=torch.bfloat16))
    assert out.dtype == torch.float32  # computed in the parameter dtype; the hook casts back
    half = make("direft", dtype="float16")
    assert all(p.dtype == torch.float16 for p in half.parameters())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", TYPES)
def test_half_precision_parameters_are_computed_in_float32(kind, dtype):
    intervention = make(kind, dtype=dtype).eval()
    states = torch.randn(5, DIM, dtype=torch.float64)
    with torch.no_grad():
        got = intervention(states)
        # the formulas over the stored half values (R as stored), in float64
        stored = {name: value.double() for name, value in intervention.checkpoint_tensors().items()}
        widened = types.SimpleNamespace(
            kind=kind, config=intervention.config, checkpoint_tensors=lambda: stored
        )
        reference = torch.stack([expected(widened, h) for h in states])
    assert got.dtype == torch.float32
    # one float32 rounding of each step, not one of the half dtype
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", TYPES)
def test_checkpoint_tensors_round_trip_exactly(kind):
    torch.manual_seed(5)
    source = make(kind, dtype="float32")
    target = make(kind, dtype="float32")
    target.load_checkpoint_tensors(source.checkpoint_tensors())
    states = torch.randn(6, DIM)
    with torch.no_grad():
        assert torch.equal(source.eval()(states), target.eval()(states))


def test_paper_parameter_counts():
    for kind, count in [
        ("loreft", 2 * DIM * RANK + RANK),
        ("direft", 2 * DIM * RANK + RANK),
        ("noreft", 2 * DIM * RANK + RANK),
        ("consreft", DIM * RANK + RANK),
        ("lobireft", DIM * RANK + RANK),
        ("red", 2 * DIM),
        ("steer", DIM),
    ]:
        assert make(kind).parameter_count() == count, kind


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"type": "megareft"}, "unknown intervention type"),
        ({"component": "mlp_input"}, "component: unknown variant `mlp_input`"),
        ({"positions": "f-1"}, "positions"),
        ({"low_rank_dimension": 0}, "low_rank_dimension"),
        ({"type": "red", "low_rank_dimension": 4}, "no low_rank_dimension"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "swish"}, "activation"),
        ({"dtype": "int8"}, "dtype"),
        ({"type": "consreft", "bias": False}, "always has its bias"),
        ({"projection_bias": True}, "noreft only"),
        ({"positions": "f3", "group": 1}, "group 1"),
        ({"layer": -1}, "layer"),
        ({"name": "a.b"}, "name"),
    ],
)
def test_bad_configs_raise_config_errors(kwargs, needle):
    options = {"layer": 0, "low_rank_dimension": 4, **kwargs}
    with pytest.raises(ConfigError, match=None) as info:
        InterventionConfig(**options)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_reft_config_expands_two_sided_specs_in_pyreft_order():
    config = ReftConfig.for_layers([3, 9], low_rank_dimension=2, positions="f5+l5")
    assert [(i.layer, i.group) for i in config.interventions] == [(3, 0), (9, 0), (3, 1), (9, 1)]
    assert len({i.name for i in config.interventions}) == 4
    shared = ReftConfig.for_layers([3, 9], positions="f5+l5", share_weights=True)
    assert [(i.layer, i.group) for i in shared.interventions] == [(3, 0), (9, 0)]
    single = ReftConfig(InterventionConfig(layer=1, low_rank_dimension=2, positions="f2+l2"))
    assert [i.group for i in single.interventions] == [0, 1]
    red = ReftConfig.for_layers(range(3), type="red")
    assert all(i.positions == "all" and i.low_rank_dimension is None for i in red.interventions)
    with pytest.raises(ConfigError, match="named"):
        ReftConfig([InterventionConfig(layer=0, low_rank_dimension=1, name="x")] * 2)
