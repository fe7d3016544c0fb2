"""The ``reft-rs`` command: train, run, evaluate, inspect and convert ReFT
interventions from the shell.

    reft-rs quickstart                      # the first job: SmolLM2 learns a reply style
    reft-rs train --data train.jsonl --output run/
    reft-rs generate --checkpoint run/ --prompt "Hello" [--engine rust]
    reft-rs eval --checkpoint run/ --data test.jsonl
    reft-rs inspect run/
    reft-rs convert pyreft pyreft_folder/ converted/

Every subcommand has ``--help``. Mistakes in the input (a missing file, a
malformed dataset line, an unknown layer, a bad position spec) end the
command with one line on stderr and exit status 2; other failures with exit
status 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import (
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

__all__ = ["main"]

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


# ------------------------------------------------------------------- helpers


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"this command needs torch and transformers: {TORCH_INSTALL}") from None


def _layers(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--layers must be comma-separated layer numbers, found {text!r}") from None
    if not layers:
        raise UsageError("--layers needs at least one layer")
    return layers


def _model_path(model: str | None, checkpoint: str | None = None, *, for_engine: bool = False) -> Path:
    """The model folder or GGUF file to load: the one given, else the
    checkpoint's base model when it is the default or a local folder, else
    SmolLM2."""
    if model is None and checkpoint is not None:
        config, _ = _read_checkpoint(checkpoint)
        name = config["base_model"].get("name_or_path") or ""
        from .pretrained import SMOLLM2_NAME

        if name and name != SMOLLM2_NAME and os.path.exists(name):
            model = name
        elif name and name != SMOLLM2_NAME:
            raise UsageError(
                f"the checkpoint was trained on {name!r}, which is not a local folder or file; pass --model"
            )
    if model is None or model == DEFAULT_MODEL:
        from .pretrained import cache_dir, smollm2_gguf, smollm2_path

        converted = cache_dir() / "SmolLM2-135M-Instruct"
        if for_engine and not (converted / "model.safetensors").is_file():
            return smollm2_gguf()  # the Rust engine reads the GGUF file itself
        if not for_engine:
            _require_torch()
        return smollm2_path()
    path = Path(model)
    if not path.exists():
        raise ModelNotFoundError(
            f"no model at {model} (give a model folder, a .gguf file, or '{DEFAULT_MODEL}')"
        )
    return path


def _load_torch_model(
    path: Path, device: str, bf16: bool, labels: Sequence[str] | None = None
) -> tuple[Any, Any]:
    """The model and tokenizer at ``path``: a causal LM, or with ``labels``
    a sequence classifier over them (its head new unless saved with it)."""
    _require_torch()
    import torch
    import transformers

    dtype = torch.bfloat16 if bf16 else torch.float32
    auto: Any = transformers.AutoModelForCausalLM
    try:
        if path.is_file():
            kwargs: dict[str, Any] = {"gguf_file": path.name}
            folder: Path | str = path.parent
        else:
            kwargs, folder = {}, path
        if labels is not None:
            auto = transformers.AutoModelForSequenceClassification
            kwargs["num_labels"] = len(labels)
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {label: index for index, label in enumerate(labels)}
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            folder, **{k: v for k, v in kwargs.items() if k == "gguf_file"}
        )
        with _quiet_transformers():
            model = auto.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load a model from {path}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if labels is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # finds each row's last token
    model.config._name_or_path = str(path)  # what checkpoints record as the base model
    return model.to(device).eval(), tokenizer


class _quiet_transformers:
    """Silences transformers' notice that a new classification head was
    initialized: reft-rs trains it and says so."""

    def __enter__(self) -> None:
        import transformers

        self.level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()

    def __exit__(self, *exc: Any) -> None:
        import transformers

        transformers.logging.set_verbosity(self.level)


@functools.lru_cache(maxsize=4)
def _read_checkpoint(checkpoint: str) -> tuple[dict[str, Any], tuple[tuple[str, str, tuple[int, ...]], ...]]:
    """A checkpoint's config and its tensors' ``(key, dtype, shape)``, read
    and checked once per command (the tensors' bytes are not kept)."""
    from . import _core

    config_json, raw, _ = _core.load_checkpoint(os.fspath(checkpoint))
    return json.loads(config_json), tuple((key, dtype, tuple(shape)) for key, dtype, shape, _ in raw)


def _checkpoint_metadata(checkpoint: str | None) -> dict[str, Any]:
    if checkpoint is None:
        return {}
    return dict(_read_checkpoint(checkpoint)[0].get("metadata") or {})


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available")
    return name


def _prompts_from(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompt / --prompts-file, or None (interactive)."""
    if args.prompt is not None:
        return list(args.prompt)
    if args.prompts_file is None:
        return None
    path = args.prompts_file
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such prompts file")
    if path.endswith((".jsonl", ".json", ".csv")):
        from .records import read_records

        return [r.get("prompt", r.get("text")) for r in read_records(path)]
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def _interactive() -> Iterator[str]:
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


# ------------------------------------------------------------------ commands


def cmd_quickstart(args: argparse.Namespace) -> int:
    _require_torch()
    from . import quickstart

    argv = ["--output-dir", args.output_dir, "--epochs", str(args.epochs), "--seed", str(args.seed)]
    return quickstart.main(argv)


def _training_data(
    args: argparse.Namespace,
    records: list[dict[str, Any]],
    tokenizer: Any,
    config: Any,
    labels: list[str] | None,
) -> Any:
    from .data import make_dataset

    if labels is not None:
        index = {label: i for i, label in enumerate(labels)}
        return make_dataset(
            tokenizer,
            [r["text"] for r in records],
            labels=[index[str(r["label"])] for r in records],
            config=config,
            max_length=args.max_length,
        )
    options = {
        "config": config,
        "max_length": args.max_length,
        "system_prompt": args.system_prompt,
        "chat_template": False if args.no_chat_template else None,
    }
    if "response" in records[0]:
        return make_dataset(
            tokenizer, [r["prompt"] for r in records], [r["response"] for r in records], **options
        )
    # Labelled texts for a causal LM: learn to answer with the label.
    return make_dataset(
        tokenizer, [r["text"] for r in records], [str(r["label"]) for r in records], **options
    )


class _StreamedEpochs:
    """Batches read from the dataset file afresh every epoch."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any, config: Any) -> None:
        self.args, self.tokenizer, self.config = args, tokenizer, config

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from .data import stream_batches
        from .records import read_records

        records = (
            r if "response" in r else {"prompt": r["text"], "response": str(r["label"])}
            for r in read_records(self.args.data)
        )
        yield from stream_batches(
            self.tokenizer,
            records,
            self.args.batch_size,
            config=self.config,
            chunk_size=self.args.chunk_size,
            shuffle=True,
            seed=self.args.seed,
            max_length=self.args.max_length,
            system_prompt=self.args.system_prompt,
            chat_template=False if self.args.no_chat_template else None,
        )


def cmd_train(args: argparse.Namespace) -> int:
    _require_torch()
    import transformers

    from .config import ReftConfig
    from .model import get_reft_model
    from .records import read_records

    if args.resume and args.stream:
        raise UsageError("--resume needs the Trainer's checkpoints; it does not combine with --stream")
    device = _device(args.device)
    if args.bf16 and device != "cuda":
        raise UsageError("--bf16 runs on a GPU; use it with --device cuda")
    # Mistakes in the dataset or the options fail before the model loads.
    records = list(read_records(args.data)) if not args.stream else [next(iter(read_records(args.data)))]
    task = args.task
    if task == "auto":
        task = "generate" if "response" in records[0] else "classify"
    labels: list[str] | None = None
    if task == "classify":
        if "response" in records[0]:
            raise UsageError("--task classify needs text/label records, found prompt/response ones")
        if args.stream:
            raise UsageError("--stream trains generation; classification datasets are read whole")
        labels = sorted({str(r["label"]) for r in records})
        if len(labels) < 2:
            raise DatasetError(f"{args.data}: classification needs at least 2 labels, found {labels}")
    config = ReftConfig.for_layers(
        _layers(args.layers),
        type=args.type,
        low_rank_dimension=args.rank,
        positions=args.positions,
        share_weights=args.share_weights,
        component=args.component,
        dropout=args.dropout,
        trainable_head=labels is not None,
        include_last=not args.exclude_last,
    )
    model, tokenizer = _load_torch_model(_model_path(args.model), device, args.bf16, labels)
    transformers.set_seed(args.seed)  # the interventions' initial weights, then the data order
    reft_model = get_reft_model(model, config)
    reft_model.print_trainable_parameters()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.stream:
        from .trainer import train

        def save_periodically(step: int, loss: float) -> None:
            if args.save_steps and step % args.save_steps == 0:
                reft_model.save_pretrained(output / f"checkpoint-{step}")

        losses = train(
            reft_model,
            _StreamedEpochs(args, tokenizer, config),
            epochs=max(1, round(args.epochs)),
            learning_rate=args.learning_rate,
            max_steps=args.max_steps,
            seed=args.seed,
            callback=save_periodically,
        )
    else:
        from .data import ReftDataCollator
        from .trainer import ReftTrainer

        dataset = _training_data(args, records, tokenizer, config, labels)
        print(f"{len(dataset)} training examples from {args.data}")
        training_args = transformers.TrainingArguments(
            output_dir=str(output),
            num_train_epochs=args.epochs,
            max_steps=args.max_steps or -1,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="linear",
            save_strategy="steps" if args.save_steps else "no",
            save_steps=args.save_steps or 500,
            save_total_limit=args.keep_checkpoints,
            logging_steps=max(1, args.log_steps),
            bf16=args.bf16,
            use_cpu=device == "cpu",
            seed=args.seed,
            report_to=[],
            remove_unused_columns=False,
            dataloader_pin_memory=False,
        )
        trainer = ReftTrainer(
            model=reft_model,
            args=training_args,
            train_dataset=dataset,
            data_collator=ReftDataCollator(tokenizer.pad_token_id),
        )
        result = trainer.train(resume_from_checkpoint=True if args.resume else None)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        losses = losses or [result.training_loss]
    seconds = time.perf_counter() - start
    metadata: dict[str, Any] = {"dataset": os.path.basename(args.data), "task": task}
    if labels is not None:
        metadata["labels"] = labels
    reft_model.save_pretrained(output, metadata=metadata)
    summary = {
        "train_seconds": round(seconds, 2),
        "trainable_parameters": reft_model.trainable_parameter_count(),
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
    }
    (output / "train_metrics.json").write_text(json.dumps(summary, indent=2))
    print(f"saved the checkpoint in {output}/ ({seconds:.0f} s, final loss {summary['final_loss']})")
    return 0


class _TorchGenerator:
    """Greedy or sampled generation through transformers with the checkpoint."""

    def __init__(self, args: argparse.Namespace) -> None:
        model, self.tokenizer = _load_torch_model(
            _model_path(args.model, args.checkpoint), _device(args.device), args.bf16
        )
        if args.checkpoint:
            from .model import ReftModel

            model = ReftModel.from_pretrained(model, args.checkpoint)
        self.model = model
        self.args = args
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) and not args.no_chat_template

    def _text(self, prompt: str) -> str:
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
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sample:
            kwargs["temperature"] = self.args.temperature
        return kwargs

    def batch(self, prompts: Sequence[str]) -> list[str]:
        import torch

        ids = self.tokenizer([self._text(p) for p in prompts], add_special_tokens=not self.chat)["input_ids"]
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model.generate(input_ids.to(device), attention_mask=mask.to(device), **self._kwargs())
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]

    def stream(self, prompt: str) -> None:
        import threading

        import torch
        import transformers

        ids = self.tokenizer(self._text(prompt), add_special_tokens=not self.chat, return_tensors="pt")
        device = next(self.model.parameters()).device
        streamer = transformers.TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True
        )

        def run() -> None:
            with torch.no_grad():
                self.model.generate(
                    ids["input_ids"].to(device),
                    attention_mask=ids["attention_mask"].to(device),
                    streamer=streamer,
                    **self._kwargs(),
                )

        thread = threading.Thread(target=run)
        thread.start()
        for piece in streamer:
            print(piece, end="", flush=True)
        thread.join()
        print()


class _RustGenerator:
    """Generation with the Rust CPU engine: no torch involved."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .engine import Engine

        self.engine = Engine(
            _model_path(args.model, args.checkpoint, for_engine=True),
            reft=args.checkpoint,
            threads=args.threads,
        )
        self.args = args
        self.chat = self.engine.has_chat_template and not args.no_chat_template

    def _options(self) -> dict[str, Any]:
        return {"max_new_tokens": self.args.max_new_tokens, "temperature": self.args.temperature}

    def batch(self, prompts: Sequence[str]) -> list[str]:
        if self.chat:
            texts = [self.engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
            return [
                r.strip() for r in self.engine.generate(texts, add_special_tokens=False, **self._options())
            ]
        return [r.strip() for r in self.engine.generate(list(prompts), **self._options())]

    def stream(self, prompt: str) -> None:
        if self.chat:
            text = self.engine.apply_chat_template([{"role": "user", "content": prompt}])
            ids = self.engine.encode(text, add_special_tokens=False)
        else:
            ids = self.engine.encode(prompt)
        for piece in self.engine.stream(ids, **self._options()):
            print(piece, end="", flush=True)
        print()


def _generator(args: argparse.Namespace) -> _TorchGenerator | _RustGenerator:
    return _RustGenerator(args) if args.engine == "rust" else _TorchGenerator(args)


def cmd_generate(args: argparse.Namespace) -> int:
    if _checkpoint_metadata(args.checkpoint).get("task") == "classify":
        raise UsageError("this is a classification checkpoint; score texts with reft-rs eval")
    prompts = _prompts_from(args)
    generator = _generator(args)
    if prompts is None:
        for prompt in _interactive():
            generator.stream(prompt)
        return 0
    if args.stream:
        for prompt in prompts:
            if len(prompts) > 1:
                print(f"> {prompt}")
            generator.stream(prompt)
        return 0
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        for prompt, reply in zip(chunk, generator.batch(chunk)):
            print(json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False) if args.jsonl else reply)
    return 0


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def _eval_classifier(args: argparse.Namespace, labels: list[str], records: list[dict[str, Any]]) -> int:
    """Accuracy of a classification checkpoint (batched forward passes)."""
    import numpy as np
    import torch

    from .data import make_dataset
    from .model import ReftModel

    if args.engine == "rust":
        raise UsageError("classification checkpoints run on the torch engine; drop --engine rust")
    if "text" not in records[0]:
        raise DatasetError(f"{args.data}: a classification checkpoint needs text/label records")
    model, tokenizer = _load_torch_model(
        _model_path(args.model, args.checkpoint), _device(args.device), args.bf16, labels
    )
    reft_model = ReftModel.from_pretrained(model, args.checkpoint)
    index = {label: i for i, label in enumerate(labels)}
    expected = np.array([index.get(str(r["label"]), -1) for r in records])
    dataset = make_dataset(
        tokenizer,
        [r["text"] for r in records],
        labels=expected.tolist(),
        config=reft_model.reft_config,
    )
    start = time.perf_counter()
    predicted = []
    with torch.no_grad():
        for batch in dataset.batches(args.batch_size, tokenizer.pad_token_id):
            batch.pop("labels")
            batch = {k: v.to(reft_model.device) for k, v in batch.items()}
            predicted.append(reft_model(**batch).logits.argmax(-1).cpu().numpy())
    chosen = np.concatenate(predicted)
    metrics = {
        "examples": len(records),
        "accuracy": float((chosen == expected).mean()),
        "unseen_labels": int((expected < 0).sum()),
        "seconds": round(time.perf_counter() - start, 2),
        "engine": "torch",
    }
    print(json.dumps(metrics, indent=2))
    if args.output:
        rows = [
            {"text": r["text"], "expected": str(r["label"]), "predicted": labels[c], "correct": bool(c == e)}
            for r, c, e in zip(records, chosen.tolist(), expected.tolist())
        ]
        Path(args.output).write_text(json.dumps({**metrics, "predictions": rows}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .records import read_records

    records = list(read_records(args.data))
    metadata = _checkpoint_metadata(args.checkpoint)
    if metadata.get("task") == "classify":
        return _eval_classifier(args, list(metadata["labels"]), records)
    pairs = [
        (r["prompt"], r["response"]) if "response" in r else (r["text"], str(r["label"])) for r in records
    ]
    generator = _generator(args)
    exact = contains = 0
    predictions = []
    start = time.perf_counter()
    for first in range(0, len(pairs), args.batch_size):
        chunk = pairs[first : first + args.batch_size]
        replies = generator.batch([p for p, _ in chunk])
        for (prompt, expected), reply in zip(chunk, replies):
            hit = _normalize(reply) == _normalize(expected)
            found = _normalize(expected) in _normalize(reply)
            exact += hit
            contains += found
            predictions.append({"prompt": prompt, "expected": expected, "reply": reply, "exact": hit})
        print(f"\r{len(predictions)}/{len(pairs)} evaluated", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    metrics = {
        "examples": len(pairs),
        "exact_match": exact / len(pairs),
        "contains_answer": contains / len(pairs),
        "seconds": round(time.perf_counter() - start, 2),
        "engine": args.engine,
    }
    print(json.dumps(metrics, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps({**metrics, "predictions": predictions}, indent=2))
    return 0


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    folder = Path(args.checkpoint)
    config, tensors = _read_checkpoint(args.checkpoint)
    counts: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    for key, dtype, shape in tensors:
        owner = key.partition(".")[0]
        counts[owner] = counts.get(owner, 0) + int(np.prod(shape))
        dtypes[owner] = dtype
    extra = set(config.get("extra_tensors") or [])
    trainable = sum(
        int(np.prod(shape)) for key, _, shape in tensors if key not in extra or key.startswith("head.")
    )
    files = {p.name: _size(p) for p in sorted(folder.iterdir()) if p.is_file()}
    if args.json:
        print(json.dumps({"config": config, "parameters": counts, "files": files}, indent=2))
        return 0
    base = config["base_model"]
    print(
        f"checkpoint {folder} (format {config.get('format_version')}, reft_rs {config.get('library_version')})"
    )
    print(
        f"base model: {base.get('name_or_path') or '?'} ({base.get('model_type') or '?'}, hidden size "
        f"{base['hidden_size']}, {base['num_hidden_layers']} layers)"
    )
    print(f"{len(config['interventions'])} interventions, {trainable:,} trained parameters")
    rows = [("name", "type", "layer", "component", "positions", "rank", "parameters")]
    for entry in config["interventions"]:
        rank = entry.get("low_rank_dimension")
        positions = (entry.get("positions") or "all") + (" shared" if entry.get("share_weights") else "")
        if not entry.get("include_last", True):
            positions += " (last token excluded)"
        rows.append(
            (
                entry["name"],
                entry["type"],
                str(entry["layer"]),
                entry["component"],
                positions,
                "-" if rank is None else str(rank),
                f"{counts.get(entry['name'], 0):,} {dtypes.get(entry['name'], '?')}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    metadata = {k: v for k, v in (config.get("metadata") or {}).items() if k != "trainable_head"}
    if metadata:
        print(f"metadata: {json.dumps(metadata)}")
    print("files: " + ", ".join(f"{name} ({size})" for name, size in files.items()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    _require_torch()
    from . import convert

    base: Any = None
    if args.model is not None:
        import transformers

        base = transformers.AutoConfig.from_pretrained(_model_path(args.model))
    elif args.hidden_size is not None or args.num_layers is not None:
        if args.hidden_size is None or args.num_layers is None:
            raise UsageError("give both --hidden-size and --num-layers, or --model")
        base = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_layers}
    if not os.path.exists(args.source):
        raise CheckpointError(f"{args.source}: no such checkpoint to convert", args.source)
    if args.kind == "pyreft":
        config = convert.from_pyreft(
            args.source,
            args.output,
            base_model=base,
            positions=args.positions,
            share_weights=args.share_weights,
            include_last=not args.exclude_last,
        )
    else:
        config = convert.from_red(args.source, args.output, base_model=base)
    print(f"converted {len(config.interventions)} interventions from {args.kind} into {args.output}/")
    return 0


# ------------------------------------------------------------------- parser

EXAMPLES = {
    "quickstart": """examples:
  reft-rs quickstart
  reft-rs quickstart --output-dir runs/pirate --epochs 8""",
    "train": """examples:
  reft-rs train --data train.jsonl --output runs/style
  reft-rs train --model ./my-llama --data qa.csv --layers 4,8,12 --positions f3+l3 --rank 8
  reft-rs train --data big.jsonl --stream --max-steps 2000 --output runs/big
  reft-rs train --data train.jsonl --output runs/style --save-steps 50 --resume
  reft-rs train --data train.jsonl --device cuda --bf16 --output runs/gpu

The dataset is JSON lines, JSON or CSV with prompt/response fields (the
model learns the responses) or text/label fields (a classification head
trains with the interventions; --task generate teaches the model to answer
each text with its label instead).""",
    "generate": """examples:
  reft-rs generate --checkpoint runs/style --prompt "What is the capital of France?"
  reft-rs generate --checkpoint runs/style --engine rust --prompt "Hello" --stream
  reft-rs generate --checkpoint runs/style --prompts-file prompts.txt --jsonl
  reft-rs generate --checkpoint runs/style          # interactive""",
    "eval": """examples:
  reft-rs eval --checkpoint runs/style --data test.jsonl
  reft-rs eval --checkpoint runs/style --data test.csv --engine rust --output results.json
  reft-rs eval --checkpoint runs/sentiment --data test.jsonl      # a classifier: accuracy""",
    "inspect": """examples:
  reft-rs inspect reft-quickstart/checkpoint
  reft-rs inspect runs/style --json""",
    "convert": """examples:
  reft-rs convert pyreft pyreft_out/ converted/ --positions f1+l1 --model smollm2
  reft-rs convert red delta_vector.pth converted/ --hidden-size 576 --num-layers 30""",
}


def _subparser(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=EXAMPLES[name],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a reft_rs checkpoint folder (none: the base model alone)")
    parser.add_argument(
        "--model", help="model folder or .gguf file (default: the checkpoint's base model, else SmolLM2)"
    )
    parser.add_argument(
        "--engine", choices=["torch", "rust"], default="torch", help="torch (default) or the Rust CPU engine"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-chat-template", action="store_true", help="send prompts as plain text")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="torch engine only")
    parser.add_argument("--bf16", action="store_true", help="load the model in bfloat16 (torch, GPU)")
    parser.add_argument("--threads", type=int, default=None, help="Rust engine threads (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"reft-rs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    quick = _subparser(commands, "quickstart", "train LoReFT on SmolLM2-135M-Instruct and show the result")
    quick.add_argument("--output-dir", default="reft-quickstart", help="default: ./reft-quickstart")
    quick.add_argument("--epochs", type=int, default=5)
    quick.add_argument("--seed", type=int, default=0)
    quick.set_defaults(run=cmd_quickstart)

    train = _subparser(commands, "train", "train interventions on a dataset")
    train.add_argument("--data", required=True, help="JSONL, JSON or CSV dataset")
    train.add_argument("--output", required=True, help="folder for the checkpoint(s)")
    train.add_argument("--model", help=f"model folder or .gguf file (default: {DEFAULT_MODEL})")
    train.add_argument(
        "--task",
        choices=["auto", "generate", "classify"],
        default="auto",
        help="generate: learn the responses (prompt/response data; the default for it); classify: a "
        "sequence classifier over the labels (text/label data; the default for it); generate with "
        "text/label data learns to answer each text with its label",
    )
    train.add_argument("--type", default="loreft", help="intervention type (default loreft)")
    train.add_argument("--layers", default="3,9,18,24", help="comma-separated layers (default 3,9,18,24)")
    train.add_argument("--positions", default="f1+l1", help="position spec, e.g. f1+l1, l3, all")
    train.add_argument("--rank", type=int, default=4, help="low-rank dimension (default 4)")
    train.add_argument("--share-weights", action="store_true", help="one intervention for prefix and suffix")
    train.add_argument(
        "--exclude-last",
        action="store_true",
        help="leave the last prompt token out of the positions (pyreft's library datasets); recorded in "
        "the checkpoint, so generate and eval edit the same positions",
    )
    train.add_argument("--component", default="block_output")
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--epochs", type=float, default=3)
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--learning-rate", type=float, default=4e-3)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--max-length", type=int, default=None, help="cut examples to this many tokens")
    train.add_argument("--system-prompt", default=None)
    train.add_argument("--no-chat-template", action="store_true")
    train.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps")
    train.add_argument("--keep-checkpoints", type=int, default=3)
    train.add_argument("--log-steps", type=int, default=10)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    train.add_argument("--stream", action="store_true", help="read the dataset chunk by chunk")
    train.add_argument("--chunk-size", type=int, default=16384)
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    train.add_argument("--bf16", action="store_true", help="bfloat16 model on the GPU")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(run=cmd_train)

    generate = _subparser(commands, "generate", "generate replies with a checkpoint")
    _generation_options(generate)
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    generate.add_argument("--prompts-file", help="one prompt per line, or JSONL/CSV with a prompt field")
    generate.add_argument("--stream", action="store_true", help="print tokens as they come")
    generate.add_argument("--jsonl", action="store_true", help="print one JSON object per reply")
    generate.set_defaults(run=cmd_generate)

    evaluate = _subparser(
        commands, "eval", "exact match of a checkpoint's replies, or a classifier's accuracy, on a dataset"
    )
    _generation_options(evaluate)
    evaluate.add_argument("--data", required=True, help="prompt/response or text/label records")
    evaluate.add_argument("--output", help="write the metrics and every prediction to this JSON file")
    evaluate.set_defaults(run=cmd_eval)

    inspect = _subparser(commands, "inspect", "show a checkpoint's interventions, sizes and base model")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=cmd_inspect)

    convert = _subparser(commands, "convert", "convert a pyreft or RED checkpoint into a reft_rs one")
    convert.add_argument("kind", choices=["pyreft", "red"])
    convert.add_argument("source", help="pyreft's folder, or RED's delta_vector.pth (or its folder)")
    convert.add_argument("output")
    convert.add_argument("--model", help="the base model (to record its identity)")
    convert.add_argument("--hidden-size", type=int)
    convert.add_argument("--num-layers", type=int)
    convert.add_argument("--positions", help="pyreft: the position spec used in training")
    convert.add_argument(
        "--share-weights", action=argparse.BooleanOptionalAction, default=None, help="pyreft: shared weights"
    )
    convert.add_argument(
        "--exclude-last",
        action="store_true",
        help="pyreft: trained on pyreft's library datasets, which leave the last prompt token out",
    )
    convert.set_defaults(run=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _read_checkpoint.cache_clear()  # one command's reads; a later call may see new files
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except USER_ERRORS as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ReftError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`reft-rs inspect ... | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
