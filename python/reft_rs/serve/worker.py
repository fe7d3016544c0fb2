"""The thread that drives the :class:`~reft_rs.Scheduler` behind the server.

Request handlers run on the asyncio loop; the forward passes run on this
thread, with the interpreter released. A handler submits a request and gets
an :class:`asyncio.Queue` that receives the request's events as the steps
produce them; a handler that stops listening cancels its request, which
frees its place in the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence

from ..engine.engine import Engine
from ..engine.sampling import SamplingParams
from ..engine.scheduler import Event, Scheduler

__all__ = ["Worker", "WorkerStopped"]


class WorkerStopped(RuntimeError):
    """The generation thread is not running: nothing can be submitted."""


class Worker:
    """Steps ``scheduler`` on a background thread and routes its events.

    Args:
        scheduler: The scheduler (and through it the engine) to drive.
        on_failure: Called with the error, on this thread, if stepping
            fails; every waiting request gets an error event first.
    """

    def __init__(
        self, scheduler: Scheduler, on_failure: Callable[[BaseException], None] | None = None
    ) -> None:
        self.scheduler = scheduler
        self.on_failure = on_failure
        self.engine: Engine = scheduler.engine
        self._lock = threading.Lock()
        self._sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reft-rs-scheduler", daemon=True)
        self.steps = 0
        #: Requests cancelled before they finished (their clients went away).
        self.cancelled = 0
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Cancels what is running and stops the thread."""
        with self._lock:
            for request_id in list(self._sinks):
                self.scheduler.cancel(request_id)
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def submit(
        self, prompt: Sequence[int], sampling: SamplingParams, *, adapter: str | None, client: str | None
    ) -> tuple[int, asyncio.Queue[Event]]:
        """Queues one request (as :meth:`Scheduler.submit`); returns its id
        and the queue its events will arrive on. Raises what ``submit``
        raises for bad input."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        # Registered under the lock that routing takes, so no event of the
        # request can arrive before its queue exists.
        with self._lock:
            if self.failure is not None or not self._thread.is_alive():
                raise WorkerStopped("the generation thread stopped")
            request_id = self.scheduler.submit(prompt, sampling=sampling, adapter=adapter, client=client)
            self._sinks[request_id] = (loop, queue)
        return request_id, queue

    def cancel(self, request_id: int) -> None:
        """Stops a request; its remaining events are dropped."""
        with self._lock:
            if self._sinks.pop(request_id, None) is not None:
                self.scheduler.cancel(request_id)
                self.cancelled += 1

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.scheduler.wait(0.05):
                    continue
                events = self.scheduler.step()
                self.steps += 1
                with self._lock:
                    for event in events:
                        sink = (
                            self._sinks.pop(event.id, None)
                            if event.finish is not None
                            else self._sinks.get(event.id)
                        )
                        if sink is not None:
                            loop, queue = sink
                            try:
                                loop.call_soon_threadsafe(queue.put_nowait, event)
                            except RuntimeError:  # its loop has closed
                                self._sinks.pop(event.id, None)
                                self.scheduler.cancel(event.id)
        except BaseException as error:  # noqa: BLE001 - reported to every waiting request
            logging.getLogger("reft_rs.serve").critical("the generation thread stopped", exc_info=error)
            with self._lock:
                # Set under the lock: a submit after it sees the failure and
                # refuses, one before it has its sink answered here.
                self.failure = error
                for request_id, (loop, queue) in self._sinks.items():
                    event = Event(request_id, None, "error", f"the scheduler stopped: {error}")
                    with contextlib.suppress(RuntimeError):  # its loop has closed
                        loop.call_soon_threadsafe(queue.put_nowait, event)
                self._sinks.clear()
            if self.on_failure is not None:
                self.on_failure(error)
