"""Many adapters over one engine, continuously batched.

The reference for every request is the same checkpoint run alone: an engine
loaded with that checkpoint (or none), one request at a time. A mixed batch
(requests with different adapters and none, joining and leaving at
different steps, greedy and seeded sampling) must give each request those
tokens, and logits within 1e-5. The torch path checks the lone runs.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import ReftConfig  # noqa: E402

from .test_engine import checkpoint_for, folders, intervention  # noqa: E402, F401
from .tiny_models import random_ids  # noqa: E402

LOGIT_TOLERANCE = 1e-5


def configs():
    return {
        "loreft": ReftConfig(
            [
                intervention("loreft", "block_output", positions="f2+l2"),
                intervention("red", "mlp_output", layer=0),
            ]
        ),
        "steer": ReftConfig([intervention("steer", "block_output", layer=2)]),
        "nodireft": ReftConfig([intervention("nodireft", "attention_output", positions="l3", layer=0)]),
    }


@pytest.fixture(scope="module")
def adapters(folders, tmp_path_factory):  # noqa: F811
    """Three checkpoints per family, each with distinct random weights."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for family in ("llama", "qwen2", "gpt2"):
        for seed, (name, config) in enumerate(configs().items()):
            path = root / family / name
            checkpoint_for(folders, family, config, path, seed=seed)
            out[family, name] = path
    return out


def alone(folders, adapters, family, name, prompt, **options):  # noqa: F811
    """Tokens and logits of one request run by itself on an engine loaded with its checkpoint."""
    engine = reft_rs.Engine(folders[family], reft=None if name is None else adapters[family, name])
    scheduler = reft_rs.Scheduler(engine)
    scheduler.submit(prompt, return_logits=True, ignore_eos=True, **options)
    tokens, logits = [], []
    while scheduler.has_work:
        for event in scheduler.step():
            if event.token is not None:
                tokens.append(event.token)
                logits.append(event.logits)
    assert tokens == engine.generate_ids([prompt], ignore_eos=True, **options)[0]
    return tokens, np.stack(logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_a_mixed_continuous_batch_gives_every_request_what_it_gets_alone(folders, adapters, family):  # noqa: F811
    engine = reft_rs.Engine(folders[family])
    for name in configs():
        engine.add_adapter(name, adapters[family, name])
    assert sorted(engine.adapters) == sorted(configs())
    # (adapter, prompt length, options, step at which it is submitted)
    plan = [
        ("loreft", 5, dict(max_new_tokens=12), 0),
        (None, 9, dict(max_new_tokens=7), 0),
        ("steer", 4, dict(max_new_tokens=10, temperature=1.3, seed=7), 0),
        ("loreft", 11, dict(max_new_tokens=9, intervene_on_generated=True), 2),
        ("nodireft", 6, dict(max_new_tokens=8, temperature=0.9, top_k=20, seed=3), 3),
        ("steer", 7, dict(max_new_tokens=6), 5),
        (None, 3, dict(max_new_tokens=5, temperature=1.1, top_p=0.9, seed=11), 9),
    ]
    prompts = [random_ids(1, n, seed=10 + i)[0].tolist() for i, (_, n, _, _) in enumerate(plan)]
    scheduler = reft_rs.Scheduler(engine, max_batch=8)
    ids, tokens, logits = {}, {}, {}
    step = 0
    widths = []
    while step < 200 and (step <= max(p[3] for p in plan) or scheduler.has_work):
        for i, (name, _, options, at) in enumerate(plan):
            if at == step:
                ids[
                    scheduler.submit(prompts[i], adapter=name, return_logits=True, ignore_eos=True, **options)
                ] = i
        events = scheduler.step()
        widths.append(scheduler.running)
        for event in events:
            i = ids[event.id]
            if event.token is not None:
                tokens.setdefault(i, []).append(event.token)
                logits.setdefault(i, []).append(event.logits)
            if event.finish is not None:
                assert event.finish == "length"
        step += 1
    assert max(widths) >= 4  # requests really ran together
    assert scheduler.reserved_bytes == 0 and scheduler.running == 0
    for i, (name, _, options, _) in enumerate(plan):
        want_tokens, want_logits = alone(folders, adapters, family, name, prompts[i], **options)
        assert tokens[i] == want_tokens, (i, name)
        np.testing.assert_allclose(np.stack(logits[i]), want_logits, atol=LOGIT_TOLERANCE, rtol=0)


def test_lone_requests_match_the_torch_path(folders, adapters):  # noqa: F811
    from .test_engine import load_model

    model = load_model(folders, "llama")
    reft_model = reft_rs.ReftModel.from_pretrained(model, adapters["llama", "loreft"])
    prompt = random_ids(1, 8, seed=4)
    expected = reft_model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 8:]
    engine = reft_rs.Engine(folders["llama"])
    engine.add_adapter("a", adapters["llama", "loreft"])
    scheduler = reft_rs.Scheduler(engine)
    scheduler.submit(prompt[0].tolist(), max_new_tokens=10, adapter="a", ignore_eos=True)
    assert next(iter(scheduler.run().values())) == expected.tolist()


def test_generate_takes_one_adapter_per_prompt(folders, adapters):  # noqa: F811
    engine = reft_rs.Engine(folders["qwen2"])
    engine.add_adapter("loreft", adapters["qwen2", "loreft"])
    engine.add_adapter("steer", adapters["qwen2", "steer"])
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (4, 9, 6, 5)]
    names = ["steer", None, "loreft", "steer"]
    got = engine.generate_ids(prompts, 10, adapter=names, ignore_eos=True)
    for prompt, name, tokens in zip(prompts, names, got):
        solo = reft_rs.Engine(folders["qwen2"], reft=None if name is None else adapters["qwen2", name])
        assert tokens == solo.generate_ids([prompt], 10, ignore_eos=True)[0]
    one = engine.generate_ids(prompts[:1], 10, adapter="loreft", ignore_eos=True)[0]
    assert (
        one
        == reft_rs.Engine(folders["qwen2"], reft=adapters["qwen2", "loreft"]).generate_ids(
            prompts[:1], 10, ignore_eos=True
        )[0]
    )
    ids = prompts[0]
    np.testing.assert_array_equal(
        engine.logits(ids, adapter="steer"),
        reft_rs.Engine(folders["qwen2"], reft=adapters["qwen2", "steer"]).logits(ids),
    )
    text = engine.generate("hello world", 6, adapter="steer", ignore_eos=True)
    assert text == reft_rs.Engine(folders["qwen2"], reft=adapters["qwen2", "steer"]).generate(
        "hello world", 6, ignore_eos=True
    )
    streamed = list(engine.stream(ids, 6, adapter="steer", ignore_eos=True, tokens=True))
    assert streamed == engine.generate_ids([ids], 6, adapter="steer", ignore_eos=True)[0]


def test_adapters_load_and_unload_while_requests_run(folders, adapters, tmp_path):  # noqa: F811
    engine = reft_rs.Engine(folders["llama"])
    engine.add_adapter("a", adapters["llama", "loreft"])
    with pytest.raises(reft_rs.InvalidArgumentError, match="loaded already"):
        engine.add_adapter("a", adapters["llama", "steer"])
    for bad in ("", "has space", "x" * 129, "tab\t", "é"):
        with pytest.raises(reft_rs.InvalidArgumentError, match="adapter name"):
            engine.add_adapter(bad, adapters["llama", "steer"])
    checkpoint_for(folders, "gpt2", configs()["steer"], tmp_path / "gpt2-steer")
    with pytest.raises(reft_rs.IncompatibleModelError):
        engine.add_adapter("gpt2", tmp_path / "gpt2-steer")
    assert list(engine.adapters) == ["a"]

    scheduler = reft_rs.Scheduler(engine)
    prompt = random_ids(1, 6)[0].tolist()
    first = scheduler.submit(prompt, 12, adapter="a", ignore_eos=True)
    (event,) = scheduler.step()
    engine.remove_adapter("a")  # the running request keeps its checkpoint
    with pytest.raises(reft_rs.InvalidArgumentError, match='no adapter named "a"'):
        scheduler.submit(prompt, 4, adapter="a")
    engine.add_adapter("b", adapters["llama", "steer"])
    second = scheduler.submit(prompt, 5, adapter="b", ignore_eos=True)
    out = scheduler.run()
    assert [event.token] + out[first] == reft_rs.Engine(
        folders["llama"], reft=adapters["llama", "loreft"]
    ).generate_ids([prompt], 12, ignore_eos=True)[0]
    assert (
        out[second]
        == reft_rs.Engine(folders["llama"], reft=adapters["llama", "steer"]).generate_ids(
            [prompt], 5, ignore_eos=True
        )[0]
    )
    with pytest.raises(reft_rs.InvalidArgumentError, match='no adapter named "a"'):
        engine.remove_adapter("a")


def test_cancellation_frees_the_place_at_once(folders):  # noqa: F811
    engine = reft_rs.Engine(folders["llama"])
    scheduler = reft_rs.Scheduler(engine, max_batch=1)
    prompt = random_ids(1, 5)[0].tolist()
    long = scheduler.submit(prompt, 100, ignore_eos=True)
    short = scheduler.submit(prompt, 3, ignore_eos=True)
    assert [e.id for e in scheduler.step()] == [long]
    assert (scheduler.running, scheduler.waiting) == (1, 1)
    scheduler.cancel(long)
    events = scheduler.step()
    assert events[0].id == long and events[0].finish == "cancelled" and events[0].token is None
    assert events[1].id == short and events[1].token is not None  # admitted in the same step
    rest = scheduler.run()
    assert len([events[1].token] + rest[short]) == 3
    scheduler.cancel(long)  # finished ids are ignored
    scheduler.cancel(12345)
    assert scheduler.step() == []
    # A request cancelled before it ever ran.
    queued = scheduler.submit(prompt, 4)
    scheduler.cancel(queued)
    assert [(e.id, e.finish) for e in scheduler.step()] == [(queued, "cancelled")]
    assert scheduler.reserved_bytes == 0 and not scheduler.has_work


def test_the_kv_budget_queues_what_does_not_fit_and_refuses_what_never_can(folders):  # noqa: F811
    import json

    engine = reft_rs.Engine(folders["llama"])
    hf = json.loads((folders["llama"] / "config.json").read_text())
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    per_token = hf["num_hidden_layers"] * 2 * hf["num_key_value_heads"] * head_dim * 4  # K and V, float32
    assert reft_rs.Scheduler(engine).kv_bytes(10) == 10 * per_token
    prompt = random_ids(1, 100)[0].tolist()
    # 100 prompt tokens and 27 new ones cache 126 tokens (the last is never fed back):
    # a budget of one such request runs two of them one after the other.
    budget = 126 * per_token + 10
    scheduler = reft_rs.Scheduler(engine, kv_cache_bytes=budget)
    a = scheduler.submit(prompt, 27, ignore_eos=True)
    b = scheduler.submit(prompt, 27, ignore_eos=True)
    scheduler.step()
    assert (scheduler.running, scheduler.waiting) == (1, 1)
    assert scheduler.reserved_bytes == 126 * per_token
    peak = 0
    out = {}
    while scheduler.has_work:
        for event in scheduler.step():
            if event.token is not None:
                out.setdefault(event.id, []).append(event.token)
        peak = max(peak, scheduler.reserved_bytes)
    assert peak <= budget and scheduler.reserved_bytes == 0
    assert len(out[b]) == 27 and len(out[a]) == 26  # a's first token came in the first step
    # 128 - 100 + 1 = 29 new tokens at most: 128 cached tokens, over the budget.
    with pytest.raises(reft_rs.ReftMemoryError, match="key/value cache"):
        scheduler.submit(prompt, 500)
    assert not scheduler.has_work


def test_bad_requests_are_refused_at_submit(folders):  # noqa: F811
    engine = reft_rs.Engine(folders["llama"])
    scheduler = reft_rs.Scheduler(engine)
    with pytest.raises(reft_rs.InvalidArgumentError, match="no tokens"):
        scheduler.submit([])
    with pytest.raises(reft_rs.InvalidArgumentError, match="outside the vocabulary"):
        scheduler.submit([1, 2, 500])
    with pytest.raises(reft_rs.InvalidArgumentError, match="context of 128"):
        scheduler.submit([1] * 129)
    with pytest.raises(reft_rs.InvalidArgumentError, match="temperature"):
        scheduler.submit([1, 2], temperature=-1)
    with pytest.raises(reft_rs.InvalidArgumentError, match="top_p"):
        scheduler.submit([1, 2], top_p=1.5)
    with pytest.raises(reft_rs.InvalidArgumentError, match="no adapter named"):
        scheduler.submit([1, 2], adapter="nope")
    with pytest.raises(reft_rs.InvalidArgumentError, match="max_batch"):
        reft_rs.Scheduler(engine, max_batch=0)
    assert not scheduler.has_work
    # A full context still gives one token, and stops there.
    full = scheduler.submit([1] * 128, 10, ignore_eos=True)
    events = scheduler.step()
    assert [(e.id, e.finish) for e in events] == [(full, "length")] and events[0].token is not None


def test_zero_new_tokens_and_stop_reasons(folders):  # noqa: F811
    engine = reft_rs.Engine(folders["llama"])
    scheduler = reft_rs.Scheduler(engine)
    prompt = random_ids(1, 5)[0].tolist()
    none = scheduler.submit(prompt, 0)
    assert [(e.id, e.token, e.finish) for e in scheduler.step()] == [(none, None, "length")]
    free = engine.generate_ids([prompt], 12, ignore_eos=True)[0]
    text = engine.decode(free)
    stop = text[len(text) // 2 :][:3]
    request = scheduler.submit(prompt, 12, stop=stop, ignore_eos=True)
    events = [e for e in (scheduler.step() for _ in range(20)) for e in e]
    assert events[-1].id == request and events[-1].finish == "stop"
    got = [e.token for e in events if e.token is not None]
    assert got == free[: len(got)] and len(got) < 12
    assert stop in engine.decode(got) and stop not in engine.decode(got[:-1])
    # The events' text, joined, is the reply cut before the stop string, the
    # text generate gives, and the stream's pieces: the rule is in one place.
    cut = text[: text.find(stop)]
    assert "".join(e.text for e in events) == cut
    assert engine.generate(engine.decode(prompt), 12, stop=stop, ignore_eos=True)[0] == cut or (
        engine.encode(engine.decode(prompt)) != prompt
    )
    assert "".join(engine.stream(prompt, 12, stop=stop, ignore_eos=True)) == cut


def test_event_text_holds_back_a_possible_stop_string_and_flushes_it_at_the_end(folders):  # noqa: F811
    engine = reft_rs.Engine(folders["llama"])
    prompt = random_ids(1, 5, seed=3)[0].tolist()
    free = engine.generate_ids([prompt], 16, ignore_eos=True)[0]
    text = engine.decode(free)
    # A stop string that the reply's end begins but never completes.
    tail = text[-2:]
    stop = tail + "\x00never"
    scheduler = reft_rs.Scheduler(engine)
    request = scheduler.submit(prompt, 16, stop=stop, ignore_eos=True)
    events = [e for e in (scheduler.step() for _ in range(30)) for e in e if e.id == request]
    assert events[-1].finish == "length"
    pieces = [e.text for e in events]
    assert "".join(pieces) == text  # the held characters came out on the last event
    # After each earlier event, what went out is the text so far less its
    # longest end that begins the stop string (the rule written plainly).
    for k in range(1, len(events)):
        so_far = engine.decode(free[:k])
        if so_far.endswith("\ufffd"):
            continue  # an incomplete character: nothing new goes out
        held = max(
            (n for n in range(1, min(len(stop), len(so_far) + 1)) if stop.startswith(so_far[-n:])), default=0
        )
        assert "".join(pieces[:k]) == so_far[: len(so_far) - held], k
    assert pieces[-1].endswith(tail)
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edit_strength_matches_the_torch_path_alone_and_mixed(folders, adapters, family, tmp_path):  # noqa: F811
    """h + α(Φ(h) − h): the engine's logits and tokens at several strengths
    equal the torch path's (itself checked against the formula written out in
    tests/test_steering.py), and requests of one adapter at different
    strengths share a batch without changing each other."""
    config = ReftConfig(
        [
            intervention("loreft", "block_output", positions="f2+l2"),
            intervention("red", "mlp_output", layer=0),
            intervention("steer", "attention_output", layer=2),
        ]
    )
    reft_model = checkpoint_for(folders, family, config, tmp_path / "reft", seed=4)
    engine = reft_rs.Engine(folders[family], reft=tmp_path / "reft")
    bare = reft_rs.Engine(folders[family])
    ids = random_ids(1, 9, seed=21)
    for strength in (0.0, 0.5, 2.0, -1.0):
        with torch.no_grad():
            expected = reft_model(input_ids=ids, strength=strength).logits[0].numpy()
        got = engine.logits(ids[0].tolist(), strength=strength)
        np.testing.assert_allclose(got, expected, atol=LOGIT_TOLERANCE, rtol=0)
        for on_generated in (False, True):
            want = reft_model.generate(
                ids,
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
                strength=strength,
                intervene_on_generated=on_generated,
            )[0, 9:].tolist()
            tokens = engine.generate_ids(
                [ids[0].tolist()], 8, ignore_eos=True, strength=strength, intervene_on_generated=on_generated
            )[0]
            assert tokens == want, (strength, on_generated)
    # α = 0 is the base model, bit for bit.
    assert np.array_equal(engine.logits(ids[0].tolist(), strength=0.0), bare.logits(ids[0].tolist()))
    # One adapter at three strengths in one continuous batch.
    server = reft_rs.Engine(folders[family])
    server.add_adapter("a", tmp_path / "reft")
    scheduler = reft_rs.Scheduler(server, max_batch=4)
    prompts = [random_ids(1, n, seed=30 + n)[0].tolist() for n in (5, 7, 6)]
    strengths = [1.0, -0.5, 3.0]
    requests = {
        scheduler.submit(p, 6, adapter="a", strength=s, ignore_eos=True, return_logits=True): i
        for i, (p, s) in enumerate(zip(prompts, strengths))
    }
    tokens, logits = {}, {}
    for _ in range(50):
        if not scheduler.has_work:
            break
        for event in scheduler.step():
            if event.token is not None:
                tokens.setdefault(requests[event.id], []).append(event.token)
                logits.setdefault(requests[event.id], []).append(event.logits)
    for i, (prompt, strength) in enumerate(zip(prompts, strengths)):
        lone = reft_rs.Scheduler(engine)
        lone.submit(prompt, 6, strength=strength, ignore_eos=True, return_logits=True)
        want_tokens, want_logits = [], []
        while lone.has_work:
            for event in lone.step():
                if event.token is not None:
                    want_tokens.append(event.token)
                    want_logits.append(event.logits)
        assert tokens[i] == want_tokens
        np.testing.assert_allclose(np.stack(logits[i]), np.stack(want_logits), atol=LOGIT_TOLERANCE, rtol=0)
    for bad in (float("nan"), float("inf"), "strong"):
        with pytest.raises(reft_rs.InvalidArgumentError, match="strength"):
            engine.generate_ids([prompts[0]], 2, strength=bad)


def test_the_queue_is_bounded_per_client_and_clients_take_turns(folders):  # noqa: F811
    engine = reft_rs.Engine(folders["llama"])
    scheduler = reft_rs.Scheduler(engine, max_batch=1, max_waiting=6)
    assert scheduler.max_waiting == 6
    prompt = random_ids(1, 5)[0].tolist()
    sent = {}
    for client in ("a", "a", "a"):
        sent[scheduler.submit(prompt, 1, client=client)] = client
    with pytest.raises(reft_rs.BusyError, match="this client"):  # half the queue is a's
        scheduler.submit(prompt, 1, client="a")
    for client in ("b", "b", "b"):
        sent[scheduler.submit(prompt, 1, client=client)] = client
    with pytest.raises(reft_rs.BusyError, match="6 requests are waiting"):
        scheduler.submit(prompt, 1, client="c")
    assert scheduler.waiting == 6 and scheduler.load == (6, 0, 0)
    order = []
    while scheduler.has_work:
        order += [sent[e.id] for e in scheduler.step() if e.finish is not None]
    # One place, six requests of one token each: the clients alternate.
    assert order == ["a", "b", "a", "b", "a", "b"]
    # Room again once they are admitted.
    scheduler.submit(prompt, 1, client="a")


def test_a_request_that_does_not_fit_holds_back_only_its_client_until_its_patience_ends(folders):  # noqa: F811
    engine = reft_rs.Engine(folders["llama"])
    prompt = random_ids(1, 5)[0].tolist()
    small = reft_rs.Scheduler(engine).kv_bytes(5 + 20 - 1)
    # Room for two of b's requests; a's big one needs all of it.
    scheduler = reft_rs.Scheduler(engine, max_batch=4, kv_cache_bytes=2 * small)
    assert small < scheduler.kv_bytes(40 + 5 - 1) <= 2 * small
    # b's two requests end 10 steps apart, so one of them always runs.
    mine = {scheduler.submit(prompt, n, ignore_eos=True, client="b") for n in (20, 10)}
    scheduler.step()
    big = scheduler.submit(prompt * 8, 5, ignore_eos=True, client="a")
    started = set()  # b's requests admitted while a's waited
    for step in range(400):  # noqa: B007 (read after the loop)
        while len(mine) < 2:  # b keeps two requests in flight: the budget is never free
            mine.add(scheduler.submit(prompt, 20, ignore_eos=True, client="b"))
        events = scheduler.step()
        if any(e.id == big for e in events):
            break
        started |= {e.id for e in events if e.token is not None} & mine
        mine -= {e.id for e in events if e.finish is not None}
    else:
        raise AssertionError("the big request never ran")
    # b's requests kept being admitted while a's waited (no head-of-line
    # blocking across clients); a's ran once its patience (64 steps in which
    # it did not fit) was spent and b's running requests had finished.
    assert len(started) > 4
    assert 64 <= step <= 64 + 20, step


def test_sampling_params_reach_the_engine_field_by_field(folders):  # noqa: F811
    """One SamplingParams from the front ends to the Rust engine: sampled
    tokens with a seed, a stop string and a token budget are those the loose
    arguments give, each field read by its name."""
    engine = reft_rs.Engine(folders["llama"])
    prompt = random_ids(1, 6, seed=3)[0].tolist()
    params = reft_rs.SamplingParams(
        max_new_tokens=7, temperature=0.8, top_k=5, top_p=0.9, seed=11, ignore_eos=True
    )
    assert params.stop == () and isinstance(params.seed, int)
    loose = engine.generate_ids([prompt], 7, 0.8, 5, 0.9, 11, ignore_eos=True)[0]
    scheduler = reft_rs.Scheduler(engine)
    scheduler.submit(prompt, sampling=params)
    tokens = []
    while scheduler.has_work:
        tokens += [e.token for e in scheduler.step() if e.token is not None]
    assert tokens == loose and len(tokens) == 7
    # Another seed gives other tokens: the seed field was read.
    other = reft_rs.Scheduler(engine)
    other.submit(prompt, sampling=reft_rs.SamplingParams(7, 0.8, 5, 0.9, 12, ignore_eos=True))
    second = []
    while other.has_work:
        second += [e.token for e in other.step() if e.token is not None]
    assert second == engine.generate_ids([prompt], 7, 0.8, 5, 0.9, 12, ignore_eos=True)[0]
    with pytest.raises(reft_rs.InvalidArgumentError, match="not both"):
        scheduler.submit(prompt, 5, sampling=params)
    with pytest.raises(reft_rs.InvalidArgumentError, match="SamplingParams"):
        scheduler.submit(prompt, sampling={"max_new_tokens": 3})
    for bad in ({"max_new_tokens": -1}, {"top_k": 0}, {"temperature": "hot"}, {"strength": float("nan")}):
        with pytest.raises(reft_rs.InvalidArgumentError):
            reft_rs.SamplingParams(**bad)
