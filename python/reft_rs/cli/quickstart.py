"""``reft-rs quickstart``: the first job (SmolLM2 learns a reply style)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_command, require_torch

EXAMPLES = """examples:
  reft-rs quickstart
  reft-rs quickstart --output-dir runs/pirate --epochs 8"""


def register(commands: Any) -> None:
    quick = add_command(
        commands, "quickstart", "train LoReFT on SmolLM2-135M-Instruct and show the result", EXAMPLES
    )
    quick.add_argument("--output-dir", default="reft-quickstart", help="default: ./reft-quickstart")
    quick.add_argument("--epochs", type=int, default=5)
    quick.add_argument("--seed", type=int, default=0)
    quick.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_torch()
    from .. import quickstart

    argv = ["--output-dir", args.output_dir, "--epochs", str(args.epochs), "--seed", str(args.seed)]
    return quickstart.main(argv)
