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

from . import checkpoint
from .data import ReftDataCollator
from .errors import IncompatibleModelError
from .model import ReftModel

__all__ = ["ReftTrainer", "train"]


def _unwrap(model: Any) -> ReftModel:
    while not isinstance(model, ReftModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, ReftModel):
        raise TypeError(f"ReftTrainer trains a ReftModel, found {type(model).__name__}")
    return model


def load_into(reft_model: ReftModel, folder: str | os.PathLike[str]) -> None:
    """Loads a checkpoint saved from the same configuration into ``reft_model``."""
    config, tensors = checkpoint.load(folder, framework="torch")
    saved = [entry["name"] for entry in config["interventions"]]
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
    """

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
) -> list[float]:
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

    Returns:
        The loss of every optimizer step.
    """
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, torch.utils.data.Dataset):
        loader: Iterable[dict[str, Any]] = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collator or ReftDataCollator(0),
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
    reft_model.train()
    losses: list[float] = []
    step, accumulated, pending = 0, 0.0, 0
    start = time.perf_counter()
    try:
        for _ in range(epochs):
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                loss = reft_model(**batch).loss / gradient_accumulation_steps
                loss.backward()
                accumulated += loss.item()
                pending += 1
                if pending < gradient_accumulation_steps:
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(accumulated)
                step += 1
                bar(step, accumulated, time.perf_counter() - start)
                if callback is not None:
                    callback(step, accumulated)
                accumulated, pending = 0.0, 0
                if max_steps is not None and step >= max_steps:
                    return losses
    finally:
        reft_model.eval()
        bar(None, None, None)
    return losses


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
