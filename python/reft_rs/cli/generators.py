"""Generating replies from the command line, with torch or the Rust engine."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import DatasetError
from .common import UsageError, device_for, load_torch_model, model_path


def prompts_from(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompt / --prompts-file, or None (interactive)."""
    if args.prompt is not None:
        return list(args.prompt)
    if args.prompts_file is None:
        return None
    path = args.prompts_file
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such prompts file")
    if path.endswith((".jsonl", ".json", ".csv")):
        from ..io.records import read_records

        return [r.get("prompt", r.get("text")) for r in read_records(path)]
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def interactive() -> Iterator[str]:
    print("Type a prompt and press Enter; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            return
        yield line


class TorchGenerator:
    """Greedy or sampled generation through transformers with the checkpoint."""

    def __init__(self, args: argparse.Namespace) -> None:
        model, self.tokenizer = load_torch_model(
            model_path(args.model, args.checkpoint), device_for(args.device), args.bf16
        )
        if args.checkpoint:
            from ..model.reft_model import ReftModel

            model = ReftModel.from_pretrained(model, args.checkpoint)
        self.model = model
        self.args = args
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) and not args.no_chat_template
        # A vision-language model's "tokenizer" is its processor.
        self.text = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        # An encoder-decoder reads the prompt in its encoder (padded on the
        # right) and its output is the reply alone.
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))

    def _text(self, prompt: str) -> str:
        if self.text is not self.tokenizer:  # a processor: its own chat template, no image
            from ..training.images import render_prompt

            return render_prompt(self.tokenizer, prompt)
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def _kwargs(self) -> dict[str, Any]:
        sample = self.args.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.args.max_new_tokens,
            "do_sample": sample,
            "pad_token_id": self.text.pad_token_id,
        }
        if self.args.checkpoint:
            kwargs["strength"] = self.args.strength
        if sample:
            kwargs["temperature"] = self.args.temperature
        return kwargs

    def _with_images(self, prompts: Sequence[str], images: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
        """Left-padded ids and the image features of prompts with images."""
        import numpy as np
        import torch

        from ..training.data import pad_features
        from ..training.images import encode_prompt

        encoded = [encode_prompt(self.tokenizer, p, i) for p, i in zip(prompts, images)]
        lengths = np.array([len(ids) for ids, _, _ in encoded])
        width = int(lengths.max())
        ids = torch.full((len(encoded), width), self.text.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, (prompt, _, _) in enumerate(encoded):
            ids[row, width - len(prompt) :] = torch.from_numpy(prompt)
            mask[row, width - len(prompt) :] = 1
        features = pad_features([f for _, f, _ in encoded], lengths, width, True)
        return ids, {"attention_mask": mask, **{k: torch.from_numpy(v) for k, v in features.items()}}

    def batch(self, prompts: Sequence[str], images: Sequence[Any] | None = None) -> list[str]:
        import torch

        device = next(self.model.parameters()).device
        if images is not None:
            input_ids, extra = self._with_images(prompts, images)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids.to(device), **{k: v.to(device) for k, v in extra.items()}, **self._kwargs()
                )
            width = input_ids.shape[1]
            return [self.text.decode(row[width:], skip_special_tokens=True).strip() for row in out]
        ids = self.text([self._text(p) for p in prompts], add_special_tokens=not self.chat)["input_ids"]
        width = max(len(i) for i in ids)
        pad = self.text.pad_token_id
        if self.encoder_decoder:
            input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
        else:
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            out = self.model.generate(input_ids.to(device), attention_mask=mask.to(device), **self._kwargs())
        first = 0 if self.encoder_decoder else width
        return [self.text.decode(row[first:], skip_special_tokens=True).strip() for row in out]

    def stream(self, prompt: str, image: Any = None) -> None:
        import threading

        import torch
        import transformers

        if image is not None:
            input_ids, extra = self._with_images([prompt], [image])
        else:
            ids = self.text(self._text(prompt), add_special_tokens=not self.chat, return_tensors="pt")
            input_ids, extra = ids["input_ids"], {"attention_mask": ids["attention_mask"]}
        device = next(self.model.parameters()).device
        streamer = transformers.TextIteratorStreamer(self.text, skip_prompt=True, skip_special_tokens=True)

        def run() -> None:
            with torch.no_grad():
                self.model.generate(
                    input_ids.to(device),
                    **{k: v.to(device) for k, v in extra.items()},
                    streamer=streamer,
                    **self._kwargs(),
                )

        thread = threading.Thread(target=run)
        thread.start()
        for piece in streamer:
            print(piece, end="", flush=True)
        thread.join()
        print()


class RustGenerator:
    """Generation with the Rust CPU engine: no torch involved."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ..engine.engine import Engine

        self.engine = Engine(
            model_path(args.model, args.checkpoint, for_engine=True),
            reft=args.checkpoint,
            threads=args.threads,
            int8_activations=getattr(args, "int8_activations", False),
        )
        self.args = args
        self.chat = self.engine.has_chat_template and not args.no_chat_template

    def _options(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.args.max_new_tokens,
            "temperature": self.args.temperature,
            "strength": self.args.strength,
        }

    def batch(self, prompts: Sequence[str], images: Sequence[Any] | None = None) -> list[str]:
        _text_only(images)
        if self.chat:
            texts = [self.engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
            return [
                r.strip() for r in self.engine.generate(texts, add_special_tokens=False, **self._options())
            ]
        return [r.strip() for r in self.engine.generate(list(prompts), **self._options())]

    def stream(self, prompt: str, image: Any = None) -> None:
        _text_only(image)
        if self.chat:
            text = self.engine.apply_chat_template([{"role": "user", "content": prompt}])
            ids = self.engine.encode(text, add_special_tokens=False)
        else:
            ids = self.engine.encode(prompt)
        for piece in self.engine.stream(ids, **self._options()):
            print(piece, end="", flush=True)
        print()


def _text_only(images: Any) -> None:
    if images is not None:
        raise UsageError(
            "the Rust engine runs text models; generate with images through torch (--engine torch)"
        )


def images_for(args: argparse.Namespace, prompts: list[str] | None) -> list[Any] | None:
    """One image per prompt from --image (once for every prompt, or once per
    prompt) or the prompts file's ``image`` fields; ``None`` without images."""
    given = getattr(args, "image", None)
    if given:
        for path in given:
            if not os.path.isfile(path):
                raise DatasetError(f"{path}: no such image file")
        if prompts is None or len(given) == 1:
            return [given[0]] * (1 if prompts is None else len(prompts))
        if len(given) != len(prompts):
            raise UsageError(f"{len(prompts)} prompts but {len(given)} --image: give one, or one per prompt")
        return list(given)
    if args.prompts_file is not None and args.prompts_file.endswith((".jsonl", ".json", ".csv")):
        from ..io.records import read_records

        records = list(read_records(args.prompts_file))
        if "image" in records[0]:
            return [r["image"] for r in records]
    return None


def generator_for(args: argparse.Namespace) -> TorchGenerator | RustGenerator:
    if not math.isfinite(args.strength):
        raise UsageError(f"--strength must be a finite number, found {args.strength}")
    return RustGenerator(args) if args.engine == "rust" else TorchGenerator(args)


def generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a reft_rs checkpoint folder (none: the base model alone)")
    parser.add_argument(
        "--model", help="model folder or .gguf file (default: the checkpoint's base model, else SmolLM2)"
    )
    parser.add_argument(
        "--engine", choices=["torch", "rust"], default="torch", help="torch (default) or the Rust CPU engine"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="edit strength a: each edited state becomes h + a(edit(h) - h); 1 the trained edit (default), "
        "0 the base model, negative reverses a steering vector",
    )
    parser.add_argument(
        "--image",
        action="append",
        help="a picture for a vision-language model: once for every prompt, or once per --prompt",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-chat-template", action="store_true", help="send prompts as plain text")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="torch engine only")
    parser.add_argument("--bf16", action="store_true", help="load the model in bfloat16 (torch, GPU)")
    parser.add_argument("--threads", type=int, default=None, help="Rust engine threads (default: all)")
    parser.add_argument(
        "--int8-activations",
        action="store_true",
        help="Rust engine, GGUF: round activations to 8 bits in quantized products, as llama.cpp does "
        "(default: 16 bits, close to the float32 model)",
    )
