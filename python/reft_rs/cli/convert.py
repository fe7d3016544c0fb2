"""``reft-rs convert``: pyreft, RED and llama.cpp control vectors into reft_rs
checkpoints, and steer checkpoints out as control vectors."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import CheckpointError
from .common import DEFAULT_MODEL, UsageError, add_command, model_path, require_torch

EXAMPLES = """examples:
  reft-rs convert pyreft pyreft_out/ converted/ --positions f1+l1 --model smollm2
  reft-rs convert red delta_vector.pth converted/ --hidden-size 576 --num-layers 30
  reft-rs convert controlvector vector.gguf converted/ --model smollm2
  reft-rs convert to-controlvector steer_checkpoint/ vector.gguf"""


def register(commands: Any) -> None:
    convert = add_command(
        commands,
        "convert",
        "convert a pyreft, RED or llama.cpp control-vector file into a reft_rs checkpoint, or back to a control vector",
        EXAMPLES,
    )
    convert.add_argument("kind", choices=["pyreft", "red", "controlvector", "to-controlvector"])
    convert.add_argument(
        "source",
        help="pyreft's folder, RED's delta_vector.pth (or its folder), a control-vector .gguf, "
        "or (to-controlvector) a steer checkpoint",
    )
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


def _control_vector(args: argparse.Namespace) -> int:
    """Both directions of llama.cpp control vectors: no torch needed."""
    from ..io import control_vector

    if args.kind == "to-controlvector":
        written = control_vector.export_control_vector(args.source, args.output)
        print(f"wrote directions for layers {', '.join(map(str, written))} to {args.output}")
        return 0
    base: Any = None
    if args.model is not None:
        # The model's identity as the engine reads it (a folder or a GGUF file).
        from ..engine.engine import Engine
        from ..io.pretrained import SMOLLM2_NAME

        path = model_path(args.model, for_engine=True)
        engine = Engine(path)
        base = {
            "name_or_path": SMOLLM2_NAME if args.model == DEFAULT_MODEL else str(path),
            "model_type": engine.model_type,
            "hidden_size": engine.hidden_size,
            "num_hidden_layers": engine.num_hidden_layers,
        }
    elif args.hidden_size is not None or args.num_layers is not None:
        if args.hidden_size is None or args.num_layers is None:
            raise UsageError("give both --hidden-size and --num-layers, or --model")
        base = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers}
    config = control_vector.import_control_vector(args.source, args.output, base_model=base)
    print(f"converted {len(config.interventions)} control-vector directions into {args.output}/")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.kind in ("controlvector", "to-controlvector"):
        return _control_vector(args)
    require_torch()
    from ..io import convert

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
