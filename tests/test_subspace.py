"""Inside the subspaces: logit-lens tokens, edit sizes and principal angles
against plain torch and numpy computations, and ``reft-rs inspect --subspace``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import InterventionConfig, ReftConfig, get_reft_model, make_dataset  # noqa: E402
from reft_rs.cli import main  # noqa: E402
from reft_rs.experiments import subspace  # noqa: E402

from .tiny_models import build, tokenizer  # noqa: E402

PROMPTS = ["what colour is the sky", "what colour is the grass", "say hello", "what colour is the sea"]
RESPONSES = ["blue", "green", "hello world", "blue"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_tokens_are_the_unembedding_of_the_normed_rows(family):
    model = build(family, init_range=0.3)
    config = ReftConfig([InterventionConfig(layer=1, type="loreft", low_rank_dimension=3, positions="l1"),
                         InterventionConfig(layer=2, type="nodireft", low_rank_dimension=2, positions="l1")])  # fmt: skip
    reft_model = get_reft_model(model, config)
    lens = subspace.logit_lens(reft_model, None, top_k=5)
    norm = model.model.norm if family == "llama" else model.transformer.ln_f
    unembed = model.get_output_embeddings().weight
    with torch.no_grad():
        for entry, intervention in zip(lens, reft_model.interventions):
            rows = (
                intervention.rotation()
                if intervention.rotation is not None
                else intervention.projection_weight
            )
            assert len(entry["basis"]) == rows.shape[0]
            for tokens, row in zip(entry["basis"], rows):
                logits = unembed @ norm(row[None, None])[0, 0]  # plainly
                assert tokens["promotes_ids"] == torch.topk(logits, 5).indices.tolist()
                assert tokens["suppresses_ids"] == torch.topk(-logits, 5).indices.tolist()
            assert len(entry["source"]) == intervention.weight.shape[0]


def test_edit_statistics_are_the_plain_averages():
    tok = tokenizer()
    model = build("llama", init_range=0.3)
    config = ReftConfig.for_layers([1], low_rank_dimension=2, positions="l2")
    reft_model = get_reft_model(model, config)
    with torch.no_grad():
        reft_model.interventions[0].weight.mul_(5)
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=config)
    batches = list(dataset.batches(3, tok.pad_token_id))
    got = subspace.edit_statistics(reft_model, batches)[0]
    # plainly: the bare model's layer-1 output at the located positions, edited by the module
    captured = []
    handle = model.model.layers[1].register_forward_hook(
        lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    edits, norms, inside, energy = [], [], 0.0, 0.0
    r = reft_model.interventions[0].rotation().detach()
    with torch.no_grad():
        for batch in batches:
            captured.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hidden = captured[0]
            for row in range(hidden.shape[0]):
                for position in batch["locations"][0, row].tolist():
                    if position < 0:
                        continue
                    h = hidden[row, position]
                    edited = reft_model.interventions[0](h[None])[0]
                    edits.append(float((edited - h).norm()))
                    norms.append(float(h.norm()))
                    inside += float(((r @ h) ** 2).sum())
                    energy += float((h**2).sum())
    handle.remove()
    assert got["states"] == len(edits) == 2 * len(PROMPTS)
    assert got["mean_edit_norm"] == pytest.approx(np.mean(edits), rel=1e-5)
    assert got["mean_state_norm"] == pytest.approx(np.mean(norms), rel=1e-5)
    assert got["subspace_share"] == pytest.approx(inside / energy, rel=1e-5)


def test_principal_angles_match_known_subspaces_and_numpy():
    d = 6
    e = torch.eye(d)
    theta = 0.3
    tilted = torch.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]])
    angles = subspace.principal_angles(e[:2], tilted)
    assert angles == pytest.approx([0.0, math.degrees(theta)], abs=1e-6)
    assert subspace.principal_angles(e[:2], e[2:4]) == pytest.approx([90.0, 90.0])
    assert subspace.overlap(e[:3], 2 * e[:3]) == pytest.approx(1.0)  # spans, not bases
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, generator=generator), torch.randn(2, 16, generator=generator)
    qa, _ = np.linalg.qr(a.numpy().T.astype(np.float64))
    qb, _ = np.linalg.qr(b.numpy().T.astype(np.float64))
    reference = np.degrees(np.arccos(np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1, 1)))
    assert subspace.principal_angles(a, b) == pytest.approx(np.sort(reference), abs=1e-6)


def test_reft_rs_inspect_subspace(tmp_path, capsys):
    tok = tokenizer()
    build("llama", seed=1, init_range=0.3).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                                                 for p, r in zip(PROMPTS, RESPONSES)))  # fmt: skip
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        get_reft_model(
            model, ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions="l2")
        ).save_pretrained(tmp_path / name)
    argv = ["inspect", str(tmp_path / "a"), "--subspace", "--model", str(tmp_path / "model"), "--data",
            str(tmp_path / "data.jsonl"), "--compare", str(tmp_path / "b"), "--plot", str(tmp_path / "overlap.png")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "promotes" in out and "suppresses" in out and "principal angles" in out
    assert "edited states: mean |Phi(h) - h|" in out
    assert (tmp_path / "overlap.png").read_bytes()[:4] == b"\x89PNG"
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["overlap"]["names"]) == 4
    assert np.allclose(np.diag(report["overlap"]["matrix"]), 1.0)
    assert all(e["states"] == 2 * len(PROMPTS) for e in report["edits"])
    assert main(["inspect", str(tmp_path / "a"), "--data", str(tmp_path / "data.jsonl")]) == 2
    assert "--data goes with --subspace" in capsys.readouterr().err
    reft_rs.io.checkpoint.load(tmp_path / "a")  # untouched
