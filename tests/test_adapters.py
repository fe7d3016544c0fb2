"""ReftModel as a peft user expects it: disable_adapter, several named
adapters, frozen loading, the adapter's own state, attribute fall-through,
gradient checkpointing through the Trainer, and merge_and_unload."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import reft_rs  # noqa: E402
from reft_rs import (  # noqa: E402
    InterventionConfig,
    ReftConfig,
    ReftModel,
    get_reft_model,
    make_dataset,
)
from reft_rs.errors import ConfigError  # noqa: E402
from reft_rs.model import gradient_checkpointing  # noqa: E402

from .tiny_models import HIDDEN, build, random_ids, tokenizer  # noqa: E402

PROMPTS = ["what colour is the sky", "what colour is the grass", "say hello", "what colour is the sea"]
RESPONSES = ["blue", "green", "hello world", "blue"]


def randomize(reft_model: ReftModel, seed: int, adapter: str | None = None) -> None:
    """Moves every intervention away from its start (a steering vector starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    adapter = adapter or reft_model.active_adapter
    with torch.no_grad():
        for parameter in reft_model.adapters[adapter].parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)


def logits(module, ids):
    with torch.no_grad():
        return module(input_ids=ids).logits


def config_a():
    return ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="f1+l1")


def config_b():
    return ReftConfig(
        [
            InterventionConfig(layer=1, type="red", positions="all", component="mlp_output"),
            InterventionConfig(layer=2, low_rank_dimension=3, positions="l2"),
        ]
    )


def test_disable_adapter_gives_the_base_model_exactly():
    model = build("llama", seed=1)
    ids = random_ids(2, 9)
    base = logits(model, ids)
    base_text = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    reft_model = get_reft_model(model, config_a())
    randomize(reft_model, 0)
    edited = logits(reft_model, ids)
    assert not torch.allclose(edited, base)
    with reft_model.disable_adapter():
        assert torch.equal(logits(reft_model, ids), base)
        out = reft_model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out, base_text)
        assert len(reft_model._adapter_hooks["default"]) > 0  # still registered
    assert torch.equal(logits(reft_model, ids), edited)


def test_named_adapters_each_act_as_they_would_alone():
    ids = random_ids(2, 8, seed=3)
    reft_model = get_reft_model(build("llama", seed=1), config_a())
    assert reft_model.active_adapter == "default" and reft_model.adapter_names == ["default"]
    randomize(reft_model, 0)
    reft_model.add_adapter("b", config_b())
    randomize(reft_model, 1, "b")
    assert reft_model.active_adapter == "default"  # adding does not switch, as in peft
    with_a = logits(reft_model, ids)
    reft_model.set_adapter("b")
    with_b = logits(reft_model, ids)

    # The references: each adapter alone on its own copy of the base model.
    alone_a = get_reft_model(build("llama", seed=1), config_a())
    alone_a.load_tensors(reft_model.get_adapter_state_dict("default"))
    alone_b = get_reft_model(build("llama", seed=1), config_b())
    alone_b.load_tensors(reft_model.get_adapter_state_dict("b"))
    torch.testing.assert_close(with_a, logits(alone_a, ids), rtol=0, atol=1e-6)
    torch.testing.assert_close(with_b, logits(alone_b, ids), rtol=0, atol=1e-6)
    assert not torch.allclose(with_a, with_b)

    # Only the active adapter trains.
    trains = {name: any(p.requires_grad for p in m.parameters()) for name, m in reft_model.adapters.items()}
    assert trains == {"default": False, "b": True}
    reft_model.set_adapter("default")
    assert torch.equal(logits(reft_model, ids), with_a)
    reft_model.delete_adapter("default")
    assert reft_model.adapter_names == ["b"] and reft_model.active_adapter == "b"
    assert torch.equal(logits(reft_model, ids), with_b)
    with pytest.raises(ConfigError, match="only adapter"):
        reft_model.delete_adapter("b")
    with pytest.raises(ConfigError, match="no adapter named 'zzz'"):
        reft_model.set_adapter("zzz")
    with pytest.raises(ConfigError, match="already exists"):
        reft_model.add_adapter("b", config_a())


def test_saving_and_loading_named_adapters(tmp_path):
    ids = random_ids(2, 8, seed=4)
    reft_model = get_reft_model(build("llama", seed=1), config_a())
    randomize(reft_model, 0)
    reft_model.add_adapter("b", config_b())
    randomize(reft_model, 1, "b")
    expected = {}
    for name in ("default", "b"):
        reft_model.set_adapter(name)
        expected[name] = logits(reft_model, ids)
    reft_model.save_pretrained(tmp_path / "both", adapter_names=["default", "b"])
    # peft's layout: the default adapter at the root, the others in subfolders.
    assert (tmp_path / "both" / "reft_config.json").is_file()
    assert (tmp_path / "both" / "b" / "reft_model.safetensors").is_file()
    reft_model.save_pretrained(tmp_path / "active")  # the active one, b
    on_disk = safetensors_torch.load_file(tmp_path / "active" / "reft_model.safetensors")
    state = reft_model.get_adapter_state_dict()
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k], on_disk[k]) for k in state)

    loaded = ReftModel.from_pretrained(build("llama", seed=1), tmp_path / "both", adapter_name="first")
    assert loaded.active_adapter == "first"
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen unless asked
    assert torch.equal(logits(loaded, ids), expected["default"])
    loaded.load_adapter(tmp_path / "both" / "b", "second")
    assert loaded.active_adapter == "first"
    loaded.set_adapter("second")
    assert torch.equal(logits(loaded, ids), expected["b"])
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = ReftModel.from_pretrained(build("llama", seed=1), tmp_path / "active", is_trainable=True)
    assert all(p.requires_grad for p in trainable.adapters["default"].parameters())
    with pytest.raises(ConfigError, match="only an adapter|already exists"):
        loaded.load_adapter(tmp_path / "active", "second")
    assert loaded.adapter_names == ["first", "second"]


@pytest.mark.parametrize("name", ["/abs", "a/b", "..", "a\\b", "c:x", "", "x\0y"])
def test_adapter_names_that_are_paths_are_refused(tmp_path, name):
    reft_model = get_reft_model(build("llama", seed=1), config_a())
    reft_model.save_pretrained(tmp_path / "one")
    outside = tmp_path / "outside"
    with pytest.raises(ConfigError, match="adapter name"):
        reft_model.add_adapter(name, config_b())
    with pytest.raises(ConfigError, match="adapter name"):
        reft_model.load_adapter(tmp_path / "one", name)
    # Nothing registered under the name, so nothing can be saved under it.
    assert reft_model.adapter_names == ["default"]
    with pytest.raises(ConfigError, match="no adapter named"):
        reft_model.save_pretrained(tmp_path / "out", adapter_names=["default", name])
    assert not outside.exists() and not (tmp_path / "out").exists()


def test_parameter_counts_and_attributes_of_the_base_model():
    model = build("llama", seed=1)
    reft_model = get_reft_model(model, ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="l1"))
    # LoReFT: R and W (r x d) and b (r) per layer, written out.
    per_layer = 2 * HIDDEN + 2 * HIDDEN + 2
    base = sum(p.numel() for p in model.parameters())
    assert reft_model.get_nb_trainable_parameters() == (2 * per_layer, base + 2 * per_layer)
    reft_model.add_adapter("other", ReftConfig.for_layers([1], low_rank_dimension=2, positions="l1"))
    assert reft_model.get_nb_trainable_parameters() == (2 * per_layer, base + 3 * per_layer)
    # Attributes fall through to the wrapped model, as peft's do.
    assert reft_model.generation_config is model.generation_config
    assert reft_model.get_input_embeddings() is model.get_input_embeddings()
    assert reft_model.supports_gradient_checkpointing is model.supports_gradient_checkpointing
    with pytest.raises(AttributeError):
        reft_model.no_such_attribute  # noqa: B018
    copy.deepcopy(reft_model)  # dunder lookups are not forwarded


def gradient_config():
    return ReftConfig(
        [
            InterventionConfig(layer=0, low_rank_dimension=2, positions="f1+l1", share_weights=True),
            InterventionConfig(layer=1, type="red", positions="all", component="mlp_output"),
            InterventionConfig(
                layer=2,
                low_rank_dimension=2,
                positions="f1+l1",
                share_weights=True,
                component="attention_output",
            ),
            InterventionConfig(
                layer=2,
                type="noreft",
                low_rank_dimension=2,
                positions="f1+l1",
                share_weights=True,
                component="mlp_output",
            ),
        ]
    )


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradients_are_the_same_with_gradient_checkpointing(reentrant):
    tok = tokenizer()
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=gradient_config())
    batch = reft_rs.ReftDataCollator(tok.pad_token_id)([dataset[i] for i in range(4)])

    def gradients(checkpointing):
        reft_model = get_reft_model(build("llama", seed=1), gradient_config())
        randomize(reft_model, 0)
        if checkpointing:
            reft_model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        reft_model.train()
        loss = reft_model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in reft_model.named_parameters() if p.requires_grad}
        return loss.item(), grads, reft_model

    loss, plain, _ = gradients(False)
    loss_c, checked, reft_model = gradients(True)
    replays = [
        m._gradient_checkpointing_func
        for m in reft_model.model.modules()
        if isinstance(m.__dict__.get("_gradient_checkpointing_func"), gradient_checkpointing._Replaying)
    ]
    assert replays and sum(r.replays for r in replays) > 0  # layers really were recomputed
    assert abs(loss - loss_c) < 1e-6
    assert plain.keys() == checked.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_trainer_trains_with_gradient_checkpointing(tmp_path):
    tok = tokenizer()
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=gradient_config())

    def run(checkpointing):
        reft_model = get_reft_model(build("llama", seed=1), gradient_config())
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            data_seed=0,
            disable_tqdm=True,
            gradient_checkpointing=checkpointing,
        )
        trainer = reft_rs.ReftTrainer(
            model=reft_model,
            args=args,
            train_dataset=dataset,
            data_collator=reft_rs.ReftDataCollator(tok.pad_token_id),
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, reft_model

    losses, plain = run(False)
    losses_c, checked = run(True)
    assert checked.calls.recomputing and len(losses) == 3
    assert all(abs(a - b) < 1e-5 for a, b in zip(losses, losses_c)), (losses, losses_c)
    before = get_reft_model(build("llama", seed=1), gradient_config()).checkpoint_tensors()
    after = checked.checkpoint_tensors()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    for key, value in plain.checkpoint_tensors().items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_folds_red_and_steer_into_the_weights(family):
    config = ReftConfig(
        [
            InterventionConfig(layer=0, type="red", positions="all", component="mlp_output"),
            InterventionConfig(
                layer=1, type="steer", positions="all", component="attention_output", alpha=2.0
            ),
            # two edits on one projection, folded in the order they apply
            InterventionConfig(layer=2, type="steer", positions="all", component="mlp_output"),
            InterventionConfig(layer=2, type="red", positions="all", component="mlp_output"),
        ]
    )
    ids = random_ids(2, 7, seed=5)
    reft_model = get_reft_model(build(family, seed=1), config)
    randomize(reft_model, 0)
    edited = logits(reft_model, ids)
    merged = reft_model.merge_and_unload()
    assert isinstance(merged, transformers.PreTrainedModel)
    assert not any(module._forward_hooks for module in merged.modules())
    torch.testing.assert_close(logits(merged, ids), edited, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(build(family, seed=1), ids), edited)


def test_merge_and_unload_refuses_what_does_not_fold():
    ids = random_ids(1, 6)
    cases = [
        (ReftConfig.for_layers([0], low_rank_dimension=2, positions="l1"), "edits a low-rank subspace"),
        (ReftConfig([InterventionConfig(layer=0, type="red", positions="all")]), "sums the residual stream"),
        (
            ReftConfig([InterventionConfig(layer=0, type="steer", positions="l2", component="mlp_output")]),
            "positions 'l2' only",
        ),
    ]
    for config, reason in cases:
        reft_model = get_reft_model(build("llama", seed=1), config)
        randomize(reft_model, 0)
        edited = logits(reft_model, ids)
        with pytest.raises(ConfigError, match=reason):
            reft_model.merge_and_unload()
        assert torch.equal(logits(reft_model, ids), edited)  # nothing changed
    # BERT's attention block ends in a norm over a residual: no weight holds the edit.
    bert = get_reft_model(
        build("bert", seed=1),
        ReftConfig(
            [InterventionConfig(layer=0, type="steer", positions="all", component="attention_output")]
        ),
    )
    with pytest.raises(ConfigError, match="not the output of one of its linear layers"):
        bert.merge_and_unload()


def test_a_config_that_does_not_fit_leaves_the_model_untouched():
    model = build("llama", seed=1).train()
    for p in model.parameters():
        p.requires_grad_(True)
    with pytest.raises(ConfigError, match="layer 9 does not exist"):
        get_reft_model(model, ReftConfig.for_layers([9], low_rank_dimension=2, positions="l1"))
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
