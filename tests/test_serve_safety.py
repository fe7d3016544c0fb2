"""``reft-rs serve`` left running: hostile pages, floods, slow steps, a dead
generation thread and hostile bodies, each tried against a real server on
127.0.0.1 with the real ``openai`` client or raw HTTP.

Every server here binds 127.0.0.1 only, every loop is bounded in count and
time, and every server is stopped at the end of its test.
"""

# ruff: noqa: F811  (pytest fixtures imported from test_serve)
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import reft_rs  # noqa: E402
from reft_rs.serve import create_app  # noqa: E402

from .test_engine import folders  # noqa: E402, F401
from .test_serve import CONTEXT, KEY, PROMPTS, reference, running, setup  # noqa: E402, F401


def send(port, method, path, body=None, headers=None, timeout=30):
    """One raw HTTP request, headers exactly as given: (status, headers, parsed body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = data.decode("utf-8", "replace")
    return response.status, dict(response.getheaders()), parsed


JSON = {"Content-Type": "application/json"}
SMALL = {"model": "tiny", "prompt": "the cat", "max_tokens": 2, "temperature": 0}


def test_an_empty_key_is_refused_not_taken_for_no_key(setup, monkeypatch):
    engine = reft_rs.Engine(setup.model)
    for key in ("", "   "):
        with pytest.raises(reft_rs.InvalidArgumentError, match="empty"):
            create_app(engine, api_key=key)
    base = [sys.executable, "-m", "reft_rs", "serve", "--model", str(setup.model), "--port", "0"]
    for extra, environment in (
        (["--api-key", ""], {}),  # --api-key "$KEY" with KEY unset
        ([], {"REFT_RS_API_KEY": ""}),
    ):
        done = subprocess.run(
            base + extra, capture_output=True, text=True, timeout=60, env={**os.environ, **environment}
        )
        assert done.returncode == 2 and "--api-key is empty" in done.stderr, done.stderr


def test_a_web_page_cannot_drive_a_server_without_a_key(setup):
    app = create_app(reft_rs.Engine(setup.model), model_name="tiny")
    with running(app) as server:
        # What a page's plain form or fetch without preflight sends.
        status, _, reply = send(server.port, "POST", "/v1/completions", SMALL, {"Content-Type": "text/plain"})
        assert status == 415 and reply["error"]["code"] == "unsupported_media_type"
        status, _, reply = send(server.port, "POST", "/v1/completions", SMALL, {})
        assert status == 415
        # DNS rebinding: the page's own name reaches 127.0.0.1.
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80"):
            status, _, reply = send(server.port, "POST", "/v1/completions", SMALL, {**JSON, "Host": host})
            assert status == 403 and reply["error"]["code"] == "host_not_allowed", host
            status, _, _ = send(server.port, "GET", "/v1/models", None, {"Host": host})
            assert status == 403
        for host in ("127.0.0.1", f"127.0.0.1:{server.port}", "localhost:9", "[::1]:8000", "LOCALHOST"):
            status, _, reply = send(server.port, "POST", "/v1/completions", SMALL, {**JSON, "Host": host})
            assert status == 200 and reply["usage"]["completion_tokens"] == 2, host
        # The real client sends what the server wants.
        api = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=30)
        assert api.completions.create(**SMALL).usage.completion_tokens == 2
    # With a key, the key is the guard and any Host is served.
    app = create_app(reft_rs.Engine(setup.model), model_name="tiny", api_key=KEY)
    with running(app) as server:
        headers = {**JSON, "Host": "api.example", "Authorization": f"Bearer {KEY}"}
        status, _, _ = send(server.port, "POST", "/v1/completions", SMALL, headers)
        assert status == 200
        status, _, _ = send(server.port, "POST", "/v1/completions", SMALL, {**JSON, "Host": "api.example"})
        assert status == 401


def test_the_command_warns_when_it_listens_beyond_this_machine_and_bounds_connections(setup):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "reft_rs", "serve", "--model", str(setup.model), "--port", str(port)]
    process = subprocess.Popen(
        command + ["--host", "0.0.0.0", "--log-level", "critical", "--max-connections", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _, _ = send(port, "GET", "/health")
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        assert status == 200
        # Two connections held open (headers half sent): a third is refused.
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for sock in held:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.5)
        status, _, _ = send(port, "GET", "/health")
        assert status == 503
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while send(port, "GET", "/health")[0] != 200:
            assert time.monotonic() < deadline, "the held connections were never let go"
            time.sleep(0.1)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=20)
    assert "reachable from other machines and no API key is set" in err


def test_a_flood_is_bounded_and_another_client_is_still_served(setup):
    """One client sends 300 long requests at once; it gets 429s with
    Retry-After once it holds half the queue, and another client's short
    requests, sent meanwhile, are all served, each within a bounded time."""
    app = create_app(reft_rs.Engine(setup.model), model_name="tiny", api_key=KEY, max_batch=4, max_waiting=16)
    flood = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 200, "ignore_eos": True, "user": "a"}
    headers = {**JSON, "Authorization": f"Bearer {KEY}"}
    with running(app) as server:
        statuses: list[int] = []
        retry: set[str] = set()
        stop = threading.Event()

        def flooder(count: int) -> None:
            for _ in range(count):
                if stop.is_set():
                    return
                status, head, _ = send(server.port, "POST", "/v1/completions", flood, headers, timeout=120)
                statuses.append(status)
                if status == 429:
                    retry.add(head.get("retry-after", ""))

        pool = concurrent.futures.ThreadPoolExecutor(30)
        floods = [pool.submit(flooder, 10) for _ in range(30)]
        deadline = time.monotonic() + 30
        while sum(s == 429 for s in statuses) < 20:
            assert time.monotonic() < deadline, "the flood was never refused"
            time.sleep(0.05)
        api = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
        waits = []
        for prompt in PROMPTS * 2:
            started = time.monotonic()
            reply = api.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, user="b")
            waits.append(time.monotonic() - started)
            assert reply.choices[0].text == reference(setup, None).generate(prompt, 3)[0]
        stop.set()
        for future in floods:
            future.result(timeout=300)
        pool.shutdown()
        assert retry == {"1"}
        assert set(statuses) <= {200, 429} and 200 in statuses
        # A short request waits for a place in a batch of 4 (one long
        # request finishing, at most 200 steps of a tiny model), then runs.
        assert max(waits) < 20, waits
        status, _, health = send(server.port, "GET", "/health")
        assert status == 200 and health["waiting"] <= 16


def test_one_request_may_not_ask_for_everything(setup):
    app = create_app(reft_rs.Engine(setup.model), model_name="tiny", max_request_tokens=1000)
    with running(app) as server:
        api = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as caught:
            api.completions.create(model="tiny", prompt=["the cat"] * 10, max_tokens=100)
        assert caught.value.code == "request_too_large"
        assert api.completions.create(model="tiny", prompt=["the cat"] * 10, max_tokens=90).usage


def test_health_answers_at_once_during_a_long_prefill(setup):
    app = create_app(reft_rs.Engine(setup.model), model_name="tiny", max_batch=8)
    with running(app) as server:
        prompts = [[5 + i] * (CONTEXT - 100) for i in range(4)]  # one long prefill per step
        body = {"model": "tiny", "prompt": prompts, "max_tokens": 1}
        done = concurrent.futures.ThreadPoolExecutor(1).submit(
            send, server.port, "POST", "/v1/completions", body, JSON, 120
        )
        timings = []  # (sent, answered, steps before, steps after)
        deadline = time.monotonic() + 120
        while not done.done():
            assert time.monotonic() < deadline
            steps = server.worker.steps
            sent = time.monotonic()
            status, _, health = send(server.port, "GET", "/health")
            timings.append((sent, time.monotonic(), steps, server.worker.steps))
            assert status == 200 and health["status"] == "ok"
            time.sleep(0.005)
        assert done.result(timeout=120)[0] == 200
    # The steps took long (a prefill of ~4,000 tokens each, ~0.35 s here);
    # /health answered throughout, each call at once.
    assert len(timings) >= 10 and timings[-1][3] - timings[0][2] >= 2
    slowest = max(b - a for a, b, _, _ in timings)
    assert slowest < 0.15, slowest


def test_a_dead_generation_thread_fails_requests_and_stops_the_command(setup):
    failures = []
    app = create_app(reft_rs.Engine(setup.model), model_name="tiny", on_failure=failures.append)
    with running(app) as server:
        api = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=30)
        assert api.completions.create(**SMALL).usage.completion_tokens == 2

        def broken() -> list:
            raise RuntimeError("/secret/path/to/model: the device fell over")

        server.worker.scheduler.step = broken
        with pytest.raises(openai.InternalServerError) as caught:  # the request in flight
            api.completions.create(**SMALL)
        assert caught.value.status_code == 503
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError) as caught:  # and every later one, at once
            api.completions.create(**SMALL)
        assert caught.value.status_code == 503
        status, _, health = send(server.port, "GET", "/health")
        assert status == 503 and "secret" not in json.dumps(health) and "fell" not in json.dumps(health)
        assert isinstance(failures[0], RuntimeError)
    # The command exits non-zero, so a supervisor restarts it.
    code = f"""
import sys, threading, time, urllib.request, json
import reft_rs.engine.scheduler
def broken(self):
    raise RuntimeError("the device fell over")
reft_rs.engine.scheduler.Scheduler.step = broken
from reft_rs.cli import main
def poke():
    for _ in range(600):
        try:
            request = urllib.request.Request("http://127.0.0.1:{{port}}/v1/completions",
                json.dumps({{"model": "model", "prompt": "hi", "max_tokens": 2}}).encode(),
                {{"Content-Type": "application/json"}})
            urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
threading.Thread(target=poke, daemon=True).start()
sys.exit(main(["serve", "--model", {str(setup.model)!r}, "--port", "{{port}}", "--log-level", "critical"]))
"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", code.replace("{port}", str(port))], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert "the generation thread failed" in done.stderr


def test_hostile_bodies_get_400s_in_openai_bodies(setup, tmp_path):
    app = create_app(reft_rs.Engine(setup.model), model_name="tiny", adapter_dir=setup.adapters)
    with running(app) as server:
        for raw_body, what in (
            (b'{"model": "tiny", "prompt": "\\ud800 cat", "max_tokens": 2}', "surrogate in prompt"),
            (
                b'{"model": "tiny", "prompt": "cat", "stop": ["\\udfff"], "max_tokens": 2}',
                "surrogate in stop",
            ),
            (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}', "surrogate in chat"),
            (b"[" * 100000 + b"]" * 100000, "deep nesting"),
            (b'{"a": ' * 50000 + b"1" + b"}" * 50000, "deep objects"),
        ):
            status, _, reply = send(server.port, "POST", "/v1/completions", raw_body, JSON)
            assert status == 400, what
            assert reply["error"]["type"] == "invalid_request_error", what
        status, _, _ = send(server.port, "POST", "/v1/chat/completions", b'{"x": "\\ud800"}', JSON)
        assert status == 400
        # A checkpoint that cannot load: the error names it, not the server's folders.
        broken = setup.adapters / "broken"
        broken.mkdir(exist_ok=True)
        (broken / "config.json").write_text("{not json")
        try:
            status, _, reply = send(
                server.port, "POST", "/v1/adapters", {"name": "b", "path": "broken"}, JSON
            )
        finally:
            shutil.rmtree(broken)
        assert status in (400, 404)
        assert str(setup.root) not in reply["error"]["message"] and "broken" in reply["error"]["message"]
        assert "/tmp" not in reply["error"]["message"]
    # A model without a tokenizer: a 400, not a 500.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (setup.model / name).exists():
            shutil.copy(setup.model / name, bare / name)
    with running(create_app(reft_rs.Engine(bare), model_name="bare")) as server:
        # Replies are text: without a tokenizer there is none to give.
        for extra in ({"stop": ["x"]}, {}):
            body = {"model": "bare", "prompt": [1, 2, 3], "max_tokens": 2, **extra}
            status, _, reply = send(server.port, "POST", "/v1/completions", body, JSON)
            assert status == 400 and "tokenizer" in reply["error"]["message"]


def test_adapters_loaded_at_run_time_are_bounded_in_number_and_size(setup):
    engine = reft_rs.Engine(setup.model)
    engine.add_adapter("loreft", setup.adapters / "loreft")
    app = create_app(engine, model_name="tiny", adapter_dir=setup.adapters, max_adapters=3, max_adapter_mib=1)
    size = sum(f.stat().st_size for f in (setup.adapters / "steer").iterdir() if f.is_file())
    copies = (1 << 20) // size  # how many copies of "steer" fit in 1 MiB
    with running(app) as server:
        status, _, reply = send(server.port, "POST", "/v1/adapters", {"name": "s1", "path": "steer"}, JSON)
        assert status == 201, reply
        status, _, reply = send(server.port, "POST", "/v1/adapters", {"name": "s2", "path": "steer"}, JSON)
        assert status == (201 if copies >= 2 else 409), reply
        status, _, reply = send(server.port, "POST", "/v1/adapters", {"name": "s3", "path": "steer"}, JSON)
        assert status == 409 and reply["error"]["code"] == "adapter_limit"  # 3 loaded, or 1 MiB
        assert "s3" not in engine.adapters
    app = create_app(
        reft_rs.Engine(setup.model), model_name="tiny", adapter_dir=setup.adapters, max_adapter_mib=0
    )
    with running(app) as server:
        status, _, reply = send(server.port, "POST", "/v1/adapters", {"name": "s", "path": "steer"}, JSON)
        assert status == 409 and "MiB" in reply["error"]["message"]


def test_a_stream_never_sends_part_of_a_stop_string_and_the_server_never_decodes(setup):
    engine = reft_rs.Engine(setup.model)
    prompt = PROMPTS[1]
    text = reference(setup, None).generate(prompt, 40, ignore_eos=True)[0]
    stop = text[10:16]
    expected = text[: text.find(stop)]
    assert len(stop) == 6 and len(expected) >= 4
    decoded = []
    original = engine.decode

    def counting(ids):
        decoded.append(len(ids))
        return original(ids)

    engine.decode = counting
    app = create_app(engine, model_name="tiny")
    with running(app) as server:
        api = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=60)
        options = dict(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
        )
        whole = api.completions.create(**options, stop=[stop])
        assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
        pieces = [c.choices[0].text for c in api.completions.create(**options, stop=[stop], stream=True)]
        assert "".join(pieces) == expected  # nothing of the stop string went out first
        long = dict(options, max_tokens=CONTEXT // 4)
        chunks = list(api.completions.create(**long, stream=True))
        assert (
            "".join(c.choices[0].text for c in chunks)
            == reference(setup, None).generate(prompt, CONTEXT // 4, ignore_eos=True)[0]
        )
        # The text comes with the scheduler's events (decoded in Rust, a few
        # tokens per token): the server itself decodes nothing.
        assert decoded == []
