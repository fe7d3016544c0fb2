"""Selection on a development set: the metrics against plain computations,
the best step kept by the plain loop and by ReftTrainer, early stopping,
and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import ConfigError, ReftConfig, ReftDataCollator, get_reft_model, make_dataset  # noqa: E402
from reft_rs.cli import main  # noqa: E402
from reft_rs.training.evaluation import evaluate  # noqa: E402
from reft_rs.training.trainer import ReftTrainer  # noqa: E402

from .tiny_models import build, tokenizer  # noqa: E402

PROMPTS = ["what colour is the sky", "what colour is the grass", "say hello", "what colour is the sea"]
RESPONSES = ["blue", "green", "hello world", "blue"]
CONFIG = dict(low_rank_dimension=4, positions="f3+l3")


def setup(seed=1):
    tok = tokenizer()
    model = build("llama", seed=seed, init_range=0.5)
    config = ReftConfig.for_layers([0, 1, 2], **CONFIG)
    reft_model = get_reft_model(model, config)
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=config)
    return tok, reft_model, dataset


def trainable(reft_model):
    return {n: p.detach().clone() for n, p in reft_model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- the metrics


def test_the_loss_is_the_mean_over_every_label_token():
    tok, reft_model, dataset = setup()
    got = evaluate(reft_model, dataset, "loss", tokenizer=tok, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for index in range(len(dataset)):  # one example at a time, by hand
            item = dataset[index]
            ids = torch.from_numpy(item["input_ids"])[None]
            locations = torch.from_numpy(item["locations"])[:, None]  # the prompt's positions
            logits = reft_model(input_ids=ids, locations=locations).logits[0, :-1]
            labels = torch.from_numpy(item["labels"])[1:]
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert got == pytest.approx(total / count, rel=1e-5)


def test_exact_match_and_contains_compare_greedy_replies_with_the_responses():
    tok, reft_model, dataset = setup()
    reft_rs.train(reft_model, dataset, collator=ReftDataCollator(tok.pad_token_id), epochs=40, batch_size=4,
                  learning_rate=3e-2, progress=False)  # fmt: skip
    replies = []
    with torch.no_grad():
        for prompt in PROMPTS:  # one prompt at a time, by hand
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            out = reft_model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            replies.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    exact = np.mean([" ".join(r.split()) == e for r, e in zip(replies, RESPONSES)])
    contains = np.mean([e in " ".join(r.split()) for r, e in zip(replies, RESPONSES)])
    assert evaluate(reft_model, dataset, "exact_match", tokenizer=tok, batch_size=3) == exact
    assert evaluate(reft_model, dataset, "contains", tokenizer=tok, batch_size=3) == contains
    assert exact >= 0.5  # trained on these very pairs
    with pytest.raises(ConfigError, match="tokenizer"):
        evaluate(reft_model, dataset, "exact_match")
    with pytest.raises(ConfigError, match="accuracy scores a classifier"):
        evaluate(reft_model, dataset, "accuracy")
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        evaluate(reft_model, dataset, "bleu")


def test_accuracy_is_the_classifier_argmax():
    tok = tokenizer(chat=False)
    model = build("bert")
    config = ReftConfig.for_layers([1], low_rank_dimension=2, positions="l1", trainable_head=True)
    reft_model = get_reft_model(model, config)
    labels = [0, 1, 1, 0]
    dataset = make_dataset(tok, PROMPTS, labels=labels, config=config)
    with torch.no_grad():
        predicted = [
            int(reft_model(input_ids=torch.from_numpy(dataset[i]["input_ids"])[None]).logits.argmax(-1))
            for i in range(4)
        ]
    expected = np.mean([p == y for p, y in zip(predicted, labels)])
    assert evaluate(reft_model, dataset, "accuracy", batch_size=3) == expected


# ---------------------------------------------------------------- the plain loop


def test_the_loop_stops_after_patience_evaluations_without_a_strictly_better_score():
    tok, reft_model, dataset = setup()
    # best 0.1, 0.5; a tie and a drop (waited 2); a new best 0.6; three
    # more without one: stop at the 8th evaluation, never reaching 0.9.
    script = [0.1, 0.5, 0.5, 0.4, 0.6, 0.3, 0.2, 0.1, 0.9, 0.9, 0.9, 0.9]
    scores = iter(script)
    history = reft_rs.train(
        reft_model, dataset, collator=ReftDataCollator(tok.pad_token_id), epochs=6, batch_size=2, learning_rate=1e-2,
        progress=False, eval_dataset=dataset, eval_metric=lambda model: next(scores), greater_is_better=True,
        eval_steps=1, early_stopping_patience=3,
    )  # fmt: skip
    assert [e["score"] for e in history.evaluations] == script[:8]
    assert history.stopped_early and len(history) == 8
    assert (history.best_step, history.best_score) == (5, 0.6)
    # Lower is better: the same rule the other way round.
    tok, reft_model, dataset = setup()
    scores = iter([0.5, 0.4, 0.45, 0.4, 0.3, 0.35, 0.1])
    history = reft_rs.train(
        reft_model, dataset, collator=ReftDataCollator(tok.pad_token_id), epochs=6, batch_size=2, learning_rate=1e-2,
        progress=False, eval_dataset=dataset, eval_metric=lambda model: next(scores), greater_is_better=False,
        eval_steps=1, early_stopping_patience=2,
    )  # fmt: skip
    assert [e["score"] for e in history.evaluations] == [0.5, 0.4, 0.45, 0.4]
    assert (history.best_step, history.best_score, history.stopped_early) == (2, 0.4, True)


def test_the_loop_keeps_the_parameters_of_the_best_evaluation():
    tok, reft_model, dataset = setup()
    scores = iter([0.1, 0.5, 0.9, 0.4, 0.3, 0.2])
    snapshots = {}

    def scripted(model):  # a dev score that peaks at the third evaluation
        return next(scores)

    history = reft_rs.train(
        reft_model, dataset, collator=ReftDataCollator(tok.pad_token_id), epochs=6, batch_size=2, learning_rate=1e-2,
        progress=False, eval_dataset=dataset, eval_metric=scripted, greater_is_better=True, eval_steps=2,
        callback=lambda step, loss: snapshots.__setitem__(step, trainable(reft_model)),
    )  # fmt: skip
    assert [e["step"] for e in history.evaluations] == [2, 4, 6, 8, 10, 12]
    assert [e["score"] for e in history.evaluations] == [0.1, 0.5, 0.9, 0.4, 0.3, 0.2]
    assert (history.best_step, history.best_score, history.stopped_early) == (6, 0.9, False)
    assert len(history) == 12  # still the list of losses
    now = trainable(reft_model)
    assert all(torch.equal(now[name], snapshots[6][name]) for name in now)
    assert not all(torch.equal(now[name], snapshots[12][name]) for name in now)


def test_early_stopping_and_lower_is_better():
    tok, reft_model, dataset = setup()
    scores = iter([3.0, 2.0, 2.5, 2.2, 1.0])

    history = reft_rs.train(
        reft_model, dataset, collator=ReftDataCollator(tok.pad_token_id), epochs=10, batch_size=2, progress=False,
        eval_dataset=dataset, eval_metric=lambda m: next(scores), greater_is_better=False, eval_steps=1,
        early_stopping_patience=2,
    )  # fmt: skip
    assert [e["score"] for e in history.evaluations] == [3.0, 2.0, 2.5, 2.2]  # 2 without a better score
    assert (history.best_step, history.stopped_early, len(history)) == (2, True, 4)


def test_the_loop_selects_on_a_real_metric_per_epoch():
    tok, reft_model, dataset = setup()
    history = reft_rs.train(
        reft_model, dataset, collator=ReftDataCollator(tok.pad_token_id), epochs=30, batch_size=4,
        learning_rate=3e-2, progress=False, eval_dataset=dataset, eval_metric="exact_match", tokenizer=tok,
    )  # fmt: skip
    assert len(history.evaluations) == 30  # one per epoch of one step
    scores = [e["score"] for e in history.evaluations]
    assert history.best_score == max(scores) >= 0.5 and scores[0] < history.best_score
    assert history.best_step == history.evaluations[scores.index(max(scores))]["step"]  # the earliest best
    assert evaluate(reft_model, dataset, "exact_match", tokenizer=tok) == history.best_score
    with pytest.raises(ConfigError, match="greater_is_better"):
        reft_rs.train(reft_model, dataset, eval_dataset=dataset, eval_metric=lambda m: 0.0, progress=False)


# ---------------------------------------------------------------- ReftTrainer


@pytest.mark.parametrize("metric", ["exact_match", "loss"])
def test_reft_trainer_selects_on_the_dev_metric(metric, tmp_path):
    tok, reft_model, dataset = setup()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=24, per_device_train_batch_size=4, learning_rate=3e-2,
        eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3, load_best_model_at_end=True,
        metric_for_best_model=f"eval_{metric}", greater_is_better=metric != "loss", use_cpu=True, report_to=[],
        remove_unused_columns=False, logging_steps=1, save_total_limit=2, dataloader_pin_memory=False,
    )  # fmt: skip
    trainer = ReftTrainer(
        model=reft_model, args=args, train_dataset=dataset, eval_dataset=dataset,
        data_collator=ReftDataCollator(tok.pad_token_id), eval_metric=metric, eval_tokenizer=tok,
    )  # fmt: skip
    trainer.train()
    scores = [(e["step"], e[f"eval_{metric}"]) for e in trainer.state.log_history if f"eval_{metric}" in e]
    assert len(scores) == 8
    best = max(scores, key=lambda s: s[1]) if metric != "loss" else min(scores, key=lambda s: s[1])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best[0]}")
    _, saved = reft_rs.io.checkpoint.load(trainer.state.best_model_checkpoint, framework="torch")
    held = reft_model.checkpoint_tensors()
    assert all(torch.equal(held[key], saved[key]) for key in saved)  # the best step's weights are loaded
    assert evaluate(reft_model, dataset, metric, tokenizer=tok) == pytest.approx(best[1], rel=1e-5)


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    build("llama", seed=1, init_range=0.5).save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    for name in ("train", "dev"):
        with open(root / f"{name}.jsonl", "w") as handle:
            for prompt, response in zip(PROMPTS, RESPONSES):
                handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return root


TRAIN = ["--layers", "0,1,2", "--positions", "f3+l3", "--rank", "4", "--device", "cpu", "--batch-size", "4"]


@pytest.mark.parametrize("stream", [False, True])
def test_reft_rs_train_keeps_the_best_checkpoint_on_the_dev_set(files, tmp_path, capsys, stream):
    out = tmp_path / "run"
    argv = ["train", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output", str(out),
            "--epochs", "20", "--learning-rate", "3e-2", "--eval-data", str(files / "dev.jsonl"),
            "--eval-steps", "2", "--metric", "exact_match", *TRAIN] + (["--stream"] if stream else [])  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    scores = [e["score"] for e in metrics["evaluations"]]
    assert len(scores) == 10 and metrics["metric"] == "exact_match"
    assert metrics["best_score"] == max(scores)
    assert metrics["best_step"] == metrics["evaluations"][scores.index(max(scores))]["step"]
    assert f"at step {metrics['best_step']} of 20" in printed
    config, tensors = reft_rs.io.checkpoint.load(out)
    assert config["metadata"]["selected_step"] == metrics["best_step"]
    assert config["metadata"]["dev_metric"] == "exact_match"
    if not stream:  # the Trainer's checkpoint of that step is what --output holds
        _, best = reft_rs.io.checkpoint.load(out / f"checkpoint-{metrics['best_step']}")
        assert all(np.array_equal(best[k], tensors[k]) for k in tensors)
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    engine = reft_rs.Engine(files / "model", reft=out)
    replies = [engine.chat([{"role": "user", "content": p}], max_new_tokens=4).strip() for p in PROMPTS]
    assert np.mean([" ".join(r.split()) == e for r, e in zip(replies, RESPONSES)]) == metrics["best_score"]


def test_reft_rs_train_stops_early_and_checks_its_options(files, tmp_path, capsys):
    out = tmp_path / "early"
    argv = ["train", "--model", str(files / "model"), "--data", str(files / "train.jsonl"), "--output", str(out),
            "--epochs", "40", "--learning-rate", "3e-2", "--eval-data", str(files / "dev.jsonl"), "--eval-steps", "1",
            "--metric", "exact_match", "--early-stopping", "3", *TRAIN]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] and len(metrics["losses"]) < 40
    scores = [e["score"] for e in metrics["evaluations"]]
    # The patience rule written plainly: stop at the third evaluation in a
    # row that is not strictly better than the best so far.
    best, waited, stop = None, 0, None
    for index, score in enumerate(scores):
        best, waited = (score, 0) if best is None or score > best else (best, waited + 1)
        if waited == 3:
            stop = index
            break
    assert stop == len(scores) - 1 and metrics["best_score"] == best
    capsys.readouterr()
    base = [
        "train",
        "--model",
        str(files / "model"),
        "--data",
        str(files / "train.jsonl"),
        "--output",
        str(tmp_path / "x"),
    ]
    for extra, message in [
        (["--metric", "loss"], "--metric needs --eval-data"),
        (["--eval-data", str(files / "dev.jsonl"), "--metric", "accuracy"], "scores a classifier"),
        (
            ["--eval-data", str(files / "dev.jsonl"), "--eval-steps", "2", "--save-steps", "3"],
            "drop --save-steps",
        ),
        (["--eval-data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
    ]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
