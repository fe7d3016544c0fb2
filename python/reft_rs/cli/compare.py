"""``reft-rs compare``: interventions, LoRA and the frozen model under one budget, dev for every choice, test once."""

from __future__ import annotations

import argparse
from typing import Any

from .common import UsageError, add_command, require_torch
from .experiments import add_data_options, add_space_options, load_model, read_task, space_from, test_reader

EXAMPLES = """examples:
  reft-rs compare --data train.csv --eval-data dev.csv --test-data test.csv \\
      --methods loreft direft red lora zero-shot --trials 10 --seeds 3 --output compare/tweets
  reft-rs compare ... --time-budget 900        # each method may search for 15 minutes

Every method but zero-shot gets its own Optuna sweep with the same budget
(--trials, or --time-budget seconds), selected on the development set. When
every selection is made, the test file is read: each selected checkpoint is
scored with a 95% bootstrap interval, and its configuration retrained with
--seeds - 1 further seeds. OUTPUT/compare.md and compare.json hold the
table (method, trainable parameters, dev and test score, seed spread, train
time, seconds per step), compare.png plots test score against trainable
parameters; each method's sweep is in OUTPUT/METHOD/."""


def register(commands: Any) -> None:
    compare = add_command(
        commands, "compare", "compare methods under one tuning budget: dev to select, test once", EXAMPLES
    )
    add_data_options(compare)
    add_space_options(compare)
    compare.add_argument(
        "--methods",
        nargs="+",
        default=["loreft", "red", "lora", "zero-shot"],
        help="intervention types, lora, zero-shot (default: loreft red lora zero-shot)",
    )
    compare.add_argument(
        "--trials", type=int, default=None, help="trials per method (default 10, unless --time-budget)"
    )
    compare.add_argument(
        "--time-budget", type=float, default=None, metavar="SECONDS", help="seconds of search per method"
    )
    compare.add_argument(
        "--seeds", type=int, default=3, help="test runs of each selected configuration (default 3)"
    )
    compare.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_torch()
    from ..experiments import compare

    if args.trials is not None and args.time_budget is not None:
        raise UsageError("give one budget: --trials or --time-budget")
    trials = args.trials if args.trials is not None or args.time_budget is not None else 10
    if args.test_data is None:
        raise UsageError("compare scores the selected methods on --test-data; give it")
    task, _ = read_task(args)
    test = test_reader(args)
    model, tokenizer, _ = load_model(args, task.labels)
    space = space_from(args, model.config.num_hidden_layers)
    report = compare.run(
        model, tokenizer, task, args.methods, output=args.output, metric=args.metric, trials=trials,
        seconds=args.time_budget, seeds=args.seeds, space=space, batch_size=args.batch_size,
        eval_steps=args.eval_steps, seed=args.seed, test=test,
    )  # fmt: skip
    print()
    print(compare.markdown(report), end="")
    print(f"\nwrote compare.md, compare.json and compare.png in {args.output}/")
    return 0
