"""A first real job: teach SmolLM2-135M-Instruct a reply style with LoReFT.

    reft-rs quickstart [--output-dir ./reft-quickstart]

The bundled instruction set (64 questions answered as a pirate would: each
reply opens with "Arr!" and closes with "matey.") is split into 48 training
and 16 held-out prompts. The job measures how often the model replies in the
style on the held-out prompts before and after training (a checker, not a
judgement), prints examples, and saves the checkpoint, ``metrics.json`` and
the loss curve (``loss.png``). Last, it runs the saved checkpoint through the
Rust CPU engine (no torch) and checks that it gives the same replies,
printing the generation speed of both paths. It takes a couple of minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["engine_check", "generate_replies", "has_style", "load_examples", "main"]


def load_examples() -> list[dict[str, str]]:
    """The bundled prompt/response pairs."""
    text = resources.files("reft_rs").joinpath("assets/pirate_style.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def has_style(reply: str) -> bool:
    """The checker: a reply in the taught style opens with "Arr!"."""
    return reply.strip().startswith("Arr!")


def generate_replies(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy replies to chat prompts, generated as one left-padded batch."""
    import torch

    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(ids):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        mask[row, width - len(sequence) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def engine_check(checkpoint: Path, prompts: list[str], threads: int) -> tuple[list[str], float]:
    """Greedy replies of the Rust engine with the saved checkpoint (one
    left-padded batch, as the torch path ran), and the seconds they took."""
    import reft_rs
    from reft_rs.pretrained import smollm2_path

    engine = reft_rs.Engine(smollm2_path(), reft=checkpoint, threads=threads)
    texts = [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    start = time.perf_counter()
    replies = engine.generate(texts, max_new_tokens=24, add_special_tokens=False)
    return [r.strip() for r in replies], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reft-rs quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", default="reft-quickstart", help="where the checkpoint and metrics go")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    import reft_rs
    from reft_rs.pretrained import load_smollm2

    torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_smollm2()
    except reft_rs.MissingDependencyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    examples = load_examples()
    held_out = examples[3::4]
    train = [e for i, e in enumerate(examples) if i % 4 != 3]
    prompts = [e["prompt"] for e in held_out]
    print(f"SmolLM2-135M-Instruct; {len(train)} training and {len(held_out)} held-out prompts")

    print("generating the held-out replies before training...", flush=True)
    before = generate_replies(model, tokenizer, prompts)
    config = reft_rs.ReftConfig.for_layers([3, 9, 18, 24], low_rank_dimension=4, positions="f1+l1")
    reft_model = reft_rs.get_reft_model(model, config)
    reft_model.print_trainable_parameters()
    dataset = reft_rs.make_dataset(
        tokenizer, [e["prompt"] for e in train], [e["response"] for e in train], config=config
    )
    start = time.perf_counter()
    losses = reft_rs.train(
        reft_model,
        dataset,
        collator=reft_rs.ReftDataCollator(tokenizer.pad_token_id),
        epochs=args.epochs,
        batch_size=8,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    train_seconds = time.perf_counter() - start
    print("generating the held-out replies after training...", flush=True)
    start = time.perf_counter()
    after = generate_replies(reft_model, tokenizer, prompts)
    torch_seconds = time.perf_counter() - start

    rate_before = sum(map(has_style, before)) / len(before)
    rate_after = sum(map(has_style, after)) / len(after)
    for prompt, old, new in list(zip(prompts, before, after))[:4]:
        print(f"\n> {prompt}\n  before: {old}\n  after:  {new}")
    print(f"\nheld-out replies in the taught style: {rate_before:.0%} before, {rate_after:.0%} after")

    output = Path(args.output_dir)
    reft_model.save_pretrained(output / "checkpoint", metadata={"task": "pirate_style"})
    from reft_rs.plot import training_curves

    training_curves(output / "loss.png", losses, title="LoReFT training loss (SmolLM2-135M-Instruct)")
    print("running the saved checkpoint through the Rust engine...", flush=True)
    engine_replies, engine_seconds = engine_check(output / "checkpoint", prompts, torch.get_num_threads())
    same = sum(a == b for a, b in zip(engine_replies, after))
    tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in after)
    print(
        f"the Rust engine, run on the saved checkpoint, gives the same replies for {same}/{len(after)} "
        f"held-out prompts\n  torch: {tokens / torch_seconds:.1f} tok/s, Rust engine: "
        f"{tokens / engine_seconds:.1f} tok/s ({torch_seconds / engine_seconds:.1f}x)"
    )
    metrics = {
        "success_rate_before": rate_before,
        "success_rate_after": rate_after,
        "train_seconds": round(train_seconds, 2),
        "trainable_parameters": reft_model.trainable_parameter_count(),
        "final_loss": losses[-1],
        "engine_same_replies": same,
        "torch_generate_seconds": round(torch_seconds, 3),
        "engine_generate_seconds": round(engine_seconds, 3),
        "losses": list(losses),
        "held_out": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)],
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved the checkpoint, metrics.json and loss.png in {output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
