"""The README's main job end to end on the real SmolLM2 (slow)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

import reft_rs  # noqa: E402
from reft_rs.cli import main  # noqa: E402
from reft_rs.io import pretrained  # noqa: E402

from .test_plot import read_png  # noqa: E402

pytestmark = pytest.mark.slow


def test_quickstart_teaches_the_style_and_the_engine_agrees(tmp_path, capsys):
    try:
        pretrained.smollm2_gguf()
    except reft_rs.MissingDependencyError as error:
        pytest.skip(str(error))
    assert main(["quickstart", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("success_rate_before", "success_rate_after", "train_seconds", "trainable_parameters"):
        assert key in metrics
    assert metrics["success_rate_before"] <= 0.25 and metrics["success_rate_after"] >= 0.9
    assert metrics["engine_same_replies"] == len(metrics["held_out"])
    assert metrics["losses"][-1] < metrics["losses"][0] / 2
    width, height = read_png(tmp_path / "loss.png")
    assert (width, height) == (800, 480)
    assert "gives the same replies for 16/16" in out
    engine = reft_rs.Engine(pretrained.smollm2_path(), reft=tmp_path / "checkpoint")
    assert engine.reft_config["metadata"]["task"] == "pirate_style"


def test_quickstart_on_gemma3_serves_the_q4_k_m_file_with_the_replies_of_torch(tmp_path, capsys):
    """Trained in torch on the dequantized weights, served by the engine
    from the Q4_K_M file: the same greedy replies on the held-out prompts."""
    try:
        gguf = pretrained.gemma3_270m_gguf()
    except reft_rs.MissingDependencyError as error:
        pytest.skip(str(error))
    assert main(["quickstart", "--model", "gemma3-270m", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "gemma3-270m"
    assert metrics["success_rate_before"] <= 0.25 and metrics["success_rate_after"] >= 0.9
    assert metrics["engine_same_replies"] >= 0.9 * len(metrics["held_out"])
    assert "on the Q4_K_M file" in out
    engine = reft_rs.Engine(gguf, reft=tmp_path / "checkpoint")
    assert engine.quantized and engine.model_type == "gemma3"
    assert engine.reft_config["base_model"]["model_type"] == "gemma3_text"
