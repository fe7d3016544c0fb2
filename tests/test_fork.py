"""Fork and thread safety: the engine, the tokenizer and the position
pipeline in children forked after the parent used them (``os.fork``,
``multiprocessing``'s fork start method, a torch ``DataLoader`` with
workers), and ReFT models run from several threads at once.

A process forked after using a thread pool inherits the pool's bookkeeping
but none of its threads, so work handed to it would wait forever: each
child here runs under a time limit and a hang fails the test instead of
stalling the suite."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import InterventionConfig, ReftConfig, ReftModel  # noqa: E402
from reft_rs.positions import locate  # noqa: E402

from .tiny_models import build, tokenizer  # noqa: E402

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
LIMIT = 120


def _config(layers=(0, 1)):
    return ReftConfig(
        [
            InterventionConfig(
                type="loreft", layer=i, component="block_output", low_rank_dimension=2, positions="f1+l1"
            )
            for i in layers
        ]
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork")
    torch.manual_seed(0)
    model = build("llama")
    model.save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    reft_model = reft_rs.get_reft_model(model, _config())
    for p in reft_model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.3)
    reft_model.save_pretrained(root / "reft")
    return root


def _work(engine):
    """What a child does with everything the parent used."""
    ids = engine.generate_ids(PROMPTS, 6, ignore_eos=True)
    text = engine.encode("the cat sat on the mat")
    spots = locate(np.arange(200_000) % 300, "f7+l7", parallel=True)
    return ids, text, int(spots.sum()), np.asarray(engine.logits(PROMPTS[0])).round(5).tolist()


def _child(engine, queue):
    queue.put(_work(engine))


@pytest.mark.parametrize("threads", [None, 2])
def test_multiprocessing_fork_children_run_the_engine_after_the_parent(folder, threads):
    engine = reft_rs.Engine(folder / "model", reft=folder / "reft", threads=threads)
    expected = _work(engine)  # the parent's pools are running now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_child, args=(engine, queue)) for _ in range(2)]
    for child in children:
        child.start()
    try:
        results = [queue.get(timeout=LIMIT) for _ in children]
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    assert [child.exitcode for child in children] == [0, 0]
    assert results == [expected, expected]


def test_os_fork_child_runs_the_engine_after_the_parent(folder):
    engine = reft_rs.Engine(folder / "model", reft=folder / "reft")
    expected = repr(_work(engine))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        try:
            signal.alarm(LIMIT)
            os.write(write, repr(_work(engine)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        got = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got == expected


class _Prompts(torch.utils.data.Dataset):
    def __init__(self, engine):
        self.engine = engine

    def __len__(self):
        return 4

    def __getitem__(self, index):
        ids = self.engine.encode(f"the cat sat {index}")
        new = self.engine.generate_ids([ids], 4, ignore_eos=True)[0]
        spots = locate((np.arange(100_000) + index) % 300, "f7+l7")
        return torch.tensor(new), torch.from_numpy(spots[:3].copy())


def test_dataloader_workers_run_the_engine_after_the_parent(folder):
    engine = reft_rs.Engine(folder / "model", reft=folder / "reft")
    dataset = _Prompts(engine)
    expected = [dataset[i] for i in range(len(dataset))]  # in the parent first
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, timeout=LIMIT, multiprocessing_context="fork"
    )
    got = list(loader)
    assert len(got) == len(expected)
    for (new, spots), (want_new, want_spots) in zip(got, expected):
        assert torch.equal(new, want_new) and torch.equal(spots, want_spots)


def _run_threads(calls):
    """Runs each call on its own thread, all at once; returns the results."""
    results = [None] * len(calls)
    errors = []
    start = threading.Barrier(len(calls))

    def run(i):
        try:
            start.wait(timeout=LIMIT)
            results[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=LIMIT)
    assert not any(w.is_alive() for w in workers), "a thread did not finish"
    assert not errors, errors
    return results


def _batch(seed):
    ids = torch.randint(7, 60, (3, 9), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def test_two_reft_models_forward_from_two_threads(folder):
    models = []
    for layers in [(0,), (1,)]:
        torch.manual_seed(len(models))
        reft_model = reft_rs.get_reft_model(build("llama"), _config(layers))
        models.append(reft_model.eval())
    batches = [_batch(1), _batch(2)]

    def forward(model, batch):
        ids, mask = batch
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    alone = [forward(m, b) for m, b in zip(models, batches)]
    for _ in range(3):
        together = _run_threads([lambda m=m, b=b: forward(m, b) for m, b in zip(models, batches)])
        for a, t in zip(alone, together):
            assert torch.equal(a, t)


def test_one_reft_model_forward_from_two_threads_at_once(folder):
    """As DataParallel-style callers do: one model, concurrent forwards on
    different batches with different positions, each equal to its forward
    alone."""
    reft_model = ReftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(folder / "model"), folder / "reft"
    ).eval()
    batches = [_batch(3), _batch(4)]
    # Different prompt lengths, so the positions differ between the calls.
    batches[1][1][:, 6:] = 0

    def forward(batch):
        ids, mask = batch
        with torch.no_grad():
            return reft_model(input_ids=ids, attention_mask=mask).logits

    alone = [forward(b) for b in batches]
    for _ in range(5):
        together = _run_threads([lambda b=b: forward(b) for b in batches])
        for a, t in zip(alone, together):
            assert torch.equal(a, t)
