"""reft-rs compare: every method tuned with the same budget, selected on dev,
tested once with bootstrap intervals and seeds; the base model comes back
untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optuna")
peft = pytest.importorskip("peft")

import safetensors.torch as safetensors_torch  # noqa: E402

import reft_rs  # noqa: E402
from reft_rs.cli import main  # noqa: E402
from reft_rs.experiments import compare  # noqa: E402
from reft_rs.experiments.compare import bootstrap_interval  # noqa: E402
from reft_rs.experiments.methods import Baseline  # noqa: E402
from reft_rs.experiments.sweep import SearchSpace, Task  # noqa: E402
from reft_rs.training.evaluation import evaluate, example_scores  # noqa: E402

from .tiny_models import build, config_for, tokenizer  # noqa: E402

PROMPTS = ["what colour is the sky", "what colour is the grass", "say hello", "what colour is the sea"]
RESPONSES = ["blue", "green", "hello world", "blue"]
RECORDS = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]
SPACE = SearchSpace(
    layer_sets=[[0, 1, 2]], positions=["f3+l3"], ranks=[4], learning_rate=(1e-2, 3e-2), epochs=(3, 5)
)


def test_bootstrap_intervals_follow_the_percentile_rule():
    scores = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=float)
    low, high = bootstrap_interval(scores, resamples=500, seed=3)
    rng = np.random.default_rng(3)  # the rule written plainly
    means = [scores[rng.integers(0, 10, size=10)].mean() for _ in range(500)]
    assert (low, high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    assert low <= scores.mean() <= high
    assert bootstrap_interval([0.5] * 7) == (0.5, 0.5)


def test_every_method_is_tuned_selected_and_tested_once(tmp_path):
    model = build("llama", seed=1, init_range=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events = []

    def read_test():
        events.append("test read")
        return RECORDS

    report = compare.run(
        model, tokenizer(), Task(RECORDS, RECORDS), ["loreft", "red", "lora", "zero-shot"], output=tmp_path,
        metric="exact_match", trials=2, seeds=2, space=SPACE, batch_size=2, test=read_test,
        log=lambda line: events.append(line.split()[0]),
    )  # fmt: skip
    assert events.count("test read") == 1
    assert events.index("test read") > max(
        i for i, e in enumerate(events) if e == "trial"
    )  # after every selection
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["loreft", "red", "lora", "zero-shot"]
    for name, row in rows.items():
        low, high = row["test_interval"]
        assert low <= row["test_score"] <= high
        assert len(row["seed_scores"]) == (1 if name == "zero-shot" else 2)
        assert row["seed_scores"][0] == row["test_score"]
        if name != "zero-shot":
            assert row["trials"] == 2 and row["train_seconds"] > 0 and row["seconds_per_step"] > 0
    # the frozen model is as it was: no LoRA layers left, no weight changed
    assert not any("lora" in name for name, _ in model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # zero-shot, by hand
    dev = Task(RECORDS, RECORDS).dataset(tokenizer(), RECORDS, None)
    assert rows["zero-shot"]["dev_score"] == evaluate(
        Baseline(model), dev, "exact_match", tokenizer=tokenizer()
    )
    # the LoRA row: peft's own count, and its saved adapter scores what the table says
    lora = rows["lora"]
    adapter = peft.PeftModel.from_pretrained(model, tmp_path / "lora" / "best")
    assert lora["trainable_parameters"] == sum(
        p.numel() for n, p in adapter.named_parameters() if "lora_" in n
    )
    scores = example_scores(Baseline(adapter), dev, "exact_match", tokenizer=tokenizer(), batch_size=2)
    assert scores.mean() == lora["test_score"]
    adapter.unload()
    table = (tmp_path / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in rows)
    assert json.loads((tmp_path / "compare.json").read_text())["rows"] == report["rows"]
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_classifiers_compare_on_accuracy_with_their_heads_reset(tmp_path):
    model_config = config_for("llama")
    model_config.num_labels = 2
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(model_config).eval()
    model.config.pad_token_id = 0
    head = {k: v.clone() for k, v in model.score.state_dict().items()}
    records = [{"text": p, "label": str(i % 2)} for i, p in enumerate(PROMPTS)]
    space = SearchSpace(layer_sets=[[1]], positions=["l1"], ranks=[2], learning_rate=(1e-2, 3e-2), epochs=2)
    report = compare.run(
        model, tokenizer(chat=False), Task(records, records, labels=["0", "1"]), ["loreft", "lora", "zero-shot"],
        output=tmp_path, metric="accuracy", trials=2, seeds=1, space=space, batch_size=2, test=lambda: records, log=None,
    )  # fmt: skip
    assert [row["method"] for row in report["rows"]] == ["loreft", "lora", "zero-shot"]
    assert all(torch.equal(head[k], v) for k, v in model.score.state_dict().items())  # reset after every run
    rows = {row["method"]: row for row in report["rows"]}
    tok = tokenizer(chat=False)

    def accuracy(module):
        """Accuracy written plainly: the arg max of the logits of each text."""
        hits = 0
        for record in records:
            with torch.no_grad():
                logits = module(**tok(record["text"], return_tensors="pt")).logits
            hits += int(logits[0].argmax().item() == int(record["label"]))
        return hits / len(records)

    assert rows["zero-shot"]["test_score"] == accuracy(model)
    # Each tuned row: its kept checkpoint (interventions and trained head)
    # scores what the table says.
    reft_model = reft_rs.ReftModel.from_pretrained(model, tmp_path / "loreft" / "best")
    assert rows["loreft"]["test_score"] == accuracy(reft_model)
    reft_model.remove_hooks()
    model.score.load_state_dict(safetensors_torch.load_file(tmp_path / "lora" / "best" / "head.safetensors"))
    adapter = peft.PeftModel.from_pretrained(model, tmp_path / "lora" / "best")
    assert rows["lora"]["test_score"] == accuracy(adapter)
    adapter.unload()
    model.score.load_state_dict(head)


def test_reft_rs_compare_end_to_end(tmp_path, capsys):
    root = tmp_path / "files"
    build("llama", seed=1, init_range=0.5).save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    for name in ("train", "dev", "test"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    argv = ["compare", "--model", str(root / "model"), "--data", str(root / "train.jsonl"),
            "--eval-data", str(root / "dev.jsonl"), "--test-data", str(root / "test.jsonl"), "--output",
            str(tmp_path / "out"), "--methods", "loreft", "zero-shot", "--trials", "2", "--seeds", "2",
            "--metric", "exact_match", "--layer-sets", "0,1,2", "--positions", "f3+l3", "--ranks", "4",
            "--epochs", "3", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| loreft |" in out and "| zero-shot |" in out
    assert (tmp_path / "out" / "loreft" / "study.db").is_file()
    for extra, message in [
        (["--methods", "bitfit"], "unknown methods ['bitfit']"),
        (["--time-budget", "5"], "give one budget"),
    ]:
        assert main(argv + extra) == 2
        assert message in capsys.readouterr().err
    no_test = [a for a in argv if a not in ("--test-data", str(root / "test.jsonl"))]
    assert main(no_test) == 2 and "--test-data" in capsys.readouterr().err
