"""reft-rs sweep: trials scored on dev, the best kept, the study resumed from
its SQLite file, bad trials pruned, and the test set read only after
selection."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
optuna = pytest.importorskip("optuna")

import reft_rs  # noqa: E402
from reft_rs.cli import main  # noqa: E402
from reft_rs.experiments import sweep  # noqa: E402
from reft_rs.experiments.sweep import SearchSpace, Task  # noqa: E402
from reft_rs.training.evaluation import evaluate  # noqa: E402

from .tiny_models import build, tokenizer  # noqa: E402

PROMPTS = ["what colour is the sky", "what colour is the grass", "say hello", "what colour is the sea"]
RESPONSES = ["blue", "green", "hello world", "blue"]
RECORDS = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]
SPACE = SearchSpace(
    types=["loreft", "direft"], layer_sets=[[1], [0, 2]], positions=["l2", "f3+l3"], ranks=[2, 4],
    learning_rate=(1e-3, 3e-2), epochs=(2, 4),
)  # fmt: skip


def run(tmp_path, trials, **options):
    model = build("llama", seed=1, init_range=0.5)
    return sweep.run(
        model, tokenizer(), Task(train=RECORDS, dev=RECORDS), options.pop("space", SPACE), output=tmp_path,
        trials=trials, batch_size=2, log=options.pop("log", None), **options,
    )  # fmt: skip


def test_a_sweep_scores_every_trial_on_dev_and_keeps_the_best(tmp_path):
    lines = []
    summary = run(tmp_path, 4, metric="loss", log=lines.append)
    assert len(summary["trials"]) == 4 and summary["direction"] == "minimize"
    for trial in summary["trials"]:
        assert trial["state"] in ("complete", "pruned")
        assert trial["params"]["type"] in ("loreft", "direft") and trial["params"]["layers"] in ([1], [0, 2])
        assert 1e-3 <= trial["params"]["learning_rate"] <= 3e-2 and 2 <= trial["params"]["epochs"] <= 4
        assert trial["intermediate"]  # the dev score of every epoch, reported to the pruner
    complete = [t for t in summary["trials"] if t["state"] == "complete"]
    best = min(complete, key=lambda t: t["dev_score"])
    assert summary["best"]["trial"] == best["number"] and summary["best"]["dev_score"] == best["dev_score"]
    assert best["trainable_parameters"] > 0 and best["seconds"] > 0
    assert [line.split(":")[0] for line in lines] == [f"trial {k}/4" for k in range(1, 5)]
    assert "ETA" in lines[0] and "best" in lines[-1]
    # the kept checkpoint is the best trial at its best step: re-scoring it gives its dev score
    model = build("llama", seed=1, init_range=0.5)
    reft_model = reft_rs.ReftModel.from_pretrained(model, tmp_path / "best")
    assert reft_model.reft_config.metadata["sweep_trial"] == best["number"]
    dev = Task(train=RECORDS, dev=RECORDS).dataset(tokenizer(), RECORDS, reft_model.reft_config)
    assert evaluate(reft_model, dev, "loss", batch_size=2) == pytest.approx(best["dev_score"], rel=1e-5)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["best"] == summary["best"] and len(saved["trials"]) == 4
    assert {"optimization_history.png", "param_importances.png"} <= set(summary["plots"])
    assert (tmp_path / "study.db").is_file()


def test_a_stopped_sweep_resumes_from_its_database(tmp_path):
    first = run(tmp_path, 2, metric="loss")
    second = run(tmp_path, 4, metric="loss")
    assert [t["number"] for t in second["trials"]] == [0, 1, 2, 3]
    assert second["trials"][:2] == first["trials"]  # the earlier trials are kept as they were
    lines = []
    third = run(tmp_path, 4, metric="loss", log=lines.append)
    assert len(third["trials"]) == 4 and "nothing to run" in lines[0]


def test_a_sweep_killed_before_best_is_updated_resumes_with_best_and_study_agreeing(tmp_path, monkeypatch):
    space = SearchSpace(
        layer_sets=[[0, 1, 2]], positions=["f3+l3"], ranks=[4], learning_rate=[1e-7, 3e-2], epochs=2
    )
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="reft-rs", direction="minimize"
    )
    for rate in (1e-7, 3e-2):  # the second trial learns: it becomes the best
        study.enqueue_trial({"learning_rate": rate})
    run(tmp_path, 1, metric="loss", space=space)
    assert sweep._trial_of(tmp_path / "best") == 0
    settle = sweep._settle_best

    def killed(*args):
        raise KeyboardInterrupt  # the process dies once Optuna has recorded trial 1

    monkeypatch.setattr(sweep, "_settle_best", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 2, metric="loss", space=space)
    recorded = optuna.load_study(study_name="reft-rs", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert recorded.best_trial.number == 1
    assert sweep._trial_of(tmp_path / "best") == 0  # stale: the kill came first
    monkeypatch.setattr(sweep, "_settle_best", settle)
    summary = run(tmp_path, 2, metric="loss", space=space)  # resumed: nothing left to run
    assert summary["best"]["trial"] == 1
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["best"]["trial"] == 1
    reft_model = reft_rs.ReftModel.from_pretrained(build("llama", seed=1, init_range=0.5), tmp_path / "best")
    assert reft_model.reft_config.metadata["sweep_trial"] == 1
    assert not (tmp_path / "candidates").exists()


def test_a_resumed_study_must_rank_by_the_same_metric_and_direction(tmp_path):
    run(tmp_path / "a", 1, metric="loss")
    with pytest.raises(reft_rs.ConfigError, match="ranked by dev loss, not exact_match"):
        run(tmp_path / "a", 2, metric="exact_match")
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'b.db'}", study_name="reft-rs", direction="maximize")
    (tmp_path / "b").mkdir()
    (tmp_path / "b.db").rename(tmp_path / "b" / "study.db")
    with pytest.raises(reft_rs.ConfigError, match="maximizes its metric, and loss needs to minimize"):
        run(tmp_path / "b", 1, metric="loss")


def test_the_pruner_stops_a_trial_that_falls_behind(tmp_path):
    space = SearchSpace(
        layer_sets=[[0, 1, 2]], positions=["f3+l3"], ranks=[4], learning_rate=[3e-2, 1e-7], epochs=6
    )
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="reft-rs", direction="minimize"
    )
    for rate in (3e-2, 3e-2, 3e-2, 1e-7):
        study.enqueue_trial({"learning_rate": rate})
    summary = run(tmp_path, 4, metric="loss", space=space)
    states = [t["state"] for t in summary["trials"]]
    assert states[:2] == ["complete"] * 2  # the pruner's start-up trials always finish
    assert states[3] == "pruned"  # no learning at all: behind the median at its first evaluations
    assert len(summary["trials"][3]["intermediate"]) < 6


def test_the_test_set_is_read_once_after_selection(tmp_path, monkeypatch):
    events = []
    original = sweep._summary

    def summary_after_search(*args, **kwargs):
        events.append("selection over")
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep, "_summary", summary_after_search)

    def read_test():
        events.append("test read")
        return RECORDS[:3]

    result = run(
        tmp_path, 3, metric="exact_match", test=read_test, log=lambda line: events.append(line.split()[0])
    )
    assert events == ["trial", "trial", "trial", "selection over", "test read", "test"]
    assert result["test"]["examples"] == 3
    # The test score is the kept checkpoint's, on the three test records.
    reft_model = reft_rs.ReftModel.from_pretrained(build("llama", seed=1, init_range=0.5), tmp_path / "best")
    test = Task(train=RECORDS, dev=RECORDS).dataset(tokenizer(), RECORDS[:3], reft_model.reft_config)
    assert result["test"]["score"] == evaluate(
        reft_model, test, "exact_match", tokenizer=tokenizer(), batch_size=2
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-cli")
    build("llama", seed=1, init_range=0.5).save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    for name in ("train", "dev", "test"):
        with open(root / f"{name}.jsonl", "w") as handle:
            for record in RECORDS:
                handle.write(json.dumps(record) + "\n")
    return root


def test_reft_rs_sweep_reads_the_test_file_only_after_selection(files, tmp_path, capsys, monkeypatch):
    import reft_rs.io.records

    selection = {"over": False}
    original_summary, original_read = sweep._summary, reft_rs.io.records.read_records

    def summary_after_search(*args, **kwargs):
        selection["over"] = True
        return original_summary(*args, **kwargs)

    def guarded_read(path, *args, **kwargs):
        if str(path).endswith("test.jsonl") and not selection["over"]:
            raise AssertionError("the test file was read before selection ended")
        return original_read(path, *args, **kwargs)

    monkeypatch.setattr(sweep, "_summary", summary_after_search)
    monkeypatch.setattr(reft_rs.io.records, "read_records", guarded_read)
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(files / "model"), "--data", str(files / "train.jsonl"),
            "--eval-data", str(files / "dev.jsonl"), "--test-data", str(files / "test.jsonl"), "--output", str(out),
            "--trials", "3", "--metric", "exact_match", "--layer-sets", "0,1,2", "1", "--positions", "f3+l3",
            "--ranks", "4", "--learning-rate", "1e-2", "3e-2", "--epochs", "3", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "trial 3/3" in printed and "read after selection" in printed
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["test"]["examples"] == 4 and saved["metric"] == "exact_match"
    assert (out / "best" / "reft_config.json").is_file()
    capsys.readouterr()
    bad = argv[:-2] + ["--device", "cpu", "--layer-sets", "0,9"]
    assert main(bad) == 2 and "layer 9 does not exist" in capsys.readouterr().err
