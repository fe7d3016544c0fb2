"""``reft-rs serve`` under load, on 127.0.0.1: a few hundred concurrent
requests over three models, with cancellations, malformed requests and
stalled half-sent requests mixed in, against a key/value budget of 1 MiB.

Every well-formed request must get the reply the engine gives it alone,
every bad one a 4xx in OpenAI's error body, the reserved cache must never
pass the budget, and the server must still serve at the end. The mix is
drawn from a fixed seed; the whole test is bounded in count and time.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import socket
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import reft_rs  # noqa: E402
from reft_rs.serve import create_app  # noqa: E402
from reft_rs.serve.app import MAX_BODY_BYTES  # noqa: E402

from .test_engine import folders  # noqa: E402, F401
from .test_serve import CONTEXT, KEY, PROMPTS, raw, reference, running, setup  # noqa: E402, F401

REQUESTS = 300
CONCURRENCY = 16
BUDGET_MIB = 1
STALLED = 6
LIMIT_S = 300
MODELS = ("tiny", "loreft", "steer")


@pytest.fixture(scope="module")
def server(setup):  # noqa: F811
    engine = reft_rs.Engine(setup.model)
    engine.add_adapter("loreft", setup.adapters / "loreft")
    engine.add_adapter("steer", setup.adapters / "steer")
    app = create_app(engine, model_name="tiny", api_key=KEY, max_batch=8, kv_cache_mib=BUDGET_MIB)
    with running(app, log_level="error") as served:
        yield served


def send_raw(port: int, head: bytes, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    """Sends bytes as they are (what no client library would send) and reads one reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header, _, rest = data.partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in header.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return status, json.loads(rest[:length])


def request_head(length: int, path: str = "/v1/completions", auth: bool = True) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        "Connection: close",
    ]
    if auth:
        lines.append(f"Authorization: Bearer {KEY}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def malformed(rng: random.Random, port: int) -> tuple[str, int, dict]:
    """One bad request of a random kind: (kind, status, error body)."""
    kind = rng.choice(
        [
            "bad json",
            "invalid utf-8",
            "empty body",
            "not an object",
            "unknown model",
            "negative max_tokens",
            "huge max_tokens",
            "over the context",
            "body too large",
            "wrong types",
            "no key",
            "bad sampling",
        ]
    )
    good = {"model": rng.choice(MODELS), "prompt": rng.choice(PROMPTS), "max_tokens": 4}
    bodies = {
        "bad json": b'{"model": "tiny", "prompt": ',
        "invalid utf-8": b'{"model": "tiny", "prompt": "\xff\xfe"}',
        "empty body": b"",
        "not an object": b'["tiny", "hi"]',
        "unknown model": json.dumps({**good, "model": "no-such-model"}).encode(),
        "negative max_tokens": json.dumps({**good, "max_tokens": -rng.randint(1, 10**6)}).encode(),
        # Up to the context's end needs 4096 tokens of cache, past the 1 MiB budget.
        "huge max_tokens": json.dumps({**good, "max_tokens": rng.choice([10**6, 10**12, CONTEXT])}).encode(),
        "over the context": json.dumps({**good, "prompt": [5] * (CONTEXT + rng.randint(1, 100))}).encode(),
        "body too large": b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}',
        "wrong types": json.dumps({**good, "prompt": rng.choice([5, None, {"a": 1}, [[1], "x"]])}).encode(),
        "no key": json.dumps(good).encode(),
        "bad sampling": json.dumps({**good, rng.choice(["temperature", "top_p"]): -1}).encode(),
    }
    body = bodies[kind]
    status, reply = send_raw(port, request_head(len(body), auth=kind != "no key"), body)
    return kind, status, reply


def cancelled_stream(rng: random.Random, port: int) -> None:
    """A long streamed request whose client leaves after the first token."""
    body = json.dumps(
        {
            "model": rng.choice(MODELS),
            "prompt": rng.choice(PROMPTS),
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(request_head(len(body)) + body)
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the stream before a token"
            received += chunk


def test_hundreds_of_mixed_requests_with_bad_ones_cancellations_and_stalls(server, setup):  # noqa: F811
    rng = random.Random(0)
    api = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
    references = {model: reference(setup, None if model == "tiny" else model) for model in MODELS}
    budget = BUDGET_MIB << 20
    peak = {"reserved": 0}
    done = threading.Event()

    def watch_memory():
        while not done.is_set():
            peak["reserved"] = max(peak["reserved"], server.worker.scheduler.reserved_bytes)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()

    # Connections that send half a request and then stall for the whole run.
    stalled = []
    for _ in range(STALLED):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=LIMIT_S)
        body = json.dumps({"model": "tiny", "prompt": "the cat", "max_tokens": 4}).encode()
        sock.sendall(request_head(len(body)) + body[: len(body) // 2])
        stalled.append(sock)

    jobs = []
    for i in range(REQUESTS):
        draw = rng.random()
        if draw < 0.6:
            options = (
                {"temperature": 0}
                if rng.random() < 0.5
                else {"temperature": rng.choice([0.7, 1.0]), "seed": rng.randint(0, 3), "top_p": 0.9}
            )
            jobs.append(
                (
                    "good",
                    rng.choice(MODELS),
                    rng.choice(PROMPTS),
                    rng.choice([4, 8]),
                    options,
                    rng.random() < 0.3,
                )
            )
        elif draw < 0.7:
            jobs.append(("cancel", random.Random(i)))
        else:
            jobs.append(("bad", random.Random(i)))

    def run(job):
        if job[0] == "good":
            _, model, prompt, n, options, stream = job
            if stream:
                chunks = api.completions.create(
                    model=model, prompt=prompt, max_tokens=n, stream=True, **options
                )
                return "".join(c.choices[0].text for c in chunks)
            return api.completions.create(model=model, prompt=prompt, max_tokens=n, **options).choices[0].text
        if job[0] == "cancel":
            return cancelled_stream(job[1], server.port)
        return malformed(job[1], server.port)

    cancelled_before = server.worker.cancelled
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(run, jobs, timeout=LIMIT_S))
    assert time.monotonic() - started < LIMIT_S

    lone = {}
    for job, result in zip(jobs, results):
        if job[0] == "good":
            _, model, prompt, n, options, _ = job
            key = (model, prompt, n, json.dumps(options, sort_keys=True))
            if key not in lone:
                lone[key] = references[model].generate(prompt, n, **options)[0]
            assert result == lone[key], key
        elif job[0] == "bad":
            kind, status, reply = result
            assert 400 <= status < 500, (kind, status, reply)
            assert reply["error"]["message"], kind
    kinds = {result[0] for job, result in zip(jobs, results) if job[0] == "bad"}
    assert len(kinds) >= 10  # the mix really covered the bad kinds

    # Stalled clients give up; nothing they sent ran, and nothing is left behind.
    for sock in stalled:
        sock.close()
    deadline = time.monotonic() + 30
    while True:
        status, health = raw(server, "GET", "/health")
        if health["running"] == 0 and health["waiting"] == 0:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    done.set()
    watcher.join(5)
    cancels = sum(1 for job in jobs if job[0] == "cancel")
    assert server.worker.cancelled - cancelled_before == cancels
    assert 0 < peak["reserved"] <= budget, peak
    assert health["kv_cache_reserved_bytes"] == 0 and health["status"] == "ok"
    # Still serving, and still exact.
    reply = api.completions.create(model="loreft", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert reply.choices[0].text == references["loreft"].generate(PROMPTS[0], 6)[0]
    assert server.worker.alive
