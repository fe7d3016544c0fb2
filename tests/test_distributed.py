"""Data-parallel training: two gloo processes on the CPU train exactly what
one process trains on the combined batches, and only rank 0 saves.

The processes are started with ``torch.multiprocessing.spawn`` and bind
127.0.0.1 only; each run is bounded by a time limit.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch build has no gloo backend", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

import reft_rs  # noqa: E402

from . import distributed_worker as worker  # noqa: E402
from .tiny_models import build  # noqa: E402

LIMIT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(function, world: int, out) -> None:
    """Runs ``function(rank, world, port, out)`` in ``world`` processes (or
    in this one for 1), failing on any error or past the time limit."""
    out.mkdir(parents=True, exist_ok=True)
    if world == 1:
        function(0, 1, 0, str(out))
        return
    context = torch.multiprocessing.spawn(
        function, args=(world, free_port(), str(out)), nprocs=world, join=False, start_method="spawn"
    )
    timer = threading.Timer(LIMIT_S, lambda: [p.kill() for p in context.processes])
    timer.start()
    try:
        finished = False
        while not finished:  # join() returns once every process has ended
            finished = context.join()
    finally:
        timer.cancel()
    assert all(p.exitcode == 0 for p in context.processes), [p.exitcode for p in context.processes]


def results(out, rank):
    return load_file(str(out / f"rank{rank}.safetensors")), json.loads((out / f"rank{rank}.json").read_text())


@pytest.mark.parametrize("function", [worker.plain_loop, worker.trainer], ids=["plain-loop", "trainer"])
def test_two_processes_train_what_one_trains_on_the_combined_batches(tmp_path, function):
    launch(function, 1, tmp_path / "single")
    launch(function, 2, tmp_path / "ddp")
    single, single_log = results(tmp_path / "single", 0)
    initial = worker._model_and_data("f1+l1" if function is worker.plain_loop else "l2")[
        1
    ].checkpoint_tensors()
    for rank in (0, 1):
        tensors, log = results(tmp_path / "ddp", rank)
        assert tensors.keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=1e-6, msg=f"rank {rank}, {key}")
            assert not torch.equal(value, initial[key])  # it trained
        assert len(log["losses"]) == len(single_log["losses"]) == worker.STEPS
    # The loss each rank sees is its half's; their mean is the combined batch's.
    if function is worker.plain_loop:
        halves = [results(tmp_path / "ddp", r)[1]["losses"] for r in (0, 1)]
        for step, combined in enumerate(single_log["losses"]):
            assert abs((halves[0][step] + halves[1][step]) / 2 - combined) < 1e-6
    else:
        for step, combined in enumerate(single_log["losses"]):
            assert abs(results(tmp_path / "ddp", 0)[1]["losses"][step] - combined) < 1e-4  # logged rounded
    # The checkpoint is written once, by rank 0.
    saves = [results(tmp_path / "ddp", r)[1]["saves"] for r in (0, 1)]
    assert len(saves[0]) == 1 and saves[1] == []
    folder = (
        tmp_path / "ddp" / "plain-checkpoint"
        if function is worker.plain_loop
        else tmp_path / "ddp" / "trainer" / f"checkpoint-{worker.STEPS}"
    )
    assert saves[0][0] == str(folder)
    restored = reft_rs.ReftModel.from_pretrained(build("llama", seed=1, dtype=torch.float64), folder)
    tensors, _ = results(tmp_path / "ddp", 0)
    for key, value in restored.checkpoint_tensors().items():
        assert torch.equal(value, tensors[key])
