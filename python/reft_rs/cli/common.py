"""What the subcommands share: errors, argument helpers, loading models and
checkpoints."""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    IncompatibleModelError,
    InvalidArgumentError,
    MissingDependencyError,
    ModelNotFoundError,
    PositionError,
    ReftError,
)

PROG = "reft-rs"
DEFAULT_MODEL = "smollm2"
TORCH_INSTALL = "pip install 'reft-rs[torch]'"
# Errors in what the user typed or pointed at: exit status 2.
USER_ERRORS = (
    DatasetError,
    ConfigError,
    PositionError,
    IncompatibleModelError,
    InvalidArgumentError,
    ModelNotFoundError,
    CheckpointError,
    MissingDependencyError,
)


class UsageError(ReftError, ValueError):
    """A command-line argument that makes no sense."""


def add_command(commands: Any, name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with its help and examples."""
    return commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def require_torch() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"this command needs torch and transformers: {TORCH_INSTALL}") from None


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--layers must be comma-separated layer numbers, found {text!r}") from None
    if not layers:
        raise UsageError("--layers needs at least one layer")
    return layers


def model_path(model: str | None, checkpoint: str | None = None, *, for_engine: bool = False) -> Path:
    """The model folder or GGUF file to load: the one given, else the
    checkpoint's base model when it is the default or a local folder, else
    SmolLM2."""
    if model is None and checkpoint is not None:
        config, _ = read_checkpoint(checkpoint)
        name = config["base_model"].get("name_or_path") or ""
        from ..io.pretrained import SMOLLM2_NAME

        if name and name != SMOLLM2_NAME and os.path.exists(name):
            model = name
        elif name and name != SMOLLM2_NAME:
            raise UsageError(
                f"the checkpoint was trained on {name!r}, which is not a local folder or file; pass --model"
            )
    if model is None or model == DEFAULT_MODEL:
        from ..io.pretrained import cache_dir, smollm2_gguf, smollm2_path

        converted = cache_dir() / "SmolLM2-135M-Instruct"
        if for_engine and not (converted / "model.safetensors").is_file():
            return smollm2_gguf()  # the Rust engine reads the GGUF file itself
        if not for_engine:
            require_torch()
        return smollm2_path()
    path = Path(model)
    if not path.exists():
        raise ModelNotFoundError(
            f"no model at {model} (give a model folder, a .gguf file, or '{DEFAULT_MODEL}')"
        )
    return path


def load_torch_model(
    path: Path, device: str, bf16: bool, labels: Sequence[str] | None = None
) -> tuple[Any, Any]:
    """:func:`reft_rs.io.pretrained.load_model`, after checking torch is there."""
    require_torch()
    from ..io.pretrained import load_model

    return load_model(path, device=device, bf16=bf16, labels=labels)


@functools.lru_cache(maxsize=4)
def read_checkpoint(checkpoint: str) -> tuple[dict[str, Any], tuple[tuple[str, str, tuple[int, ...]], ...]]:
    """A checkpoint's config and its tensors' ``(key, dtype, shape)``, read
    and checked once per command (the tensors' bytes are not kept)."""
    from ..io.checkpoint import read_layout

    config, layout = read_layout(checkpoint)
    return config, tuple(layout)


def checkpoint_metadata(checkpoint: str | None) -> dict[str, Any]:
    if checkpoint is None:
        return {}
    return dict(read_checkpoint(checkpoint)[0].get("metadata") or {})


def device_for(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    return name
