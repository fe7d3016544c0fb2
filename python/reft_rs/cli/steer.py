"""``reft-rs steer``: a steering-vector checkpoint from contrastive pairs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import DatasetError
from .common import add_command, device_for, load_torch_model, model_path, parse_layers, require_torch

EXAMPLES = """examples:
  reft-rs steer --pairs formal_casual.jsonl --layers 10,14 --output steer/casual
  reft-rs steer --pairs pairs.jsonl --layers 12 --method pca --read mean --output steer/ --control-vector steer.gguf
  reft-rs generate --checkpoint steer/casual --prompt "Tell me about Rome" --strength -2

The pairs file is JSON lines of {"positive": "...", "negative": "..."}; the
texts are read as given (apply a chat template yourself to steer replies)."""


def register(commands: Any) -> None:
    steer = add_command(commands, "steer", "compute steering vectors from contrastive pairs", EXAMPLES)
    steer.add_argument("--pairs", required=True, help="JSON lines with positive and negative texts")
    steer.add_argument(
        "--layers", required=True, type=parse_layers, help="comma-separated layers, e.g. 10,14"
    )
    steer.add_argument("--output", required=True, help="the steer checkpoint folder to write")
    steer.add_argument("--model", help="model folder (default: SmolLM2)")
    steer.add_argument("--method", choices=["mean_difference", "pca"], default="mean_difference")
    steer.add_argument(
        "--read", choices=["last", "mean"], default="last", help="last token or mean over tokens"
    )
    steer.add_argument(
        "--component",
        choices=["block_output", "block_input", "mlp_output", "attention_output"],
        default="block_output",
    )
    steer.add_argument("--alpha", type=float, default=1.0, help="the vectors' scale saved in the checkpoint")
    steer.add_argument("--batch-size", type=int, default=8)
    steer.add_argument("--control-vector", help="also write a llama.cpp control-vector .gguf file")
    steer.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    steer.set_defaults(run=run)


def read_pairs(path: str) -> tuple[list[str], list[str]]:
    positive, negative = [], []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the pairs file ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: the pairs file is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DatasetError(f"{path}:{number}: not a JSON line ({error})") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("positive"), str)
            or not isinstance(record.get("negative"), str)
        ):
            raise DatasetError(f"{path}:{number}: each line needs string fields positive and negative")
        positive.append(record["positive"])
        negative.append(record["negative"])
    if not positive:
        raise DatasetError(f"{path}: no pairs")
    return positive, negative


def run(args: argparse.Namespace) -> int:
    require_torch()
    from ..experiments import steering
    from ..io import control_vector

    positive, negative = read_pairs(args.pairs)
    model, tokenizer = load_torch_model(model_path(args.model), device_for(args.device), False)
    config = steering.steering_checkpoint(
        model,
        tokenizer,
        positive,
        negative,
        args.layers,
        args.output,
        method=args.method,
        read=args.read,
        component=args.component,
        alpha=args.alpha,
        batch_size=args.batch_size,
    )
    print(
        f"steering vectors for layers {', '.join(str(i.layer) for i in config.interventions)} "
        f"from {len(positive)} pairs in {args.output}/"
    )
    if args.control_vector:
        control_vector.export_control_vector(args.output, args.control_vector)
        print(f"llama.cpp control vector in {args.control_vector}")
    return 0
