"""Training curves through matplotlib: a PNG of the drawn data, titled and labelled."""

from __future__ import annotations

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from matplotlib import image  # noqa: E402

from reft_rs import ConfigError  # noqa: E402
from reft_rs.training.plot import training_curves  # noqa: E402


def read_png(path):
    """(width, height) of a PNG file, read back by matplotlib."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    return pixels.shape[1], pixels.shape[0]


def test_the_loss_curve_and_the_dev_curve_are_drawn(tmp_path):
    losses = [3.0, 2.0, 1.5, 1.2, 1.1, 1.05]
    evaluations = [{"step": 2, "score": 0.25}, {"step": 4, "score": 0.75}, {"step": 6, "score": 0.5}]
    fig = training_curves(
        tmp_path / "training.png",
        losses,
        evaluations=evaluations,
        metric="exact_match",
        best_step=4,
        title="LoReFT on a tiny model",
    )
    assert read_png(tmp_path / "training.png") == (800, 480)
    loss_axis, dev_axis = fig.axes
    assert loss_axis.get_title() == "LoReFT on a tiny model"
    assert (loss_axis.get_xlabel(), loss_axis.get_ylabel(), dev_axis.get_ylabel()) == (
        "optimizer step",
        "training loss",
        "dev exact_match",
    )
    loss_line = loss_axis.get_lines()[0]
    assert list(loss_line.get_xdata()) == [1, 2, 3, 4, 5, 6] and list(loss_line.get_ydata()) == losses
    dev_line = dev_axis.get_lines()[0]
    assert list(dev_line.get_xdata()) == [2, 4, 6] and list(dev_line.get_ydata()) == [0.25, 0.75, 0.5]
    assert [t.get_text() for t in loss_axis.get_legend().get_texts()] == [
        "training loss",
        "dev exact_match",
        "selected: step 4",
    ]
    pixels = image.imread(tmp_path / "training.png")
    assert (pixels[..., :3] < 0.9).any()  # something is drawn on the white page


def test_a_loss_curve_alone_with_its_own_steps(tmp_path):
    fig = training_curves(tmp_path / "loss.png", [2.0, 1.0], loss_steps=[10, 20], title="loss")
    assert len(fig.axes) == 1
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [10, 20]
    with pytest.raises(ConfigError, match="no training loss"):
        training_curves(tmp_path / "x.png", [])
    with pytest.raises(ConfigError, match="2 losses but 1 steps"):
        training_curves(tmp_path / "x.png", [1.0, 2.0], loss_steps=[1])
    assert np.isfinite(image.imread(tmp_path / "loss.png")).all()
