"""``reft-rs serve`` through the real ``openai`` client (and raw HTTP for
what a client library will not send), on 127.0.0.1.

The server runs in this process on a tiny random Llama with a 4096-token
context; the reference for every reply is a separate engine loaded with the
same checkpoint (or none), run one request at a time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import reft_rs  # noqa: E402
from reft_rs import ReftConfig  # noqa: E402
from reft_rs.serve import create_app  # noqa: E402

from .test_engine import checkpoint_for, folders, intervention  # noqa: E402, F401
from .tiny_models import config_for, tokenizer  # noqa: E402

KEY = "test-key"
CONTEXT = 4096
PROMPTS = ["the cat sat on the mat", "what colour is the sky", "one two three"]


@pytest.fixture(scope="module")
def setup(folders, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("serve")
    config = config_for("llama")
    config.max_position_embeddings = CONTEXT
    config.initializer_range = 0.2
    import torch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    adapters = root / "adapters"
    checkpoint_for(
        folders,
        "llama",
        ReftConfig([intervention("loreft", "block_output", positions="f2+l2")]),
        adapters / "loreft",
    )
    checkpoint_for(
        folders,
        "llama",
        ReftConfig([intervention("steer", "block_output", layer=2)]),
        adapters / "steer",
        seed=1,
    )
    checkpoint_for(
        folders,
        "llama",
        ReftConfig([intervention("red", "mlp_output", layer=0)]),
        adapters / "nested" / "red",
        seed=2,
    )
    (root / "outside").mkdir()
    checkpoint_for(
        folders, "llama", ReftConfig([intervention("red", "mlp_output")]), root / "outside" / "red", seed=3
    )
    os.symlink(root / "outside", adapters / "link")
    (adapters / "empty").mkdir()
    return SimpleNamespace(root=root, model=root / "model", adapters=adapters)


@contextlib.contextmanager
def running(app, **config) -> Iterator[SimpleNamespace]:
    """``app`` served on 127.0.0.1 (a free port) for the ``with`` block, in
    a thread; stopped after it (``config``: more of uvicorn's settings)."""
    settings = {"log_level": "critical", **config}
    served = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **settings))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not served.started:
        assert time.monotonic() < deadline, "the server did not start"
        assert thread.is_alive(), "the server thread died"
        time.sleep(0.02)
    port = served.servers[0].sockets[0].getsockname()[1]
    try:
        yield SimpleNamespace(
            port=port, url=f"http://127.0.0.1:{port}/v1", app=app, worker=app.state.server.worker
        )
    finally:
        served.should_exit = True
        thread.join(15)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(setup):
    engine = reft_rs.Engine(setup.model)
    engine.add_adapter("loreft", setup.adapters / "loreft")
    engine.add_adapter("steer", setup.adapters / "steer")
    app = create_app(
        engine, model_name="tiny", adapter_dir=setup.adapters, api_key=KEY, max_batch=8, default_max_tokens=24
    )
    with running(app, log_level="warning", lifespan="on") as served:
        served.engine = engine
        yield served


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=60)


def reference(setup, name):
    """An engine loaded with the checkpoint alone (the one-by-one reference)."""
    return reft_rs.Engine(setup.model, reft=None if name is None else setup.adapters / name)


def raw(server, method, path, body=None, headers=None, timeout=30):
    """One HTTP request with the standard library's client: (status, parsed JSON or text)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data.decode("utf-8", "replace")


def test_models_lists_the_base_model_and_each_adapter_with_its_parent(server):
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {"tiny", "loreft", "steer"}
    assert models["loreft"].parent == "tiny" and models["steer"].root == "tiny"
    assert models["tiny"].parent is None


@pytest.mark.parametrize("model", ["tiny", "loreft", "steer"])
def test_completions_equal_the_engine_alone(server, setup, model):
    name = None if model == "tiny" else model
    want_ids = reference(setup, name).generate_ids([server.engine.encode(PROMPTS[0])], 12)[0]
    reply = client(server).completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert reply.choices[0].text == server.engine.decode(want_ids)
    assert reply.choices[0].finish_reason == ("length" if len(want_ids) == 12 else "stop")
    assert reply.usage.prompt_tokens == len(server.engine.encode(PROMPTS[0]))
    assert reply.usage.completion_tokens == len(want_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(want_ids)
    assert reply.object == "text_completion" and reply.model == model


def test_several_prompts_in_one_completion_request(server, setup):
    reply = client(server).completions.create(model="steer", prompt=PROMPTS, max_tokens=6, temperature=0)
    want = reference(setup, "steer").generate(PROMPTS, 6)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == want


def test_chat_uses_the_chat_template(server, setup):
    messages = [{"role": "user", "content": "what colour is the sky"}]
    reply = client(server).chat.completions.create(
        model="loreft", messages=messages, max_tokens=10, temperature=0
    )
    assert reply.choices[0].message.content == reference(setup, "loreft").chat(messages, max_new_tokens=10)
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    prompt = server.engine.encode(server.engine.apply_chat_template(messages), add_special_tokens=False)
    assert reply.usage.prompt_tokens == len(prompt)


def test_streams_join_to_the_whole_reply(server, setup):
    api = client(server)
    whole = api.completions.create(model="steer", prompt=PROMPTS[1], max_tokens=15, temperature=0).choices[0]
    chunks = list(
        api.completions.create(model="steer", prompt=PROMPTS[1], max_tokens=15, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "hello world"}]
    chat = api.chat.completions.create(model="loreft", messages=messages, max_tokens=9, temperature=0)
    stream = api.chat.completions.create(
        model="loreft",
        messages=messages,
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [chat.choices[0].finish_reason]


def test_a_stream_of_several_prompts_names_each_choice(server, setup):
    api = client(server)
    chunks = list(
        api.completions.create(
            model="steer",
            prompt=PROMPTS,
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    want = reference(setup, "steer").generate(PROMPTS, 7)
    got = [
        "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)
    ]
    assert got == want
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1, 2]
    ids = [server.engine.encode(p) for p in PROMPTS]
    assert chunks[-1].usage.prompt_tokens == sum(map(len, ids))
    assert chunks[-1].usage.completion_tokens == sum(
        len(t) for t in reft_rs.Engine(setup.model, reft=setup.adapters / "steer").generate_ids(ids, 7)
    )


def test_the_stream_ends_with_done(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0, "stream": True}
    connection.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_concurrent_requests_of_every_model_equal_their_lone_runs(server, setup):
    api = client(server)
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        for model in ("tiny", "loreft", "steer"):
            sampled = (i + len(model)) % 2 == 0
            jobs.append(
                (
                    model,
                    prompt,
                    10 + i,
                    dict(temperature=1.0, seed=100 + i) if sampled else {"temperature": 0},
                )
            )

    def ask(job):
        model, prompt, n, options = job
        if model == "steer" and n == 11:  # one of them streamed
            chunks = api.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True, **options)
            return "".join(c.choices[0].text for c in chunks)
        return api.completions.create(model=model, prompt=prompt, max_tokens=n, **options).choices[0].text

    steps_before = server.worker.steps
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    for (model, prompt, n, options), text in zip(jobs, got):
        engine = reference(setup, None if model == "tiny" else model)
        assert text == engine.generate(prompt, n, **options)[0], (model, prompt, options)
    # Batched: far fewer steps than the requests' tokens one by one.
    assert server.worker.steps - steps_before < sum(n for _, _, n, _ in jobs)


def test_adapters_load_and_unload_at_run_time(server, setup):
    api = client(server)
    status, card = raw(server, "POST", "/v1/adapters", {"name": "red", "path": "nested/red"})
    assert status == 201 and card["id"] == "red" and card["parent"] == "tiny"
    assert "red" in {m.id for m in api.models.list().data}
    want = reference(setup, "nested/red").generate(PROMPTS[0], 8)[0]
    assert (
        api.completions.create(model="red", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
        == want
    )
    status, body = raw(server, "POST", "/v1/adapters", {"name": "red", "path": "steer"})
    assert status == 409 and body["error"]["param"] == "name"
    status, body = raw(server, "DELETE", "/v1/adapters/red")
    assert status == 200 and body["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="red", prompt=PROMPTS[0], max_tokens=2)
    status, body = raw(server, "DELETE", "/v1/adapters/red")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    # Nothing outside the adapter folder, whatever the path says.
    for path in (
        "../outside/red",
        str(setup.root / "outside" / "red"),
        "link/red",
        "nested/../../outside/red",
    ):
        status, body = raw(server, "POST", "/v1/adapters", {"name": "escape", "path": path})
        assert status == 403, (path, body)
        assert "leaves the adapter folder" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/adapters", {"name": "missing", "path": "nope"})
    assert status == 404
    status, body = raw(server, "POST", "/v1/adapters", {"name": "empty", "path": "empty"})
    assert status == 404 and "no checkpoint" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/adapters", {"name": "tiny", "path": "steer"})
    assert status == 409
    status, body = raw(server, "POST", "/v1/adapters", {"name": "bad name", "path": "steer"})
    assert status == 400 and "adapter name" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/adapters", {"name": "x"})
    assert status == 400
    assert {m.id for m in api.models.list().data} == {"tiny", "loreft", "steer"}


def test_errors_use_openai_bodies_and_statuses_and_the_server_keeps_serving(server):
    api = client(server)
    with pytest.raises(openai.NotFoundError) as caught:
        api.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert caught.value.code == "model_not_found"
    for options in (
        dict(temperature=5),
        dict(max_tokens=-1),
        dict(top_p=0),
        dict(n=2),
        dict(stop=["a", "b", "c", "d", "e"]),
        dict(extra_body={"top_k": 0}),
        dict(extra_body={"logprobs": 3}),
        dict(extra_body={"seed": -4}),
    ):
        with pytest.raises(openai.BadRequestError):
            api.completions.create(model="tiny", prompt="hi", **{"max_tokens": 2, **options})
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model="tiny", prompt=[5] * (CONTEXT + 1), max_tokens=2)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model="tiny", prompt=[[1, 2], "x"], max_tokens=2)
    for body in (b"{not json", b"\xff\xfe{}", b"[1, 2]", b""):
        status, reply = raw(server, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
        assert status == 400, body
        assert reply["error"]["type"] == "invalid_request_error"
    status, reply = raw(server, "POST", "/v1/completions", {"prompt": "hi"})
    assert status == 400 and reply["error"]["param"] == "model"
    status, reply = raw(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in reply
    status, reply = raw(server, "GET", "/v1/completions")
    assert status == 405 and "error" in reply
    # Keys.
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    status, reply = raw(server, "GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    status, reply = raw(server, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and reply["status"] == "ok"
    # Still serving, and serving right: the engine's own greedy reply.
    reply = api.completions.create(
        model="tiny", prompt="hi", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].text == server.engine.generate("hi", 3, ignore_eos=True)[0]
    assert server.worker.alive


def _wait_idle(server, deadline):
    while time.monotonic() < deadline:
        status, health = raw(server, "GET", "/health")
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.02)
    raise AssertionError("requests still running after the client left")


def test_a_client_that_disconnects_cancels_its_request(server):
    long = CONTEXT - 16  # far more tokens than the test waits for
    for stream in (True, False):
        before = server.worker.cancelled
        steps = server.worker.steps
        body = json.dumps(
            {"model": "loreft", "prompt": "the cat", "max_tokens": long, "ignore_eos": True, "stream": stream}
        ).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        if stream:
            received = b""
            while b"data: " not in received:  # the first token has come
                chunk = sock.recv(65536)
                assert chunk, "the server closed the stream"
                received += chunk
        else:
            deadline = time.monotonic() + 10
            while server.worker.steps == steps:  # it has started
                assert time.monotonic() < deadline
                time.sleep(0.005)
        sock.close()
        _wait_idle(server, time.monotonic() + 10)
        assert server.worker.cancelled == before + 1
        assert server.worker.steps - steps < long // 2


def test_the_command_serves_and_refuses_bad_arguments(setup, tmp_path):
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "reft_rs", "serve", "--model", str(setup.model), "--port", str(port)]
    command += ["--adapter", f"style={setup.adapters / 'steer'}", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = {m.id for m in api.models.list().data}
                break
            except openai.APIConnectionError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        assert models == {"model", "style"}
        reply = api.completions.create(model="style", prompt=PROMPTS[0], max_tokens=5, temperature=0)
        assert reply.choices[0].text == reference(setup, "steer").generate(PROMPTS[0], 5)[0]
    finally:
        process.terminate()
        process.wait(20)
    for bad, message in (
        (["--adapter", "nameonly"], "NAME=CHECKPOINT"),
        (["--adapter", f"model={setup.adapters / 'steer'}"], "base model"),
        (["--max-batch", "0"], "max-batch"),
        (["--adapter-dir", str(tmp_path / "none")], "not a folder"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "reft_rs", "serve", "--model", str(setup.model), *bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_server_runs_without_torch(setup):
    import subprocess
    import sys

    code = f"""
import json, sys, threading, time, urllib.request
sys.modules["torch"] = None          # any `import torch` now fails
sys.modules["transformers"] = None
import uvicorn
import reft_rs
from reft_rs.serve import create_app
engine = reft_rs.Engine({str(setup.model)!r})
engine.add_adapter("steer", {str(setup.adapters / "steer")!r})
served = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
threading.Thread(target=served.run, daemon=True).start()
deadline = time.monotonic() + 30
while not served.started and time.monotonic() < deadline:
    time.sleep(0.02)
port = served.servers[0].sockets[0].getsockname()[1]
body = json.dumps({{"model": "steer", "prompt": "the cat", "max_tokens": 4, "temperature": 0}}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{{port}}/v1/completions", body, {{"Content-Type": "application/json"}})
reply = json.load(urllib.request.urlopen(request, timeout=30))
print(reply["usage"]["completion_tokens"] == len(engine.generate_ids([engine.encode("the cat")], 4, adapter="steer")[0]), reply["choices"][0]["text"] == engine.generate("the cat", 4, adapter="steer")[0])
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
served.should_exit = True
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True True"


def test_the_strength_field_scales_a_request_edits(server, setup):
    """``strength`` (a reft_rs field, sent with the client's extra_body): the
    reply equals the engine's at that strength; 0 is the base model."""
    prompt = PROMPTS[0]
    alone = reference(setup, "steer")
    base = reference(setup, None)
    for strength in (0.0, -2.0, 3.0):
        reply = client(server).completions.create(
            model="steer",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            extra_body={"strength": strength, "ignore_eos": True},
        )
        want = alone.generate(prompt, 10, strength=strength, ignore_eos=True)[0]
        assert reply.choices[0].text == want, strength
        if strength == 0.0:
            assert want == base.generate(prompt, 10, ignore_eos=True)[0]
    assert (
        alone.generate(prompt, 10, strength=3.0, ignore_eos=True)[0]
        != base.generate(prompt, 10, ignore_eos=True)[0]
    )
    for bad in ("strong", 1e9, None, True):
        status, body = raw(
            server,
            "POST",
            "/v1/completions",
            {"model": "steer", "prompt": prompt, "max_tokens": 2, "strength": bad},
        )
        if bad is None:
            assert status == 200
        else:
            assert status == 400 and body["error"]["param"] == "strength", (bad, body)


def test_control_vectors_load_at_run_time_and_steer_only_their_requests(server, setup, tmp_path):
    """llama.cpp control-vector files (written as repeng writes them) served
    as adapters: requests with vector a, vector b and none share batches,
    and each gets what an engine loaded with that vector alone gives."""
    import numpy as np

    pytest.importorskip("gguf")
    from reft_rs.io import control_vector

    from .test_steering import write_repeng_style

    hidden = server.engine.hidden_size
    rng = np.random.default_rng(7)
    folder = setup.adapters / "vectors"
    folder.mkdir(exist_ok=True)
    vectors = {
        "a": {1: 4 * rng.normal(size=hidden), 2: 4 * rng.normal(size=hidden)},
        "b": {1: 4 * rng.normal(size=hidden)},
    }
    for name, directions in vectors.items():
        write_repeng_style(folder / f"{name}.gguf", directions)
    for name in vectors:
        status, reply = raw(
            server, "POST", "/v1/adapters", {"name": f"cv-{name}", "path": f"vectors/{name}.gguf"}
        )
        assert status == 201 and reply["parent"] == "tiny", reply
    try:
        alone = {None: reference(setup, None)}
        for name in vectors:
            control_vector.import_control_vector(
                folder / f"{name}.gguf",
                tmp_path / name,
                base_model={"hidden_size": hidden, "num_hidden_layers": server.engine.num_hidden_layers},
            )
            alone[f"cv-{name}"] = reft_rs.Engine(setup.model, reft=tmp_path / name)
        jobs = [(model, prompt) for prompt in PROMPTS for model in ("cv-a", "cv-b", "tiny")] * 2
        api = client(server)

        def ask(job):
            model, prompt = job
            return (
                api.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
                .choices[0]
                .text
            )

        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            replies = list(pool.map(ask, jobs))
        for (model, prompt), text in zip(jobs, replies):
            engine = alone[None if model == "tiny" else model]
            assert text == engine.generate(prompt, 8)[0], (model, prompt)
        assert any(
            alone["cv-a"].generate(p, 8)[0] != alone[None].generate(p, 8)[0] for p in PROMPTS
        )  # the vector steers
        # A file that is not a control vector is refused in OpenAI's body.
        (folder / "model.gguf").write_bytes(b"GGUF" + bytes(60))
        status, reply = raw(server, "POST", "/v1/adapters", {"name": "x", "path": "vectors/model.gguf"})
        assert status == 400 and "error" in reply
    finally:
        for name in vectors:
            raw(server, "DELETE", f"/v1/adapters/cv-{name}")
        shutil.rmtree(folder)
