"""Hyperparameter search with Optuna: dev for every choice, test once.

A sweep trains one configuration per trial, drawn from a :class:`SearchSpace`
(intervention type, layers, positions, rank, learning rate, epochs,
dropout), scores it on the development set after every epoch (or every
``eval_steps`` steps), reports those scores to Optuna so that its pruner can
stop a trial that is going badly, and keeps the trial's best step. The study
lives in a SQLite file, so a sweep that is stopped resumes where it was.
After the search the best trial's checkpoint is kept, and only then is the
test set, if any, read and scored once.

    result = reft_rs.experiments.sweep.run(model, tokenizer, task, SearchSpace.default(30), output="sweep/",
                               metric="exact_match", trials=20)

``reft-rs sweep`` is the command-line face; :mod:`reft_rs.experiments.compare` runs one
sweep per method under one budget.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingDependencyError
from ..training.metrics import Metric, greater_is_better
from .methods import Fitted, ReftMethod, SearchSpace, Task

__all__ = ["Fitted", "ReftMethod", "SearchSpace", "Task", "run", "search"]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingDependencyError(
            "sweeps need Optuna: pip install optuna (it comes with 'reft-rs[experiments]')"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def run(
    model: Any,
    tokenizer: Any,
    task: Task,
    space: SearchSpace,
    *,
    output: str | os.PathLike[str],
    metric: Metric = "loss",
    trials: int | None = 20,
    timeout: float | None = None,
    batch_size: int = 8,
    eval_steps: int | None = None,
    seed: int = 0,
    test: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
    study_name: str = "reft-rs",
    pruner: Any = None,
    sampler: Any = None,
    log: Callable[[str], None] | None = print,
    plots: bool = True,
) -> dict[str, Any]:
    """Runs (or resumes) a sweep of reft_rs interventions and writes its
    results into ``output``.

    Args:
        model, tokenizer: The frozen base model (its classification head,
            for a classifier, is reset before every trial) and its tokenizer.
        task: The training and development records.
        space: What to search over.
        output: A folder: ``study.db`` (Optuna's SQLite storage; an existing
            one is resumed), ``best/`` (the best trial's checkpoint, at its
            best step), ``sweep.json`` and the plots.
        metric: The dev metric (:mod:`reft_rs.training.metrics`).
        trials: Trials the study should have in all (earlier runs count);
            ``None`` runs until ``timeout``.
        timeout: Seconds this call may search for.
        batch_size, eval_steps, seed: Training settings of every trial
            (``eval_steps=None``: score the dev set after every epoch).
        test: Called once, after the search, for the test records; never
            before (the command passes a reader of the test file).
        pruner, sampler: Optuna's; by default a median pruner (after two
            complete trials) and a TPE sampler seeded with ``seed``.
        log: Where the progress lines go (``None``: nowhere).
        plots: Write ``optimization_history.png`` and ``param_importances.png``.

    Returns:
        What ``sweep.json`` holds: every trial (parameters, dev score, its
        best step, seconds, trainable parameters, state), the best trial and
        the test score.
    """
    method = ReftMethod(
        model, tokenizer, task, space, metric=metric, batch_size=batch_size, eval_steps=eval_steps
    )
    summary = search(
        method, output=output, metric=metric, trials=trials, timeout=timeout, seed=seed, study_name=study_name,
        pruner=pruner, sampler=sampler, log=log, plots=False,
    )  # fmt: skip
    output = Path(output)
    metric_name = summary["metric"]
    # Selection has ended: only now is the test set read, and scored once.
    if test is not None:
        records = list(test())
        if not records:
            raise ConfigError("the test set is empty")
        scores = method.test_scores(output / "best", records)
        summary["test"] = {"score": float(scores.mean()), "examples": len(records)}
        if log is not None:
            log(f"test {metric_name} of the selected configuration: {summary['test']['score']:.4f} "
                f"({len(records)} examples, read after selection)")  # fmt: skip
    if plots:
        summary["plots"] = _plots(
            _optuna().load_study(study_name=study_name, storage=_storage(output)), output
        )
    (output / "sweep.json").write_text(json.dumps(summary, indent=2))
    return summary


def _storage(output: Path) -> str:
    return f"sqlite:///{(output / 'study.db').resolve()}"


def search(
    method: Any,
    *,
    output: str | os.PathLike[str],
    metric: Metric,
    trials: int | None,
    timeout: float | None = None,
    seed: int = 0,
    study_name: str = "reft-rs",
    pruner: Any = None,
    sampler: Any = None,
    log: Callable[[str], None] | None = print,
    plots: bool = True,
) -> dict[str, Any]:
    """The search itself, for any method with ``suggest``, ``fit`` and
    ``describe_space`` (see :class:`ReftMethod`): trials in a resumable
    Optuna study in ``output/study.db``, the best trial saved as
    ``output/best``. Writes ``sweep.json`` and returns its contents (no
    test score: that is the caller's, after selection)."""
    optuna = _optuna()
    if trials is None and timeout is None:
        raise ConfigError("give the sweep a budget: a number of trials, a timeout, or both")
    if trials is not None and trials < 1:
        raise ConfigError(f"trials must be at least 1, found {trials}")
    higher = greater_is_better(metric)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    study = optuna.create_study(
        storage=_storage(output),
        study_name=study_name,
        direction="maximize" if higher else "minimize",
        load_if_exists=True,
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        sampler=sampler or optuna.samplers.TPESampler(seed=seed),
    )
    _check_resumed(study, output, metric_name, "maximize" if higher else "minimize")
    done = [t for t in study.trials if t.state.is_finished()]
    remaining = None if trials is None else max(0, trials - len(done))
    total = trials if trials is not None else "?"
    started = time.perf_counter()
    durations: list[float] = []

    def objective(trial: Any) -> float:
        params = method.suggest(trial)
        begin = time.perf_counter()

        def report(step: int, score: float) -> None:
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"dev {metric_name} {score:.4f} at step {step}")

        trial.set_user_attr("params", params)
        fitted = method.fit(params, seed + trial.number, report)
        try:
            history = fitted.history
            score = float(history.best_score)
            seconds = time.perf_counter() - begin
            trial.set_user_attr("best_step", history.best_step)
            trial.set_user_attr("steps", len(history))
            trial.set_user_attr("seconds", round(seconds, 2))
            trial.set_user_attr("seconds_per_step", round(seconds / max(1, len(history)), 4))
            trial.set_user_attr("trainable_parameters", fitted.trainable_parameters)
            finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            best = None if not finished else study.best_value
            if best is None or (score > best if higher else score < best):
                # A candidate until Optuna has recorded the trial: `best/`
                # takes it only then (_settle_best), so that a sweep killed
                # in between resumes with `best/` and the study agreeing.
                candidate = _candidate(output, trial.number)
                _remove_tree(candidate)
                fitted.save(
                    candidate,
                    {
                        "sweep_trial": trial.number,
                        "selected_step": history.best_step,
                        "dev_metric": metric_name,
                        "dev_score": score,
                        "params": params,
                    },
                )
                (candidate / _TRIAL_FILE).write_text(json.dumps({"trial": trial.number}))
            return score
        finally:
            fitted.close()

    def progress(study: Any, trial: Any) -> None:
        _settle_best(study, optuna, output)
        seconds = trial.user_attrs.get("seconds")
        if seconds is None and trial.datetime_complete and trial.datetime_start:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        durations.append(seconds or 0.0)
        finished = [t for t in study.trials if t.state.is_finished()]
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if trial.state == optuna.trial.TrialState.COMPLETE:
            what = f"dev {metric_name} {trial.value:.4f}"
        else:
            what = trial.state.name.lower()
            last = trial.intermediate_values
            if last:
                what += f" at {metric_name} {last[max(last)]:.4f}"
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})" if complete else "no best yet"
        left = ""
        if trials is not None:
            remaining_trials = max(0, trials - len(finished))
            eta = remaining_trials * (sum(durations) / len(durations))
            if timeout is not None:
                eta = min(eta, max(0.0, timeout - (time.perf_counter() - started)))
            left = f"; ETA {_duration(eta)}"
        if log is not None:
            log(f"trial {len(finished)}/{total}: {what} in {_duration(seconds or 0)}; {best}{left}")

    if remaining is None or remaining > 0:
        study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=[progress], catch=())
    elif log is not None:
        log(f"the study in {output / 'study.db'} already has {len(done)} trials; nothing to run")
    _settle_best(study, optuna, output)
    summary = _summary(study, optuna, metric_name, method.describe_space(), output)
    if summary["best"] is None:
        raise ConfigError("no trial completed; nothing to select")
    if plots:
        summary["plots"] = _plots(study, output)
    (output / "sweep.json").write_text(json.dumps(summary, indent=2))
    return summary


#: In a trial's checkpoint folder: the trial it comes from.
_TRIAL_FILE = "sweep_trial.json"


def _candidate(output: Path, number: int) -> Path:
    return output / "candidates" / f"trial-{number}"


def _remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _trial_of(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / _TRIAL_FILE).read_text())["trial"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_resumed(study: Any, output: Path, metric: str, direction: str) -> None:
    """A study resumed from ``output/study.db`` must rank trials as this
    search would: the same metric, the same direction."""
    stored = study.user_attrs.get("metric")
    if stored is not None and stored != metric:
        raise ConfigError(
            f"{output / 'study.db'} holds a study ranked by dev {stored}, not {metric}: "
            "its trials cannot be compared; use another output folder or study name"
        )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"{output / 'study.db'} holds a study that {study.direction.name.lower()}s its metric, "
            f"and {metric} needs to {direction}: use another output folder or study name"
        )
    if stored is None:
        study.set_user_attr("metric", metric)


def _settle_best(study: Any, optuna: Any, output: Path) -> None:
    """Makes ``best/`` the checkpoint of the study's best recorded trial
    (promoting its candidate) and drops the other candidates; called
    between trials."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return
    number = study.best_trial.number
    best = output / "best"
    if _trial_of(best) != number:
        candidate = _candidate(output, number)
        if _trial_of(candidate) == number:
            # Each rename is atomic: best/ is the old or the new trial's.
            retired = output / "candidates" / "retired"
            _remove_tree(retired)
            if best.exists():
                os.replace(best, retired)
            os.replace(candidate, best)
            _remove_tree(retired)
    # Trials run one at a time and this runs between them: any other
    # candidate lost to a better trial or to a killed run.
    _remove_tree(output / "candidates")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _summary(study: Any, optuna: Any, metric: str, space: Mapping[str, Any], output: Path) -> dict[str, Any]:
    rows = []
    for trial in study.trials:
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name.lower(),
                "params": trial.user_attrs.get("params", trial.params),
                "dev_score": trial.value,
                "best_step": trial.user_attrs.get("best_step"),
                "intermediate": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
                "steps": trial.user_attrs.get("steps"),
                "seconds": trial.user_attrs.get("seconds"),
                "seconds_per_step": trial.user_attrs.get("seconds_per_step"),
                "trainable_parameters": trial.user_attrs.get("trainable_parameters"),
            }
        )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = None
    if complete:
        trial = study.best_trial
        best = {
            "trial": trial.number,
            "params": trial.user_attrs.get("params"),
            "dev_score": trial.value,
            "best_step": trial.user_attrs.get("best_step"),
            "checkpoint": str(output / "best"),
        }
    return {
        "metric": metric,
        "direction": study.direction.name.lower(),
        "space": dict(space),
        "trials": rows,
        "best": best,
    }


def _plots(study: Any, output: Path) -> list[str]:
    """Optuna's optimization history and parameter importances, as PNG files."""
    written = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import optuna.visualization.matplotlib as views
        from matplotlib import pyplot
    except ImportError:
        return written
    for name, draw in (("optimization_history", views.plot_optimization_history),
                       ("param_importances", views.plot_param_importances)):  # fmt: skip
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib views experimental
                axes = draw(study)
        except (ValueError, RuntimeError):  # importances need two finished trials that differ
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
        figure.set_size_inches(8, 4.8)
        figure.tight_layout()
        figure.savefig(output / f"{name}.png")
        pyplot.close(figure)
        written.append(f"{name}.png")
    return written
