"""Prefix-cached training is exact: the same loss and gradients as the full
pass, on Llama, Qwen2 and GPT-2, left- and right-padded, for language
modelling and last-token classification, with and without the store."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import InterventionConfig, ReftConfig, ReftDataCollator, get_reft_model, make_dataset  # noqa: E402
from reft_rs.model.prefix_cache import PrefixCache, applies  # noqa: E402

from .tiny_models import build, config_for, tokenizer  # noqa: E402

PROMPTS = [
    "what colour is the sky on a day with no clouds at all",
    "say hello",
    "what colour is the grass in the park near the big tree",
    "what is one and two",
    "the cat sat on the mat what colour is the mat",
]
RESPONSES = ["blue", "hello world", "green", "three", "red"]
TOLERANCE = 1e-4


def config(mixed=False):
    """LoReFT and DiReFT on three layers and two components; ``mixed``
    gives them different specs (``l2``, negative indices, ``l1``)."""
    specs = ["l2", [-1, -4], "l1"] if mixed else ["l3"] * 3
    return ReftConfig(
        [
            InterventionConfig(layer=0, type="loreft", low_rank_dimension=2, positions=specs[0]),
            InterventionConfig(
                layer=2, type="direft", low_rank_dimension=3, positions=specs[1], activation="tanh"
            ),
            InterventionConfig(
                layer=1, type="loreft", low_rank_dimension=2, positions=specs[2], component="mlp_output"
            ),
        ]
    )


def loss_and_grads(reft_model, batch, **options):
    reft_model.zero_grad(set_to_none=True)
    out = reft_model(**batch, **options)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in reft_model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same(full, cached):
    (out_a, grads_a), (out_b, grads_b) = full, cached
    assert abs(out_a.loss.item() - out_b.loss.item()) <= TOLERANCE * max(1.0, abs(out_a.loss.item()))
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_language_modelling_losses_and_gradients_are_exact(family, side):
    tok = tokenizer()
    reft_model = get_reft_model(build(family, init_range=0.3), config())
    assert applies(reft_model) is None
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=reft_model.reft_config)
    batch = ReftDataCollator(tok.pad_token_id, padding_side=side)([dataset[i] for i in range(len(dataset))])
    full = loss_and_grads(reft_model, batch)
    per_batch = loss_and_grads(reft_model, batch, prefix_cache=True)
    assert per_batch[0].logits.shape[1] < batch["input_ids"].shape[1]  # a prefix was cached
    assert_same(full, per_batch)
    # mixed specs without locations (chosen from the labels), and a store kept across calls
    reft_model = get_reft_model(build(family, init_range=0.3), config(mixed=True))
    store = PrefixCache()
    no_locations = {k: v for k, v in batch.items() if k != "locations"}
    full = loss_and_grads(reft_model, no_locations)
    assert_same(full, loss_and_grads(reft_model, no_locations, prefix_cache=store))
    if side == "right":
        assert store.misses == len(PROMPTS) and len(store) == len(PROMPTS)
        again = loss_and_grads(reft_model, no_locations, prefix_cache=store)
        assert store.hits == len(PROMPTS)  # the second pass reads every prefix from the store
        assert_same(full, again)


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_classification_is_exact(side):
    tok = tokenizer(chat=False)
    model_config = config_for("llama")
    model_config.num_labels = 3
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(model_config).eval()
    reft_config = ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="l2", trainable_head=True)
    reft_model = get_reft_model(model, reft_config)
    assert applies(reft_model) is None
    dataset = make_dataset(tok, PROMPTS, labels=[0, 1, 2, 1, 0], config=reft_config)
    batch = ReftDataCollator(tok.pad_token_id, padding_side=side)([dataset[i] for i in range(len(dataset))])
    assert_same(
        loss_and_grads(reft_model, batch), loss_and_grads(reft_model, batch, prefix_cache=PrefixCache())
    )


def test_where_it_does_not_apply_the_full_pass_runs():
    tok = tokenizer()
    with_red = ReftConfig([*config().interventions, InterventionConfig(layer=1, type="red", name="red")])
    reft_model = get_reft_model(build("llama"), with_red)
    assert "every token" in applies(reft_model)
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=reft_model.reft_config)
    batch = ReftDataCollator(tok.pad_token_id)([dataset[i] for i in range(3)])
    out = reft_model(**batch, prefix_cache=True)
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
    # a spec that edits the first prompt token leaves nothing to cache
    first = get_reft_model(
        build("llama"), ReftConfig.for_layers([1], low_rank_dimension=2, positions="f1+l1")
    )
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=first.reft_config)
    batch = ReftDataCollator(tok.pad_token_id)([dataset[i] for i in range(3)])
    assert first(**batch, prefix_cache=True).logits.shape[1] == batch["input_ids"].shape[1]
    bert = get_reft_model(build("bert"), ReftConfig.for_layers([1], low_rank_dimension=2, positions="l1"))
    assert "causally" in applies(bert)


def test_a_store_within_its_budget_holds_what_fits():
    tok = tokenizer()
    reft_model = get_reft_model(build("llama"), config())
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=reft_model.reft_config)
    batch = ReftDataCollator(tok.pad_token_id)([dataset[i] for i in range(len(dataset))])
    store = PrefixCache(memory=6_000)  # about 384 bytes a token here: some prefixes fit
    full = loss_and_grads(reft_model, batch)
    assert_same(full, loss_and_grads(reft_model, batch, prefix_cache=store))
    assert 0 < len(store) < len(PROMPTS) and store.full and store.stored_bytes <= 6_000
    assert_same(full, loss_and_grads(reft_model, batch, prefix_cache=store))  # mixed hits and misses
    assert "budget full" in store.describe()
    assert reft_rs.model.prefix_cache.PrefixCache(memory=0).memory == 0


def trained(prefix_cache, trainer=False, tmp_path=None):
    tok = tokenizer()
    reft_model = get_reft_model(build("qwen2", init_range=0.3), config())
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=reft_model.reft_config)
    collator = ReftDataCollator(tok.pad_token_id)
    if trainer:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
            use_cpu=True, report_to=[], remove_unused_columns=False, save_strategy="no", seed=3, logging_steps=1,
            dataloader_pin_memory=False,
        )  # fmt: skip
        run = reft_rs.ReftTrainer(model=reft_model, args=args, train_dataset=dataset, data_collator=collator,
                                  prefix_cache=prefix_cache)  # fmt: skip
        assert (run.prefix_cache is not None) == prefix_cache
        run.train()
        losses = [e["loss"] for e in run.state.log_history if "loss" in e]
    else:
        history = reft_rs.train(reft_model, dataset, collator=collator, epochs=3, batch_size=2, learning_rate=1e-2,
                                progress=False, prefix_cache=prefix_cache, seed=3)  # fmt: skip
        assert (history.prefix_cache is not None) == prefix_cache
        if prefix_cache:
            assert history.prefix_cache.hits >= 2 * len(PROMPTS)  # epochs 2 and 3 read every prefix
        losses = list(history)
    return losses, {n: p.detach().clone() for n, p in reft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("trainer", [False, True])
def test_training_with_the_cache_ends_where_training_without_it_does(trainer, tmp_path):
    losses, weights = trained(True, trainer, tmp_path / "a")
    plain_losses, plain_weights = trained(False, trainer, tmp_path / "b")
    assert len(losses) == len(plain_losses) >= 6
    for got, want in zip(losses, plain_losses):
        assert abs(got - want) <= TOLERANCE * max(1.0, abs(want))
    for name in weights:
        torch.testing.assert_close(weights[name], plain_weights[name], rtol=1e-4, atol=1e-5)
