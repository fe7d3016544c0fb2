"""Hyperparameter search with Optuna: dev for every choice, test once.

A sweep trains one configuration per trial, drawn from a :class:`SearchSpace`
(intervention type, layers, positions, rank, learning rate, epochs,
dropout), scores it on the development set after every epoch (or every
``eval_steps`` steps), reports those scores to Optuna so that its pruner can
stop a trial that is going badly, and keeps the trial's best step. The study
lives in a SQLite file, so a sweep that is stopped resumes where it was.
After the search the best trial's checkpoint is kept, and only then is the
test set, if any, read and scored once.

    result = reft_rs.sweep.run(model, tokenizer, task, SearchSpace.default(30), output="sweep/",
                               metric="exact_match", trials=20)

``reft-rs sweep`` is the command-line face; :mod:`reft_rs.compare` runs one
sweep per method under one budget.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import LOW_RANK_TYPES, ReftConfig
from .data import ReftDataCollator, make_dataset
from .errors import ConfigError, MissingDependencyError
from .metrics import Metric, greater_is_better
from .model import get_reft_model
from .trainer import train

__all__ = ["Fitted", "ReftMethod", "SearchSpace", "Task", "run", "search"]

Range = tuple[float, float]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingDependencyError(
            "sweeps need Optuna: pip install optuna (it comes with 'reft-rs[experiments]')"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclasses.dataclass
class SearchSpace:
    """What a sweep may choose. Lists are categorical choices, ``(low, high)``
    pairs ranges (log scale for the learning rate), a single value is fixed.

    Attributes:
        types: Intervention types.
        layer_sets: Sets of layers, each a list.
        positions: Position specs.
        ranks: Low-rank dimensions (ignored by ``red`` and ``steer``).
        learning_rate: A log-scale range or a list of values.
        epochs: An integer range or a list.
        dropout: A range or a list.
    """

    types: Sequence[str] = ("loreft",)
    layer_sets: Sequence[Sequence[int]] = ((0,),)
    positions: Sequence[str] = ("f1+l1",)
    ranks: Sequence[int] = (4,)
    learning_rate: Range | Sequence[float] = (1e-4, 2e-2)
    epochs: tuple[int, int] | Sequence[int] = (1, 3)
    dropout: Range | Sequence[float] = (0.0,)

    @classmethod
    def default(cls, num_layers: int, **changes: Any) -> SearchSpace:
        """Sensible choices for a decoder of ``num_layers`` layers: one layer
        at a quarter or a half of the depth, three spread over it, or four as
        the ReFT paper's scripts place them; ``f1+l1``, ``l1``, ``l2`` and
        ``f3+l3``; rank 1 to 8; learning rate 1e-4 to 2e-2; 1 to 3 epochs."""
        quarter, half = max(0, num_layers // 4), num_layers // 2
        spread = sorted({quarter, half, min(num_layers - 1, 3 * num_layers // 4)})
        paper = sorted({min(num_layers - 1, round(num_layers * i / 5)) for i in (1, 2, 3, 4)})
        sets: list[list[int]] = []
        for choice in ([quarter], [half], spread, paper):
            if choice not in sets:
                sets.append(choice)
        space = cls(layer_sets=sets, positions=("f1+l1", "l1", "l2", "f3+l3"), ranks=(1, 2, 4, 8))
        return dataclasses.replace(space, **changes)

    def validate(self, num_layers: int | None = None) -> None:
        """Raises :class:`ConfigError` for an empty or impossible choice."""
        for name in ("types", "layer_sets", "positions", "ranks"):
            if not list(getattr(self, name)):
                raise ConfigError(f"the search space has no {name.replace('_', ' ')} to choose from")
        for layers in self.layer_sets:
            if not list(layers):
                raise ConfigError("a layer set of the search space is empty")
            if num_layers is not None and max(layers) >= num_layers:
                raise ConfigError(f"layer {max(layers)} does not exist: the model has {num_layers} layers")
        for kind in self.types:
            ReftConfig.for_layers([0], type=kind, low_rank_dimension=1, positions="l1")  # a known type
        for spec in self.positions:
            ReftConfig.for_layers([0], low_rank_dimension=1, positions=spec)  # a valid spec
        low, high = _bounds(self.learning_rate)
        if not 0 < low <= high:
            raise ConfigError(f"learning rates must be positive, found {self.learning_rate}")
        low, high = _bounds(self.epochs)
        if not 1 <= low <= high:
            raise ConfigError(f"epochs must be at least 1, found {self.epochs}")
        low, high = _bounds(self.dropout)
        if not 0 <= low <= high < 1:
            raise ConfigError(f"dropout must be in [0, 1), found {self.dropout}")

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One configuration drawn through an Optuna trial."""
        kind = _categorical(trial, "type", list(self.types))
        layers = _categorical(trial, "layers", [",".join(map(str, s)) for s in self.layer_sets])
        positions = _categorical(trial, "positions", list(self.positions))
        rank = _categorical(trial, "rank", list(self.ranks)) if kind in LOW_RANK_TYPES else None
        return {
            "type": kind,
            "layers": [int(v) for v in str(layers).split(",")],
            "positions": positions if kind in LOW_RANK_TYPES else "all",
            "rank": rank,
            "learning_rate": _numeric(trial, "learning_rate", self.learning_rate, log=True),
            "epochs": int(_numeric(trial, "epochs", self.epochs, integer=True)),
            "dropout": _numeric(trial, "dropout", self.dropout),
        }

    def as_dict(self) -> dict[str, Any]:
        """The space as plain data (for ``sweep.json``)."""

        def plain(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return {name: plain(value) for name, value in dataclasses.asdict(self).items()}


def _bounds(value: Any) -> tuple[float, float]:
    values = [value] if isinstance(value, (int, float)) else list(value)
    if not values:
        raise ConfigError("an empty choice in the search space")
    return float(min(values)), float(max(values))


def _categorical(trial: Any, name: str, choices: list[Any]) -> Any:
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, choices)


def _numeric(trial: Any, name: str, value: Any, *, log: bool = False, integer: bool = False) -> float:
    """A range ``(low, high)`` tuple, a list of choices, or one fixed value."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        low, high = value
        if low == high:
            return low
        if integer:
            return trial.suggest_int(name, int(low), int(high))
        return trial.suggest_float(name, float(low), float(high), log=log and low > 0)
    choices = list(value)
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, choices)


@dataclasses.dataclass
class Task:
    """The data of an experiment, as records (:func:`reft_rs.records.read_records`).

    Attributes:
        train, dev: ``prompt``/``response`` records (the model learns the
            responses) or ``text``/``label`` ones (a classifier).
        labels: The class names of a classifier, in head order; ``None``
            for generation.
        max_length, system_prompt, chat_template: As in :func:`reft_rs.make_dataset`.
    """

    train: list[Mapping[str, Any]]
    dev: list[Mapping[str, Any]]
    labels: list[str] | None = None
    max_length: int | None = None
    system_prompt: str | None = None
    chat_template: bool | None = None

    @property
    def classify(self) -> bool:
        return self.labels is not None

    def dataset(self, tokenizer: Any, records: Sequence[Mapping[str, Any]], config: ReftConfig) -> Any:
        """The :class:`reft_rs.ReftDataset` of ``records`` for ``config``'s positions."""
        if self.labels is not None:
            index = {label: i for i, label in enumerate(self.labels)}
            unknown = sorted({str(r["label"]) for r in records} - set(index))
            if unknown:
                raise ConfigError(f"labels {unknown} do not occur in the training set")
            return make_dataset(
                tokenizer,
                [r["text"] for r in records],
                labels=[index[str(r["label"])] for r in records],
                config=config,
                max_length=self.max_length,
            )
        prompts = [r["prompt"] if "prompt" in r else r["text"] for r in records]
        responses = [r["response"] if "response" in r else str(r["label"]) for r in records]
        return make_dataset(
            tokenizer,
            prompts,
            responses,
            config=config,
            max_length=self.max_length,
            system_prompt=self.system_prompt,
            chat_template=self.chat_template,
        )


def build_config(params: Mapping[str, Any], classify: bool) -> ReftConfig:
    """The :class:`ReftConfig` of one trial's parameters."""
    return ReftConfig.for_layers(
        params["layers"],
        type=params["type"],
        low_rank_dimension=params.get("rank"),
        positions=params["positions"],
        dropout=params.get("dropout", 0.0),
        trainable_head=classify,
    )


class _Head:
    """The classification head's starting values, restored before each trial
    (a trial trains the head with the interventions)."""

    def __init__(self, model: Any) -> None:
        from .model import _find_head

        try:
            self.module = _find_head(model)
        except ConfigError:
            self.module = None
        self.state = (
            None
            if self.module is None
            else {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        )

    def reset(self) -> None:
        if self.module is not None:
            self.module.load_state_dict(self.state)
            self.module.requires_grad_(False)


class Fitted:
    """A trained configuration of some method: its history, its size, how
    to save it, score it, and give the base model back."""

    def __init__(self, model: Any, history: Any, release: Callable[[], None]) -> None:
        self.model = model
        self.history = history
        self._release = release

    @property
    def trainable_parameters(self) -> int:
        return int(self.model.trainable_parameter_count())

    def save(self, path: Path, metadata: Mapping[str, Any]) -> None:
        self.model.save_pretrained(path, metadata=dict(metadata))

    def close(self) -> None:
        self._release()


class ReftMethod:
    """Trials of reft_rs interventions (any type, RED included)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        space: SearchSpace,
        *,
        metric: Metric,
        batch_size: int = 8,
        eval_steps: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.task, self.space = model, tokenizer, task, space
        self.metric, self.batch_size, self.eval_steps = metric, batch_size, eval_steps
        self.head = _Head(model)
        space.validate(getattr(getattr(model, "config", None), "num_hidden_layers", None))

    def suggest(self, trial: Any) -> dict[str, Any]:
        return self.space.suggest(trial)

    def describe_space(self) -> dict[str, Any]:
        return self.space.as_dict()

    def fit(
        self, params: Mapping[str, Any], seed: int, report: Callable[[int, float], None] | None
    ) -> Fitted:
        """Trains one configuration, selecting its best step on dev."""
        self.head.reset()
        torch.manual_seed(seed)
        config = build_config(params, self.task.classify)
        reft_model = get_reft_model(self.model, config)
        try:
            train_set = self.task.dataset(self.tokenizer, self.task.train, config)
            dev_set = self.task.dataset(self.tokenizer, self.task.dev, config)
            history = train(
                reft_model,
                train_set,
                collator=ReftDataCollator(_pad(self.tokenizer)),
                epochs=int(params["epochs"]),
                batch_size=self.batch_size,
                learning_rate=float(params["learning_rate"]),
                seed=seed,
                progress=False,
                eval_dataset=dev_set,
                eval_metric=self.metric,
                eval_steps=self.eval_steps,
                tokenizer=self.tokenizer,
                eval_callback=report,
            )
        except BaseException:
            self._release(reft_model)
            raise
        return Fitted(reft_model, history, lambda: self._release(reft_model))

    def _release(self, reft_model: Any) -> None:
        """The base model as it was: hooks off, the head's starting values and frozen state back."""
        reft_model.remove_hooks()
        self.head.reset()

    def test_scores(self, source: Fitted | Path, records: Sequence[Mapping[str, Any]]) -> Any:
        """Per-example test scores of a fitted model or a saved checkpoint."""
        from .evaluation import example_scores
        from .model import ReftModel

        if isinstance(source, Fitted):
            reft_model, release = source.model, None
        else:
            self.head.reset()
            reft_model = ReftModel.from_pretrained(self.model, source)
            release = reft_model.remove_hooks
        try:
            dataset = self.task.dataset(self.tokenizer, records, reft_model.reft_config)
            return example_scores(
                reft_model, dataset, self.metric, tokenizer=self.tokenizer, batch_size=self.batch_size
            )
        finally:
            if release is not None:
                release()
                self.head.reset()


def _pad(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


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
        metric: The dev metric (:mod:`reft_rs.metrics`).
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
