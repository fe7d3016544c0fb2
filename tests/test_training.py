"""Datasets, the collator, the plain loop and ReftTrainer (save, resume)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import ReftConfig, ReftDataCollator, ReftModel, get_reft_model, make_dataset  # noqa: E402
from reft_rs.training.data import IGNORE_INDEX  # noqa: E402

from . import reference  # noqa: E402
from .tiny_models import build, tokenizer  # noqa: E402

PROMPTS = ["what colour is the sky", "what colour is the grass", "say hello", "what colour is the sea"]
RESPONSES = ["blue", "green", "hello world", "blue"]


def test_dataset_masks_prompts_and_locates_positions():
    tok = tokenizer()
    config = ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="f2+l2")
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=config)
    assert len(dataset) == 4
    for index, prompt in enumerate(PROMPTS):
        prompt_text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        item = dataset[index]
        n = len(prompt_ids)
        assert dataset.prompt_lengths[index] == n
        assert item["input_ids"][:n].tolist() == prompt_ids
        assert (item["labels"][:n] == IGNORE_INDEX).all()
        response = tok.decode(item["input_ids"][n:])
        assert response.split() == RESPONSES[index].split() + ["</s>"]
        assert (item["labels"][n:] == item["input_ids"][n:]).all()
        expected = reft_rs.positions.locate([n], "f2+l2")[:, 0]
        assert np.array_equal(item["locations"], expected)
        assert np.shares_memory(item["locations"], dataset.locations)


def test_dataset_without_a_chat_template_and_for_classification():
    tok = tokenizer(chat=False)
    dataset = make_dataset(tok, PROMPTS, RESPONSES, positions="l1")
    assert dataset[0]["input_ids"][-1] == tok.eos_token_id
    texts = make_dataset(tok, PROMPTS, labels=[0, 1, 0, 1], positions="f1+l1", include_last=False)
    assert texts[1]["labels"] == 1
    n = texts.prompt_lengths[0]
    assert texts[0]["locations"][1, 0] == n - 2  # the last token is left out


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_and_moves_locations(side):
    tok = tokenizer()
    dataset = make_dataset(tok, PROMPTS, RESPONSES, positions="f2+l2")
    batch = ReftDataCollator(tok.pad_token_id, padding_side=side)([dataset[i] for i in range(4)])
    ids, mask, labels, locations = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        batch["locations"],
    )
    assert ids.shape == mask.shape == labels.shape
    for row in range(4):
        real = ids[row][mask[row].bool()]
        assert real.tolist() == dataset[row]["input_ids"].tolist()
        assert (labels[row][~mask[row].bool()] == IGNORE_INDEX).all()
        for group in range(2):
            chosen = [p for p in locations[group, row].tolist() if p >= 0]
            unpadded = [p for p in dataset[row]["locations"][group].tolist() if p >= 0]
            assert ids[row, chosen].tolist() == dataset[row]["input_ids"][unpadded].tolist()


def test_plain_loop_teaches_a_tiny_model_its_responses():
    tok = tokenizer()
    model = build("llama", seed=1, init_range=0.5)
    # f3+l3 reaches past the chat template's markers to the words of the question
    config = ReftConfig.for_layers([0, 1, 2], low_rank_dimension=4, positions="f3+l3")
    reft_model = get_reft_model(model, config)
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=config)
    losses = reft_rs.train(
        reft_model,
        dataset,
        collator=ReftDataCollator(tok.pad_token_id),
        epochs=80,
        batch_size=4,
        learning_rate=3e-2,
        progress=False,
    )
    assert losses[-1] < 0.2 < 4.0 < losses[0]
    for prompt, response in zip(PROMPTS, RESPONSES):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        out = reft_model.generate(
            ids,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split() == response.split()


class StopAt(transformers.TrainerCallback):
    """Ends training after a given step, as a crash would (after its save)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def trainer_for(output_dir, *, steps, save_steps=None, accumulate=1, seed=0, family="llama", stop_at=None):
    tok = tokenizer()
    model = build(family, seed=1)
    if family == "bert":
        config = ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="f1+l1", trainable_head=True)
        dataset = make_dataset(tok, PROMPTS, labels=[0, 1, 0, 1], config=config)
    else:
        config = ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="f1+l1", dropout=0.1)
        dataset = make_dataset(tok, PROMPTS, RESPONSES, config=config)
    reft_model = get_reft_model(model, config)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        gradient_accumulation_steps=accumulate,
        save_steps=save_steps or steps,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    trainer = reft_rs.ReftTrainer(
        model=reft_model,
        args=args,
        train_dataset=dataset,
        data_collator=ReftDataCollator(tok.pad_token_id),
        callbacks=[StopAt(stop_at)] if stop_at else None,
    )
    return trainer, reft_model


def test_trainer_saves_full_checkpoints_and_resumes_exactly(tmp_path):
    straight, straight_model = trainer_for(tmp_path / "a", steps=6)
    straight.train()
    interrupted, _ = trainer_for(tmp_path / "b", steps=6, save_steps=3, stop_at=3)
    interrupted.train()
    assert interrupted.state.global_step == 3
    folder = tmp_path / "b" / "checkpoint-3"
    assert {"reft_config.json", "reft_model.safetensors", "training_args.json"} <= set(os.listdir(folder))
    assert json.loads((folder / "reft_config.json").read_text())["interventions"]  # config included
    resumed, resumed_model = trainer_for(tmp_path / "b", steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(folder))
    assert resumed.state.global_step == 6
    ours = resumed_model.checkpoint_tensors()
    for key, value in straight_model.checkpoint_tensors().items():
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-7)
    restored = ReftModel.from_pretrained(build("llama", seed=1), tmp_path / "a" / "checkpoint-6")
    for key, value in straight_model.checkpoint_tensors().items():
        assert torch.equal(restored.checkpoint_tensors()[key], value)


def test_gradient_accumulation_steps_with_the_gradient_of_the_whole_batch(tmp_path):
    """Two micro-batches of 2 make one step with the gradient of the mean
    loss over all 4 examples' label tokens (transformers' num_items_in_batch),
    written plainly below; the responses differ in length, so averaging the
    two micro-batch means would give another step."""
    tok = tokenizer()
    config = ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="f1+l1")
    responses = ["blue", "green and a much longer reply than the others", "hello world", "blue"]
    dataset = make_dataset(tok, PROMPTS, responses, config=config)
    collate = ReftDataCollator(tok.pad_token_id)

    def fresh():
        torch.manual_seed(3)
        return get_reft_model(build("llama", seed=1), config)

    def trained(accumulate, batch):
        reft_model = fresh()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"run{accumulate}"), max_steps=1, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=0.0, save_strategy="no", report_to=[], use_cpu=True, seed=0,
            disable_tqdm=True,
        )  # fmt: skip
        reft_rs.ReftTrainer(model=reft_model, args=args, train_dataset=dataset, data_collator=collate).train()
        return reft_model.checkpoint_tensors()

    def sgd_step(batches, combine):
        """One plain SGD step (rate 1) on ``combine`` of the batches' losses."""
        reft_model = fresh()
        before = {k: v.clone() for k, v in reft_model.checkpoint_tensors().items()}
        combine([reft_model(**collate([dataset[i] for i in part])).loss for part in batches]).backward()
        with torch.no_grad():
            for parameter in reft_model.parameters():
                if parameter.grad is not None:
                    parameter -= parameter.grad
        return before, reft_model.checkpoint_tensors()

    # The reference: the mean loss over every label token of the 4 examples.
    start, expected = sgd_step([[0, 1, 2, 3]], lambda losses: losses[0])
    accumulated = trained(2, 2)
    whole = trained(1, 4)
    moved = False
    for key in expected:
        torch.testing.assert_close(accumulated[key], expected[key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(whole[key], expected[key], rtol=1e-4, atol=1e-6)
        moved |= not torch.equal(expected[key], start[key])
    assert moved
    # The mean of the two micro-batch means is a different step: the check above can fail.
    _, naive = sgd_step([[0, 1], [2, 3]], lambda losses: (losses[0] + losses[1]) / 2)
    assert any(not torch.allclose(naive[k], expected[k], rtol=1e-4, atol=1e-6) for k in expected)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_trainer_with_gradient_accumulation(tmp_path, family):
    trainer, reft_model = trainer_for(tmp_path, steps=4, accumulate=2, family=family)
    before = {k: v.clone() for k, v in reft_model.checkpoint_tensors().items()}
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    after = reft_model.checkpoint_tensors()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if family == "bert":
        assert any(key.startswith("head.") for key in after)
        restored = ReftModel.from_pretrained(build("bert", seed=1), tmp_path / "checkpoint-4")
        for key, value in after.items():
            assert torch.equal(restored.checkpoint_tensors()[key], value)


def test_resuming_into_a_different_config_is_refused(tmp_path):
    trainer, _ = trainer_for(tmp_path, steps=2)
    trainer.train()
    other = get_reft_model(build("llama"), ReftConfig.for_layers([1], low_rank_dimension=2, positions="l1"))
    with pytest.raises(reft_rs.IncompatibleModelError, match="holds interventions"):
        reft_rs.training.trainer.load_into(other, tmp_path / "checkpoint-2")


@pytest.mark.parametrize(
    ("problem_type", "labels", "loss"),
    [
        ("single_label_classification", [0, 1, 1, 0], torch.nn.functional.cross_entropy),
        (
            "regression",
            [0.5, -1.0, 2.0, 0.0],
            lambda logits, y: torch.nn.functional.mse_loss(logits.squeeze(-1), y),
        ),
        (
            "multi_label_classification",
            [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
            torch.nn.functional.binary_cross_entropy_with_logits,
        ),
    ],
)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_classification_losses_by_problem_type(family, problem_type, labels, loss):
    from .tiny_models import config_for

    tok = tokenizer(chat=False)
    model_config = config_for(family)
    model_config.num_labels = (
        1
        if problem_type == "regression"
        else len(np.atleast_1d(labels[0]))
        if problem_type.startswith("multi")
        else 2
    )
    model_config.problem_type = problem_type
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(model_config).eval()
    config = ReftConfig.for_layers([1], low_rank_dimension=2, positions="f1+l1", trainable_head=True)
    reft_model = get_reft_model(model, config)
    dataset = make_dataset(tok, PROMPTS, labels=labels, config=config)
    batch = ReftDataCollator(tok.pad_token_id)([dataset[i] for i in range(4)])
    if problem_type != "single_label_classification":
        batch["labels"] = batch["labels"].float()
    out = reft_model(**batch)
    torch.testing.assert_close(out.loss, loss(out.logits, batch["labels"]))
    out.loss.backward()
    assert reft_model.head is not None and all(p.grad is not None for p in reft_model.head.parameters())


def _edited_positions(reft_model, layer, run):
    """Per row, the token positions whose layer output ``run`` changed with
    the interventions on, against the base model on the same input."""
    captured = []
    handle = reft_model.model.model.layers[layer].register_forward_hook(
        lambda module, args, output: captured.append(
            (output[0] if isinstance(output, tuple) else output).detach()
        )
    )
    try:
        with torch.no_grad():
            run(reft_model)  # edited (the first call is the prefill when generating)
            edited = captured[0]
            captured.clear()
            run(reft_model.model)  # the same call on the bare model
            plain = captured[0]
    finally:
        handle.remove()
    changed = (edited - plain).abs().amax(-1) > 1e-6
    return [torch.nonzero(row).flatten().tolist() for row in changed]


@pytest.mark.parametrize("include_last", [True, False])
def test_the_last_token_rule_of_training_is_kept_by_every_path(include_last, tmp_path):
    """Trained with either convention, saved and reloaded, the torch path
    (forward and generate, without locations) and the engine edit the
    positions the training data used."""
    tok = tokenizer()
    folder = tmp_path / "model"
    build("llama", seed=3, init_range=0.3).save_pretrained(folder)
    tok.save_pretrained(folder)
    config = ReftConfig.for_layers([1], low_rank_dimension=2, positions="l2", include_last=include_last)
    with pytest.raises(reft_rs.ConfigError, match="include_last"):
        make_dataset(tok, PROMPTS, RESPONSES, config=config, include_last=not include_last)
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=config)
    trained_positions = []
    for index in range(len(PROMPTS)):
        n = int(dataset.prompt_lengths[index])
        [rule] = reference.rows_for_example("l2", n, share_weights=False, include_last=include_last)
        assert dataset[index]["locations"][0].tolist() == rule
        trained_positions.append(rule)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    reft_model = get_reft_model(model, config)
    reft_rs.train(reft_model, dataset, collator=ReftDataCollator(tok.pad_token_id), epochs=2, batch_size=2,
                  learning_rate=1e-2, progress=False)  # fmt: skip
    reft_model.save_pretrained(tmp_path / "reft")
    saved, _ = reft_rs.io.checkpoint.load(tmp_path / "reft")
    assert saved["interventions"][0]["include_last"] is include_last

    loaded = ReftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path / "reft"
    )
    assert loaded.reft_config.interventions[0].include_last is include_last
    # forward over prompt + response with labels: the prompt ends at the first label
    batch = ReftDataCollator(tok.pad_token_id)([dataset[i] for i in range(len(PROMPTS))])
    batch.pop("locations")
    edited = _edited_positions(loaded, 1, lambda m: m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                      labels=batch["labels"]))  # fmt: skip
    assert edited == trained_positions
    # generation from each prompt (left-padded batch): the same positions of each prompt
    prompts = [
        dataset[i]["input_ids"][: int(dataset.prompt_lengths[i])].tolist() for i in range(len(PROMPTS))
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    edited = _edited_positions(
        loaded, 1, lambda m: m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    )  # fmt: skip
    assert edited == [
        [p + width - len(prompt) for p in rule] for rule, prompt in zip(trained_positions, prompts)
    ]
    # the engine: the logits of the training positions' edit (explicit locations), not the other rule's
    engine = reft_rs.Engine(folder, reft=tmp_path / "reft")
    for prompt, rule in zip(prompts, trained_positions):
        with torch.no_grad():
            here = (
                loaded(input_ids=torch.tensor([prompt]), locations=torch.tensor([[rule]])).logits[0].numpy()
            )
            [other] = reference.rows_for_example(
                "l2", len(prompt), share_weights=False, include_last=not include_last
            )
            there = (
                loaded(input_ids=torch.tensor([prompt]), locations=torch.tensor([[other]])).logits[0].numpy()
            )
        got = engine.logits(prompt)
        assert np.abs(got - here).max() <= 1e-4
        assert np.abs(got - there).max() > 1e-3


def test_training_arguments_select_on_dev_as_the_command_does(tmp_path):
    args, callbacks = reft_rs.training.trainer.training_arguments(
        tmp_path, metric="exact_match", eval_steps=5, early_stopping=2, batch_size=3, use_cpu=True
    )
    assert (args.eval_strategy, args.eval_steps, args.save_strategy, args.save_steps) == (
        "steps",
        5,
        "steps",
        5,
    )
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_exact_match"
    assert args.greater_is_better and args.per_device_eval_batch_size == 3
    [stopper] = callbacks
    assert isinstance(stopper, transformers.EarlyStoppingCallback) and stopper.early_stopping_patience == 2
    args, _ = reft_rs.training.trainer.training_arguments(tmp_path, metric="loss", use_cpu=True)
    assert args.eval_strategy == "epoch" and args.greater_is_better is False
    args, callbacks = reft_rs.training.trainer.training_arguments(tmp_path, save_steps=0, use_cpu=True)
    assert args.save_strategy == "no" and not args.load_best_model_at_end and callbacks == []


def test_streamed_epochs_read_the_whole_file_every_pass(tmp_path):
    tok = tokenizer()
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(PROMPTS, RESPONSES))
    )
    config = ReftConfig.for_layers([0], low_rank_dimension=2, positions="f1+l1")
    epochs = reft_rs.training.data.StreamedEpochs(path, tok, 2, config=config, chunk_size=3, seed=1)
    whole = make_dataset(tok, PROMPTS, RESPONSES, config=config)
    want = sorted(tuple(whole[i]["input_ids"].tolist()) for i in range(len(PROMPTS)))
    for _ in range(2):
        rows = []
        for batch in epochs:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                rows.append(tuple(ids[mask.bool()].tolist()))
        assert sorted(rows) == want
