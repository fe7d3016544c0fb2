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

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from reft_rs.pretrained import cache_dir

VERSION = "0.3.36"
TREE = f"llama_cpp_python-{VERSION}/vendor/llama.cpp"
# What the converter needs of the tree.
PARTS = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")


def _usable(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "gguf-py").is_dir()


def _fetch(target: Path) -> None:
    """Downloads the sdist and unpacks the converter's part of its tree
    into ``target`` (renamed into place: never half there)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=target.parent))
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                f"llama-cpp-python=={VERSION}",
                "-d",
                str(work),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        with tarfile.open(work / f"llama_cpp_python-{VERSION}.tar.gz") as sdist:
            members = [
                m
                for m in sdist.getmembers()
                if m.isfile() and m.name.startswith(TREE + "/") and m.name[len(TREE) + 1 :].startswith(PARTS)
            ]
            sdist.extractall(work, members=members, filter="data")
        os.replace(work / TREE, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def source() -> Path:
    """llama.cpp's source tree (fetched on first use), or a skip saying why not."""
    configured = os.environ.get("REFT_RS_LLAMA_CPP_SOURCE")
    if configured:
        if _usable(Path(configured)):
            return Path(configured)
        pytest.skip(f"REFT_RS_LLAMA_CPP_SOURCE={configured} holds no convert_hf_to_gguf.py and gguf-py")
    target = cache_dir() / f"llama.cpp-source-{VERSION}"
    if not _usable(target):
        try:
            _fetch(target)
        except (OSError, subprocess.SubprocessError, tarfile.TarError) as error:
            pytest.skip(f"cannot fetch llama-cpp-python {VERSION}'s sdist for llama.cpp's converter: {error}")
    return target


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
