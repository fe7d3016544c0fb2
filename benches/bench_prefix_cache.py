"""Benchmark: prefix-cached training against full-sequence training.

SmolLM2-135M-Instruct float32 on the CPU threads given (2 by default),
LoReFT rank 4 at ``l2`` on layers 3, 9, 18 and 24, batch 8, AdamW through
``reft_rs.train``: seconds per epoch over the same pairs, first with every
step over the whole sequence (``prefix_cache=False``), then prefix-cached
(the default), in one run and from the same seed. The losses of the two runs
are compared step by step (they must agree: the cache is exact).

Pairs are synthetic text (Zipf-distributed words, as in
bench_preprocess.py) in the chat template: prompts of 20-60 words with short
answers of 1-6 words (the setting the target is for: the edits and the loss
sit at the end of the sequence), and, reported beside it, answers of 20-60
words, where the response must be trained through either way.

    python benches/bench_prefix_cache.py [--pairs 500] [--long-pairs 64] [--epochs 2] [--cache-gib 4]

The kept prefixes of 500 such pairs take about 2.8 GiB (float32 keys and
values of 30 layers); the run gives the cache 4 GiB so that all fit.

Targets: >= 5x per epoch after the first, >= 1.5x on the first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_preprocess import synthetic_pairs

import reft_rs
from reft_rs.io.pretrained import load_smollm2

LAYERS = [3, 9, 18, 24]


def short_answers(count: int, seed: int) -> list[str]:
    _, words = synthetic_pairs(count, seed=seed + 1)
    rng = np.random.default_rng(seed)
    return [" ".join(text.split()[: rng.integers(1, 7)]) for text in words]


def pairs(count: int, long_answers: bool, seed: int = 0) -> tuple[list[str], list[str]]:
    prompts, responses = synthetic_pairs(count, seed=seed)
    rng = np.random.default_rng(seed + 7)
    prompts = [" ".join(p.split()[: rng.integers(20, 61)]) for p in prompts]
    if long_answers:
        responses = [" ".join(r.split()[: rng.integers(20, 61)]) for r in responses]
    else:
        responses = short_answers(count, seed)
    return prompts, responses


def epoch_times(
    model, tokenizer, dataset, config, epochs: int, prefix_cache: bool, cache_bytes: int
) -> tuple[list[float], list[float]]:
    """Seconds of each epoch and the loss of every step."""
    torch.manual_seed(0)
    reft_model = reft_rs.get_reft_model(model, config)
    per_epoch = -(-len(dataset) // 8)
    marks = [time.perf_counter()]

    def mark(step: int, loss: float) -> None:
        if step % per_epoch == 0:
            marks.append(time.perf_counter())

    history = reft_rs.train(
        reft_model,
        dataset,
        collator=reft_rs.ReftDataCollator(tokenizer.pad_token_id),
        epochs=epochs,
        batch_size=8,
        learning_rate=4e-3,
        seed=0,
        progress=False,
        callback=mark,
        prefix_cache=prefix_cache,
        prefix_cache_memory=cache_bytes,
    )
    if history.prefix_cache is not None:
        print(f"    {history.prefix_cache.describe()}")
    reft_model.remove_hooks()
    return [b - a for a, b in zip(marks, marks[1:])], list(history)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--long-pairs", type=int, default=64, help="pairs of the long-answer setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-gib", type=float, default=4.0)
    args = parser.parse_args()
    cache_bytes = int(args.cache_gib * (1 << 30))
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    config = reft_rs.ReftConfig.for_layers(LAYERS, low_rank_dimension=4, positions="l2")
    print(
        f"SmolLM2-135M float32, {args.threads} threads; LoReFT r4 at l2 on layers {LAYERS}, batch 8, "
        f"{args.epochs} epochs, prefix cache budget {args.cache_gib:g} GiB"
    )
    settings = (
        ("answers of 1-6 words", False, args.pairs),
        ("answers of 20-60 words", True, args.long_pairs),
    )
    for label, long_answers, count in settings:
        prompts, responses = pairs(count, long_answers)
        dataset = reft_rs.make_dataset(tokenizer, prompts, responses, config=config)
        prompt_tokens = dataset.prompt_lengths.sum()
        total = dataset.lengths.sum()
        print(
            f"\n{label}: {total / len(dataset):.0f} tokens per example, {prompt_tokens / total:.0%} of them prompt"
        )
        print("  full sequence:")
        full, full_losses = epoch_times(model, tokenizer, dataset, config, args.epochs, False, cache_bytes)
        print("  prefix-cached:")
        cached, cached_losses = epoch_times(model, tokenizer, dataset, config, args.epochs, True, cache_bytes)
        difference = max(abs(a - b) for a, b in zip(full_losses, cached_losses))
        print(f"  {'epoch':<8}{'full s':>10}{'cached s':>10}{'ratio':>9}")
        for epoch, (a, b) in enumerate(zip(full, cached), start=1):
            print(f"  {epoch:<8}{a:>10.1f}{b:>10.1f}{a / b:>8.2f}x")
        print(f"  losses of the two runs agree to {difference:.1e} over {len(full_losses)} steps")
        if not long_answers:
            later = sum(full[1:]) / max(1, len(full) - 1) / (sum(cached[1:]) / max(1, len(cached) - 1))
            print(
                f"  ratios: first epoch {full[0] / cached[0]:.2f}x (target >= 1.5), later epochs {later:.2f}x "
                "(target >= 5)"
            )


if __name__ == "__main__":
    main()
