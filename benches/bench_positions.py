"""Benchmark: intervention positions for a large dataset, reft_rs against plain Python.

The baseline is pyreft's `get_intervention_locations` rule (the last prompt
token included, unused slots -1) written in plain Python and run in this
process, building the same (groups, examples, positions) array. Both outputs
are checked equal before anything is timed.

    python benches/bench_positions.py [--examples 1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from reft_rs.positions import locate


def python_locations(lengths: list[int], first_n: int, last_n: int, share_weights: bool) -> np.ndarray:
    """pyreft's rule for every example, in plain Python, then one numpy array."""
    groups: list[list[list[int]]] = [[]] if share_weights else [[], []]
    for last_position in lengths:
        first = min(last_position // 2, first_n)
        last = min(last_position // 2, last_n)
        head = list(range(first))
        tail = list(range(last_position - last, last_position))
        if share_weights:
            groups[0].append(head + tail + [-1] * ((first_n - first) + (last_n - last)))
        else:
            width = max(first_n, last_n)
            groups[0].append(head + [-1] * (width - first))
            groups[1].append(tail + [-1] * (width - last))
    return np.array(groups, dtype=np.int64)


def best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 513, size=args.examples)  # prompt lengths 4..512
    as_list = lengths.tolist()
    print(f"{args.examples:,} examples, prompt lengths 4-512, spec f7+l7, {os.cpu_count()} CPUs")
    print(
        f"{'layout':<10} {'python ex/s':>14} {'reft_rs 1 core':>16} {'reft_rs all':>14} {'ratio 1 core':>13} {'ratio all':>10}"
    )
    for share_weights in (False, True):
        ours = locate(lengths, "f7+l7", share_weights=share_weights)
        start = time.perf_counter()
        theirs = python_locations(as_list, 7, 7, share_weights)
        python_seconds = time.perf_counter() - start
        assert np.array_equal(ours, theirs), "reft_rs and the Python rule disagree"
        del theirs
        one_core = best_time(
            lambda shared=share_weights: locate(lengths, "f7+l7", share_weights=shared, parallel=False),
            args.repeats,
        )
        all_cores = best_time(
            lambda shared=share_weights: locate(lengths, "f7+l7", share_weights=shared), args.repeats
        )

        def rate(seconds: float) -> float:
            return args.examples / seconds

        print(
            f"{'shared' if share_weights else 'unshared':<10} {rate(python_seconds):>14,.0f} "
            f"{rate(one_core):>16,.0f} {rate(all_cores):>14,.0f} "
            f"{python_seconds / one_core:>12,.0f}x {python_seconds / all_cores:>9,.0f}x"
        )


if __name__ == "__main__":
    main()
