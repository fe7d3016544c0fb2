"""Training curves as PNG files, drawn by matplotlib (in the ``torch`` extra).

The figures are built on matplotlib's object API with the Agg canvas, so
no global pyplot state or display is involved and threads may plot at once.

Example::

    reft_rs.training.plot.training_curves("training.png", history, metric="exact_match")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError, MissingDependencyError

__all__ = ["figure", "training_curves"]

SIZE = (8.0, 4.8)  # inches; 800 x 480 pixels at DPI
DPI = 100


def figure() -> Any:
    """A blank matplotlib ``Figure`` on the Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "plots need matplotlib: pip install matplotlib (it comes with 'reft-rs[torch]')"
        ) from None
    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def training_curves(
    path: str | os.PathLike[str],
    losses: Sequence[float],
    *,
    loss_steps: Sequence[int] | None = None,
    evaluations: Sequence[Mapping[str, Any]] = (),
    metric: str | None = None,
    best_step: int | None = None,
    title: str = "training",
) -> Any:
    """Draws the training loss and, when there are evaluations, the dev metric.

    Args:
        path: The PNG file to write (800 x 480).
        losses: Training loss values.
        loss_steps: The optimizer step of each loss (default 1, 2, ...).
        evaluations: ``{"step", "score"}`` mappings of the dev metric,
            drawn on their own axis at the right.
        metric: The dev metric's name, for its axis label.
        best_step: The selected step, marked with a dashed line.
        title: The figure's title.

    Returns:
        The matplotlib ``Figure`` (already written to ``path``).
    """
    if not losses:
        raise ConfigError("there is no training loss to plot")
    steps = list(loss_steps) if loss_steps is not None else list(range(1, len(losses) + 1))
    if len(steps) != len(losses):
        raise ConfigError(f"{len(losses)} losses but {len(steps)} steps")
    fig = figure()
    ax = fig.add_subplot()
    ax.plot(steps, list(losses), color="tab:blue", linewidth=1.5, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if evaluations:
        dev = ax.twinx()
        dev.plot(
            [e["step"] for e in evaluations],
            [e["score"] for e in evaluations],
            color="tab:orange",
            marker="o",
            linewidth=1.5,
            label=f"dev {metric or 'score'}",
        )
        dev.set_ylabel(f"dev {metric or 'score'}")
        more_handles, more_labels = dev.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if best_step is not None:
        line = ax.axvline(
            best_step, color="tab:green", linestyle="--", linewidth=1, label=f"selected: step {best_step}"
        )
        handles.append(line)
        labels.append(line.get_label())
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return fig
