"""One schema: the Rust core owns the checkpoint tables and checks, and every
path (Python configs, the torch modules, saving and loading, the engine)
gets the same answer from it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import reft_rs
from reft_rs import ConfigError, InterventionConfig, ReftConfig, _core
from reft_rs.errors import IncompatibleModelError, InvalidCheckpointError
from reft_rs.io import checkpoint

BASE = {"name_or_path": "tiny", "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 3}

# Entries that are wrong on their own, each with a part of the reason.
BAD = [
    ({"type": "megareft"}, "unknown intervention type"),
    ({"component": "mlp_input"}, "component: unknown variant `mlp_input`"),
    ({"positions": "x1"}, "positions"),
    ({"low_rank_dimension": 0}, "low_rank_dimension"),
    ({"type": "red", "low_rank_dimension": 4}, "no low_rank_dimension"),
    ({"dropout": 1.5}, "dropout"),
    ({"activation": "swish"}, "unknown activation"),
    ({"dtype": "int64"}, "not a floating-point type"),
    ({"dtype": "float8"}, "dtype: unknown variant"),
    ({"type": "consreft", "bias": False}, "always has its bias"),
    ({"projection_bias": True}, "noreft only"),
    ({"positions": "f3", "group": 1}, "group 1"),
    ({"layer": -1}, "layer: invalid value"),
    ({"layer": "2"}, "layer: invalid type"),
    ({"layer": True}, "layer: invalid type"),
    ({"name": "a.b"}, "name"),
    ({"name": "café"}, "ASCII"),  # passed in Python before and failed only when saving
    ({"type": "red", "include_last": False}, "include_last"),
    ({"embed_dim": 0}, "embed_dim"),
    ({"tower": "middle"}, "tower: unknown variant"),
    ({"type": "red", "component": "cross_attention_output"}, "cross_attention_output is a decoder component"),
    ({"type": "red", "component": "cross_attention_output", "tower": "encoder"}, "decoder component"),
]


def entry(**changes):
    item = {"name": "a", "layer": 1, "low_rank_dimension": 4, "positions": "l1", **changes}
    if item.get("type") in ("red", "steer") and "positions" not in changes:
        item["positions"] = "all"
    if item.get("type") in ("red", "steer") and "low_rank_dimension" not in changes:
        item.pop("low_rank_dimension")
    return item


@pytest.mark.parametrize(("change", "needle"), BAD)
def test_python_configs_and_checkpoints_give_the_same_verdict(change, needle):
    item = entry(**change)
    with pytest.raises(ConfigError) as built:
        InterventionConfig(**item)
    assert needle in str(built.value)
    stored = {"component": "block_output", "type": "loreft", **item}
    with pytest.raises(InvalidCheckpointError) as loaded:
        checkpoint.normalize_config({"base_model": BASE, "interventions": [stored]})
    # the checkpoint's message is the same reason, placed in the file
    assert needle in str(loaded.value)
    reason = str(built.value).split(": ", 1)[-1]
    assert reason in str(loaded.value), (str(built.value), str(loaded.value))


def test_good_configs_pass_both_ways_with_the_same_defaults():
    for kind in reft_rs.config.INTERVENTION_TYPES:
        low_rank = kind in reft_rs.config.LOW_RANK_TYPES
        item = InterventionConfig(layer=2, type=kind, low_rank_dimension=4 if low_rank else None, name="x")
        assert item.positions == ("l1" if low_rank else "all")
        stored = checkpoint.normalize_config({"base_model": BASE, "interventions": [item.to_checkpoint()]})[
            "interventions"
        ][0]
        assert {k: v for k, v in item.to_checkpoint().items() if k in stored} == stored
    assert InterventionConfig(layer=np.int64(1), low_rank_dimension=np.int32(2)).layer == 1  # numpy ints
    assert InterventionConfig(layer=0, low_rank_dimension=2, positions=[0, -1]).positions == "0,-1"
    for field in ("dropout", "alpha"):
        with pytest.raises(ConfigError, match=f"{field} must be a finite number, found nan"):
            InterventionConfig(layer=0, type="steer", **{field: float("nan")})


# The specification's tables (SPEC.md §1-§3), written out here: which
# matrices each type trains (R: rotation, W/b: a learned source, W₂: a
# projection) and where it applies by default.
SPEC_TYPES = {
    "loreft": (True, True, True, False, "l1"),
    "noreft": (True, False, True, True, "l1"),
    "direft": (True, True, True, False, "l1"),
    "nodireft": (True, False, True, True, "l1"),
    "consreft": (True, True, False, False, "l1"),
    "lobireft": (True, True, False, False, "l1"),
    "red": (False, False, False, False, "all"),
    "steer": (False, False, False, False, "all"),
}
SPEC_COMPONENTS = ("block_output", "block_input", "mlp_output", "attention_output")
# Beyond the specification's table: an encoder-decoder's decoder component,
# and the stacks an intervention may name on an encoder-decoder or a
# vision-language model (issue 29).
ENCODER_DECODER_COMPONENTS = ("cross_attention_output",)
TOWERS = ("encoder", "decoder", "vision", "projector")
SPEC_DTYPES = ("float32", "float16", "bfloat16", "float64")


def test_the_tables_are_the_specification_s():
    """The core's tables (which Python reads) against the specification,
    and each type's torch module against its row."""
    schema = _core.schema()
    fields = ("low_rank", "rotation", "source", "projection", "default_positions")
    assert {name: tuple(row[f] for f in fields) for name, row in schema["types"].items()} == SPEC_TYPES
    assert reft_rs.config.INTERVENTION_TYPES == tuple(SPEC_TYPES)
    assert reft_rs.config.COMPONENTS == SPEC_COMPONENTS + ENCODER_DECODER_COMPONENTS
    assert reft_rs.config.TOWERS == TOWERS
    assert reft_rs.config.DTYPES == SPEC_DTYPES
    assert set(reft_rs.config.ACTIVATIONS) >= {"identity", "relu", "gelu", "silu", "tanh", "sigmoid"}
    assert reft_rs.FORMAT_VERSION == schema["format_version"] == 2
    for name, (low_rank, rotation, source, projection, positions) in SPEC_TYPES.items():
        config = InterventionConfig(layer=0, type=name, low_rank_dimension=4 if low_rank else None)
        assert config.positions == positions, name
        keys = {key.split(".", 1)[1] for key, _, _ in checkpoint.expected_tensors(
            {"base_model": BASE, "interventions": [{**config.to_checkpoint(), "name": "a"}]}
        )}  # fmt: skip
        assert ("rotation" in keys) == rotation, (name, keys)
        assert ("weight" in keys) == source, (name, keys)
        assert ("projection_weight" in keys) == projection, (name, keys)


def test_placement_checks_come_from_the_core():
    with pytest.raises(ConfigError, match="layer 3 does not exist: the model has 3 layers"):
        _core.check_placement("a", 3, 4, 32, 3)
    with pytest.raises(ConfigError, match="low_rank_dimension 40 must be between 1 and the hidden size 32"):
        _core.check_placement("a", 0, 40, 32, 3)
    _core.check_placement("a", 2, None, 32, 3)
    config = {
        "base_model": BASE,
        "interventions": [{**entry(layer=3), "component": "block_output", "type": "loreft"}],
    }
    with pytest.raises(InvalidCheckpointError, match="layer 3 does not exist: the model has 3 layers"):
        checkpoint.normalize_config(config)
    with pytest.raises(IncompatibleModelError, match='model type "llama" vs the model\'s "gpt2"'):
        _core.check_fits(
            tuple(BASE.values()), "ckpt", inferred=False, hidden_size=32, num_hidden_layers=3,
            model_type="gpt2", strict=True,
        )  # fmt: skip


torch = pytest.importorskip("torch")

from reft_rs.model.interventions import Intervention  # noqa: E402


@pytest.mark.parametrize(
    ("kind", "bias", "projection_bias"),
    [
        (kind, bias, projection)
        for kind, bias, projection in itertools.product(
            reft_rs.config.INTERVENTION_TYPES, [True, False], [False, True]
        )
        if (bias or kind in reft_rs.config.SOURCE_TYPES) and (not projection or kind == "noreft")
    ],
)
def test_torch_modules_hold_exactly_the_tensors_the_core_expects(kind, bias, projection_bias):
    low_rank = kind in reft_rs.config.LOW_RANK_TYPES
    item = InterventionConfig(
        layer=0, type=kind, low_rank_dimension=3 if low_rank else None, bias=bias,
        projection_bias=projection_bias, name="x",
    )  # fmt: skip
    module = Intervention(item, 32)
    held = {f"x.{name}": tuple(value.shape) for name, value in module.checkpoint_tensors().items()}
    held.pop("x.rotation_base", None)  # an extra tensor, declared as such by save_pretrained
    expected = checkpoint.expected_tensors({"base_model": BASE, "interventions": [item.to_checkpoint()]})
    assert held == {key: shape for key, _, shape in expected}
    assert module.parameter_names() == {key.removeprefix("x.") for key, _, _ in expected}


def test_building_a_reft_model_does_not_serialise_its_config(monkeypatch):
    from .tiny_models import build

    config = ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="f1+l1")

    def refuse(*args, **kwargs):
        raise AssertionError("the config was serialised and checked again")

    monkeypatch.setattr(_core, "normalize_config", refuse)
    monkeypatch.setattr(_core, "normalize_intervention", refuse)
    monkeypatch.setattr(checkpoint, "_config_json", refuse)
    reft_model = reft_rs.get_reft_model(build("llama"), config)
    assert len(reft_model.interventions) == 4
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="layer 5 does not exist"):
        reft_rs.get_reft_model(build("llama"), ReftConfig.for_layers([5], low_rank_dimension=2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_dtype_move_before_saving_is_recorded(dtype, tmp_path):
    from .tiny_models import build, random_ids

    config = ReftConfig.for_layers([1], type="loreft", low_rank_dimension=2, positions="l2")
    reft_model = reft_rs.get_reft_model(build("llama"), config)
    reft_model.to(dtype)
    reft_model.save_pretrained(tmp_path / "moved")
    saved, tensors = checkpoint.load(tmp_path / "moved", framework="torch")
    name = str(dtype).removeprefix("torch.")
    assert saved["interventions"][0]["dtype"] == name
    assert {str(t.dtype).removeprefix("torch.") for t in tensors.values()} == {name}
    reloaded = reft_rs.ReftModel.from_pretrained(build("llama").to(dtype), tmp_path / "moved")
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, reft_model.eval()(input_ids=ids).logits)
    # parameters moved one by one to different dtypes cannot be saved as one intervention
    with torch.no_grad():
        reft_model.interventions[0].weight.data = reft_model.interventions[0].weight.data.float()
    with pytest.raises(ConfigError, match="mixed dtypes"):
        reft_model.save_pretrained(tmp_path / "mixed")
