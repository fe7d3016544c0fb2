"""``reft-rs sweep``: hyperparameter search with Optuna, dev for every choice, test once."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_command, require_torch
from .experiments import add_data_options, add_space_options, load_model, read_task, space_from, test_reader

EXAMPLES = """examples:
  reft-rs sweep --data train.jsonl --eval-data dev.jsonl --metric exact_match --trials 20 --output sweeps/qa
  reft-rs sweep --data train.csv --eval-data dev.csv --test-data test.csv --timeout 3600 --output sweeps/tweets
  reft-rs sweep ... --types loreft direft --layer-sets 6 3,9,18,24 --ranks 2 4 --learning-rate 1e-3 1e-2

Each trial trains one configuration drawn by Optuna (TPE) from the search
space and is scored on the development set after every epoch (or every
--eval-steps steps); a median pruner stops trials that fall behind. The
study is kept in OUTPUT/study.db: running the command again resumes it up to
--trials. After the search the best trial's checkpoint is OUTPUT/best/, and
only then is --test-data read and scored, once. OUTPUT/sweep.json lists
every trial; optimization_history.png and param_importances.png plot them."""


def register(commands: Any) -> None:
    sweep = add_command(commands, "sweep", "search hyperparameters on a development set (Optuna)", EXAMPLES)
    add_data_options(sweep)
    add_space_options(sweep)
    sweep.add_argument(
        "--trials", type=int, default=20, help="trials in the study, earlier runs included (default 20)"
    )
    sweep.add_argument("--timeout", type=float, default=None, help="seconds this run may search for")
    sweep.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_torch()
    from ..experiments import sweep

    task, _ = read_task(args)
    test = test_reader(args)
    model, tokenizer, _ = load_model(args, task.labels)
    space = space_from(args, model.config.num_hidden_layers)
    summary = sweep.run(
        model, tokenizer, task, space, output=args.output, metric=args.metric, trials=args.trials,
        timeout=args.timeout, batch_size=args.batch_size, eval_steps=args.eval_steps, seed=args.seed, test=test,
    )  # fmt: skip
    best = summary["best"]
    print(
        f"best: trial {best['trial']}, dev {summary['metric']} {best['dev_score']:.4f} at step {best['best_step']}: "
        f"{best['params']}\nsaved its checkpoint in {best['checkpoint']}/ and the study in {args.output}/"
    )
    return 0
