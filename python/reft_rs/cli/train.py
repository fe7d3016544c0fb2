"""``reft-rs train``: train interventions on a dataset file."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ..training.metrics import METRICS
from .common import (
    DEFAULT_MODEL,
    UsageError,
    add_command,
    device_for,
    load_torch_model,
    model_path,
    parse_layers,
    require_torch,
)

EXAMPLES = """examples:
  reft-rs train --data train.jsonl --output runs/style
  reft-rs train --model ./my-llama --data qa.csv --layers 4,8,12 --positions f3+l3 --rank 8
  reft-rs train --data big.jsonl --stream --max-steps 2000 --output runs/big
  reft-rs train --data train.jsonl --output runs/style --save-steps 50 --resume
  reft-rs train --data train.jsonl --device cuda --bf16 --output runs/gpu
  reft-rs train --data train.jsonl --eval-data dev.jsonl --metric exact_match --eval-steps 20 \\
      --early-stopping 3 --output runs/selected

The dataset is JSON lines, JSON or CSV with prompt/response fields (the
model learns the responses) or text/label fields (a classification head
trains with the interventions; --task generate teaches the model to answer
each text with its label instead).

With --eval-data the model is scored on that development set every
--eval-steps steps (default: every epoch) by --metric (loss by default;
accuracy for a classifier), and the checkpoint kept in --output is the best
one, at the step it names; metrics.json holds the training loss and every
dev score, training.png draws them."""


def register(commands: Any) -> None:
    train = add_command(commands, "train", "train interventions on a dataset", EXAMPLES)
    train.add_argument("--data", required=True, help="JSONL, JSON or CSV dataset")
    train.add_argument("--output", required=True, help="folder for the checkpoint(s)")
    train.add_argument("--model", help=f"model folder or .gguf file (default: {DEFAULT_MODEL})")
    train.add_argument(
        "--task",
        choices=["auto", "generate", "classify"],
        default="auto",
        help="generate: learn the responses (prompt/response data; the default for it); classify: a "
        "sequence classifier over the labels (text/label data; the default for it); generate with "
        "text/label data learns to answer each text with its label",
    )
    train.add_argument("--type", default="loreft", help="intervention type (default loreft)")
    train.add_argument("--layers", default="3,9,18,24", help="comma-separated layers (default 3,9,18,24)")
    train.add_argument("--positions", default="f1+l1", help="position spec, e.g. f1+l1, l3, all")
    train.add_argument("--rank", type=int, default=4, help="low-rank dimension (default 4)")
    train.add_argument("--share-weights", action="store_true", help="one intervention for prefix and suffix")
    train.add_argument(
        "--exclude-last",
        action="store_true",
        help="leave the last prompt token out of the positions (pyreft's library datasets); recorded in "
        "the checkpoint, so generate and eval edit the same positions",
    )
    train.add_argument("--component", default="block_output")
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--epochs", type=float, default=3)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--learning-rate", type=float, default=4e-3)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--max-length", type=int, default=None, help="cut examples to this many tokens")
    train.add_argument("--system-prompt", default=None)
    train.add_argument("--no-chat-template", action="store_true")
    train.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps")
    train.add_argument("--keep-checkpoints", type=int, default=3)
    train.add_argument("--log-steps", type=int, default=10)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --output that holds a checkpoint, replacing it",
    )
    train.add_argument("--stream", action="store_true", help="read the dataset chunk by chunk")
    train.add_argument("--chunk-size", type=int, default=16384)
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    train.add_argument("--bf16", action="store_true", help="bfloat16 model on the GPU")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-data", help="development set (same format): select the best checkpoint on it")
    train.add_argument(
        "--eval-steps", type=int, default=None, help="evaluate every N steps (default: each epoch)"
    )
    train.add_argument(
        "--metric",
        choices=list(METRICS),
        default=None,
        help="dev metric (default: loss; accuracy for a classifier)",
    )
    train.add_argument(
        "--early-stopping",
        type=int,
        default=None,
        metavar="N",
        help="stop after N evaluations without a better score",
    )
    train.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="run every step over the whole sequence (by default, where every intervention edits only the "
        "end of the prompt, the untouched prefix is computed once without gradients and kept: same losses)",
    )
    train.add_argument(
        "--prefix-cache-memory",
        type=float,
        default=2.0,
        metavar="GIB",
        help="memory the kept prefixes may take, in GiB (default 2); past it they are recomputed per batch",
    )
    train.set_defaults(run=run)


def _training_data(
    args: argparse.Namespace,
    records: list[dict[str, Any]],
    tokenizer: Any,
    config: Any,
    labels: list[str] | None,
) -> Any:
    """The dataset of ``records`` as the options ask (classified when
    ``labels`` are given, else taught as prompt → response or text → label)."""
    from ..experiments.methods import Task

    task = Task(
        records,
        [],
        labels=labels,
        max_length=args.max_length,
        system_prompt=args.system_prompt,
        chat_template=False if args.no_chat_template else None,
    )
    return task.dataset(tokenizer, records, config)


def _holds_a_run(output: str) -> bool:
    """A checkpoint, or the Trainer's periodic ones, in ``output``."""
    from ..io.checkpoint import holds_checkpoint

    if not os.path.isdir(output):
        return False
    return holds_checkpoint(output) or any(name.startswith("checkpoint-") for name in os.listdir(output))


def run(args: argparse.Namespace) -> int:
    require_torch()
    import transformers

    from ..config import ReftConfig
    from ..io.records import read_records
    from ..model.reft_model import get_reft_model

    if args.resume and args.stream:
        raise UsageError("--resume needs the Trainer's checkpoints; it does not combine with --stream")
    if args.stream and "image" in next(iter(read_records(args.data))):
        raise UsageError("--stream reads text records; a dataset with images is read whole")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --output and --overwrite replaces it: pick one")
    if not (args.resume or args.overwrite) and _holds_a_run(args.output):
        raise UsageError(
            f"{args.output} holds a checkpoint from an earlier run: pass --resume to continue it, "
            "--overwrite to replace it, or another --output"
        )
    device = device_for(args.device)
    if args.bf16 and device != "cuda":
        raise UsageError("--bf16 runs on a GPU; use it with --device cuda")
    # Mistakes in the dataset or the options fail before the model loads.
    records = list(read_records(args.data)) if not args.stream else [next(iter(read_records(args.data)))]
    task = args.task
    if task == "auto":
        task = "generate" if "response" in records[0] else "classify"
    labels: list[str] | None = None
    if task == "classify":
        if "response" in records[0]:
            raise UsageError("--task classify needs text/label records, found prompt/response ones")
        if args.stream:
            raise UsageError("--stream trains generation; classification datasets are read whole")
        labels = sorted({str(r["label"]) for r in records})
        if len(labels) < 2:
            raise DatasetError(f"{args.data}: classification needs at least 2 labels, found {labels}")
    config = ReftConfig.for_layers(
        parse_layers(args.layers),
        type=args.type,
        low_rank_dimension=args.rank,
        positions=args.positions,
        share_weights=args.share_weights,
        component=args.component,
        dropout=args.dropout,
        trainable_head=labels is not None,
        include_last=not args.exclude_last,
    )
    metric = _dev_metric(args, task)
    dev_records = list(read_records(args.eval_data)) if args.eval_data else None
    if dev_records is not None:
        _check_dev_records(args, dev_records, records[0], labels)
    model, tokenizer = load_torch_model(model_path(args.model), device, args.bf16, labels)
    transformers.set_seed(args.seed)  # the interventions' initial weights, then the data order
    reft_model = get_reft_model(model, config)
    reft_model.print_trainable_parameters()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    dev = _training_data(args, dev_records, tokenizer, config, labels) if dev_records is not None else None
    if dev is not None:
        print(f"{len(dev)} development examples from {args.eval_data}; selecting on {metric}")
    start = time.perf_counter()
    if args.stream:
        history = _train_streamed(args, reft_model, tokenizer, config, output, dev, metric)
    else:
        dataset = _training_data(args, records, tokenizer, config, labels)
        print(f"{len(dataset)} training examples from {args.data}")
        history = _train_with_trainer(args, reft_model, tokenizer, dataset, dev, metric, output, device)
    seconds = time.perf_counter() - start
    metadata: dict[str, Any] = {"dataset": os.path.basename(args.data), "task": task}
    if labels is not None:
        metadata["labels"] = labels
    if history["best_step"] is not None:
        metadata.update(
            selected_step=history["best_step"],
            dev_dataset=os.path.basename(args.eval_data),
            dev_metric=metric,
            dev_score=history["best_score"],
        )
    reft_model.save_pretrained(output, metadata=metadata)
    losses = history["losses"]
    summary = {
        "train_seconds": round(seconds, 2),
        "trainable_parameters": reft_model.trainable_parameter_count(),
        "final_loss": losses[-1] if losses else None,
        **history,
    }
    (output / "metrics.json").write_text(json.dumps(summary, indent=2))
    if losses:
        from ..training.plot import training_curves

        training_curves(
            output / "training.png",
            losses,
            loss_steps=history["loss_steps"],
            evaluations=history["evaluations"],
            metric=history["metric"],
            best_step=history["best_step"],
            title=f"{args.type} on {os.path.basename(args.data)}",
        )
    if history["best_step"] is not None:
        stopped = " (stopped early)" if history["stopped_early"] else ""
        print(
            f"best dev {metric} {history['best_score']:.4f} at step {history['best_step']} of "
            f"{history['steps']}{stopped}; kept that checkpoint"
        )
    print(f"saved the checkpoint in {output}/ ({seconds:.0f} s, final loss {summary['final_loss']})")
    return 0


def _dev_metric(args: argparse.Namespace, task: str) -> str:
    metric = args.metric or ("accuracy" if task == "classify" else "loss")
    if args.eval_data is None:
        for flag, value in (
            ("--metric", args.metric),
            ("--eval-steps", args.eval_steps),
            ("--early-stopping", args.early_stopping),
        ):
            if value is not None:
                raise UsageError(f"{flag} needs --eval-data (a development set to score on)")
        return metric
    if task == "classify" and metric in ("exact_match", "contains"):
        raise UsageError(
            f"--metric {metric} scores generated replies; a classifier is scored by accuracy or loss"
        )
    if task != "classify" and metric == "accuracy":
        raise UsageError("--metric accuracy scores a classifier; for replies use exact_match or contains")
    if args.eval_steps is not None and args.eval_steps < 1:
        raise UsageError("--eval-steps must be at least 1")
    if args.early_stopping is not None and args.early_stopping < 1:
        raise UsageError("--early-stopping must be at least 1")
    if args.save_steps and args.eval_steps is not None and args.save_steps != args.eval_steps:
        raise UsageError("with --eval-data a checkpoint is saved at every evaluation; drop --save-steps")
    return metric


def _cache_bytes(args: argparse.Namespace) -> int:
    if not args.prefix_cache_memory >= 0:
        raise UsageError("--prefix-cache-memory must be a number of GiB, at least 0")
    return int(args.prefix_cache_memory * (1 << 30))


def _check_dev_records(
    args: argparse.Namespace, dev: list[dict[str, Any]], first: dict[str, Any], labels: list[str] | None
) -> None:
    if not dev:
        raise DatasetError(f"{args.eval_data}: the development set is empty")
    if ("response" in dev[0]) != ("response" in first):
        raise DatasetError(f"{args.eval_data}: the development set must have the training set's fields")
    if labels is not None:
        unknown = sorted({str(r["label"]) for r in dev} - set(labels))
        if unknown:
            raise DatasetError(f"{args.eval_data}: labels {unknown} do not occur in the training set")


def _train_streamed(
    args: argparse.Namespace,
    reft_model: Any,
    tokenizer: Any,
    config: Any,
    output: Path,
    dev: Any,
    metric: str,
) -> dict[str, Any]:
    from ..training.data import StreamedEpochs
    from ..training.trainer import train

    def save_periodically(step: int, loss: float) -> None:
        if args.save_steps and step % args.save_steps == 0:
            reft_model.save_pretrained(output / f"checkpoint-{step}")

    history = train(
        reft_model,
        StreamedEpochs(
            args.data,
            tokenizer,
            args.batch_size,
            config=config,
            chunk_size=args.chunk_size,
            seed=args.seed,
            max_length=args.max_length,
            system_prompt=args.system_prompt,
            chat_template=False if args.no_chat_template else None,
        ),
        epochs=max(1, round(args.epochs)),
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        seed=args.seed,
        callback=save_periodically,
        eval_dataset=dev,
        eval_metric=metric,
        eval_steps=args.eval_steps,
        eval_batch_size=args.batch_size,
        tokenizer=tokenizer,
        early_stopping_patience=args.early_stopping,
        prefix_cache=not args.no_prefix_cache,
        prefix_cache_memory=_cache_bytes(args),
    )
    if history.prefix_cache is not None:
        print(history.prefix_cache.describe())
    return {
        **history.as_dict(),
        "loss_steps": list(range(1, len(history) + 1)),
        "steps": len(history),
    }


def _train_with_trainer(
    args: argparse.Namespace,
    reft_model: Any,
    tokenizer: Any,
    dataset: Any,
    dev: Any,
    metric: str,
    output: Path,
    device: str,
) -> dict[str, Any]:

    from ..experiments.methods import pad_id
    from ..training.data import ReftDataCollator
    from ..training.trainer import ReftTrainer, training_arguments

    training_args, callbacks = training_arguments(
        output,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        keep_checkpoints=args.keep_checkpoints,
        log_steps=args.log_steps,
        bf16=args.bf16,
        use_cpu=device == "cpu",
        seed=args.seed,
        save_steps=args.save_steps,
        metric=metric if dev is not None else None,
        eval_steps=args.eval_steps,
        early_stopping=args.early_stopping,
    )
    trainer = ReftTrainer(
        model=reft_model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=dev,
        data_collator=ReftDataCollator(pad_id(tokenizer), encoder_decoder=dataset.encoder_decoder),
        eval_metric=metric,
        eval_tokenizer=tokenizer,
        callbacks=callbacks or None,
        prefix_cache=not args.no_prefix_cache,
        prefix_cache_memory=_cache_bytes(args),
    )
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    if trainer.prefix_cache is not None:
        print(trainer.prefix_cache.describe())
    state = trainer.state
    logged = [entry for entry in state.log_history if "loss" in entry]
    losses = [entry["loss"] for entry in logged] or [result.training_loss]
    loss_steps = [entry["step"] for entry in logged] or [state.global_step]
    key = f"eval_{metric}"
    evaluations = [
        {"step": entry["step"], "epoch": entry.get("epoch"), "score": entry[key]}
        for entry in state.log_history
        if key in entry
    ]
    best_step = best_score = None
    if dev is not None and state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rpartition("-")[2])
        best_score = state.best_metric
    return {
        "losses": losses,
        "loss_steps": loss_steps,
        "metric": metric if dev is not None else None,
        "evaluations": evaluations,
        "best_step": best_step,
        "best_score": best_score,
        "stopped_early": dev is not None and state.global_step < state.max_steps,
        "steps": state.global_step,
    }
