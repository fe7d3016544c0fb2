"""Benchmark: generation with the Rust CPU engine against torch.

SmolLM2-135M-Instruct with LoReFT rank 4 on layers 3, 9, 18, 24 at f5+l5
(unshared), a 32-token prompt, 64 new tokens (greedy, end-of-sequence
ignored), batch 1, 4, 16 and 64, on the threads given (2 by default). Rows:

* torch: transformers ``generate`` on the float32 model through the reft_rs
  torch hooks (``ReftModel.generate``);
* engine f32: ``reft_rs.Engine`` on the same float32 safetensors;
* engine Q4_1: ``reft_rs.Engine`` on the package's quantized GGUF file;
* llama.cpp: ``llama-cpp-python`` on the same GGUF file, without
  interventions, when it is installed.

Each row runs in a fresh process, so time to first token counts from the
process start (imports and loading included) and peak memory is that
process's maximum resident set. Prefill speed comes from a run with one new
token; decode speed from the remaining 63 tokens of a 64-token run;
generate speed is the 64-token run's new tokens over its whole time (what a
caller of ``generate`` sees, prefill included). The best of ``--repeats``
runs is kept.

    python benches/bench_engine.py [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

PROMPT = 32
NEW = 64
TEXT = (
    "The history of the Roman Empire spans many centuries, beginning with the founding of the city and ending "
    "with the fall of Constantinople. Its legacy shaped law, language, architecture and religion across Europe "
    "and the Mediterranean, and historians still debate the causes of its decline, from economic troubles and "
    "military defeats to political instability and the pressures of migration along its long frontiers."
)


def prompts_for(encode, batch: int) -> list[list[int]]:
    """``batch`` distinct 32-token windows of the text (repeated as needed)."""
    ids = encode(TEXT)
    ids = ids * (1 + (PROMPT + 3 * batch) // len(ids))
    return [ids[3 * i : 3 * i + PROMPT] for i in range(batch)]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(run, batch: int, repeats: int) -> dict[str, float]:
    """``run(n)`` generates n new tokens for the batch."""
    prefill = decode = whole = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(1)
        one = time.perf_counter() - start
        start = time.perf_counter()
        run(NEW)
        full = time.perf_counter() - start
        prefill = min(prefill, one)
        decode = min(decode, max(full - one, 1e-9))
        whole = min(whole, full)
    return {
        "prefill_tok_s": batch * PROMPT / prefill,
        "decode_tok_s": batch * (NEW - 1) / decode,
        "generate_tok_s": batch * NEW / whole,
    }


def worker(kind: str, batch: int, threads: int, repeats: int, checkpoint: str, launched: float) -> dict:
    from reft_rs.io import pretrained

    if kind == "torch":
        import torch
        import transformers

        import reft_rs

        torch.set_num_threads(threads)
        folder = pretrained.smollm2_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        reft_model = reft_rs.ReftModel.from_pretrained(model, checkpoint)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        ids = torch.tensor(prompts_for(lambda t: tokenizer(t)["input_ids"], batch))
        mask = torch.ones_like(ids)

        def run(n: int) -> None:
            reft_model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)

    elif kind in ("engine", "gguf"):
        import reft_rs

        path = pretrained.smollm2_path() if kind == "engine" else pretrained.smollm2_gguf()
        engine = reft_rs.Engine(path, reft=checkpoint, threads=threads)
        prompts = prompts_for(engine.encode, batch)

        def run(n: int) -> None:
            engine.generate_ids(prompts, n, ignore_eos=True)

    elif kind == "llamacpp":
        import llama_cpp

        llm = llama_cpp.Llama(
            model_path=str(pretrained.smollm2_gguf()),
            n_threads=threads,
            n_ctx=256,
            n_batch=128,
            verbose=False,
        )
        prompts = prompts_for(lambda t: llm.tokenize(t.encode(), add_bos=False), batch)
        if batch != 1:
            raise SystemExit("llama-cpp-python runs one sequence at a time")

        def run(n: int) -> None:
            llm.reset()
            for i, _ in enumerate(llm.generate(prompts[0], top_k=1, reset=True)):
                if i + 1 >= n:
                    break

    else:
        raise SystemExit(f"unknown worker {kind}")
    run(1)
    first_token = time.time() - launched
    result = measure(run, batch, repeats)
    result.update(ttft_cold_s=first_token, peak_mb=peak_mb())
    return result


def make_checkpoint(path: str) -> None:
    import torch

    import reft_rs
    from reft_rs.io import pretrained

    model, _ = pretrained.load_smollm2()
    config = reft_rs.ReftConfig.for_layers([3, 9, 18, 24], low_rank_dimension=4, positions="f5+l5")
    reft_model = reft_rs.get_reft_model(model, config)
    with torch.no_grad():
        for intervention in reft_model.interventions:
            intervention.weight.mul_(4)
    reft_model.save_pretrained(path)


def spawn(kind: str, batch: int, args: argparse.Namespace, checkpoint: str) -> dict | None:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--batch",
        str(batch),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--checkpoint",
        checkpoint,
        "--launched",
        repr(time.time()),
    ]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  {kind} batch {batch}: failed: {out.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpoint")
    parser.add_argument("--launched", type=float)
    args = parser.parse_args()
    if args.worker:
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
        result = worker(args.worker, args.batch, args.threads, args.repeats, args.checkpoint, args.launched)
        print(json.dumps(result))
        return

    import importlib.util

    has_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "reft")
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import runpy; runpy.run_path({__file__!r})['make_checkpoint']({checkpoint!r})",
            ],
            check=True,
            capture_output=True,
        )
        print(
            f"SmolLM2-135M, LoReFT r4 on 4 layers at f5+l5, prompt {PROMPT}, {NEW} new tokens, "
            f"{args.threads} threads"
        )
        header = (
            f"{'':18}{'batch':>6}{'prefill tok/s':>15}{'decode tok/s':>14}{'generate tok/s':>16}"
            f"{'TTFT cold s':>13}{'peak MB':>10}"
        )
        print(header)
        results: dict[tuple[str, int], dict] = {}
        batches = (1, 4, 16, 64)
        rows = [(kind, batch) for batch in batches for kind in ("torch", "engine", "gguf")]
        if has_llamacpp:
            rows.append(("llamacpp", 1))
        names = {
            "torch": "torch f32",
            "engine": "engine f32",
            "gguf": "engine Q4_1",
            "llamacpp": "llama.cpp Q4_1",
        }
        for kind, batch in rows:
            result = spawn(kind, batch, args, checkpoint)
            if result is None:
                continue
            results[(kind, batch)] = result
            print(
                f"{names[kind]:18}{batch:>6}{result['prefill_tok_s']:>15.0f}{result['decode_tok_s']:>14.1f}"
                f"{result['generate_tok_s']:>16.1f}{result['ttft_cold_s']:>13.2f}{result['peak_mb']:>10.0f}",
                flush=True,
            )
        print("ratios (engine / baseline, same run):")
        for batch in batches:
            t, e, q = (results.get((k, batch)) for k in ("torch", "engine", "gguf"))
            if t and e:
                print(
                    f"  batch {batch}: f32 decode {e['decode_tok_s'] / t['decode_tok_s']:.2f}x torch "
                    f"(target >= 1.5), prefill {e['prefill_tok_s'] / t['prefill_tok_s']:.2f}x (target >= 1.5), "
                    f"peak memory {e['peak_mb'] / t['peak_mb']:.2f}x (target <= 1.0)"
                )
            if t and e:
                print(
                    f"  batch {batch}: f32 generate {e['generate_tok_s'] / t['generate_tok_s']:.2f}x torch "
                    "(target >= 1.5)"
                )
            if t and q:
                print(f"  batch {batch}: Q4_1 decode {q['decode_tok_s'] / t['decode_tok_s']:.2f}x torch f32")
        for kind in ("engine", "gguf"):
            speeds = [results[(kind, b)]["generate_tok_s"] for b in batches if (kind, b) in results]
            rising = all(a <= b for a, b in zip(speeds, speeds[1:]))
            listed = ", ".join(f"{v:.0f}" for v in speeds)
            print(
                f"  {names[kind]} generate tok/s over batches {batches}: {listed} (non-decreasing: {rising})"
            )
        if ("llamacpp", 1) in results and ("gguf", 1) in results:
            q, ll = results[("gguf", 1)], results[("llamacpp", 1)]
            print(
                f"  batch 1: Q4_1 decode {q['decode_tok_s'] / ll['decode_tok_s']:.2f}x llama.cpp (target >= 0.7), "
                f"prefill {q['prefill_tok_s'] / ll['prefill_tok_s']:.2f}x (target >= 1.0)"
            )
        elif not has_llamacpp:
            print("  llama.cpp: llama-cpp-python is not installed; not measured")


if __name__ == "__main__":
    main()
