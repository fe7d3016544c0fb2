"""The torch path on a CUDA device: bfloat16 models with float32 interventions,
training, generation and checkpoints that move between devices.

Skipped where torch sees no GPU (CI has none); docs/benchmarks.md records the last run
on one. The rest of the suite runs unchanged on such a machine, where the
Trainer tests train on the GPU by themselves.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import ReftConfig, ReftModel, get_reft_model  # noqa: E402
from reft_rs.model.layout import resolve  # noqa: E402

from .test_generation import greedy, left_pad  # noqa: E402
from .test_generation import reft_for as float64_reft_for  # noqa: E402
from .test_interventions import expected  # noqa: E402
from .test_model import (  # noqa: E402
    LENGTH,
    LOW_RANK,
    TEST_CASES,
    capture,
    intervention_for,
    loss_inputs,
    randomize,
)
from .tiny_models import DECODERS, build, random_ids  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
# One bfloat16 rounding of the result (8 bits of mantissa), plus one of the input
# where the edit is computed in float32 from bfloat16 states.
BF16 = {"rtol": 2**-7, "atol": 2**-7}


def on_cuda(batch):
    return {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize(("family", "kind", "component"), TEST_CASES)
def test_bfloat16_model_with_float32_interventions_edits_the_right_rows(family, kind, component):
    model = build(family, dtype=torch.bfloat16).to(CUDA)
    reft_model = get_reft_model(model, intervention_for(kind, component))
    randomize(reft_model)
    intervention = reft_model.interventions[0]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in intervention.parameters())
    site = resolve(model, reft_model.reft_config.interventions[0])
    seen, handle = capture(site.module, site.edits_input)
    ids = random_ids(2, LENGTH).to(CUDA)
    with torch.no_grad():
        model(input_ids=ids)
        out = reft_model(input_ids=ids)
    handle.remove()
    before, after = seen
    assert after.dtype == torch.bfloat16 and out.logits.dtype == torch.bfloat16
    rows = range(LENGTH - 2, LENGTH) if kind in LOW_RANK else range(LENGTH)
    untouched = [p for p in range(LENGTH) if p not in rows]
    assert torch.equal(after[:, untouched], before[:, untouched])
    with torch.no_grad():
        for b in range(2):
            for p in rows:
                want = expected(intervention, before[b, p].float()).to(torch.bfloat16)
                torch.testing.assert_close(after[b, p], want, **BF16)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_training_on_the_gpu_lowers_the_loss_and_keeps_rotations_orthonormal(family):
    model = build(family, dtype=torch.bfloat16, init_range=0.2).to(CUDA)
    frozen = {name: p.clone() for name, p in model.named_parameters()}
    reft_model = get_reft_model(model, ReftConfig.for_layers([0, 2], low_rank_dimension=3, positions="l2"))
    optimizer = torch.optim.AdamW(reft_model.interventions.parameters(), lr=2e-2)
    batch = on_cuda(loss_inputs(family, batch=4))
    if family == "bert":
        batch.pop("locations", None)
        batch["locations"] = reft_rs.positions.locate([LENGTH] * 4, "l2")
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = reft_model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for name, p in model.named_parameters():
        assert torch.equal(p, frozen[name]), name
    for intervention in reft_model.interventions:
        R = intervention.checkpoint_tensors()["rotation"]
        assert R.is_cuda and R.dtype == torch.float32
        eye = torch.eye(R.shape[0], device=CUDA)
        torch.testing.assert_close(R @ R.T, eye, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_generation_on_the_gpu_batched_equals_one_by_one(family):
    reft_model = float64_reft_for(family).to(CUDA)
    prompts = [random_ids(1, n, seed=n)[0].to(CUDA) for n in (5, 11, 8)]
    singles = [greedy(reft_model, p[None])[0][0] for p in prompts]
    ids, mask = left_pad([p.cpu() for p in prompts])
    batched, _ = greedy(reft_model, ids.to(CUDA), mask.to(CUDA))
    for row, single in enumerate(singles):
        assert torch.equal(batched[row], single)
    no_cache = [greedy(reft_model, p[None], use_cache=False)[0][0] for p in prompts]
    for a, b in zip(singles, no_cache):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", DECODERS)
def test_checkpoints_move_between_gpu_and_cpu_exactly(family, tmp_path):
    gpu = get_reft_model(
        build(family, dtype=torch.float64).to(CUDA),
        ReftConfig.for_layers([0, 1], low_rank_dimension=2, positions="f1+l2", dtype="float64"),
    )
    randomize(gpu, seed=1)
    gpu.save_pretrained(tmp_path / "ckpt")
    cpu = ReftModel.from_pretrained(build(family, dtype=torch.float64), tmp_path / "ckpt")
    for a, b in zip(gpu.interventions, cpu.interventions):
        for (name, value), theirs in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(value.cpu(), theirs), name  # what is trained travels bit for bit
        # R is derived by QR, whose kernels differ between devices in the last bits
        mine, theirs = a.checkpoint_tensors()["rotation"], b.checkpoint_tensors()["rotation"]
        torch.testing.assert_close(mine.cpu(), theirs, rtol=0, atol=1e-13)
    ids = random_ids(2, LENGTH)
    with torch.no_grad():
        on_gpu = gpu(input_ids=ids.to(CUDA)).logits.cpu()
        on_cpu = cpu(input_ids=ids).logits
    # Llama-style models build their rotary tables in float32 even in a float64
    # model, and the GPU's sin/cos differ from the CPU's in the last bit.
    torch.testing.assert_close(on_gpu, on_cpu, rtol=0, atol=1e-6 if family != "gpt2" else 1e-12)
    back = ReftModel.from_pretrained(build(family, dtype=torch.float64).to(CUDA), tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids.to(CUDA)).logits, gpu(input_ids=ids.to(CUDA)).logits)


def test_the_command_line_trains_in_bfloat16_on_the_gpu(tmp_path, capsys):
    import json

    from reft_rs.cli import main

    from .tiny_models import tokenizer

    build("llama", seed=1, init_range=0.5).save_pretrained(tmp_path / "model")
    tokenizer().save_pretrained(tmp_path / "model")
    prompts = ["what colour is the sky", "say hello"]
    responses = ["blue", "hello world"]
    with open(tmp_path / "train.jsonl", "w") as handle:
        for prompt, response in zip(prompts, responses):
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    argv = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl")]
    argv += ["--output", str(tmp_path / "run"), "--layers", "0,1", "--positions", "f1+l1", "--rank", "2"]
    argv += ["--device", "cuda", "--bf16", "--epochs", "60", "--batch-size", "2", "--learning-rate", "3e-2"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["losses"][-1] < 0.5 * metrics["losses"][0]
    config, tensors = reft_rs.io.checkpoint.load(tmp_path / "run", framework="torch")
    # float32 interventions on a bfloat16 model
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    capsys.readouterr()
    common = ["generate", "--checkpoint", str(tmp_path / "run"), "--model", str(tmp_path / "model")]
    common += ["--prompt", prompts[0], "--max-new-tokens", "2"]
    assert main([*common, "--device", "cuda", "--bf16"]) == 0
    assert capsys.readouterr().out.split()[:1] == ["blue"]
    assert main([*common, "--engine", "rust"]) == 0  # the same checkpoint on the CPU engine
    assert capsys.readouterr().out.split()[:1] == ["blue"]
