"""The OpenAI-compatible HTTP application (Starlette, served by uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending
with ``data: [DONE]``), and ``GET``/``POST /v1/adapters``,
``DELETE /v1/adapters/{name}`` to list, load and unload adapters at run
time (reft_rs checkpoints, or llama.cpp control-vector ``.gguf`` files:
each request picks its own vector, or none). A request's ``model`` picks the base model (by its served name) or an
adapter (by its name). Requests of every model share one continuously
batched forward pass.

Safe to leave running: request bodies must say ``application/json``; with
no API key, the ``Host`` header must name the bound address (so a web page
cannot drive the server through a browser, by a plain form or by DNS
rebinding); the waiting queue is bounded (429 with ``Retry-After``), as
are each request's prompts × tokens and the adapters loaded at run time;
clients (the request's ``user``, else the peer address) take turns at
admission; ``/health`` answers at once during a long prefill; and if the
generation thread dies, requests get 503 and ``on_failure`` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.engine import Engine
from ..engine.scheduler import Event, Scheduler
from ..errors import (
    BusyError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    IncompatibleModelError,
    InvalidArgumentError,
    ReftError,
    ReftMemoryError,
    TokenizerError,
)
from .protocol import ApiError, Sampling, bad, parse_messages, parse_prompts, parse_sampling
from .worker import Worker, WorkerStopped

__all__ = ["Limits", "create_app", "is_loopback"]

#: Largest request body read.
MAX_BODY_BYTES = 4 << 20
#: Seconds a client refused for a full queue is told to wait.
RETRY_AFTER_S = 1

_log = logging.getLogger("reft_rs.serve")


#: An absolute path in a message (POSIX or Windows), which error bodies drop.
_ABSOLUTE = re.compile(r"(?<![\w.~])(?:/|[A-Za-z]:\\)(?:[^\s'\"/\\]+[/\\])+")


def public(message: str) -> str:
    """``message`` with the folders of absolute paths left out (``/srv/a/b.json``
    → ``b.json``): an error body must not tell clients the server's layout."""
    return _ABSOLUTE.sub("", message)


_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _host_name(value: str) -> str:
    """The name in a ``Host`` header value, without its port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is this machine only."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _HostCheck:
    """ASGI middleware: the ``Host`` header must be one of ``allowed`` (a
    browser sends the page's own host, so a foreign page, or a DNS name
    rebound to 127.0.0.1, is refused)."""

    def __init__(self, app: Callable[..., Any], allowed: set[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"host", b"")
            name = _host_name(header.decode("latin-1"))
            if name not in self.allowed:
                error = ApiError(
                    403,
                    "the Host header does not name this server (requests from other sites are "
                    "refused while no API key is set)",
                    code="host_not_allowed",
                )
                await JSONResponse(error.body(), status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _ApiKey:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every route but ``/health``."""

    def __init__(self, app: Callable[..., Any], key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = ApiError(
                    401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key"
                )
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server:
    def __init__(
        self,
        engine: Engine,
        model_name: str,
        adapter_dir: Path | None,
        limits: Limits,
        default_max_tokens: int,
        on_failure: Callable[[BaseException], None] | None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.adapter_dir = None if adapter_dir is None else adapter_dir.resolve()
        self.limits = limits
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.adapters_created: dict[str, int] = {name: self.created for name in engine.adapters}
        #: Bytes of each adapter loaded at run time (counted per name).
        self.adapter_bytes: dict[str, int] = {}
        scheduler = Scheduler(
            engine,
            max_batch=limits.max_batch,
            kv_cache_mib=limits.kv_cache_mib,
            max_waiting=limits.max_waiting,
            max_prefill_tokens=limits.max_prefill_tokens,
        )
        self.worker = Worker(scheduler, on_failure=on_failure)

    # -------------------------------------------------------------- helpers

    async def body(self, request: Request) -> dict[str, Any]:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES >> 20} MiB")
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise ApiError(
                415,
                f"the request body must be sent as application/json, found {media or 'no Content-Type'!r}",
                code="unsupported_media_type",
            )
        try:
            body = json.loads(bytes(raw).decode("utf-8"))
            # A \ud800 escape decodes to a lone surrogate, which no text holds.
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeError:
            raise bad("the request body is not UTF-8 text (a lone surrogate?)") from None
        except json.JSONDecodeError as error:
            raise bad(f"the request body is not valid JSON: {error}") from None
        except RecursionError:
            raise bad("the request body nests too deeply") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        return body

    def client_of(self, request: Request, body: dict[str, Any]) -> str:
        """Who sent ``request``, for fair admission: its ``user`` field, else its address."""
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise bad("user must be a string", "user")
        if user:
            return "user:" + user[:256]
        return "peer:" + (request.client.host if request.client else "")

    def check_size(self, prompts: list[list[int]], sampling: Sampling) -> None:
        """Refuses a request whose prompts and replies exceed ``max_request_tokens``."""
        total = sum(len(p) for p in prompts) + len(prompts) * sampling.max_new_tokens
        if total > self.limits.max_request_tokens:
            raise bad(
                f"the request asks for {total} tokens (prompts plus max_tokens for each), "
                f"more than the {self.limits.max_request_tokens} one request may",
                "max_tokens",
                code="request_too_large",
            )

    def adapter_for(self, body: dict[str, Any]) -> str | None:
        model = body.get("model")
        if not isinstance(model, str):
            raise bad("model is required: the base model's name or an adapter's", "model")
        if model == self.model_name:
            return None
        if model in self.engine.adapters:
            return model
        raise ApiError(
            404,
            f"the model {model!r} does not exist; GET /v1/models lists the base model and its adapters",
            param="model",
            code="model_not_found",
        )

    async def encode(self, prompt: str | list[int], special: bool) -> list[int]:
        """Token ids of ``prompt``, tokenized off the event loop."""
        if isinstance(prompt, list):
            return prompt
        try:
            return await asyncio.to_thread(self.engine.encode, prompt, special)
        except ReftError as error:
            raise bad(f"the prompt cannot be tokenized: {public(str(error))}", "prompt") from None

    def submit(
        self, ids: list[int], sampling: Sampling, adapter: str | None, param: str, client: str
    ) -> tuple[int, asyncio.Queue[Event]]:
        context = self.engine.context_length
        if len(ids) > context:
            raise bad(
                f"the prompt has {len(ids)} tokens, more than the model's context of {context}",
                param,
                code="context_length_exceeded",
            )
        try:
            return self.worker.submit(ids, sampling.params, adapter=adapter, client=client)
        except WorkerStopped:
            raise ApiError(
                503, "the server cannot generate: its generation thread stopped", code="unavailable"
            ) from None
        except BusyError as error:
            raise ApiError(
                429, f"the server is busy: {error}; retry later", code="queue_full", retry_after=RETRY_AFTER_S
            ) from None
        except ReftMemoryError as error:
            raise bad(str(error), "max_tokens", code="request_too_large") from None
        except InvalidArgumentError as error:
            if "no adapter named" in str(error):  # unloaded since adapter_for looked
                raise ApiError(404, str(error), param="model", code="model_not_found") from None
            raise bad(str(error)) from None
        except TokenizerError as error:
            raise bad(str(error), "stop" if sampling.stop else None) from None

    async def events(
        self, request_id: int, queue: asyncio.Queue[Event], gone: asyncio.Future[None]
    ) -> AsyncIterator[Event]:
        """The request's events until its last, or until the client goes (then it is cancelled)."""
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    raise ConnectionAbortedError("the client went away")
                event = get.result()
                if event.finish == "error":
                    _log.error("request %d failed: %s", request_id, event.error)
                    status = 500 if self.worker.alive else 503
                    raise ApiError(
                        status, "generation failed (the server's log says why)", code="generation_failed"
                    )
                yield event
                if event.finish is not None:
                    return
        finally:
            self.worker.cancel(request_id)  # no-op once finished

    # -------------------------------------------------------------- routes

    async def health(self, request: Request) -> Response:
        if not self.worker.alive:
            # The reason stays in the server's log: /health needs no key.
            return JSONResponse(
                {"status": "error", "reason": "the generation thread stopped"}, status_code=503
            )
        waiting, running, reserved = self.worker.scheduler.load  # no lock a step holds
        return JSONResponse(
            {
                "status": "ok",
                "running": running,
                "waiting": waiting,
                "kv_cache_reserved_bytes": reserved,
                "cancelled": self.worker.cancelled,
            }
        )

    def model_card(self, name: str, parent: str | None) -> dict[str, Any]:
        created = self.created if parent is None else self.adapters_created.get(name, self.created)
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "reft_rs",
            "root": self.model_name,
            "parent": parent,
        }

    async def models(self, request: Request) -> Response:
        cards = [self.model_card(self.model_name, None)]
        cards += [self.model_card(name, self.model_name) for name in self.engine.adapters]
        return JSONResponse({"object": "list", "data": cards})

    async def completions(self, request: Request) -> Response:
        body = await self.body(request)
        adapter = self.adapter_for(body)
        client = self.client_of(request, body)
        sampling = parse_sampling(body, default_max_tokens=16, chat=False)
        prompts = [await self.encode(p, True) for p in parse_prompts(body)]
        return await self.respond(request, body["model"], prompts, sampling, adapter, client, chat=False)

    async def chat(self, request: Request) -> Response:
        body = await self.body(request)
        adapter = self.adapter_for(body)
        client = self.client_of(request, body)
        sampling = parse_sampling(body, default_max_tokens=self.default_max_tokens, chat=True)
        messages = parse_messages(body)
        if not self.engine.has_chat_template:
            raise bad("the model has no chat template; use /v1/completions", "messages")
        try:
            text = await asyncio.to_thread(
                self.engine.apply_chat_template, messages, add_generation_prompt=True
            )
        except ReftError as error:
            raise bad(
                f"the chat template failed on these messages: {public(str(error))}", "messages"
            ) from None
        prompt = await self.encode(text, False)
        return await self.respond(request, body["model"], [prompt], sampling, adapter, client, chat=True)

    async def respond(
        self,
        request: Request,
        model: str,
        prompts: list[list[int]],
        sampling: Sampling,
        adapter: str | None,
        client: str,
        *,
        chat: bool,
    ) -> Response:
        if not self.engine.has_tokenizer:
            raise bad("the model has no tokenizer, so replies cannot be written as text", "model")
        if not prompts or any(not p for p in prompts):
            raise bad("the prompt has no tokens", "prompt")
        self.check_size(prompts, sampling)
        submitted = []
        try:
            for ids in prompts:
                submitted.append(
                    self.submit(ids, sampling, adapter, "messages" if chat else "prompt", client)
                )
        except BaseException:
            for request_id, _ in submitted:
                self.worker.cancel(request_id)
            raise
        created = int(time.time())
        reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        gone = asyncio.ensure_future(_disconnected(request))
        if sampling.stream:
            stream = self.stream(submitted, gone, prompts, sampling, model, reply_id, created, chat)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            results = await asyncio.gather(
                *(self.collect(request_id, queue, gone, sampling) for request_id, queue in submitted)
            )
        except ConnectionAbortedError:
            return Response(status_code=499)
        finally:
            gone.cancel()
        choices = []
        completion_tokens = 0
        for index, (text, finish, count) in enumerate(results):
            completion_tokens += count
            if chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                )
            else:
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish})
        prompt_tokens = sum(len(p) for p in prompts)
        return JSONResponse(
            {
                "id": reply_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens),
            }
        )

    async def collect(
        self, request_id: int, queue: asyncio.Queue[Event], gone: asyncio.Future[None], sampling: Sampling
    ) -> tuple[str, str, int]:
        pieces: list[str] = []
        tokens = 0
        finish = "length"
        async for event in self.events(request_id, queue, gone):
            tokens += event.token is not None
            pieces.append(event.text)
            if event.finish is not None:
                finish = "stop" if event.finish == "stop" else "length"
        return "".join(pieces), finish, tokens

    async def stream(
        self,
        submitted: list[tuple[int, asyncio.Queue[Event]]],
        gone: asyncio.Future[None],
        prompts: list[list[int]],
        sampling: Sampling,
        model: str,
        reply_id: str,
        created: int,
        chat: bool,
    ) -> AsyncIterator[str]:
        """Chunk events of every prompt's reply as its tokens come (each
        chunk names its choice by ``index``), then the usage, then ``[DONE]``."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(
            index: int, piece: str | None, finish: str | None, usage: dict[str, int] | None = None
        ) -> str:
            if chat:
                delta: dict[str, Any] = {} if piece is None else {"content": piece}
                choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
            else:
                choices = [{"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}]
            payload: dict[str, Any] = {
                "id": reply_id,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [] if usage is not None else choices,
            }
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        merged: asyncio.Queue[tuple[int, Event | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, request_id: int, queue: asyncio.Queue[Event]) -> None:
            try:
                async for event in self.events(request_id, queue, gone):
                    merged.put_nowait((index, event))
                merged.put_nowait((index, None))
            except (ApiError, ConnectionAbortedError) as error:
                merged.put_nowait((index, error))

        tokens = [0] * len(submitted)
        pumps = [asyncio.ensure_future(pump(i, rid, q)) for i, (rid, q) in enumerate(submitted)]
        try:
            if chat:
                for index in range(len(submitted)):
                    first = json.loads(chunk(index, "", None)[6:])
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield f"data: {json.dumps(first)}\n\n"
            running = len(submitted)
            while running:
                index, item = await merged.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                tokens[index] += item.token is not None
                if item.text:
                    yield chunk(index, item.text, None)
                if item.finish is not None:
                    yield chunk(index, None if chat else "", "stop" if item.finish == "stop" else "length")
            if sampling.include_usage:
                yield chunk(0, None, None, _usage(sum(map(len, prompts)), sum(tokens)))
            yield "data: [DONE]\n\n"
        except ApiError as error:
            yield f"data: {json.dumps(_error_body(error))}\n\n"
        except ConnectionAbortedError:
            return
        finally:
            gone.cancel()
            for task in pumps:
                task.cancel()
            for request_id, _ in submitted:
                self.worker.cancel(request_id)

    async def list_adapters(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [self.model_card(name, self.model_name) for name in self.engine.adapters],
            }
        )

    async def add_adapter(self, request: Request) -> Response:
        if self.adapter_dir is None:
            raise ApiError(403, "loading adapters at run time is off; start the server with --adapter-dir")
        body = await self.body(request)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            raise bad("name and path (inside the adapter folder) are required strings")
        if name == self.model_name or name in self.engine.adapters:
            raise ApiError(409, f"a model named {name!r} exists already; DELETE it first", param="name")
        if len(self.engine.adapters) >= self.limits.max_adapters:
            raise ApiError(
                409,
                f"{len(self.engine.adapters)} adapters are loaded, the most this server holds; DELETE one first",
                code="adapter_limit",
            )
        if "\x00" in path:
            raise bad("path holds a NUL character", "path")
        target = (self.adapter_dir / path).resolve()
        if target != self.adapter_dir and self.adapter_dir not in target.parents:
            raise ApiError(403, f"the path {path!r} leaves the adapter folder", param="path")
        vector = target.is_file() and target.suffix.lower() == ".gguf"  # a llama.cpp control vector
        if not (target.is_dir() or vector):
            raise ApiError(
                404,
                f"no checkpoint folder or control-vector .gguf {path!r} in the adapter folder",
                param="path",
            )
        size = target.stat().st_size if vector else _folder_bytes(target)
        loaded = sum(self.adapter_bytes.values())
        if loaded + size > self.limits.max_adapter_bytes:
            raise ApiError(
                409,
                f"the checkpoint {path!r} holds {size >> 20} MiB; with the {loaded >> 20} MiB loaded at run time "
                f"that passes the server's {self.limits.max_adapter_bytes >> 20} MiB (the same checkpoint "
                "under another name counts again)",
                param="path",
                code="adapter_limit",
            )
        try:
            await asyncio.to_thread(self.engine.add_adapter, name, target)
        except CheckpointNotFoundError as error:
            raise ApiError(404, f"no checkpoint at {path!r}: {public(str(error))}", param="path") from None
        except (CheckpointError, IncompatibleModelError, ConfigError) as error:
            raise bad(
                f"the checkpoint {path!r} cannot be served on this model: {public(str(error))}", "path"
            ) from None
        except InvalidArgumentError as error:
            status = 409 if "loaded already" in str(error) else 400
            raise ApiError(status, public(str(error)), param="name") from None
        self.adapters_created[name] = int(time.time())
        self.adapter_bytes[name] = size
        return JSONResponse(self.model_card(name, self.model_name), status_code=201)

    async def remove_adapter(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.engine.adapters:
            raise ApiError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found")
        with contextlib.suppress(InvalidArgumentError):  # removed meanwhile
            self.engine.remove_adapter(name)
        self.adapters_created.pop(name, None)
        self.adapter_bytes.pop(name, None)
        return JSONResponse({"id": name, "object": "model", "deleted": True})


def _error_body(error: ApiError) -> dict[str, Any]:
    """OpenAI's error body, absolute paths left out of the message."""
    body = error.body()
    body["error"]["message"] = public(body["error"]["message"])
    return body


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (a checkpoint's)."""
    total = 0
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):
            if entry.is_file():
                total += entry.stat().st_size
    return total


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@dataclass(frozen=True)
class Limits:
    """What one server takes on at once (see :func:`create_app`)."""

    max_batch: int = 32
    kv_cache_mib: int = 2048
    max_prefill_tokens: int = 256
    max_waiting: int = 256
    max_request_tokens: int = 65536
    max_adapters: int = 64
    max_adapter_bytes: int = 1 << 30


def create_app(
    engine: Engine,
    *,
    model_name: str | None = None,
    adapter_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    max_batch: int = 32,
    kv_cache_mib: int = 2048,
    default_max_tokens: int = 256,
    max_prefill_tokens: int = 256,
    max_waiting: int = 256,
    max_request_tokens: int = 65536,
    max_adapters: int = 64,
    max_adapter_mib: int = 1024,
    allowed_hosts: Sequence[str] | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The server's ASGI application over ``engine`` and the adapters loaded on it.

    Args:
        engine: The base model (its adapters, added with
            :meth:`Engine.add_adapter`, are served by name).
        model_name: The base model's name in the API (default: the model
            folder's or file's name).
        adapter_dir: The folder ``POST /v1/adapters`` may load checkpoints
            from (nothing outside it); ``None`` turns run-time loading off.
        api_key: When given, every route but ``/health`` wants
            ``Authorization: Bearer <api_key>``. An empty key is refused
            (an unset variable must not open the server).
        max_batch, kv_cache_mib: Limits of the scheduler (see :class:`reft_rs.Scheduler`).
        max_prefill_tokens: Prompt tokens prefilled per step: small steps
            give the first requests their first token early and keep the
            running ones decoding while a crowd of prompts comes in.
        default_max_tokens: Reply length of chat requests that name none
            (completions default to 16, as OpenAI's do).
        max_waiting: Requests queued at most; more get 429 with ``Retry-After``.
        max_request_tokens: Most prompt tokens plus ``max_tokens`` per
            prompt that one request may ask for.
        max_adapters, max_adapter_mib: Most adapters loaded, and most
            checkpoint MiB loaded through ``POST /v1/adapters``.
        allowed_hosts: ``Host`` header names accepted while no key is set
            (default: ``localhost``, ``127.0.0.1`` and ``::1``); ``["*"]``
            accepts any, as a server bound to every address needs.
        on_failure: Called (on the generation thread) with the error if
            that thread dies; the command stops the server then, with a
            non-zero exit status.
    """
    if api_key is not None and not isinstance(api_key, str):
        raise InvalidArgumentError(f"api_key must be a string, found {type(api_key).__name__}")
    if api_key is not None and not api_key.strip():
        raise InvalidArgumentError(
            "api_key is empty: an unset variable would leave the server open; pass None to run without a key"
        )
    for label, value in (
        ("max_prefill_tokens", max_prefill_tokens),
        ("max_waiting", max_waiting),
        ("max_request_tokens", max_request_tokens),
        ("max_adapters", max_adapters),
        ("max_adapter_mib", max_adapter_mib),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (0 if label == "max_adapter_mib" else 1)
        ):
            raise InvalidArgumentError(f"{label} must be a positive integer, found {value!r}")
    name = model_name or Path(engine.model_path).name or "model"
    limits = Limits(
        max_batch=max_batch,
        kv_cache_mib=kv_cache_mib,
        max_prefill_tokens=max_prefill_tokens,
        max_waiting=max_waiting,
        max_request_tokens=max_request_tokens,
        max_adapters=max_adapters,
        max_adapter_bytes=max_adapter_mib << 20,
    )
    server = _Server(
        engine,
        name,
        None if adapter_dir is None else Path(adapter_dir),
        limits,
        default_max_tokens,
        on_failure,
    )

    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        headers = None if error.retry_after is None else {"Retry-After": str(error.retry_after)}
        return JSONResponse(_error_body(error), status_code=error.status, headers=headers)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        body = ApiError(error.status_code, str(error.detail)).body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    async def unexpected(request: Request, error: Exception) -> Response:
        _log.exception("unexpected error on %s", request.url.path, exc_info=error)
        body = ApiError(500, "internal server error (the server's log says why)").body()
        return JSONResponse(body, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            server.worker.close()

    app = Starlette(
        routes=[
            Route("/health", server.health, methods=["GET"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/v1/completions", server.completions, methods=["POST"]),
            Route("/v1/chat/completions", server.chat, methods=["POST"]),
            Route("/v1/adapters", server.list_adapters, methods=["GET"]),
            Route("/v1/adapters", server.add_adapter, methods=["POST"]),
            Route("/v1/adapters/{name:path}", server.remove_adapter, methods=["DELETE"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: unexpected},
        lifespan=lifespan,
    )
    app.state.server = server
    if api_key:
        app.add_middleware(_ApiKey, key=api_key)
    else:
        hosts = set(_LOOPBACK_NAMES if allowed_hosts is None else (h.lower() for h in allowed_hosts))
        if "*" not in hosts:
            app.add_middleware(_HostCheck, allowed=hosts)
    return app
