"""ReftModel on tiny models of every family: where edits land, training,
save/load, padding, hooks, locations (peft TEST_CASES style)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import (  # noqa: E402
    ConfigError,
    IncompatibleModelError,
    InterventionConfig,
    LocationError,
    ReftConfig,
    ReftModel,
    ShapeError,
    get_reft_model,
)
from reft_rs.model.layout import resolve  # noqa: E402

from .tiny_models import DECODERS, ENCODERS, FAMILIES, HIDDEN, build, random_ids  # noqa: E402

TYPES = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft", "red", "steer"]
COMPONENTS = ["block_output", "block_input", "mlp_output", "attention_output"]
LOW_RANK = {"loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"}
LENGTH = 9

TEST_CASES = (
    [(family, kind, "block_output") for family in FAMILIES for kind in TYPES]
    + [(family, "loreft", component) for family in FAMILIES for component in COMPONENTS[1:]]
    + [("llama", kind, component) for kind in ("red", "steer") for component in COMPONENTS[1:]]
)


def intervention_for(kind, component, layer=1, **options):
    return InterventionConfig(
        layer=layer,
        type=kind,
        component=component,
        low_rank_dimension=3 if kind in LOW_RANK else None,
        positions="l2" if kind in LOW_RANK else "all",
        **options,
    )


def randomize(reft_model, seed=0):
    """Gives identity-initialised interventions (red, steer) something to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for intervention in reft_model.interventions:
            for name in ("scale", "vector"):
                if hasattr(intervention, name):
                    getattr(intervention, name).copy_(torch.randn(HIDDEN, generator=generator))
            if intervention.kind == "red":
                intervention.bias.copy_(torch.randn(HIDDEN, generator=generator))


def capture(module, edits_input):
    """Records the state at a hook site (registered after reft_rs's hooks, so it
    sees the edited value)."""
    seen = []
    if edits_input:
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(
                (args[0] if args else kwargs["hidden_states"]).detach().clone()
            ),
            with_kwargs=True,
        )
    else:
        handle = module.register_forward_hook(
            lambda m, args, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        )
    return seen, handle


def inputs_for(family, batch=2):
    ids = random_ids(batch, LENGTH)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def loss_inputs(family, batch=2):
    inputs = inputs_for(family, batch)
    if family in ENCODERS:
        inputs["labels"] = torch.tensor([0, 1] * (batch // 2))
    else:
        labels = inputs["input_ids"].clone()
        labels[:, :5] = -100  # a 5-token prompt, a 4-token response
        inputs["labels"] = labels
        inputs["locations"] = reft_rs.positions.locate([5] * batch, "l2")
    return inputs


@pytest.mark.parametrize(("family", "kind", "component"), TEST_CASES)
def test_edits_land_exactly_at_the_chosen_positions(family, kind, component):
    model = build(family)
    config = intervention_for(kind, component)
    reft_model = get_reft_model(model, config)
    randomize(reft_model)
    site = resolve(model, reft_model.reft_config.interventions[0])
    seen, handle = capture(site.module, site.edits_input)
    inputs = inputs_for(family)
    with torch.no_grad():
        plain = model(**inputs)  # called directly, the model is unchanged
        edited = reft_model(**inputs)
    handle.remove()
    before, after = seen
    changed = (before - after).abs().amax(-1) > 0  # (batch, length)
    if kind in LOW_RANK:
        expected = torch.zeros_like(changed)
        expected[:, -2:] = True  # "l2": the last two prompt tokens
    else:
        expected = torch.ones_like(changed)
    assert torch.equal(changed, expected)
    if family in DECODERS:
        first = int(expected[0].nonzero()[0])
        torch.testing.assert_close(edited.logits[:, :first], plain.logits[:, :first], rtol=0, atol=0)
        assert not torch.equal(edited.logits[:, first], plain.logits[:, first])


@pytest.mark.parametrize(("family", "kind", "component"), TEST_CASES)
def test_training_lowers_the_loss_and_only_trains_interventions(family, kind, component):
    model = build(family)
    frozen = {name: p.clone() for name, p in model.named_parameters()}
    reft_model = get_reft_model(
        model, ReftConfig([intervention_for(kind, component)], trainable_head=family in ENCODERS)
    )
    reft_model.train()
    inputs = loss_inputs(family)
    optimizer = torch.optim.Adam([p for p in reft_model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = reft_model(**inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    head = {
        f"{name}.{p}"
        for name in ("score", "classifier")
        for p in ("weight", "bias", "dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")
    }
    for name, parameter in model.named_parameters():
        if name not in head:
            assert torch.equal(parameter, frozen[name]), name


@pytest.mark.parametrize(("family", "kind", "component"), TEST_CASES)
def test_save_and_load_give_bit_identical_outputs(family, kind, component, tmp_path):
    model = build(family)
    options = {"dropout": 0.1} if kind in LOW_RANK else {}
    reft_model = get_reft_model(
        model, ReftConfig([intervention_for(kind, component, **options)], trainable_head=family in ENCODERS)
    )
    randomize(reft_model)
    reft_model.train()
    inputs = loss_inputs(family)
    optimizer = torch.optim.SGD([p for p in reft_model.parameters() if p.requires_grad], lr=0.1)
    reft_model(**inputs).loss.backward()
    optimizer.step()
    reft_model.eval()
    reft_model.save_pretrained(tmp_path / "ckpt")
    restored = ReftModel.from_pretrained(build(family), tmp_path / "ckpt")
    restored.eval()
    assert restored.reft_config.interventions == reft_model.reft_config.interventions
    with torch.no_grad():
        out = reft_model(**inputs)
        again = restored(**inputs)
    assert torch.equal(out.logits, again.logits)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtype_dropout_activation_and_bias_flags_survive_reloading(dtype, tmp_path):
    config = ReftConfig(
        [
            InterventionConfig(
                layer=0,
                type="loreft",
                low_rank_dimension=2,
                positions="f1+l1",
                dtype=dtype,
                dropout=0.25,
                activation="gelu",
                bias=False,
            ),
            InterventionConfig(
                layer=1,
                type="noreft",
                low_rank_dimension=3,
                positions="l3",
                dtype=dtype,
                projection_bias=True,
                activation="tanh",
            ),
            InterventionConfig(layer=2, type="steer", alpha=-2.0, trainable=False, dtype=dtype),
        ]
    )
    reft_model = get_reft_model(build("llama"), config)
    reft_model.save_pretrained(tmp_path)
    restored = ReftModel.from_pretrained(build("llama"), tmp_path)
    assert restored.reft_config.interventions == reft_model.reft_config.interventions
    for intervention in restored.interventions:
        assert all(p.dtype == getattr(torch, dtype) for p in intervention.parameters())
    assert restored.interventions[-1].vector.requires_grad is False


def test_checkpoint_for_another_model_is_refused(tmp_path):
    reft_model = get_reft_model(build("llama"), intervention_for("loreft", "block_output"))
    reft_model.save_pretrained(tmp_path)
    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(IncompatibleModelError, match="hidden size 32 vs the model's 48"):
        ReftModel.from_pretrained(wider, tmp_path)
    deeper = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(IncompatibleModelError, match="3 layers vs the model's 4"):
        ReftModel.from_pretrained(deeper, tmp_path)
    with pytest.raises(IncompatibleModelError, match='model type "llama" vs the model\'s "qwen2"'):
        ReftModel.from_pretrained(build("qwen2"), tmp_path)
    with pytest.warns(UserWarning, match="qwen2"):
        ReftModel.from_pretrained(build("qwen2"), tmp_path, strict=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_left_and_right_padding_match_single_examples(family):
    model = build(family, dtype=torch.float64)
    config = ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="f2+l2", dtype="float64")
    reft_model = get_reft_model(model, config)
    lengths = [4, 9, 6]
    prompts = [random_ids(1, n, seed=n)[0] for n in lengths]
    singles = []
    with torch.no_grad():
        for prompt in prompts:
            singles.append(reft_model(input_ids=prompt[None]).logits[0])
        width = max(lengths)
        for side in ("left", "right"):
            ids = torch.zeros(3, width, dtype=torch.long)
            mask = torch.zeros(3, width, dtype=torch.long)
            for row, prompt in enumerate(prompts):
                where = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
                ids[row, where] = prompt
                mask[row, where] = 1
            locations = reft_rs.positions.locate(lengths, "f2+l2", padding_side=side)
            for given in (locations, None):  # explicit, and chosen by the model
                logits = reft_model(input_ids=ids, attention_mask=mask, locations=given).logits
                for row, prompt in enumerate(prompts):
                    where = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
                    torch.testing.assert_close(logits[row, where], singles[row], rtol=1e-9, atol=1e-9)


def test_location_forms_agree():
    model = build("llama")
    config = ReftConfig.for_layers([0, 1, 2], low_rank_dimension=2, positions="f2+l3")
    reft_model = get_reft_model(model, config)
    ids = random_ids(2, LENGTH)
    grouped = reft_rs.positions.locate([LENGTH, LENGTH], "f2+l3")
    per_intervention = np.stack([grouped[i.group] for i in config.interventions])
    with torch.no_grad():
        outputs = [
            reft_model(input_ids=ids, locations=grouped).logits,
            reft_model(input_ids=ids, locations=torch.from_numpy(grouped)).logits,
            reft_model(input_ids=ids, locations=per_intervention).logits,
            reft_model(input_ids=ids).logits,
        ]
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)
    masked = grouped.copy()
    masked[:] = -1
    with torch.no_grad():
        untouched = reft_model(input_ids=ids, locations=masked).logits
        plain = model(input_ids=ids).logits
    assert torch.equal(untouched, plain)


def test_bad_locations():
    reft_model = get_reft_model(
        build("llama"), ReftConfig.for_layers([0], low_rank_dimension=2, positions="f1+l1")
    )
    ids = random_ids(2, 5)
    with pytest.raises(LocationError, match="outside the 5 tokens"):
        reft_model(input_ids=ids, locations=np.full((2, 2, 1), 5))
    with pytest.raises(LocationError):
        reft_model(input_ids=ids, locations=np.full((2, 2, 1), -3))
    with pytest.raises(ShapeError, match="rows"):
        reft_model(input_ids=ids, locations=np.zeros((3, 2, 1), dtype=np.int64))
    with pytest.raises(ShapeError, match="batch=2"):
        reft_model(input_ids=ids, locations=np.zeros((2, 3, 1), dtype=np.int64))
    with pytest.raises(ShapeError, match="integers"):
        reft_model(input_ids=ids, locations=np.zeros((2, 2, 1)))


@pytest.mark.parametrize("padding", ["right", "left"])
def test_labels_over_the_whole_input_are_refused_with_the_fix(padding):
    """labels = input_ids (the usual Hugging Face habit) leaves no prompt to
    count positions from: a ConfigError that names the fix, not torch's
    "does not require grad" at backward()."""
    reft_model = get_reft_model(
        build("llama"), ReftConfig.for_layers([0], low_rank_dimension=2, positions="f1+l1")
    )
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :2] = 0
    with pytest.raises(ConfigError, match=r"row 0 cover its first token.*-100.*locations="):
        reft_model(input_ids=ids, attention_mask=mask, labels=ids.clone())
    # One row with a masked prompt is not enough: the other row is named.
    labels = ids.clone()
    labels[0, :3] = -100
    with pytest.raises(ConfigError, match="row 1 cover"):
        reft_model(input_ids=ids, attention_mask=mask, labels=labels)
    # The fixes: the prompt masked in every row, or explicit locations.
    labels[1, : 3 + (2 if padding == "left" else 0)] = -100
    reft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in reft_model.adapters["default"].parameters()
    )
    reft_model.zero_grad()
    out = reft_model(input_ids=ids, attention_mask=mask, labels=ids.clone(), locations=np.full((2, 2, 1), 2))
    out.loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in reft_model.adapters["default"].parameters()
    )


def test_many_interventions_on_one_layer_apply_in_order():
    model = build("llama", dtype=torch.float64)
    config = ReftConfig(
        [
            InterventionConfig(layer=1, type="steer", dtype="float64", name="first"),
            InterventionConfig(layer=1, type="red", dtype="float64", name="second"),
            InterventionConfig(
                layer=1, type="loreft", low_rank_dimension=2, positions="l1", dtype="float64", name="third"
            ),
        ]
    )
    reft_model = get_reft_model(model, config)
    randomize(reft_model)
    layer = model.model.layers[1]
    seen, handle = capture(layer, False)
    ids = random_ids(1, 6)
    with torch.no_grad():
        model(input_ids=ids)
        reft_model(input_ids=ids)
    handle.remove()
    h = seen[0][0]
    steer, red, loreft = reft_model.interventions
    expected = red(steer(h))
    expected[-1] = loreft(expected[-1:])[0]
    torch.testing.assert_close(seen[1][0], expected, rtol=1e-12, atol=1e-12)


def test_other_hooks_survive():
    model = build("gpt2")
    calls = []
    theirs = model.transformer.h[1].register_forward_hook(lambda m, a, o: calls.append("theirs"))
    reft_model = get_reft_model(model, ReftConfig.for_layers([1], type="red"))
    with torch.no_grad():
        reft_model(input_ids=random_ids(1, 4))
    assert calls == ["theirs"]
    base = reft_model.remove_hooks()
    assert base is model
    with torch.no_grad():
        model(input_ids=random_ids(1, 4))
    assert calls == ["theirs", "theirs"]
    assert len(model.transformer.h[1]._forward_hooks) == 1
    theirs.remove()


def test_a_bfloat16_model_with_float32_interventions_trains():
    model = build("llama", dtype=torch.bfloat16)
    reft_model = get_reft_model(model, ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="f1+l1"))
    assert all(p.dtype == torch.float32 for p in reft_model.interventions.parameters())
    inputs = loss_inputs("llama")
    inputs["locations"] = reft_rs.positions.locate([5, 5], "f1+l1")
    out = reft_model(**inputs)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grads = [p.grad for p in reft_model.interventions.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads)


def test_config_must_fit_the_model():
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        get_reft_model(build("llama"), InterventionConfig(layer=7, low_rank_dimension=2))
    with pytest.raises(ConfigError, match="low_rank_dimension 40"):
        get_reft_model(build("llama"), InterventionConfig(layer=0, low_rank_dimension=40))
    with pytest.raises(ConfigError, match="head"):
        get_reft_model(
            build("llama"),
            ReftConfig([InterventionConfig(layer=0, low_rank_dimension=2)], trainable_head=True),
        )


def test_explicit_module_paths_reach_any_module():
    model = build("llama", dtype=torch.float64)
    config = InterventionConfig(
        layer=2, type="red", module_path="model.layers.{layer}.mlp.down_proj", dtype="float64"
    )
    reft_model = get_reft_model(model, config)
    randomize(reft_model)
    seen, handle = capture(model.model.layers[2].mlp.down_proj, False)
    with torch.no_grad():
        model(input_ids=random_ids(1, 4))
        reft_model(input_ids=random_ids(1, 4))
    handle.remove()
    red = reft_model.interventions[0]
    torch.testing.assert_close(seen[1], seen[0] * red.scale + red.bias)
    with pytest.raises(IncompatibleModelError, match="no module"):
        get_reft_model(build("llama"), InterventionConfig(layer=0, type="red", module_path="model.nowhere"))


def test_print_trainable_parameters_counts_like_the_paper(capsys):
    model = build("llama")
    reft_model = get_reft_model(model, ReftConfig.for_layers([0, 1], low_rank_dimension=4, positions="f3+l3"))
    reft_model.print_trainable_parameters()
    trainable = 4 * (2 * HIDDEN * 4 + 4)
    total = sum(p.numel() for p in model.parameters()) + trainable
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_deepcopy_and_device_moves_keep_outputs():
    reft_model = get_reft_model(
        build("llama"), ReftConfig.for_layers([1], low_rank_dimension=2, positions="l1")
    )
    ids = random_ids(1, 5)
    with torch.no_grad():
        first = reft_model(input_ids=ids).logits
        moved = copy.deepcopy(reft_model).to("cpu")
        assert torch.equal(moved(input_ids=ids).logits, first)


def test_a_deep_copy_is_independent():
    reft_model = get_reft_model(
        build("llama"), ReftConfig.for_layers([1], low_rank_dimension=2, positions="l1")
    )
    ids = random_ids(1, 5)
    with torch.no_grad():
        first = reft_model(input_ids=ids).logits
        twin = copy.deepcopy(reft_model)
        twin.remove_hooks()
        assert torch.equal(reft_model(input_ids=ids).logits, first)  # the original keeps its hooks
        assert torch.equal(twin(input_ids=ids).logits, twin.model(input_ids=ids).logits)
