"""The OpenAI request fields the server takes, checked, and its error bodies.

Every bad field ends in an :class:`ApiError` with the status and the
``{"error": {"message", "type", "param", "code"}}`` body that OpenAI's API
returns, so OpenAI clients raise their usual exceptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..engine.sampling import SamplingParams
from ..errors import InvalidArgumentError

__all__ = ["ApiError", "Sampling", "parse_sampling", "parse_prompts", "parse_messages"]

#: Most stop strings per request (OpenAI's limit).
MAX_STOP = 4
#: Longest stop string, in characters.
MAX_STOP_CHARS = 256
#: Most prompts in one completion request.
MAX_PROMPTS = 64


class ApiError(Exception):
    """An error answered in OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.param = param
        self.code = code
        self.kind = kind or {
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            409: "conflict_error",
            429: "rate_limit_error",
        }.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


#: Edit strengths past this are refused (no steering is that strong).
MAX_STRENGTH = 1000.0


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Sampling:
    """The generation fields of a completion or chat request: the settings
    the engine runs (:class:`reft_rs.SamplingParams`) and how the reply is
    sent."""

    params: SamplingParams
    stream: bool = False
    include_usage: bool = False

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def stop(self) -> tuple[str, ...]:
        return self.params.stop  # type: ignore[return-value]


def _integer(body: dict[str, Any], name: str, minimum: int, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, found {value!r}", name)
    if not minimum <= value <= maximum:
        raise bad(f"{name} must lie in [{minimum}, {maximum}], found {value}", name)
    return value


def _number(body: dict[str, Any], name: str, minimum: float, maximum: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a number, found {value!r}", name)
    if not minimum <= value <= maximum:
        raise bad(f"{name} must lie in [{minimum}, {maximum}], found {value}", name)
    return float(value)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, found {value!r}", name)
    return value


def parse_sampling(body: dict[str, Any], *, default_max_tokens: int, chat: bool) -> Sampling:
    """The generation fields of ``body``; unsupported ones are refused by name."""
    n = _integer(body, "n", 1, 1 << 20)
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of is not supported", "best_of")
    if body.get("echo"):
        raise bad("echo is not supported", "echo")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") is not None:
        raise bad("logprobs are not supported", "logprobs")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if _number(body, penalty, -2.0, 2.0) not in (None, 0.0):
            raise bad(f"{penalty} is not supported (only 0)", penalty)
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias")
    if body.get("tools") or body.get("functions"):
        raise bad("tools are not supported", "tools")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = None
    for name in names:
        value = _integer(body, name, 0 if not chat else 1, 1 << 20)
        if value is not None and max_tokens is None:
            max_tokens = value
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise bad("top_p must be above 0", "top_p")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"at most {MAX_STOP} stop strings, found {len(stops)}", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"a stop string may hold at most {MAX_STOP_CHARS} characters", "stop")
    stops = [s for s in stops if s]
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("stream_options must be an object", "stream_options")
    stream = _flag(body, "stream")
    try:
        params = SamplingParams(
            max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=None if top_p in (None, 1.0) else top_p,
            top_k=_integer(body, "top_k", 1, 1 << 30),
            seed=None if body.get("seed") is None else _integer(body, "seed", 0, (1 << 63) - 1),
            stop=stops,
            intervene_on_generated=_flag(body, "intervene_on_generated"),
            ignore_eos=_flag(body, "ignore_eos"),
            strength=1.0
            if body.get("strength") is None
            else _number(body, "strength", -MAX_STRENGTH, MAX_STRENGTH),
        )
    except InvalidArgumentError as error:
        raise bad(str(error)) from None
    return Sampling(
        params,
        stream=stream,
        include_usage=bool(stream and stream_options and stream_options.get("include_usage")),
    )


def parse_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """The prompts of a completion request: a text, texts, token ids, or lists of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            prompts: list[str | list[int]] = list(prompt)
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [list(prompt)]
        elif all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise bad("prompt must be a string, a list of strings, or token ids", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise bad(f"at most {MAX_PROMPTS} prompts per request, found {len(prompts)}", "prompt")
        for p in prompts:
            if isinstance(p, list) and any(t < 0 or t >= 1 << 32 for t in p):
                raise bad("prompt holds a negative or too large token id", "prompt")
        return prompts
    raise bad("prompt is required: a string, a list of strings, or token ids", "prompt")


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The messages of a chat request, content flattened to text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a role", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            texts = []
            for part in content:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise bad(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be text", "messages")
        out.append({"role": message["role"], "content": content})
    return out
