"""Benchmark: saving and loading 60 interventions, reft_rs against pyreft's layout.

60 LoReFT interventions (rank 4, SmolLM2's width 576: all 30 layers, f5+l5
unshared). reft_rs writes one safetensors file and one JSON config,
atomically; pyreft's layout, reproduced here, is one ``torch.save`` pickle
per intervention plus a config, read back with ``torch.load``. Both run in
this process on the same tensors; loads are checked bit-exact and
dtype-exact (pyreft itself turns float32 W and b into bfloat16 on reload).

Rows: the checkpoint files alone (``reft_rs.io.checkpoint``), and the whole
``ReftModel.save_pretrained`` / ``ReftModel.from_pretrained`` round trip on
the real model (attaching hooks included).

    python benches/bench_checkpoint.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

import reft_rs
from reft_rs.io.pretrained import load_smollm2


def median_ms(action, repeats: int) -> float:
    action()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def pickle_layout_save(folder: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """pyreft's layout: a config and one pickle per intervention."""
    os.makedirs(folder, exist_ok=True)
    by_intervention: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        owner, _, name = key.partition(".")
        by_intervention.setdefault(owner, {})[name] = value
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle)
    for owner, state in by_intervention.items():
        torch.save(state, os.path.join(folder, f"intkey_{owner}.bin"))


def pickle_layout_load(folder: str) -> dict[str, torch.Tensor]:
    with open(os.path.join(folder, "config.json")) as handle:
        json.load(handle)
    tensors = {}
    for name in os.listdir(folder):
        if name.startswith("intkey_"):
            owner = name[len("intkey_") : -len(".bin")]
            for key, value in torch.load(os.path.join(folder, name), weights_only=True).items():
                tensors[f"{owner}.{key}"] = value
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, _ = load_smollm2()
    config = reft_rs.ReftConfig.for_layers(
        range(model.config.num_hidden_layers), low_rank_dimension=4, positions="f5+l5"
    )
    reft_model = reft_rs.get_reft_model(model, config)
    tensors = reft_model.checkpoint_tensors()
    checkpoint_config = config.to_checkpoint(reft_model.base_model_identity())
    checkpoint_config["extra_tensors"] = [k for k in tensors if k.endswith(".rotation_base")]
    work = tempfile.mkdtemp(prefix="reft-bench-")
    try:
        ours, theirs = os.path.join(work, "reft_rs"), os.path.join(work, "pickles")
        save_ours = median_ms(
            lambda: reft_rs.io.checkpoint.save(ours, checkpoint_config, tensors), args.repeats
        )
        load_ours = median_ms(lambda: reft_rs.io.checkpoint.load(ours, framework="torch"), args.repeats)
        save_theirs = median_ms(lambda: pickle_layout_save(theirs, checkpoint_config, tensors), args.repeats)
        load_theirs = median_ms(lambda: pickle_layout_load(theirs), args.repeats)
        _, loaded = reft_rs.io.checkpoint.load(ours, framework="torch")
        exact = all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())
        files = {name: len(os.listdir(path)) for name, path in (("reft_rs", ours), ("pickles", theirs))}

        pretrained = os.path.join(work, "pretrained")
        save_model = median_ms(lambda: reft_model.save_pretrained(pretrained), args.repeats)
        base = reft_model.remove_hooks()

        def round_trip():
            reft_rs.ReftModel.from_pretrained(base, pretrained).remove_hooks()

        load_model = median_ms(round_trip, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    count = len(config.interventions)
    print(f"{count} LoReFT interventions, rank 4, width 576; median of {args.repeats}")
    print(f"{'':<34} {'save ms':>9} {'load ms':>9} {'files':>6}")
    print(f"{'reft_rs.io.checkpoint':<34} {save_ours:>9.2f} {load_ours:>9.2f} {files['reft_rs']:>6}")
    print(
        f"{'pickle per intervention (pyreft)':<34} {save_theirs:>9.2f} {load_theirs:>9.2f} {files['pickles']:>6}"
    )
    print(
        f"{'ratio (pickles / reft_rs)':<34} {save_theirs / save_ours:>8.1f}x {load_theirs / load_ours:>8.1f}x"
    )
    print(f"{'ReftModel save / from_pretrained':<34} {save_model:>9.2f} {load_model:>9.2f}")
    print(f"reloaded bit-exact with float32 kept: {exact}")


if __name__ == "__main__":
    main()
