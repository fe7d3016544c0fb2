"""GGUF files made the way users get them: by llama.cpp's own
``convert_hf_to_gguf.py``, from the source tree inside the
``llama-cpp-python`` sdist on PyPI (``vendor/llama.cpp``, run with its own
``gguf-py``). Nothing is compiled.

The sdist is downloaded with pip on first use and unpacked into the reft_rs
cache (``$REFT_RS_CACHE/llama.cpp-source``, outside the clone), or taken
from ``REFT_RS_LLAMA_CPP_SOURCE`` (a ``vendor/llama.cpp`` folder); where
neither works (no network), the tests that need it are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# What the converter needs of llama.cpp's tree.
PARTS = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")


def _builder():
    """``benches/llamacpp_build.py``, which fetches and builds llama.cpp (benches/
    is no package)."""
    path = Path(__file__).parents[1] / "benches" / "llamacpp_build.py"
    spec = importlib.util.spec_from_file_location("llama_cpp_builder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source() -> Path:
    """llama.cpp's source tree (fetched on first use), or a skip saying why not."""
    configured = os.environ.get("REFT_RS_LLAMA_CPP_SOURCE")
    if configured:
        if (Path(configured) / "convert_hf_to_gguf.py").is_file():
            return Path(configured)
        pytest.skip(f"REFT_RS_LLAMA_CPP_SOURCE={configured} holds no convert_hf_to_gguf.py")
    builder = _builder()
    try:
        return builder.source(PARTS)
    except (OSError, subprocess.SubprocessError, builder.tarfile.TarError) as error:
        pytest.skip(
            f"cannot fetch llama-cpp-python {builder.VERSION}'s sdist for llama.cpp's converter: {error}"
        )


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
        [
            sys.executable,
            str(tree / "convert_hf_to_gguf.py"),
            str(folder),
            "--outfile",
            str(out),
            "--outtype",
            outtype,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder}:\n{done.stderr[-3000:]}")
    return out
