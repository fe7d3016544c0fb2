"""What ``sweep`` and ``compare`` share: reading the splits, the search
space options, loading the model once."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import DatasetError
from ..training.metrics import METRICS
from .common import DEFAULT_MODEL, UsageError, device_for, load_torch_model, model_path


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="training set (JSONL, JSON or CSV)")
    parser.add_argument("--eval-data", required=True, help="development set: every choice is made on it")
    parser.add_argument("--test-data", help="test set: read and scored once, after selection")
    parser.add_argument("--output", required=True, help="folder for the results")
    parser.add_argument("--model", help=f"model folder or .gguf file (default: {DEFAULT_MODEL})")
    parser.add_argument("--task", choices=["auto", "generate", "classify"], default="auto")
    parser.add_argument(
        "--metric",
        choices=list(METRICS),
        default=None,
        help="dev metric (default: loss; accuracy for a classifier)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--eval-steps", type=int, default=None, help="score the dev set every N steps (default: each epoch)"
    )
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0)


def add_space_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--types", nargs="+", default=None, help="intervention types (default: loreft)")
    parser.add_argument(
        "--layer-sets",
        nargs="+",
        default=None,
        metavar="L,L,...",
        help="sets of layers to try, e.g. 6 3,9,18,24",
    )
    parser.add_argument(
        "--positions", nargs="+", default=None, help="position specs (default: f1+l1 l1 l2 f3+l3)"
    )
    parser.add_argument("--ranks", nargs="+", type=int, default=None, help="ranks (default: 1 2 4 8)")
    parser.add_argument(
        "--learning-rate",
        nargs="+",
        type=float,
        default=None,
        metavar="LR",
        help="LOW HIGH (log range) or one value (default: 1e-4 2e-2)",
    )
    parser.add_argument(
        "--epochs",
        nargs="+",
        type=int,
        default=None,
        metavar="N",
        help="LOW HIGH or one value (default: 1 3)",
    )
    parser.add_argument(
        "--dropout",
        nargs="+",
        type=float,
        default=None,
        metavar="P",
        help="LOW HIGH or one value (default: 0)",
    )


def space_from(args: argparse.Namespace, num_layers: int) -> Any:
    """The :class:`reft_rs.experiments.sweep.SearchSpace` the options describe."""
    from ..experiments.sweep import SearchSpace

    changes: dict[str, Any] = {}
    if args.types:
        changes["types"] = list(args.types)
    if args.layer_sets:
        try:
            changes["layer_sets"] = [
                [int(v) for v in text.split(",") if v.strip()] for text in args.layer_sets
            ]
        except ValueError:
            raise UsageError(
                f"--layer-sets takes comma-separated layer numbers, found {args.layer_sets}"
            ) from None
    if args.positions:
        changes["positions"] = list(args.positions)
    if args.ranks:
        changes["ranks"] = list(args.ranks)
    for name in ("learning_rate", "epochs", "dropout"):
        values = getattr(args, name)
        if values is None:
            continue
        if len(values) > 2:
            raise UsageError(
                f"--{name.replace('_', '-')} takes LOW HIGH or one value, found {len(values)} values"
            )
        changes[name] = tuple(values) if len(values) == 2 else values[0]
    space = SearchSpace.default(num_layers, **changes)
    space.validate(num_layers)
    return space


def read_task(args: argparse.Namespace) -> tuple[Any, str]:
    """The :class:`reft_rs.experiments.sweep.Task` of ``--data``/``--eval-data`` (the test
    file is not read here) and the task name."""
    from ..experiments.sweep import Task
    from ..io.records import read_records

    train = list(read_records(args.data))
    dev = list(read_records(args.eval_data))
    if not train or not dev:
        raise DatasetError(f"{args.data if not train else args.eval_data}: the split is empty")
    task = args.task
    if task == "auto":
        task = "generate" if "response" in train[0] else "classify"
    if ("response" in dev[0]) != ("response" in train[0]):
        raise DatasetError(f"{args.eval_data}: the development set must have the training set's fields")
    labels = None
    if task == "classify":
        if "response" in train[0]:
            raise UsageError("--task classify needs text/label records, found prompt/response ones")
        labels = sorted({str(r["label"]) for r in train})
        if len(labels) < 2:
            raise DatasetError(f"{args.data}: classification needs at least 2 labels, found {labels}")
        unknown = sorted({str(r["label"]) for r in dev} - set(labels))
        if unknown:
            raise DatasetError(f"{args.eval_data}: labels {unknown} do not occur in the training set")
    metric = args.metric or ("accuracy" if task == "classify" else "loss")
    if task == "classify" and metric in ("exact_match", "contains"):
        raise UsageError(
            f"--metric {metric} scores generated replies; a classifier is scored by accuracy or loss"
        )
    if task != "classify" and metric == "accuracy":
        raise UsageError("--metric accuracy scores a classifier; for replies use exact_match or contains")
    args.metric = metric
    return (
        Task(
            train=train,
            dev=dev,
            labels=labels,
            max_length=args.max_length,
            system_prompt=args.system_prompt,
            chat_template=False if args.no_chat_template else None,
        ),
        task,
    )


def test_reader(args: argparse.Namespace) -> Any:
    """A callable that reads ``--test-data`` when called (after selection), or ``None``."""
    if not args.test_data:
        return None
    import os

    if not os.path.isfile(args.test_data):
        raise DatasetError(f"{args.test_data}: no such test file")

    def read() -> list[dict[str, Any]]:
        from ..io.records import read_records

        return list(read_records(args.test_data))

    return read


def load_model(args: argparse.Namespace, labels: list[str] | None) -> tuple[Any, Any, str]:
    device = device_for(args.device)
    model, tokenizer = load_torch_model(model_path(args.model), device, False, labels)
    return model, tokenizer, device
