"""``reft-rs eval``: exact match of a checkpoint's replies, or a classifier's accuracy."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from ..training.metrics import normalize_answer
from .common import UsageError, add_command, checkpoint_metadata, device_for, load_torch_model, model_path
from .generators import generation_options, generator_for

EXAMPLES = """examples:
  reft-rs eval --checkpoint runs/style --data test.jsonl
  reft-rs eval --checkpoint runs/style --data test.csv --engine rust --output results.json
  reft-rs eval --checkpoint runs/sentiment --data test.jsonl      # a classifier: accuracy"""


def register(commands: Any) -> None:
    evaluate = add_command(
        commands,
        "eval",
        "exact match of a checkpoint's replies, or a classifier's accuracy, on a dataset",
        EXAMPLES,
    )
    generation_options(evaluate)
    evaluate.add_argument("--data", required=True, help="prompt/response or text/label records")
    evaluate.add_argument("--output", help="write the metrics and every prediction to this JSON file")
    evaluate.set_defaults(run=run)


def _eval_classifier(args: argparse.Namespace, labels: list[str], records: list[dict[str, Any]]) -> int:
    """Accuracy of a classification checkpoint (batched forward passes)."""
    import numpy as np
    import torch

    from ..model.reft_model import ReftModel
    from ..training.data import make_dataset

    if args.engine == "rust":
        raise UsageError("classification checkpoints run on the torch engine; drop --engine rust")
    if "text" not in records[0]:
        raise DatasetError(f"{args.data}: a classification checkpoint needs text/label records")
    model, tokenizer = load_torch_model(
        model_path(args.model, args.checkpoint), device_for(args.device), args.bf16, labels
    )
    reft_model = ReftModel.from_pretrained(model, args.checkpoint)
    index = {label: i for i, label in enumerate(labels)}
    expected = np.array([index.get(str(r["label"]), -1) for r in records])
    dataset = make_dataset(
        tokenizer,
        [r["text"] for r in records],
        labels=expected.tolist(),
        config=reft_model.reft_config,
    )
    start = time.perf_counter()
    predicted = []
    with torch.no_grad():
        for batch in dataset.batches(args.batch_size, tokenizer.pad_token_id):
            batch.pop("labels")
            batch = {k: v.to(reft_model.device) for k, v in batch.items()}
            predicted.append(reft_model(**batch, strength=args.strength).logits.argmax(-1).cpu().numpy())
    chosen = np.concatenate(predicted)
    metrics = {
        "examples": len(records),
        "accuracy": float((chosen == expected).mean()),
        "unseen_labels": int((expected < 0).sum()),
        "seconds": round(time.perf_counter() - start, 2),
        "engine": "torch",
    }
    print(json.dumps(metrics, indent=2))
    if args.output:
        rows = [
            {"text": r["text"], "expected": str(r["label"]), "predicted": labels[c], "correct": bool(c == e)}
            for r, c, e in zip(records, chosen.tolist(), expected.tolist())
        ]
        Path(args.output).write_text(json.dumps({**metrics, "predictions": rows}, indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    from ..io.records import read_records

    records = list(read_records(args.data))
    metadata = checkpoint_metadata(args.checkpoint)
    if metadata.get("task") == "classify":
        return _eval_classifier(args, list(metadata["labels"]), records)
    pairs = [
        (r["prompt"], r["response"]) if "response" in r else (r["text"], str(r["label"])) for r in records
    ]
    if args.image:
        raise UsageError("reft-rs eval reads each record's pictures from its 'image' field; drop --image")
    images = [r["image"] for r in records] if "image" in records[0] else None
    generator = generator_for(args)
    exact = contains = 0
    predictions = []
    start = time.perf_counter()
    for first in range(0, len(pairs), args.batch_size):
        chunk = pairs[first : first + args.batch_size]
        pictures = None if images is None else images[first : first + args.batch_size]
        replies = generator.batch([p for p, _ in chunk], pictures)
        for (prompt, expected), reply in zip(chunk, replies):
            hit = normalize_answer(reply) == normalize_answer(expected)
            found = normalize_answer(expected) in normalize_answer(reply)
            exact += hit
            contains += found
            predictions.append({"prompt": prompt, "expected": expected, "reply": reply, "exact": hit})
        print(f"\r{len(predictions)}/{len(pairs)} evaluated", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    metrics = {
        "examples": len(pairs),
        "exact_match": exact / len(pairs),
        "contains_answer": contains / len(pairs),
        "seconds": round(time.perf_counter() - start, 2),
        "engine": args.engine,
    }
    print(json.dumps(metrics, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps({**metrics, "predictions": predictions}, indent=2))
    return 0
