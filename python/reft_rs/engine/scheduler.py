"""Continuous batching over one :class:`~reft_rs.Engine`: :class:`Scheduler`.

Requests join a running batch at token boundaries and leave it when they
finish, each with its own adapter (or none), sampling settings and KV cache;
rows with different adapters share each forward pass. Needs no torch.

Example::

    engine = reft_rs.Engine("SmolLM2-135M-Instruct/")
    engine.add_adapter("style", "runs/style/checkpoint")
    scheduler = reft_rs.Scheduler(engine, max_batch=16)
    a = scheduler.submit(engine.encode("Hello"), max_new_tokens=20, adapter="style")
    b = scheduler.submit(engine.encode("Hello"), max_new_tokens=20)
    while scheduler.has_work:
        for event in scheduler.step():
            ...  # event.id, event.token, event.text, event.finish
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import _core
from ..errors import InvalidArgumentError
from .engine import Engine
from .sampling import SamplingParams, check_adapter, check_count, check_token_ids

__all__ = ["Event", "Scheduler"]


@dataclass(frozen=True)
class Event:
    """What happened to one request in one step.

    Attributes:
        id: The request, as :meth:`Scheduler.submit` numbered it.
        token: The token generated in this step, or ``None`` when the step
            ended the request without one (end of sequence, cancellation,
            error).
        finish: On the request's last event: ``"stop"`` (end-of-sequence
            token or stop string), ``"length"`` (``max_new_tokens`` or the
            model's context), ``"cancelled"`` or ``"error"``; else ``None``.
        error: The reason, when ``finish == "error"``.
        logits: The float32 logits the token was chosen from, when the
            request asked for them.
        text: The reply's text to hand out now: empty while a character is
            incomplete or could begin a stop string (and when the model has
            no tokenizer). Joined, a request's pieces are its reply, cut
            before the first stop string, the same text
            :meth:`Engine.generate` gives.
    """

    id: int
    token: int | None
    finish: str | None
    error: str | None = None
    logits: np.ndarray | None = None
    text: str = ""


class Scheduler:
    """Continuous batching of generation requests over ``engine``.

    Args:
        engine: The engine (its adapters are named by requests).
        max_batch: Most sequences in one forward pass.
        kv_cache_mib: Most key/value cache reserved at once, in MiB. A
            request reserves its whole cache (prompt plus ``max_new_tokens``)
            when admitted, so running requests never run out; requests that
            do not fit wait, and one larger than the whole budget is refused
            by :meth:`submit` with ``ReftMemoryError``.
        kv_cache_bytes: The same budget in bytes (overrides ``kv_cache_mib``).
        max_prefill_tokens: Most prompt tokens prefilled in one step, so
            long prompts do not stall the decoding of the others for long.
        max_waiting: Most requests waiting for a place; :meth:`submit`
            refuses more with ``BusyError``.

    Admission is fair between clients (``client=`` of :meth:`submit`): they
    take turns, a request that does not fit holds back only its own
    client's later ones, and one passed over for 64 steps holds back every
    admission until it fits.

    :meth:`submit` and :meth:`cancel` return at once, even while another
    thread is inside :meth:`step`; :meth:`step` releases the interpreter.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 32,
        kv_cache_mib: int = 2048,
        kv_cache_bytes: int | None = None,
        max_prefill_tokens: int = 2048,
        max_waiting: int = 4096,
    ) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a reft_rs.Engine, found {type(engine).__name__}")
        self.engine = engine
        self._scheduler = _core.Scheduler(
            engine.core,
            check_count("max_batch", max_batch, 1),
            (
                check_count("kv_cache_mib", kv_cache_mib, 1) << 20
                if kv_cache_bytes is None
                else check_count("kv_cache_bytes", kv_cache_bytes, 1)
            ),
            check_count("max_prefill_tokens", max_prefill_tokens, 1),
            check_count("max_waiting", max_waiting, 1),
        )

    def submit(
        self,
        prompt: Sequence[int] | np.ndarray,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        *,
        adapter: str | None = None,
        intervene_on_generated: bool = False,
        ignore_eos: bool = False,
        return_logits: bool = False,
        strength: float = 1.0,
        client: str | None = None,
        sampling: SamplingParams | None = None,
    ) -> int:
        """Queues a request for ``prompt`` (token ids); returns its id.

        The options are those of :meth:`Engine.generate`; ``adapter`` names a
        loaded adapter (``None``: the engine's own checkpoint, if any). Bad
        input is refused here, with nothing queued: an empty prompt, a token
        outside the vocabulary, a prompt longer than the model's context, an
        unknown adapter, bad sampling settings; ``BusyError`` when
        ``max_waiting`` requests wait already. ``strength`` scales the
        edits, h + α·(Φ(h) − h), this request alone. ``client`` names the
        sender (a user, an address) for fair admission. ``sampling`` gives
        the settings as one :class:`reft_rs.SamplingParams` instead.
        """
        if sampling is None:
            sampling = SamplingParams(
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                seed,
                stop,
                intervene_on_generated,
                ignore_eos,
                strength,
            )
        elif not isinstance(sampling, SamplingParams):
            raise InvalidArgumentError(f"sampling must be a SamplingParams, found {type(sampling).__name__}")
        elif (max_new_tokens, temperature, top_k, top_p, seed, stop, intervene_on_generated, ignore_eos, strength) != (
            64, 0.0, None, None, None, None, False, False, 1.0
        ):  # fmt: skip
            raise InvalidArgumentError(
                "give the sampling settings either as sampling= or one by one, not both"
            )
        if client is not None and not isinstance(client, str):
            raise TypeError(f"client must be a string or None, found {type(client).__name__}")
        return self._scheduler.submit(
            check_token_ids("prompt", prompt), sampling, check_adapter(adapter), bool(return_logits), client
        )

    def cancel(self, request_id: int) -> None:
        """Ends the request at the next step (its event says ``"cancelled"``)
        and frees its place; unknown or finished ids are ignored."""
        self._scheduler.cancel(check_count("request_id", request_id, 0))

    def step(self) -> list[Event]:
        """Admits what fits, runs one forward pass, and returns the events
        of every request it touched."""
        return [Event(*event) for event in self._scheduler.step()]

    def wait(self, timeout: float) -> bool:
        """Blocks until there is work or ``timeout`` seconds have passed;
        returns whether there is work."""
        return self._scheduler.wait(float(timeout))

    @property
    def has_work(self) -> bool:
        """Whether anything is submitted, waiting or running."""
        return self._scheduler.has_work

    @property
    def load(self) -> tuple[int, int, int]:
        """``(waiting, running, reserved_bytes)`` at once, without waiting
        for a step that is computing."""
        return self._scheduler.load

    @property
    def waiting(self) -> int:
        """Requests queued for a place (submitted since the last step included)."""
        return self._scheduler.load[0]

    @property
    def running(self) -> int:
        """Sequences in the batch (as of the last step)."""
        return self._scheduler.load[1]

    @property
    def reserved_bytes(self) -> int:
        """Key/value cache reserved by the running sequences."""
        return self._scheduler.load[2]

    @property
    def max_batch(self) -> int:
        return self._scheduler.limits[0]

    @property
    def kv_cache_bytes(self) -> int:
        return self._scheduler.limits[1]

    @property
    def max_waiting(self) -> int:
        return self._scheduler.limits[3]

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of key/value cache that a sequence of ``tokens`` tokens holds."""
        return self._scheduler.kv_bytes(check_count("tokens", tokens, 0))

    def run(self) -> dict[int, list[int]]:
        """Steps until nothing is left; returns each finished request's tokens."""
        out: dict[int, list[int]] = {}
        while self.has_work:
            for event in self.step():
                tokens = out.setdefault(event.id, [])
                if event.token is not None:
                    tokens.append(event.token)
        return out
