"""``reft-rs generate``: replies from a checkpoint, batched, streamed or interactive."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import UsageError, add_command, checkpoint_metadata
from .generators import generation_options, generator_for, images_for, interactive, prompts_from

EXAMPLES = """examples:
  reft-rs generate --checkpoint runs/style --prompt "What is the capital of France?"
  reft-rs generate --checkpoint runs/style --engine rust --prompt "Hello" --stream
  reft-rs generate --checkpoint runs/style --prompts-file prompts.txt --jsonl
  reft-rs generate --checkpoint runs/colours --model llava-folder --prompt "What colour is it?" --image cat.png
  reft-rs generate --checkpoint runs/style          # interactive"""


def register(commands: Any) -> None:
    generate = add_command(commands, "generate", "generate replies with a checkpoint", EXAMPLES)
    generation_options(generate)
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    generate.add_argument("--prompts-file", help="one prompt per line, or JSONL/CSV with a prompt field")
    generate.add_argument("--stream", action="store_true", help="print tokens as they come")
    generate.add_argument("--jsonl", action="store_true", help="print one JSON object per reply")
    generate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if checkpoint_metadata(args.checkpoint).get("task") == "classify":
        raise UsageError("this is a classification checkpoint; score texts with reft-rs eval")
    prompts = prompts_from(args)
    images = images_for(args, prompts)
    if images is not None and args.engine == "rust":
        raise UsageError(
            "the Rust engine runs text models; generate with images through torch (--engine torch)"
        )
    generator = generator_for(args)
    if prompts is None:
        for prompt in interactive():
            generator.stream(prompt, None if images is None else images[0])
        return 0
    if args.stream:
        for index, prompt in enumerate(prompts):
            if len(prompts) > 1:
                print(f"> {prompt}")
            generator.stream(prompt, None if images is None else images[index])
        return 0
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        pictures = None if images is None else images[start : start + args.batch_size]
        for prompt, reply in zip(chunk, generator.batch(chunk, pictures)):
            print(json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False) if args.jsonl else reply)
    return 0
