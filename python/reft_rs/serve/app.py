"""The OpenAI-compatible HTTP application (Starlette, served by uvicorn).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending
with ``data: [DONE]``), and ``GET``/``POST /v1/adapters``,
``DELETE /v1/adapters/{name}`` to list, load and unload adapters at run
time. A request's ``model`` picks the base model (by its served name) or an
adapter (by its name). Requests of every model share one continuously
batched forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import Engine
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    IncompatibleModelError,
    InvalidArgumentError,
    ReftError,
    ReftMemoryError,
)
from ..scheduler import Event, Scheduler
from .protocol import ApiError, Sampling, bad, parse_messages, parse_prompts, parse_sampling
from .worker import Worker

__all__ = ["create_app"]

#: Largest request body read.
MAX_BODY_BYTES = 4 << 20


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string, and whether one was found."""
    ends = [text.find(s) for s in stops if s and s in text]
    return (text[: min(ends)], True) if ends else (text, False)


class _Text:
    """The text of a growing list of tokens, handed out in new pieces."""

    def __init__(self, engine: Engine, stops: list[str]) -> None:
        self.engine = engine
        self.stops = stops
        self.tokens: list[int] = []
        self.emitted = 0
        self.stopped = False

    def add(self, token: int | None, final: bool) -> str:
        if token is not None:
            self.tokens.append(token)
        text, self.stopped = _cut(self.engine.decode(self.tokens), self.stops)
        if text.endswith("\ufffd") and not (final or self.stopped):
            return ""  # a character still incomplete
        piece = text[self.emitted :]
        self.emitted = len(text)
        return piece

    def text(self) -> str:
        return _cut(self.engine.decode(self.tokens), self.stops)[0]


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
        max_batch: int,
        kv_cache_mib: int,
        default_max_tokens: int,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.adapter_dir = None if adapter_dir is None else adapter_dir.resolve()
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.adapters_created: dict[str, int] = {name: self.created for name in engine.adapters}
        self.worker = Worker(Scheduler(engine, max_batch=max_batch, kv_cache_mib=kv_cache_mib))

    # -------------------------------------------------------------- helpers

    async def body(self, request: Request) -> dict[str, Any]:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES >> 20} MiB")
        try:
            body = json.loads(bytes(raw).decode("utf-8"))
        except UnicodeDecodeError:
            raise bad("the request body is not UTF-8") from None
        except json.JSONDecodeError as error:
            raise bad(f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        return body

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

    def encode(self, prompt: str | list[int], special: bool) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        try:
            return self.engine.encode(prompt, add_special_tokens=special)
        except ReftError as error:
            raise bad(f"the prompt cannot be tokenized: {error}", "prompt") from None

    def submit(
        self, ids: list[int], sampling: Sampling, adapter: str | None, param: str
    ) -> tuple[int, asyncio.Queue[Event]]:
        context = self.engine.context_length
        if len(ids) > context:
            raise bad(
                f"the prompt has {len(ids)} tokens, more than the model's context of {context}",
                param,
                code="context_length_exceeded",
            )
        try:
            return self.worker.submit(ids, dict(sampling.options(), adapter=adapter))
        except ReftMemoryError as error:
            raise bad(str(error), "max_tokens", code="request_too_large") from None
        except InvalidArgumentError as error:
            if "no adapter named" in str(error):  # unloaded since adapter_for looked
                raise ApiError(404, str(error), param="model", code="model_not_found") from None
            raise bad(str(error)) from None

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
                    raise ApiError(500, f"generation failed: {event.error}", code="generation_failed")
                yield event
                if event.finish is not None:
                    return
        finally:
            self.worker.cancel(request_id)  # no-op once finished

    # -------------------------------------------------------------- routes

    async def health(self, request: Request) -> Response:
        if not self.worker.alive:
            return JSONResponse({"status": "error", "reason": repr(self.worker.failure)}, status_code=503)
        waiting, running, reserved = self.worker.scheduler._scheduler.load
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
        sampling = parse_sampling(body, default_max_tokens=16, chat=False)
        prompts = [self.encode(p, True) for p in parse_prompts(body)]
        return await self.respond(request, body["model"], prompts, sampling, adapter, chat=False)

    async def chat(self, request: Request) -> Response:
        body = await self.body(request)
        adapter = self.adapter_for(body)
        sampling = parse_sampling(body, default_max_tokens=self.default_max_tokens, chat=True)
        messages = parse_messages(body)
        if not self.engine.has_chat_template:
            raise bad("the model has no chat template; use /v1/completions", "messages")
        try:
            text = self.engine.apply_chat_template(messages, add_generation_prompt=True)
        except ReftError as error:
            raise bad(f"the chat template failed on these messages: {error}", "messages") from None
        prompt = self.encode(text, False)
        return await self.respond(request, body["model"], [prompt], sampling, adapter, chat=True)

    async def respond(
        self,
        request: Request,
        model: str,
        prompts: list[list[int]],
        sampling: Sampling,
        adapter: str | None,
        *,
        chat: bool,
    ) -> Response:
        if not prompts or any(not p for p in prompts):
            raise bad("the prompt has no tokens", "prompt")
        submitted = []
        try:
            for ids in prompts:
                submitted.append(self.submit(ids, sampling, adapter, "messages" if chat else "prompt"))
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
        text = _Text(self.engine, sampling.stop)
        finish = "length"
        async for event in self.events(request_id, queue, gone):
            if event.token is not None:
                text.tokens.append(event.token)
            if event.finish is not None:
                finish = "stop" if event.finish == "stop" else "length"
        return text.text(), finish, len(text.tokens)

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

        texts = [_Text(self.engine, sampling.stop) for _ in submitted]
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
                final = item.finish is not None
                piece = texts[index].add(item.token, final)
                if piece:
                    yield chunk(index, piece, None)
                if final:
                    yield chunk(index, None if chat else "", "stop" if item.finish == "stop" else "length")
            if sampling.include_usage:
                completion = sum(len(t.tokens) for t in texts)
                yield chunk(0, None, None, _usage(sum(map(len, prompts)), completion))
            yield "data: [DONE]\n\n"
        except ApiError as error:
            yield f"data: {json.dumps(error.body())}\n\n"
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
        if "\x00" in path:
            raise bad("path holds a NUL character", "path")
        target = (self.adapter_dir / path).resolve()
        if target != self.adapter_dir and self.adapter_dir not in target.parents:
            raise ApiError(403, f"the path {path!r} leaves the adapter folder", param="path")
        if not target.is_dir():
            raise ApiError(404, f"no checkpoint folder {path!r} in the adapter folder", param="path")
        try:
            await asyncio.to_thread(self.engine.add_adapter, name, target)
        except CheckpointNotFoundError as error:
            raise ApiError(404, f"no checkpoint at {path!r}: {error}", param="path") from None
        except (CheckpointError, IncompatibleModelError) as error:
            raise bad(f"the checkpoint {path!r} cannot be served on this model: {error}", "path") from None
        except InvalidArgumentError as error:
            status = 409 if "loaded already" in str(error) else 400
            raise ApiError(status, str(error), param="name") from None
        self.adapters_created[name] = int(time.time())
        return JSONResponse(self.model_card(name, self.model_name), status_code=201)

    async def remove_adapter(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.engine.adapters:
            raise ApiError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found")
        with contextlib.suppress(InvalidArgumentError):  # removed meanwhile
            self.engine.remove_adapter(name)
        self.adapters_created.pop(name, None)
        return JSONResponse({"id": name, "object": "model", "deleted": True})


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(
    engine: Engine,
    *,
    model_name: str | None = None,
    adapter_dir: str | os.PathLike[str] | None = None,
    api_key: str | None = None,
    max_batch: int = 32,
    kv_cache_mib: int = 2048,
    default_max_tokens: int = 256,
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
            ``Authorization: Bearer <api_key>``.
        max_batch, kv_cache_mib: Limits of the scheduler (see :class:`reft_rs.Scheduler`).
        default_max_tokens: Reply length of chat requests that name none
            (completions default to 16, as OpenAI's do).
    """
    name = model_name or Path(engine.model_path).name or "model"
    server = _Server(
        engine,
        name,
        None if adapter_dir is None else Path(adapter_dir),
        max_batch,
        kv_cache_mib,
        default_max_tokens,
    )

    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return JSONResponse(error.body(), status_code=error.status)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        body = ApiError(error.status_code, str(error.detail)).body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

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
        exception_handlers={ApiError: api_error, HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.server = server
    if api_key:
        app.add_middleware(_ApiKey, key=api_key)
    return app
