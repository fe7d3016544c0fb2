"""GGUF files made the way users get them: by llama.cpp's own
``convert_hf_to_gguf.py``, from the source tree inside the
``llama-cpp-python`` sdist on PyPI (``vendor/llama.cpp``, run with its own
``gguf-py``). Nothing is compiled.

``.ci/run`` downloads and unpacks the sdist and points
``REFT_RS_LLAMA_CPP_SOURCE`` at ``vendor/llama.cpp``; without it, the tests
that need the converter are skipped with the command that provides it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SDIST = "llama-cpp-python==0.3.36"
FETCH = (
    "pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d DIR && "
    "tar xzf DIR/llama_cpp_python-0.3.36.tar.gz -C DIR, then "
    "REFT_RS_LLAMA_CPP_SOURCE=DIR/llama_cpp_python-0.3.36/vendor/llama.cpp"
)


def source() -> Path:
    """llama.cpp's source tree, or a skip naming how to get it."""
    configured = os.environ.get("REFT_RS_LLAMA_CPP_SOURCE")
    candidates = [Path(configured)] if configured else []
    candidates.append(Path.home() / ".cache/reft_rs/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp")
    for path in candidates:
        if (path / "convert_hf_to_gguf.py").is_file() and (path / "gguf-py").is_dir():
            return path
    pytest.skip(f"llama.cpp's converter is not here: {FETCH}")


def sentencepiece_vocabulary(folder: Path, sentences: list[str], vocab_size: int, *, prefix: bool) -> None:
    """Trains a small SentencePiece BPE model into ``folder/tokenizer.model``
    (what the converter reads a Llama, Gemma or Phi-3 vocabulary from), with
    ids 0-3 for pad, unk, bos, eos and no text normalisation; ``prefix``: a
    "▁" before the text, as Llama's tokenizers add and Gemma's do not."""
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=prefix,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink(missing_ok=True)


def convert(folder: Path, out: Path, outtype: str = "f32") -> Path:
    """Runs llama.cpp's converter on a Hugging Face folder."""
    tree = source()
    env = dict(os.environ, PYTHONPATH=f"{tree / 'gguf-py'}{os.pathsep}{tree}", NO_LOCAL_GGUF="1")
    done = subprocess.run(
        [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out), "--outtype", outtype],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder}:\n{done.stderr[-3000:]}")
    return out
