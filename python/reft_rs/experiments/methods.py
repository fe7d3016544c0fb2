"""The methods a search tunes and compares, in one place: what each draws
from a trial (:class:`SearchSpace` for reft_rs interventions,
:class:`LoraMethod` for peft's LoRA), how it trains, and what a trained
trial leaves (:class:`Fitted`). :mod:`reft_rs.experiments.sweep` searches one method;
:mod:`reft_rs.experiments.compare` searches several under one budget.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import LOW_RANK_TYPES, ReftConfig
from ..errors import ConfigError, MissingDependencyError
from ..model.reft_model import get_reft_model
from ..training.data import ReftDataCollator, make_dataset
from ..training.evaluation import example_scores
from ..training.metrics import Metric
from ..training.trainer import train

__all__ = [
    "Baseline",
    "Fitted",
    "Head",
    "LoraFitted",
    "LoraMethod",
    "ReftMethod",
    "SearchSpace",
    "Task",
    "build_config",
    "pad_id",
    "suggest_number",
]

Range = tuple[float, float]


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
            "learning_rate": suggest_number(trial, "learning_rate", self.learning_rate, log=True),
            "epochs": int(suggest_number(trial, "epochs", self.epochs, integer=True)),
            "dropout": suggest_number(trial, "dropout", self.dropout),
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


def suggest_number(trial: Any, name: str, value: Any, *, log: bool = False, integer: bool = False) -> float:
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
    """The data of an experiment, as records (:func:`reft_rs.io.records.read_records`).

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

    def dataset(self, tokenizer: Any, records: Sequence[Mapping[str, Any]], config: ReftConfig | None) -> Any:
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
        images = [r["image"] for r in records] if records and "image" in records[0] else None
        return make_dataset(
            tokenizer,
            prompts,
            responses,
            config=config,
            max_length=self.max_length,
            system_prompt=self.system_prompt,
            chat_template=self.chat_template,
            images=images,
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


class Head:
    """The classification head's starting values, restored before each trial
    (a trial trains the head with the interventions)."""

    def __init__(self, model: Any) -> None:
        from ..model.layout import find_head

        try:
            self.module = find_head(model)
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
        self.head = Head(model)
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
            history = _train_trial(self, reft_model, config, params, seed, report)
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
        from ..model.reft_model import ReftModel
        from ..training.evaluation import example_scores

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


def _train_trial(
    method: Any,
    model: Any,
    config: ReftConfig | None,
    params: Mapping[str, Any],
    seed: int,
    report: Callable[[int, float], None] | None,
) -> Any:
    """One trial of ``method`` (a :class:`ReftMethod` or :class:`LoraMethod`):
    ``model`` trained on the task's training set with the trial's epochs and
    learning rate, scored on dev as it goes (``report``), best step kept."""
    task, tokenizer = method.task, method.tokenizer
    dataset = task.dataset(tokenizer, task.train, config)
    return train(
        model,
        dataset,
        collator=ReftDataCollator(pad_id(tokenizer), encoder_decoder=dataset.encoder_decoder),
        epochs=int(params["epochs"]),
        batch_size=method.batch_size,
        learning_rate=float(params["learning_rate"]),
        seed=seed,
        progress=False,
        eval_dataset=task.dataset(tokenizer, task.dev, config),
        eval_metric=method.metric,
        eval_steps=method.eval_steps,
        tokenizer=tokenizer,
        eval_callback=report,
    )


def pad_id(tokenizer: Any) -> int:
    """The pad token of a tokenizer, or of a processor's tokenizer (0 if none)."""
    text = getattr(tokenizer, "tokenizer", tokenizer)
    return text.pad_token_id if text.pad_token_id is not None else 0


class Baseline(nn.Module):
    """A plain model (with or without LoRA) that trains and scores through
    the same loop and metrics as a ReftModel: locations are dropped, it
    generates through the model's own ``generate``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **batch: Any) -> Any:
        batch.pop("locations", None)
        batch.pop("prefix_cache", None)
        return self.inner(**batch)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        for parameter in self.inner.parameters():
            return parameter.device
        return torch.device("cpu")

    def prefix_cache_blocker(self) -> str:
        return "not a ReftModel"

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.inner.parameters() if p.requires_grad)


class LoraMethod:
    """Trials of peft's LoRA on the model's default target modules (for
    Llama-style models ``q_proj`` and ``v_proj``, for GPT-2 ``c_attn``), with
    ``lora_alpha = 2r``; a classifier's head trains beside it, as with
    reft_rs."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        *,
        metric: Metric,
        ranks: Sequence[int] = (4, 8, 16),
        learning_rate: Any = (5e-5, 5e-3),
        epochs: Any = (1, 3),
        dropout: Any = 0.05,
        batch_size: int = 8,
        eval_steps: int | None = None,
    ) -> None:
        try:
            import peft
        except ImportError:
            raise MissingDependencyError(
                "the LoRA baseline needs peft: pip install peft (it comes with 'reft-rs[experiments]')"
            ) from None
        self.peft = peft
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.metric, self.batch_size, self.eval_steps = metric, batch_size, eval_steps
        self.ranks, self.learning_rate, self.epochs, self.dropout = (
            list(ranks),
            learning_rate,
            epochs,
            dropout,
        )
        self.head = Head(model)

    def describe_space(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return list(value) if isinstance(value, (list, tuple)) else value

        return {
            "ranks": self.ranks,
            "learning_rate": plain(self.learning_rate),
            "epochs": plain(self.epochs),
            "dropout": plain(self.dropout),
        }

    def suggest(self, trial: Any) -> dict[str, Any]:
        rank = self.ranks[0] if len(self.ranks) == 1 else trial.suggest_categorical("rank", self.ranks)
        return {
            "type": "lora",
            "rank": int(rank),
            "learning_rate": suggest_number(trial, "learning_rate", self.learning_rate, log=True),
            "epochs": int(suggest_number(trial, "epochs", self.epochs, integer=True)),
            "dropout": suggest_number(trial, "dropout", self.dropout),
        }

    def _wrap(self, params: Mapping[str, Any]) -> tuple[Baseline, Callable[[], None]]:
        self.head.reset()
        config = self.peft.LoraConfig(
            r=int(params["rank"]),
            lora_alpha=2 * int(params["rank"]),
            lora_dropout=float(params.get("dropout", 0.0)),
            # No SEQ_CLS task type for a classifier: peft would swap the head for a
            # trained copy on unloading; the head trains as a plain parameter instead.
            task_type=None if self.task.classify else "CAUSAL_LM",
        )
        peft_model = self.peft.get_peft_model(self.model, config)
        if self.task.classify and self.head.module is not None:
            self.head.module.requires_grad_(True)  # the head trains with LoRA, as with reft_rs

        def release() -> None:
            peft_model.unload()  # the LoRA layers out, the base model as it was
            if self.head.module is not None:
                self.head.module.requires_grad_(False)
            self.head.reset()

        return Baseline(peft_model), release

    def fit(
        self, params: Mapping[str, Any], seed: int, report: Callable[[int, float], None] | None
    ) -> Fitted:
        torch.manual_seed(seed)
        wrapper, release = self._wrap(params)
        try:
            history = _train_trial(self, wrapper, None, params, seed, report)
        except BaseException:
            release()
            raise
        return LoraFitted(wrapper, history, release, self.head)

    def test_scores(self, source: Fitted | Path, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if isinstance(source, Fitted):
            return self._scores(source.model, records)
        self.head.reset()
        peft_model = self.peft.PeftModel.from_pretrained(self.model, source)
        head_file = Path(source) / "head.safetensors"
        if head_file.is_file() and self.head.module is not None:
            from safetensors.torch import load_file

            self.head.module.load_state_dict(load_file(head_file))
        try:
            return self._scores(Baseline(peft_model), records)
        finally:
            peft_model.unload()
            self.head.reset()

    def _scores(self, model: Any, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        dataset = self.task.dataset(self.tokenizer, records, None)
        return example_scores(
            model, dataset, self.metric, tokenizer=self.tokenizer, batch_size=self.batch_size
        )


class LoraFitted(Fitted):
    def __init__(self, model: Baseline, history: Any, release: Callable[[], None], head: Head) -> None:
        super().__init__(model, history, release)
        self.head = head

    def save(self, path: Path, metadata: Mapping[str, Any]) -> None:
        self.model.inner.save_pretrained(path)  # peft's adapter files (safetensors)
        if self.head.module is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in self.head.module.state_dict().items()},
                      str(Path(path) / "head.safetensors"))  # fmt: skip
        (Path(path) / "selection.json").write_text(json.dumps(dict(metadata), indent=2))
