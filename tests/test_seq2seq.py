"""Encoder-decoders (T5, BART): interventions on either stack, positions
counted over the encoder's input or the decoder's prompt-side tokens,
generation, save/load and training, on tiny random models built from their
config classes."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import IncompatibleModelError, InterventionConfig, ReftConfig, ReftModel, get_reft_model  # noqa: E402
from reft_rs.model.layout import resolve  # noqa: E402

from .tiny_models import (  # noqa: E402
    DECODER_LAYERS,
    LAYERS,
    SEQ2SEQ,
    build,
    build_seq2seq,
    random_ids,
    seq2seq_tokenizer,
    tokenizer,
)


def loreft_by_hand(h, tensors):
    """h + Rᵀ(Wh + b − Rh), in float64 (the ReFT paper's formula)."""
    rotation, weight, bias = (tensors[k].double() for k in ("rotation", "weight", "bias"))
    h = h.double()
    return h + (h @ weight.T + bias - h @ rotation.T) @ rotation


def red_by_hand(h, tensors):
    """s ⊙ h + b (RED)."""
    return h.double() * tensors["scale"].double() + tensors["bias"].double()


def strengthen(reft_model, seed=0):
    """Large random parameters, so that every edit changes what it touches."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for intervention in reft_model.interventions:
            for name, parameter in intervention.named_parameters():
                if "rotation" not in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def capture(module):
    """Records a module's output (a forward hook registered after reft_rs's,
    so it sees the edited value)."""
    seen = []
    handle = module.register_forward_hook(
        lambda m, args, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone())
    )
    return seen, handle


def batch(family):
    """Two right-padded inputs of 7 and 5 tokens, and labels of 6 tokens
    whose first two are a forced prefix (-100); the second row's labels are
    padded with -100."""
    ids = random_ids(2, 7, seed=1)
    ids[ids == 3] = 4  # no end-of-sequence token inside
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0
    labels = random_ids(2, 6, seed=2)
    labels[labels == 3] = 4
    labels[:, :2] = -100
    labels[1, 5:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# (component, tower, type, positions, the positions edited in each row of `batch`)
# The encoder reads 7 and 5 real tokens; the decoder's prompt is its start
# token and the two forced-prefix tokens (3 tokens, up to the one that
# predicts the first labelled token); the decoder reads 6 tokens.
SITES = [
    ("block_output", "encoder", "loreft", "l2", [[5, 6], [3, 4]]),
    ("block_output", "encoder", "loreft", "f1+l1", [[0, 6], [0, 4]]),
    ("attention_output", "encoder", "loreft", "l1", [[6], [4]]),
    ("mlp_output", "encoder", "red", "all", [list(range(7)), list(range(7))]),
    ("block_output", "decoder", "loreft", "f1+l1", [[0, 2], [0, 2]]),
    ("mlp_output", "decoder", "loreft", "l2", [[2], [2]]),  # at most half of a 3-token prompt
    ("cross_attention_output", "decoder", "red", "all", [list(range(6)), list(range(6))]),
    ("block_input", "decoder", "loreft", "l1", [[2], [2]]),
]


@pytest.mark.parametrize("family", SEQ2SEQ)
@pytest.mark.parametrize(("component", "tower", "kind", "positions", "expected"), SITES)
def test_edits_land_at_the_positions_of_their_own_stack_and_follow_the_formula(
    family, component, tower, kind, positions, expected
):
    model = build_seq2seq(family, dtype=torch.float64)
    item = InterventionConfig(
        layer=1,
        tower=tower,
        component=component,
        type=kind,
        positions=positions,
        low_rank_dimension=3 if kind == "loreft" else None,
        share_weights=True,
        dtype="float64",
    )
    reft_model = get_reft_model(model, item)
    strengthen(reft_model)
    site = resolve(model, reft_model.reft_config.interventions[0])
    stack = model.get_encoder() if tower == "encoder" else model.get_decoder()
    assert any(module is site.module for module in stack.modules())
    if component == "block_input":
        seen = []
        handle = site.module.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
    else:
        seen, handle = capture(site.module)
    inputs = batch(family)
    with torch.no_grad():
        model(**inputs)  # called directly, the model is unchanged
        reft_model(**inputs)
    handle.remove()
    before, after = seen
    changed = (before - after).abs().amax(-1) > 0
    want = torch.zeros_like(changed)
    for row, positions in enumerate(expected):
        want[row, positions] = True
    assert torch.equal(changed, want)
    tensors = {k.split(".", 1)[1]: v for k, v in reft_model.checkpoint_tensors().items()}
    by_hand = (loreft_by_hand if kind == "loreft" else red_by_hand)(before, tensors)
    torch.testing.assert_close(after[want], by_hand[want], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_a_batch_gives_what_each_example_gives_alone(family):
    model = build_seq2seq(family, dtype=torch.float64)
    config = ReftConfig(
        [
            InterventionConfig(
                layer=0, component="encoder.block_output", low_rank_dimension=2, positions="f1+l2"
            ),
            InterventionConfig(
                layer=2, component="decoder.block_output", low_rank_dimension=2, positions="l1"
            ),
            InterventionConfig(layer=1, component="decoder.cross_attention_output", type="red"),
        ]
    )
    reft_model = get_reft_model(model.double(), config).double()
    strengthen(reft_model)
    inputs = batch(family)
    with torch.no_grad():
        together = reft_model(**inputs).logits
        for row, (source, target) in enumerate([(7, 6), (5, 5)]):
            alone = reft_model(
                input_ids=inputs["input_ids"][row : row + 1, :source],
                attention_mask=inputs["attention_mask"][row : row + 1, :source],
                labels=inputs["labels"][row : row + 1, :target],
            ).logits
            torch.testing.assert_close(together[row : row + 1, :target], alone, rtol=1e-9, atol=1e-9)


def edited_encoder_outputs(model, reft_model, inputs, layer, positions):
    """The encoder's output with the LoReFT formula applied by hand at
    ``positions`` (per row) of block ``layer``, through a hook of the test's own."""
    tensors = {k.split(".", 1)[1]: v for k, v in reft_model.checkpoint_tensors().items()}

    def hook(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.clone()
        for row, chosen in enumerate(positions):
            hidden[row, chosen] = loreft_by_hand(hidden[row, chosen], tensors).to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    _, layers = reft_rs.model.layout.find_layers(model, "encoder")
    handle = layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        handle.remove()


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_generation_edits_the_encoder_once_and_matches_the_formula_by_hand(family):
    model = build_seq2seq(family, dtype=torch.float64)
    item = InterventionConfig(layer=1, tower="encoder", low_rank_dimension=3, positions="l2", dtype="float64")
    reft_model = get_reft_model(model, item)
    strengthen(reft_model, seed=3)
    inputs = batch(family)
    prompt = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    options = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None}
    cached = reft_model.generate(**prompt, **options)
    uncached = reft_model.generate(**prompt, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    encoded = edited_encoder_outputs(model, reft_model, prompt, 1, [[5, 6], [3, 4]])
    by_hand = model.generate(encoder_outputs=encoded, attention_mask=prompt["attention_mask"], **options)
    assert torch.equal(cached, by_hand)
    plain = model.generate(**prompt, **options)
    assert not torch.equal(cached, plain)  # the edit changes what is generated


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_decoder_edits_reach_generation_through_the_cache(family):
    """The decoder's prompt-side tokens are edited once, in the first step;
    the KV cache carries them (the same tokens as without a cache), and
    intervene_on_generated edits each new token too."""
    model = build_seq2seq(family, dtype=torch.float64)
    config = ReftConfig(
        [
            InterventionConfig(
                layer=1, component="decoder.block_output", low_rank_dimension=3, positions="l1"
            ),
            InterventionConfig(layer=0, component="encoder.block_output", type="red"),
        ]
    )
    reft_model = get_reft_model(model, config).double()
    strengthen(reft_model, seed=2)
    inputs = batch(family)
    prompt = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    options = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None}
    outputs = {}
    for generated in (False, True):
        cached = reft_model.generate(**prompt, intervene_on_generated=generated, **options)
        uncached = reft_model.generate(**prompt, intervene_on_generated=generated, use_cache=False, **options)
        assert torch.equal(cached, uncached)
        outputs[generated] = cached
    assert not torch.equal(outputs[True], outputs[False])  # new tokens edited too
    assert not torch.equal(outputs[False], model.generate(**prompt, **options))
    # The same decoder prompt given explicitly: the same tokens.
    start = torch.full((2, 1), model.config.decoder_start_token_id)
    explicit = reft_model.generate(**prompt, decoder_input_ids=start, **options)
    assert torch.equal(explicit, outputs[False])
    # A forced prefix without the start token: generate puts the start token
    # first, and the prompt's last token (the prefix's) is the one edited.
    prefix = outputs[False][:, 1:3]
    without = reft_model.generate(**prompt, decoder_input_ids=prefix, **options)
    with_start = reft_model.generate(**prompt, decoder_input_ids=torch.cat([start, prefix], 1), **options)
    assert torch.equal(without, with_start)
    # Teacher forcing the generated tokens gives the logits generation chose from.
    with torch.no_grad():
        forced = reft_model(**prompt, decoder_input_ids=outputs[False][:, :-1]).logits
    assert torch.equal(forced.argmax(-1)[:, :1], outputs[False][:, 1:2])


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_save_and_load_give_identical_outputs_and_record_the_towers(family, tmp_path):
    config = ReftConfig(
        [
            InterventionConfig(layer=LAYERS - 1, component="encoder.block_output", low_rank_dimension=2),
            InterventionConfig(
                layer=DECODER_LAYERS[family] - 1, component="decoder.cross_attention_output", type="red"
            ),
        ]
    )
    reft_model = get_reft_model(build_seq2seq(family), config)
    strengthen(reft_model)
    reft_model.save_pretrained(tmp_path / "adapter")
    stored = json.loads((tmp_path / "adapter" / "reft_config.json").read_text())
    assert [(i["tower"], i["component"]) for i in stored["interventions"]] == [
        ("encoder", "block_output"),
        ("decoder", "cross_attention_output"),
    ]
    assert stored["base_model"]["num_hidden_layers"] == LAYERS
    assert stored["base_model"]["num_decoder_layers"] == DECODER_LAYERS[family]
    reloaded = ReftModel.from_pretrained(build_seq2seq(family), tmp_path / "adapter")
    inputs = batch(family)
    with torch.no_grad():
        assert torch.equal(reft_model(**inputs).logits, reloaded(**inputs).logits)
    # A decoder-only model's checkpoint entries say nothing of towers.
    plain = get_reft_model(build("llama"), InterventionConfig(layer=1, low_rank_dimension=2))
    plain.save_pretrained(tmp_path / "plain")
    entry = json.loads((tmp_path / "plain" / "reft_config.json").read_text())["interventions"][0]
    assert "tower" not in entry


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_training_on_both_stacks_learns_a_copy_task(family):
    """A few steps of the plain loop on both stacks (RED on each, as the
    RED paper trains T5) lower the loss of copying the input; the model's
    own weights do not move."""
    model = build_seq2seq(family)
    frozen = {name: p.clone() for name, p in model.named_parameters()}
    config = ReftConfig(
        [InterventionConfig(layer=layer, tower="encoder", type="red") for layer in range(LAYERS)]
        + [
            InterventionConfig(layer=layer, tower="decoder", type="red")
            for layer in range(DECODER_LAYERS[family])
        ]
        + [
            InterventionConfig(
                layer=1, component="encoder.block_output", low_rank_dimension=4, positions="f3+l3"
            )
        ]
    )
    reft_model = get_reft_model(model, config)
    reft_model.train()
    ids = random_ids(8, 6, seed=7)
    ids[ids == 3] = 4
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    optimizer = torch.optim.Adam([p for p in reft_model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(40):
        loss = reft_model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, frozen[name]), name


def test_a_module_path_on_an_encoder_decoder_names_its_tower_too():
    model = build_seq2seq("t5")
    item = InterventionConfig(
        layer=0, module_path="encoder.block.{layer}", low_rank_dimension=2, positions="l1"
    )
    with pytest.raises(IncompatibleModelError, match="names its tower, also with a module_path"):
        get_reft_model(model, item)
    item = InterventionConfig(
        layer=0, module_path="encoder.block.{layer}", tower="encoder", low_rank_dimension=2, positions="l1"
    )
    reft_model = get_reft_model(model, item)
    by_path = reft_model(**batch("t5")).logits
    reft_model.remove_hooks()
    same = get_reft_model(
        model, InterventionConfig(layer=0, tower="encoder", low_rank_dimension=2, positions="l1")
    )
    same.load_tensors(
        {
            k.replace(item.name, same.reft_config.interventions[0].name): v
            for k, v in reft_model.checkpoint_tensors().items()
        }
    )
    assert torch.equal(same(**batch("t5")).logits, by_path)


def test_placement_is_checked_against_each_stack():
    bart = build_seq2seq("bart")  # 3 encoder layers, 4 decoder layers
    get_reft_model(bart, InterventionConfig(layer=3, tower="decoder", type="red"))
    with pytest.raises(reft_rs.ConfigError, match="layer 3 does not exist: the model has 3 layers"):
        get_reft_model(bart, InterventionConfig(layer=3, tower="encoder", type="red"))
    with pytest.raises(IncompatibleModelError, match="encoder-decoder: give each intervention a tower"):
        get_reft_model(bart, InterventionConfig(layer=0, type="red"))
    with pytest.raises(IncompatibleModelError, match="one stack of layers"):
        get_reft_model(build("llama"), InterventionConfig(layer=0, tower="decoder", type="red"))
    with pytest.raises(reft_rs.ConfigError, match="cross_attention_output is a decoder component"):
        InterventionConfig(layer=0, component="cross_attention_output", type="red")
    assert InterventionConfig(layer=0, component="encoder.mlp_output", type="red").tower == "encoder"


def test_explicit_locations_count_over_each_stack():
    model = build_seq2seq("t5")
    config = ReftConfig(
        [
            InterventionConfig(layer=0, tower="encoder", low_rank_dimension=2, positions="l1"),
            InterventionConfig(layer=0, tower="decoder", low_rank_dimension=2, positions="l1"),
        ]
    )
    reft_model = get_reft_model(model, config)
    inputs = batch("t5")
    located = torch.tensor([[[6], [4]], [[2], [2]]])  # what the rule chooses on this batch
    with torch.no_grad():
        by_rule = reft_model(**inputs).logits
        explicit = reft_model(**inputs, locations=located).logits
    assert torch.equal(by_rule, explicit)
    with pytest.raises(reft_rs.LocationError, match="outside the 6 tokens of the decoder"):
        reft_model(**inputs, locations=torch.tensor([[[6], [4]], [[6], [2]]]))


def test_the_engine_refuses_encoder_decoder_checkpoints(tmp_path):
    """The engine runs decoder-only text models: a checkpoint that names a
    tower is refused with a typed error naming it, whatever its base model."""
    from reft_rs.io import checkpoint

    model = build("llama")
    reft_model = get_reft_model(model, InterventionConfig(layer=0, type="red"))
    reft_model.save_pretrained(tmp_path / "adapter")
    config, tensors = checkpoint.load(tmp_path / "adapter")
    config["interventions"][0]["tower"] = "encoder"
    checkpoint.save(tmp_path / "towered", config, tensors)
    model.save_pretrained(tmp_path / "model")
    tokenizer().save_pretrained(tmp_path / "model")
    reft_rs.Engine(tmp_path / "model", reft=tmp_path / "adapter")  # the same checkpoint without a tower runs
    with pytest.raises(IncompatibleModelError, match="edits the encoder of an encoder-decoder"):
        reft_rs.Engine(tmp_path / "model", reft=tmp_path / "towered")


# ---------------------------------------------------------------- data, training, the command line

COPY_PROMPTS = [
    "one two three",
    "red blue",
    "the cat sat",
    "four five six seven",
    "green tree",
    "big dog ran",
    "yes no",
    "sky sea grass",
]


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_datasets_tokenize_and_pad_as_transformers_does(family):
    """Prompts become the encoder's input and responses the decoder's
    target, tokenized as the tokenizer itself does (``text_target``), and
    batches pad as transformers' DataCollatorForSeq2Seq pads them."""
    tok = seq2seq_tokenizer(family)
    responses = [" ".join(reversed(p.split())) for p in COPY_PROMPTS]
    config = ReftConfig([InterventionConfig(layer=0, component="encoder.block_output", low_rank_dimension=2)])
    dataset = reft_rs.make_dataset(tok, COPY_PROMPTS, responses, config=config)
    assert dataset.encoder_decoder and len(dataset) == len(COPY_PROMPTS)
    expected_sources = tok(COPY_PROMPTS)["input_ids"]
    expected_targets = tok(text_target=responses)["input_ids"]
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["input_ids"].tolist() == expected_sources[index]
        assert item["labels"].tolist() == expected_targets[index]
    reference = transformers.DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, return_tensors="pt")
    rows = [2, 3, 0]
    expected = reference([{"input_ids": expected_sources[i], "labels": expected_targets[i]} for i in rows])
    for batch in (
        dataset.collate(rows, tok.pad_token_id),
        reft_rs.ReftDataCollator(tok.pad_token_id)([dataset[i] for i in rows]),  # found to be targets
    ):
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        for key in batch:
            assert torch.equal(batch[key], expected[key]), key
    # Streamed chunks give the same batches.
    records = [{"prompt": p, "response": r} for p, r in zip(COPY_PROMPTS, responses)]
    streamed = list(
        reft_rs.training.data.stream_batches(tok, records, 3, config=config, group_by_length=False)
    )
    for number, batch in enumerate(streamed):
        want = dataset.collate(list(range(3 * number, min(3 * number + 3, len(dataset)))), tok.pad_token_id)
        assert all(torch.equal(batch[k], want[k]) for k in want)
    with pytest.raises(reft_rs.ConfigError, match="encoder-decoder learns responses"):
        reft_rs.make_dataset(tok, COPY_PROMPTS, labels=[0] * len(COPY_PROMPTS), config=config)


def copy_task(family):
    tok = seq2seq_tokenizer(family)
    config = ReftConfig(
        [InterventionConfig(layer=layer, tower="encoder", type="red") for layer in range(LAYERS)]
        + [
            InterventionConfig(layer=layer, tower="decoder", type="red")
            for layer in range(DECODER_LAYERS[family])
        ]
    )
    dataset = reft_rs.make_dataset(tok, COPY_PROMPTS, COPY_PROMPTS, config=config)
    return tok, config, dataset


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_the_plain_loop_and_the_trainer_train_and_evaluation_scores_by_hand(family, tmp_path):
    tok, config, dataset = copy_task(family)
    # The plain loop, with the collator it picks for the dataset.
    reft_model = get_reft_model(build_seq2seq(family), config)
    from reft_rs.training.evaluation import evaluate, generate_replies

    before = evaluate(reft_model, dataset, "loss", tokenizer=tok)
    reft_rs.train(reft_model, dataset, epochs=30, batch_size=4, learning_rate=2e-2, progress=False)
    after = evaluate(reft_model, dataset, "loss", tokenizer=tok)
    assert after < 0.7 * before, (before, after)
    # The loss by hand: every target token of every example, weighted alike.
    total = count = 0
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            logits = reft_model(
                input_ids=torch.from_numpy(item["input_ids"])[None],
                labels=torch.from_numpy(item["labels"])[None],
            ).logits
            targets = torch.from_numpy(item["labels"])
            total += torch.nn.functional.cross_entropy(logits[0].double(), targets, reduction="sum").item()
            count += len(targets)
    assert after == pytest.approx(total / count, rel=1e-5)
    # exact_match against greedy replies made one by one.
    replies = generate_replies(
        reft_model, dataset, tok, batch_size=3, pad_token_id=tok.pad_token_id, max_new_tokens=8
    )
    alone = []
    for prompt in COPY_PROMPTS:
        ids = tok([prompt], return_tensors="pt")
        out = reft_model.generate(**ids, max_new_tokens=8, do_sample=False)
        alone.append(tok.decode(out[0], skip_special_tokens=True))
    assert replies == alone
    score = evaluate(reft_model, dataset, "exact_match", tokenizer=tok, max_new_tokens=8)
    assert score == sum(r.strip() == p for r, p in zip(alone, COPY_PROMPTS)) / len(COPY_PROMPTS)
    # The transformers Trainer, with the same collator.
    trained = get_reft_model(build_seq2seq(family), config)
    arguments = reft_rs.training.trainer.training_arguments(
        tmp_path / "trainer", epochs=30, batch_size=4, learning_rate=2e-2, use_cpu=True, log_steps=5
    )[0]
    trainer = reft_rs.ReftTrainer(
        model=trained,
        args=arguments,
        train_dataset=dataset,
        data_collator=reft_rs.ReftDataCollator(tok.pad_token_id, encoder_decoder=True),
    )
    trainer.train()
    assert evaluate(trained, dataset, "loss", tokenizer=tok) < 0.7 * before


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_the_command_line_trains_generates_and_inspects_an_encoder_decoder(family, tmp_path, capsys):
    from reft_rs.cli import main

    build_seq2seq(family).save_pretrained(tmp_path / "model")
    seq2seq_tokenizer(family).save_pretrained(tmp_path / "model")
    with open(tmp_path / "train.jsonl", "w") as handle:
        for prompt in COPY_PROMPTS:
            handle.write(json.dumps({"prompt": prompt, "response": prompt}) + "\n")
    common = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--device", "cpu"]
    code = main(
        ["train", *common, "--output", str(tmp_path / "run"), "--component", "encoder.block_output"]
        + ["--layers", "0,1,2", "--positions", "f2+l2", "--rank", "4", "--epochs", "20"]
        + ["--learning-rate", "2e-2", "--batch-size", "4"]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["losses"][-1] < 0.8 * metrics["losses"][0], metrics["losses"]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "run")]) == 0
    shown = capsys.readouterr().out
    assert "encoder-decoder, 3 encoder + " in shown and "encoder.block_output" in shown
    # generate: the checkpoint's replies are those of the library's own generate.
    prompts = COPY_PROMPTS[:3]
    argv = ["generate", "--checkpoint", str(tmp_path / "run"), "--model", str(tmp_path / "model")]
    assert main([*argv, *(arg for p in prompts for arg in ("--prompt", p)), "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.splitlines()
    tok = seq2seq_tokenizer(family)
    reft_model = ReftModel.from_pretrained(build_seq2seq(family), tmp_path / "run")
    expected = []
    for prompt in prompts:
        out = reft_model.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=6, do_sample=False)
        expected.append(tok.decode(out[0], skip_special_tokens=True).strip())
    assert printed == expected
    # Without a tower the command says what to give.
    code = main(["train", *common, "--output", str(tmp_path / "plain"), "--layers", "0", "--epochs", "1"])
    assert code != 0
    assert "encoder-decoder: give each intervention a tower" in capsys.readouterr().err
