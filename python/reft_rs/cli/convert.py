"""``reft-rs convert``: pyreft and RED checkpoints into reft_rs ones."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import CheckpointError
from .common import UsageError, add_command, model_path, require_torch

EXAMPLES = """examples:
  reft-rs convert pyreft pyreft_out/ converted/ --positions f1+l1 --model smollm2
  reft-rs convert red delta_vector.pth converted/ --hidden-size 576 --num-layers 30"""


def register(commands: Any) -> None:
    convert = add_command(
        commands, "convert", "convert a pyreft or RED checkpoint into a reft_rs one", EXAMPLES
    )
    convert.add_argument("kind", choices=["pyreft", "red"])
    convert.add_argument("source", help="pyreft's folder, or RED's delta_vector.pth (or its folder)")
    convert.add_argument("output")
    convert.add_argument("--model", help="the base model (to record its identity)")
    convert.add_argument("--hidden-size", type=int)
    convert.add_argument("--num-layers", type=int)
    convert.add_argument("--positions", help="pyreft: the position spec used in training")
    convert.add_argument(
        "--share-weights", action=argparse.BooleanOptionalAction, default=None, help="pyreft: shared weights"
    )
    convert.add_argument(
        "--exclude-last",
        action="store_true",
        help="pyreft: trained on pyreft's library datasets, which leave the last prompt token out",
    )
    convert.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_torch()
    from .. import convert

    base: Any = None
    if args.model is not None:
        import transformers

        base = transformers.AutoConfig.from_pretrained(model_path(args.model))
    elif args.hidden_size is not None or args.num_layers is not None:
        if args.hidden_size is None or args.num_layers is None:
            raise UsageError("give both --hidden-size and --num-layers, or --model")
        base = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers}
    if not os.path.exists(args.source):
        raise CheckpointError(f"{args.source}: no such checkpoint to convert", args.source)
    if args.kind == "pyreft":
        config = convert.from_pyreft(
            args.source,
            args.output,
            base_model=base,
            positions=args.positions,
            share_weights=args.share_weights,
            include_last=not args.exclude_last,
        )
    else:
        config = convert.from_red(args.source, args.output, base_model=base)
    print(f"converted {len(config.interventions)} interventions from {args.kind} into {args.output}/")
    return 0
