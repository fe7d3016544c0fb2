"""Training: :class:`ReftTrainer` for the ``transformers`` Trainer, and :func:`train`,
a plain loop for everyone else.

``ReftTrainer`` is the Trainer with checkpoints in the reft_rs format: every
``checkpoint-N`` folder holds ``reft_config.json`` and
``reft_model.safetensors`` (config included, unlike pyreft's), beside the
Trainer's own optimizer and scheduler state, and ``resume_from_checkpoint``
restores the interventions from them. The loss is the wrapped model's own,
so ``num_items_in_batch`` (gradient accumulation) works on the 4.5x and 5.x
series alike.

Distributed training: the interventions are ordinary modules, so
``torchrun --nproc_per_node=N train.py`` (or ``accelerate launch``) with
``ReftTrainer`` runs data-parallel as is; in a plain loop, wrap the
ReftModel in ``DistributedDataParallel`` (its frozen base parameters are
skipped by DDP).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import transformers

from ..errors import ConfigError, IncompatibleModelError
from ..io import checkpoint
from ..model.prefix_cache import PrefixCache
from ..model.reft_model import ReftModel
from .data import ReftDataCollator
from .evaluation import evaluate as _evaluate
from .metrics import Metric
from .metrics import greater_is_better as _greater_is_better

__all__ = ["ReftTrainer", "TrainingHistory", "train", "training_arguments"]


def _unwrap(model: Any) -> ReftModel:
    while not isinstance(model, ReftModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, ReftModel):
        raise TypeError(f"ReftTrainer trains a ReftModel, found {type(model).__name__}")
    return model


def load_into(reft_model: ReftModel, folder: str | os.PathLike[str]) -> None:
    """Loads a checkpoint saved from the same configuration into ``reft_model``."""
    identity = reft_model.base_model_identity()
    config, tensors = checkpoint.read_for_model(
        folder,
        hidden_size=identity["hidden_size"],
        num_hidden_layers=identity["num_hidden_layers"],
        model_type=identity["model_type"],
        stacklevel=3,
    )
    saved = [item.name for item in config.interventions]
    ours = [item.name for item in reft_model.reft_config.interventions]
    if saved != ours:
        raise IncompatibleModelError(
            f"the checkpoint at {os.fspath(folder)} holds interventions {saved}, this model has {ours}"
        )
    reft_model.load_tensors(tensors)


class ReftTrainer(transformers.Trainer):
    """``transformers.Trainer`` for a :class:`ReftModel`.

    Use it as the Trainer, with a :class:`reft_rs.ReftDataCollator`:

        trainer = ReftTrainer(model=reft_model, args=TrainingArguments(...),
                              train_dataset=dataset, data_collator=collator)
        trainer.train()                       # or train(resume_from_checkpoint=True)
        reft_model.save_pretrained("out")

    With an ``eval_dataset`` the Trainer's evaluation scores the loss by
    default; ``eval_metric`` (``accuracy``, ``exact_match``, ``contains``
    or a callable of the model, see :mod:`reft_rs.training.metrics`) scores that
    instead, logged as ``eval_<metric>``, so that
    ``metric_for_best_model="eval_exact_match"``, ``load_best_model_at_end``
    and ``EarlyStoppingCallback`` select on it::

        args = TrainingArguments(..., eval_strategy="steps", eval_steps=50, save_steps=50,
                                 load_best_model_at_end=True,
                                 metric_for_best_model="eval_exact_match", greater_is_better=True)
        trainer = ReftTrainer(model=reft_model, args=args, train_dataset=train, eval_dataset=dev,
                              data_collator=collator, eval_metric="exact_match", eval_tokenizer=tokenizer)

    Args:
        eval_metric: What ``evaluate`` scores (default ``loss``, the
            Trainer's own evaluation).
        eval_tokenizer: For the metrics that read replies as text (default:
            the Trainer's ``processing_class``).
        prefix_cache, prefix_cache_memory: Prefix-cached training steps, as
            in :func:`train` (on by default where they apply).
        Others: as for ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        eval_metric: Metric = "loss",
        eval_tokenizer: Any = None,
        prefix_cache: bool = True,
        prefix_cache_memory: int = 2 << 30,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(eval_metric, str):
            _greater_is_better(eval_metric)  # a name it knows
        self.eval_metric = eval_metric
        self.eval_tokenizer = eval_tokenizer
        reft_model = _unwrap(self.model)
        self.prefix_cache = (
            PrefixCache(prefix_cache_memory)
            if prefix_cache and reft_model.prefix_cache_blocker() is None
            else None
        )

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        # Training steps read the untouched prompt prefix from the cache;
        # evaluation (whose logits may be wanted whole) runs the full pass.
        if self.prefix_cache is not None and model.training:
            inputs = {**inputs, "prefix_cache": self.prefix_cache}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        if self.eval_metric == "loss":
            return super().evaluate(
                eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("ReftTrainer.evaluate needs an eval_dataset")
        start = time.perf_counter()
        tokenizer = (
            self.eval_tokenizer or getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        )
        score = _evaluate(
            _unwrap(self.model),
            dataset,
            self.eval_metric,
            tokenizer=tokenizer,
            batch_size=self.args.per_device_eval_batch_size,
        )
        name = (
            self.eval_metric
            if isinstance(self.eval_metric, str)
            else getattr(self.eval_metric, "__name__", "custom")
        )
        metrics = {
            f"{metric_key_prefix}_{name}": score,
            f"{metric_key_prefix}_runtime": time.perf_counter() - start,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        _unwrap(self.model).save_pretrained(output_dir)
        processing_class = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "training_args.json"), "w") as handle:
            handle.write(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_into(_unwrap(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_into(_unwrap(self.model), self.state.best_model_checkpoint)


class TrainingHistory(list):
    """What :func:`train` returns: the loss of every optimizer step (it is
    that list), and with an evaluation set the selection made on it.

    Attributes:
        evaluations: One ``{"step", "epoch", "score"}`` per evaluation.
        metric: The metric's name (``None`` without an evaluation set).
        best_step: The step whose parameters the model holds at the end
            (with ``keep_best``), ``None`` without evaluations.
        best_score: Its score.
        stopped_early: Whether early stopping ended training.
        prefix_cache: The :class:`PrefixCache` used, or ``None``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.evaluations: list[dict[str, Any]] = []
        self.metric: str | None = None
        self.best_step: int | None = None
        self.best_score: float | None = None
        self.stopped_early = False
        self.prefix_cache: PrefixCache | None = None

    def as_dict(self) -> dict[str, Any]:
        """The history as plain data (for ``metrics.json``)."""
        return {
            "losses": list(self),
            "metric": self.metric,
            "evaluations": list(self.evaluations),
            "best_step": self.best_step,
            "best_score": self.best_score,
            "stopped_early": self.stopped_early,
        }


def train(
    reft_model: ReftModel,
    dataset: Any,
    *,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    epochs: int = 1,
    batch_size: int = 8,
    learning_rate: float = 4e-3,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.0,
    gradient_accumulation_steps: int = 1,
    max_steps: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    eval_dataset: Any = None,
    eval_metric: Metric = "loss",
    greater_is_better: bool | None = None,
    eval_steps: int | None = None,
    eval_batch_size: int | None = None,
    tokenizer: Any = None,
    early_stopping_patience: int | None = None,
    keep_best: bool = True,
    eval_callback: Callable[[int, float], None] | None = None,
    prefix_cache: bool | PrefixCache = True,
    prefix_cache_memory: int = 2 << 30,
) -> TrainingHistory:
    """Trains the interventions with AdamW and a linear schedule, no Trainer needed.

    Args:
        reft_model: The model to train (its trainable parameters only).
        dataset: A :class:`reft_rs.ReftDataset` (or any dataset of its
            items), or an iterable of ready batches.
        collator: Pads items into batches; by default a right-padding
            :class:`ReftDataCollator` with pad id 0.
        epochs, batch_size, learning_rate, weight_decay, warmup_ratio,
        gradient_accumulation_steps, max_steps, shuffle, seed: The usual.
        progress: Show a progress bar with the loss and time left.
        callback: Called as ``callback(step, loss)`` after each optimizer step.
        eval_dataset: A development set (a :class:`reft_rs.ReftDataset`):
            the model is scored on it every ``eval_steps`` optimizer steps
            (by default at the end of every epoch) and after the last step.
        eval_metric: ``loss``, ``accuracy``, ``exact_match``, ``contains``
            (see :mod:`reft_rs.training.metrics`) or a callable of the model, with
            ``greater_is_better`` beside it.
        eval_batch_size: Batch size of the evaluations (default ``batch_size``).
        tokenizer: For the metrics that read replies as text.
        early_stopping_patience: Stop after this many evaluations without
            a better score.
        keep_best: End with the parameters of the best evaluation (the
            earliest, on ties) rather than the last step's.
        eval_callback: Called as ``eval_callback(step, score)`` after each
            evaluation (a sweep reports intermediate scores this way; it
            may raise to stop training).
        prefix_cache: Where every intervention edits only the end of the
            prompt, run the untouched prefix through the frozen model
            without gradients and keep its keys and values across epochs
            (:mod:`reft_rs.model.prefix_cache`): the same losses and gradients, far
            less work. ``True`` by default (off where it does not apply);
            ``False`` turns it off; a :class:`PrefixCache` is used as given.
        prefix_cache_memory: Bytes the kept prefixes may take (default
            2 GiB); past it, prefixes are recomputed per batch.

    Returns:
        A :class:`TrainingHistory`: the loss of every optimizer step, and
        the evaluations, the best step and its score.
    """
    history = TrainingHistory()
    higher = None
    if eval_dataset is not None:
        higher = _greater_is_better(eval_metric, greater_is_better)
        history.metric = (
            eval_metric if isinstance(eval_metric, str) else getattr(eval_metric, "__name__", "custom")
        )
    if eval_steps is not None and eval_steps < 1:
        raise ConfigError(f"eval_steps must be a positive number of steps, found {eval_steps}")
    if early_stopping_patience is not None and early_stopping_patience < 1:
        raise ConfigError(f"early_stopping_patience must be at least 1, found {early_stopping_patience}")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, torch.utils.data.Dataset):
        loader: Iterable[dict[str, Any]] = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collator
            or ReftDataCollator(0, encoder_decoder=getattr(dataset, "encoder_decoder", None)),
            generator=generator,
        )
    else:
        loader = dataset
    parameters = [p for p in reft_model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters")
    per_epoch = math.ceil(len(loader) / gradient_accumulation_steps) if hasattr(loader, "__len__") else None
    total = max_steps or (per_epoch * epochs if per_epoch else None)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    warmup = int((total or 0) * warmup_ratio)

    def schedule(step: int) -> float:
        if total is None:
            return 1.0
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = _progress(total, progress)
    device = reft_model.device
    best_state: dict[str, torch.Tensor] | None = None
    waited = 0

    def run_evaluation(step: int, epoch: int) -> bool:
        """Scores the model; returns whether training should stop."""
        nonlocal best_state, waited
        if history.evaluations and history.evaluations[-1]["step"] == step:
            return False
        score = _evaluate(
            reft_model,
            eval_dataset,
            eval_metric,
            tokenizer=tokenizer,
            batch_size=eval_batch_size or batch_size,
        )
        history.evaluations.append({"step": step, "epoch": epoch, "score": score})
        better = history.best_score is None or (
            score > history.best_score if higher else score < history.best_score
        )
        if better:
            history.best_step, history.best_score = step, score
            if keep_best:
                best_state = {k: v.detach().clone() for k, v in _trainable_state(reft_model).items()}
            waited = 0
        else:
            waited += 1
        reft_model.train()
        if eval_callback is not None:
            eval_callback(step, score)
        if early_stopping_patience is not None and waited >= early_stopping_patience:
            history.stopped_early = True
            return True
        return False

    store: PrefixCache | None = None
    if prefix_cache is not False and reft_model.prefix_cache_blocker() is None:
        store = prefix_cache if isinstance(prefix_cache, PrefixCache) else PrefixCache(prefix_cache_memory)
    history.prefix_cache = store
    extra = {"prefix_cache": store} if store is not None else {}
    reft_model.train()
    step, accumulated, pending = 0, 0.0, 0
    start = time.perf_counter()
    try:
        for epoch in range(epochs):
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                loss = reft_model(**batch, **extra).loss / gradient_accumulation_steps
                loss.backward()
                accumulated += loss.item()
                pending += 1
                if pending < gradient_accumulation_steps:
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                history.append(accumulated)
                step += 1
                bar(step, accumulated, time.perf_counter() - start)
                if callback is not None:
                    callback(step, accumulated)
                accumulated, pending = 0.0, 0
                done = max_steps is not None and step >= max_steps
                if eval_dataset is not None and (done or (eval_steps is not None and step % eval_steps == 0)):
                    if run_evaluation(step, epoch):
                        return history
                if done:
                    return history
            if eval_dataset is not None and eval_steps is None and step > 0 and run_evaluation(step, epoch):
                return history
        if eval_dataset is not None and step > 0:
            run_evaluation(step, epochs - 1)
    finally:
        if best_state is not None and history.best_step != step:
            with torch.no_grad():
                current = _trainable_state(reft_model)
                for name, value in best_state.items():
                    current[name].copy_(value)
        reft_model.eval()
        bar(None, None, None)
    return history


def _trainable_state(reft_model: ReftModel) -> dict[str, torch.Tensor]:
    return {name: p for name, p in reft_model.named_parameters() if p.requires_grad}


def _progress(total: int | None, enabled: bool) -> Callable[[int | None, float | None, float | None], None]:
    """A one-line progress bar: steps, loss, elapsed and remaining time."""
    if not enabled:
        return lambda *_: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, unit="step", desc="training")

        def update(step, loss, elapsed):
            if step is None:
                bar.close()
            else:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")

        return update

    def plain(step, loss, elapsed):  # pragma: no cover
        if step is not None:
            left = elapsed / step * (total - step) if total else float("nan")
            print(f"\rstep {step}/{total or '?'} loss {loss:.4f} eta {left:.0f}s", end="", flush=True)
        else:
            print()

    return plain


def training_arguments(
    output_dir: str | os.PathLike[str],
    *,
    epochs: float = 3.0,
    max_steps: int | None = None,
    batch_size: int = 8,
    learning_rate: float = 1e-2,
    keep_checkpoints: int | None = 3,
    log_steps: int = 10,
    bf16: bool = False,
    use_cpu: bool = False,
    seed: int = 0,
    save_steps: int | None = None,
    metric: Metric | None = None,
    eval_steps: int | None = None,
    early_stopping: int | None = None,
) -> tuple[transformers.TrainingArguments, list[Any]]:
    """``TrainingArguments`` and callbacks for :class:`ReftTrainer` as
    ``reft-rs train`` runs it: a linear schedule; with a dev ``metric``, an
    evaluation every ``eval_steps`` steps (or epoch), a checkpoint at each,
    the best kept at the end and, with ``early_stopping``, a stop after that
    many evaluations without a better score; without one, a checkpoint every
    ``save_steps`` steps (none when 0 or None)."""
    callbacks: list[Any] = []
    if metric is not None:
        strategy = "steps" if eval_steps else "epoch"
        name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
        selection: dict[str, Any] = {
            "eval_strategy": strategy,
            "eval_steps": eval_steps,
            "save_strategy": strategy,
            "save_steps": eval_steps or 500,
            "per_device_eval_batch_size": batch_size,
            "load_best_model_at_end": True,
            "metric_for_best_model": f"eval_{name}",
            "greater_is_better": _greater_is_better(metric) if isinstance(metric, str) else True,
        }
        if early_stopping:
            callbacks.append(transformers.EarlyStoppingCallback(early_stopping_patience=early_stopping))
    else:
        selection = {"save_strategy": "steps" if save_steps else "no", "save_steps": save_steps or 500}
    arguments = transformers.TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        max_steps=max_steps or -1,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        save_total_limit=keep_checkpoints,
        logging_steps=max(1, log_steps),
        bf16=bf16,
        use_cpu=use_cpu,
        seed=seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        **selection,
    )
    return arguments, callbacks
