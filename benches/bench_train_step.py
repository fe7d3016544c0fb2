"""Benchmark: training step time of reft_rs interventions against the bare model.

SmolLM2-135M-Instruct, float32, on the CPU threads given (2 by default).
"bare" is the same frozen model with one trainable vector added at the
embedding output, so backward crosses every layer: the floor any
intervention method pays. Each reft_rs row is LoReFT rank 4 at f5+l5 with a
prefix and a suffix intervention per layer. Steps are forward + backward +
AdamW; bare and reft_rs steps run in alternating rounds and each ratio
compares their medians.

Also times ways of editing the chosen positions inside a hook (forward and
backward), since that choice dominates per-intervention overhead.

    python benches/bench_train_step.py [--threads 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import reft_rs
from reft_rs.io.pretrained import load_smollm2


def batch_for(vocab: int, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (batch, length), generator=generator)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # loss on the second half, as on a response
    prompt = torch.full((batch,), length // 2)
    locations = reft_rs.positions.locate(prompt.numpy(), "f5+l5")
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "locations": locations,
    }


def time_steps(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_pair(first, second, steps: int, rounds: int = 4) -> tuple[float, float]:
    """Median step times of two step functions, measured in alternating rounds
    so that drift in the machine's speed affects both alike."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for step, sink in ((first, times[0]), (second, times[1])):
            for _ in range(max(1, steps // rounds)):
                start = time.perf_counter()
                step()
                sink.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


class Bare:
    """The frozen model plus one trainable vector at the embedding output."""

    def __init__(self, model, batch):
        self.model = model
        self.vector = torch.nn.Parameter(torch.zeros(model.config.hidden_size))
        self.active = False
        self.handle = model.get_input_embeddings().register_forward_hook(
            lambda m, a, out: out + self.vector if self.active else None
        )
        self.optimizer = torch.optim.AdamW([self.vector], lr=1e-3)
        self.inputs = {k: v for k, v in batch.items() if k != "locations"}

    def __call__(self):
        self.active = True
        try:
            self.optimizer.zero_grad(set_to_none=True)
            self.model(**self.inputs).loss.backward()
            self.optimizer.step()
        finally:
            self.active = False


def reft_step(model, batch, layers):
    config = reft_rs.ReftConfig.for_layers(layers, low_rank_dimension=4, positions="f5+l5")
    reft_model = reft_rs.get_reft_model(model, config)
    reft_model.train()
    optimizer = torch.optim.AdamW([p for p in reft_model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        reft_model(**batch).loss.backward()
        optimizer.step()

    return step, reft_model.remove_hooks, len(config.interventions)


def edit_strategies(batch: int, length: int, width: int, steps: int) -> dict[str, float]:
    """Forward + backward time of editing 10 positions per example in a hook
    with a LoReFT intervention, three ways."""
    from reft_rs.model.interventions import Intervention
    from reft_rs.model.reft_model import _edit_rows

    torch.manual_seed(0)
    hidden = torch.randn(batch, length, width, requires_grad=True)
    positions = torch.tensor([list(range(5)) + list(range(length - 5, length))] * batch)
    intervention = Intervention(reft_rs.InterventionConfig(layer=0, low_rank_dimension=4), width)
    flat = (torch.arange(batch)[:, None] * length + positions).reshape(-1)

    def index_copy():  # what reft_rs does
        return _edit_rows(hidden, flat, intervention)

    def clone_and_assign():
        out = hidden.clone()
        rows = torch.arange(batch)[:, None]
        out[rows, positions] = intervention(hidden[rows, positions])
        return out

    def scatter():
        index = positions[..., None].expand(-1, -1, width)
        return hidden.scatter(1, index, intervention(hidden.gather(1, index)))

    results = {}
    strategies = [
        ("index_select/index_copy (reft_rs)", index_copy),
        ("clone + index assign", clone_and_assign),
        ("gather/scatter", scatter),
    ]
    for name, edit in strategies:

        def run(edit=edit):
            hidden.grad = None
            edit().sum().backward()

        results[name] = time_steps(run, steps * 4, warmup=3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_smollm2()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    vocab, layers = model.config.vocab_size, model.config.num_hidden_layers
    print(f"SmolLM2-135M float32, {args.threads} threads; medians of interleaved bare / reft_rs steps")
    print(f"{'setting':<42} {'interventions':>13} {'bare ms':>9} {'reft ms':>9} {'ratio':>10}")
    settings = [
        ("batch 8, seq 128, layers 3/9/18/24", 8, 128, [3, 9, 18, 24]),
        ("batch 8, seq 128, all 30 layers", 8, 128, list(range(layers))),
        ("batch 1, seq 16, all 30 layers", 1, 16, list(range(layers))),
    ]
    for label, size, length, chosen in settings:
        batch = batch_for(vocab, size, length)
        steps = args.steps if size > 1 else args.steps * 8
        bare = Bare(model, batch)
        step, undo, count = reft_step(model, batch, chosen)
        bare_seconds, seconds = time_pair(bare, step, steps)
        undo()
        bare.handle.remove()
        print(
            f"{label:<42} {count:>13} {1000 * bare_seconds:>9.1f} {1000 * seconds:>9.1f} {seconds / bare_seconds:>9.2f}x"
        )
    print("\nediting 10 positions per example in a hook, forward + backward, batch 8, seq 128, width 576:")
    results = edit_strategies(8, 128, model.config.hidden_size, args.steps)
    ours = results["index_select/index_copy (reft_rs)"]
    for name, seconds in results.items():
        print(f"  {name:<36} {1000 * seconds:>8.2f} ms  ({seconds / ours:.2f}x reft_rs)")


if __name__ == "__main__":
    main()
