"""Comparing methods honestly: one split, the same tuning budget for each,
selection on dev, the test set read once after every selection, seeds.

Methods: any reft_rs intervention type (``loreft``, ``direft``, ``red``,
...), ``lora`` (peft's LoRA, an optional dependency) and ``zero-shot`` (the
frozen model as it is). Each tuned method gets its own Optuna sweep
(:func:`reft_rs.experiments.sweep.search`) with the same budget: a number of trials or
seconds of searching. When every selection is made, the test records are
read; each method's selected checkpoint is scored on them (with a 95%
bootstrap interval over the test examples), and its selected configuration
is trained again with further seeds (best step chosen on dev each time) to
show the spread that seeds alone cause.

    report = reft_rs.experiments.compare.run(model, tokenizer, task, ["loreft", "red", "lora", "zero-shot"],
                                 output="compare/", metric="accuracy", trials=10, seeds=3,
                                 test=lambda: test_records)

``reft-rs compare`` is the command-line face. It writes ``compare.json``,
``compare.md`` and ``compare.png`` (test score against trainable parameters).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import INTERVENTION_TYPES, LOW_RANK_TYPES
from ..errors import ConfigError
from ..training.evaluation import evaluate, example_scores
from ..training.metrics import Metric, greater_is_better
from .methods import Baseline, Head, LoraMethod, ReftMethod, SearchSpace, Task
from .sweep import search

__all__ = ["BASELINES", "LoraMethod", "bootstrap_interval", "run"]

#: The methods besides the intervention types.
BASELINES = ("lora", "zero-shot")


def bootstrap_interval(
    scores: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of per-example scores."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ConfigError("no scores to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _reft_space(kind: str, num_layers: int, space: SearchSpace | None) -> SearchSpace:
    """The sweep space of one intervention type: the given space with its
    types set to ``kind`` (RED and steering vectors edit every token and have
    no rank)."""
    base = space or SearchSpace.default(num_layers)
    if kind in LOW_RANK_TYPES:
        return type(base)(**{**base.__dict__, "types": [kind]})
    return type(base)(**{**base.__dict__, "types": [kind], "positions": ["all"], "ranks": [1]})


def run(
    model: Any,
    tokenizer: Any,
    task: Task,
    methods: Sequence[str],
    *,
    output: str | os.PathLike[str],
    metric: Metric = "loss",
    trials: int | None = 10,
    seconds: float | None = None,
    seeds: int = 3,
    space: SearchSpace | None = None,
    batch_size: int = 8,
    eval_steps: int | None = None,
    seed: int = 0,
    test: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Tunes, selects and tests every method; see the module docstring.

    Args:
        methods: Intervention types, ``lora`` and ``zero-shot``.
        trials, seconds: Each tuned method's budget (the same for all):
            trials, or seconds of searching (``trials=None``).
        seeds: Test runs of each selected configuration: the selected
            checkpoint and ``seeds - 1`` retrainings with other seeds.
        space: The intervention search space (default
            :meth:`SearchSpace.default`); each type gets it with its own
            type. Its learning rate, epochs and dropout apply to LoRA too
            unless left at their defaults.
        test: Called once, after every method's selection.

    Returns:
        What ``compare.json`` holds: a row per method and the settings.
    """
    names = list(dict.fromkeys(methods))
    known = set(INTERVENTION_TYPES) | set(BASELINES)
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(sorted(known))}")
    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, found {seeds}")
    if trials is None and seconds is None:
        raise ConfigError("give every method the same budget: trials or seconds")
    higher = greater_is_better(metric)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    num_layers = int(model.config.num_hidden_layers)
    metric_name = metric if isinstance(metric, str) else "custom"
    built: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        if log is not None:
            log(f"== {name}")
        if name == "zero-shot":
            wrapper = Baseline(model)
            head = Head(model)
            head.reset()
            dev = task.dataset(tokenizer, task.dev, None)
            score = evaluate(wrapper, dev, metric, tokenizer=tokenizer, batch_size=batch_size)
            rows[name] = {"method": name, "trainable_parameters": 0, "dev_score": score, "params": None}
            if log is not None:
                log(f"dev {metric_name} {score:.4f} (no tuning)")
            continue
        if name == "lora":
            defaults = SearchSpace()
            options: dict[str, Any] = {}
            if space is not None:
                for field in ("learning_rate", "epochs", "dropout"):
                    if getattr(space, field) != getattr(defaults, field):
                        options[field] = getattr(space, field)
            method = LoraMethod(model, tokenizer, task, metric=metric, batch_size=batch_size,
                                eval_steps=eval_steps, **options)  # fmt: skip
        else:
            method = ReftMethod(model, tokenizer, task, _reft_space(name, num_layers, space), metric=metric,
                                batch_size=batch_size, eval_steps=eval_steps)  # fmt: skip
        summary = search(method, output=output / name, metric=metric, trials=trials, timeout=seconds, seed=seed,
                         log=log, plots=False)  # fmt: skip
        best = summary["best"]
        trial = next(t for t in summary["trials"] if t["number"] == best["trial"])
        built[name] = method
        rows[name] = {
            "method": name,
            "trainable_parameters": trial["trainable_parameters"],
            "dev_score": best["dev_score"],
            "params": best["params"],
            "trials": len(summary["trials"]),
            "train_seconds": trial["seconds"],
            "seconds_per_step": trial["seconds_per_step"],
            "selected_trial": best["trial"],
        }
    # Every selection is made: only now is the test set read.
    records = None
    if test is not None:
        records = list(test())
        if not records:
            raise ConfigError("the test set is empty")
        if log is not None:
            log(f"== test: {len(records)} examples, read after every selection")
        for name, row in rows.items():
            row.update(_test(name, built.get(name), model, tokenizer, task, records, metric, row, output, seeds,
                             seed, batch_size, log))  # fmt: skip
    report = {
        "metric": metric_name,
        "greater_is_better": higher,
        "budget": {"trials": trials, "seconds": seconds},
        "seeds": seeds,
        "train_examples": len(task.train),
        "dev_examples": len(task.dev),
        "test_examples": None if records is None else len(records),
        "rows": list(rows.values()),
    }
    (output / "compare.json").write_text(json.dumps(report, indent=2))
    (output / "compare.md").write_text(markdown(report))
    if records is not None:
        plot(report, output / "compare.png")
    return report


def _test(
    name: str,
    method: Any,
    model: Any,
    tokenizer: Any,
    task: Task,
    records: list[Mapping[str, Any]],
    metric: Metric,
    row: Mapping[str, Any],
    output: Path,
    seeds: int,
    seed: int,
    batch_size: int,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    if method is None:  # zero-shot: nothing trained, nothing to reseed
        head = Head(model)
        head.reset()
        dataset = task.dataset(tokenizer, records, None)
        scores = example_scores(Baseline(model), dataset, metric, tokenizer=tokenizer, batch_size=batch_size)
        spread = [float(scores.mean())]
    else:
        scores = method.test_scores(output / name / "best", records)
        spread = [float(scores.mean())]
        for k in range(1, seeds):
            begin = time.perf_counter()
            fitted = method.fit(row["params"], seed + 10_000 * k, None)
            try:
                spread.append(float(method.test_scores(fitted, records).mean()))
            finally:
                fitted.close()
            if log is not None:
                log(
                    f"{name}: seed {k + 1}/{seeds}: test {spread[-1]:.4f} ({time.perf_counter() - begin:.0f} s)"
                )
    low, high = bootstrap_interval(scores, seed=seed)
    if log is not None:
        log(f"{name}: test {scores.mean():.4f} [95% {low:.4f}, {high:.4f}]")
    return {
        "test_score": float(scores.mean()),
        "test_interval": [low, high],
        "seed_scores": spread,
        "seed_mean": float(np.mean(spread)),
        "seed_std": float(np.std(spread, ddof=1)) if len(spread) > 1 else 0.0,
    }


def markdown(report: Mapping[str, Any]) -> str:
    """The comparison as a markdown table."""
    metric = report["metric"]
    budget = report["budget"]
    given = f"{budget['trials']} trials" if budget["trials"] is not None else f"{budget['seconds']:g} s"
    lines = [
        f"Metric: {metric} ({'higher' if report['greater_is_better'] else 'lower'} is better); "
        f"budget per method: {given}; {report['seeds']} seeds for the selected configuration; "
        f"{report['train_examples']} train / {report['dev_examples']} dev / {report['test_examples']} test examples.",
        "",
        f"| method | trainable params | dev {metric} | test {metric} (95% CI) | seeds (mean ± sd) | train s | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:

        def number(value: Any, digits: int = 4) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        test = "-"
        if "test_score" in row:
            low, high = row["test_interval"]
            test = f"{row['test_score']:.4f} [{low:.4f}, {high:.4f}]"
        seeds = "-" if "seed_mean" not in row else f"{row['seed_mean']:.4f} ± {row['seed_std']:.4f}"
        lines.append(
            f"| {row['method']} | {row['trainable_parameters']:,} | {number(row['dev_score'])} | {test} | {seeds} | "
            f"{number(row.get('train_seconds'), 1)} | {number(row.get('seconds_per_step'), 3)} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Any], path: Path) -> Any:
    """Test score against trainable parameters (log scale), with intervals;
    the zero-shot score, which trains nothing, as a dashed line."""
    from ..training.plot import figure

    fig = figure()
    ax = fig.add_subplot()
    for row in report["rows"]:
        if "test_score" not in row:
            continue
        low, high = row["test_interval"]
        if row["trainable_parameters"] == 0:
            ax.axhline(row["test_score"], color="gray", linestyle="--", linewidth=1, label=f"{row['method']}")
            continue
        ax.errorbar(
            [row["trainable_parameters"]],
            [row["test_score"]],
            yerr=[[row["test_score"] - low], [high - row["test_score"]]],
            fmt="o",
            capsize=4,
            label=row["method"],
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test {report['metric']}")
    ax.set_title(f"test {report['metric']} against trainable parameters (95% bootstrap intervals)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return fig
