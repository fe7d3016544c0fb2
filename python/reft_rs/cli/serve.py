"""``reft-rs serve``: an OpenAI-compatible server on the Rust engine, with
any number of adapters over one base model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError
from .common import DEFAULT_MODEL, UsageError, add_command, model_path

EXAMPLES = """examples:
  reft-rs serve --model smollm2 --adapter style=runs/style/checkpoint
  reft-rs serve --model model/ --adapter-dir runs/ --api-key "$KEY" --port 8080

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "style", "messages": [{"role": "user", "content": "Hello"}]}'

The request's "model" picks an adapter by name, or the base model by its
name (GET /v1/models lists them). With --adapter-dir, POST /v1/adapters
{"name": ..., "path": ...} loads a checkpoint from inside that folder and
DELETE /v1/adapters/NAME unloads one."""


def register(commands: Any) -> None:
    serve = add_command(
        commands, "serve", "serve a model and its adapters over an OpenAI-compatible API", EXAMPLES
    )
    serve.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model folder or .gguf file (default: {DEFAULT_MODEL})"
    )
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=CHECKPOINT",
        help="serve a reft_rs checkpoint under NAME (repeatable)",
    )
    serve.add_argument("--adapter-dir", help="folder that POST /v1/adapters may load checkpoints from")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("REFT_RS_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $REFT_RS_API_KEY; none: open to this "
        "machine's clients only, with Host checked; an empty key is refused)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="with no key, a Host name to accept besides localhost and the bound address (repeatable)",
    )
    serve.add_argument(
        "--model-name", help="the base model's name in the API (default: the model file's name)"
    )
    serve.add_argument(
        "--max-batch", type=int, default=32, help="most sequences per forward pass (default: 32)"
    )
    serve.add_argument(
        "--kv-cache-mib", type=int, default=2048, help="key/value cache budget in MiB (default: 2048)"
    )
    serve.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="reply length of chat requests that name none (default: 256)",
    )
    serve.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=256,
        help="prompt tokens prefilled per step (default: 256; a longer prompt runs alone)",
    )
    serve.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting at most; more get 429 (default: 256)"
    )
    serve.add_argument(
        "--max-request-tokens",
        type=int,
        default=65536,
        help="most prompt tokens plus max_tokens per prompt in one request (default: 65536)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections at most; more get 503 (default: 512)",
    )
    serve.add_argument("--max-adapters", type=int, default=64, help="adapters loaded at most (default: 64)")
    serve.add_argument(
        "--max-adapter-mib",
        type=int,
        default=1024,
        help="checkpoint MiB that POST /v1/adapters may load in all (default: 1024)",
    )
    serve.add_argument("--threads", type=int, help="engine threads (default: one per core)")
    serve.add_argument(
        "--int8-activations",
        action="store_true",
        help="GGUF: round activations to 8 bits in quantized products, as llama.cpp does "
        "(default: 16 bits, close to the float32 model)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.set_defaults(run=run)


def parse_adapters(values: list[str]) -> list[tuple[str, Path]]:
    out = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter wants NAME=CHECKPOINT, found {value!r}")
        out.append((name, Path(path)))
    names = [name for name, _ in out]
    if len(set(names)) != len(names):
        raise UsageError(f"--adapter names repeat: {names}")
    return out


def served_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import create_app, is_loopback
    except ImportError as error:
        raise MissingDependencyError(
            f"reft-rs serve needs uvicorn and Starlette ({error.name} is missing): pip install 'reft-rs[serve]'"
        ) from None
    from ..engine.engine import Engine

    for name in (
        "max_batch",
        "kv_cache_mib",
        "max_tokens",
        "port",
        "max_queue",
        "max_prefill_tokens",
        "max_request_tokens",
        "max_connections",
        "max_adapters",
        "max_adapter_mib",
    ):
        least = 0 if name in ("port", "max_adapter_mib") else 1
        if getattr(args, name) < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError(
            "--api-key is empty (an unset variable?): give a key, or leave the option out to serve "
            "this machine only without one"
        )
    adapters = parse_adapters(args.adapter)
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise UsageError(f"--adapter-dir {args.adapter_dir} is not a folder")
    path = model_path(args.model, for_engine=True)
    engine = Engine(path, threads=args.threads, int8_activations=args.int8_activations)
    model_name = args.model_name or served_name(path)
    for name, checkpoint in adapters:
        if name == model_name:
            raise UsageError(f"the adapter name {name!r} is the base model's; pick another")
        engine.add_adapter(name, checkpoint)
    wildcard = args.host in ("0.0.0.0", "::", "")
    if args.api_key is None and not is_loopback(args.host):
        print(
            f"reft-rs serve: warning: {args.host} is reachable from other machines and no API key is "
            "set: anyone who reaches it can generate and load adapters (set --api-key)",
            file=sys.stderr,
            flush=True,
        )
    hosts = ["*"] if wildcard else ["localhost", "127.0.0.1", "::1", args.host, *args.allowed_host]
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop(error: BaseException) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True  # a supervisor sees the non-zero exit

    app = create_app(
        engine,
        model_name=model_name,
        adapter_dir=args.adapter_dir,
        api_key=args.api_key,
        max_batch=args.max_batch,
        kv_cache_mib=args.kv_cache_mib,
        default_max_tokens=args.max_tokens,
        max_waiting=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens,
        max_request_tokens=args.max_request_tokens,
        max_adapters=args.max_adapters,
        max_adapter_mib=args.max_adapter_mib,
        allowed_hosts=hosts,
        on_failure=stop,
    )
    names = ", ".join([model_name] + [name for name, _ in adapters])
    print(f"reft-rs serve: {names} on http://{args.host}:{args.port}/v1", flush=True)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        limit_concurrency=args.max_connections,
    )
    server = uvicorn.Server(config)
    server.run()
    if failed:
        print(f"reft-rs serve: stopped: the generation thread failed: {failed[0]!r}", file=sys.stderr)
        return 3
    return 0
