"""``reft-rs quickstart``: the first job (a small model learns a reply style)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_command, require_torch

EXAMPLES = """examples:
  reft-rs quickstart
  reft-rs quickstart --output-dir runs/pirate --epochs 8
  reft-rs quickstart --model gemma3-270m      # Gemma 3 270M, served from its Q4_K_M file"""


def register(commands: Any) -> None:
    from ..experiments.quickstart import MODELS

    quick = add_command(
        commands, "quickstart", "train LoReFT on SmolLM2-135M-Instruct and show the result", EXAMPLES
    )
    quick.add_argument("--output-dir", default="reft-quickstart", help="default: ./reft-quickstart")
    quick.add_argument("--epochs", type=int, default=5)
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument(
        "--model", choices=sorted(MODELS), default="smollm2", help="the model to teach (default: smollm2)"
    )
    quick.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_torch()
    from ..experiments import quickstart

    argv = ["--output-dir", args.output_dir, "--epochs", str(args.epochs), "--seed", str(args.seed)]
    return quickstart.main([*argv, "--model", args.model])
