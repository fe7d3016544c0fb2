"""Steering vectors from contrastive pairs, edit strength in the torch path,
and llama.cpp control vectors in and out."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from reft_rs import (  # noqa: E402
    InterventionConfig,
    ReftConfig,
    ReftModel,
    get_reft_model,
)
from reft_rs.errors import ConfigError, InvalidCheckpointError  # noqa: E402
from reft_rs.experiments import steering  # noqa: E402
from reft_rs.io import checkpoint, control_vector  # noqa: E402

from .tiny_models import HIDDEN, build, random_ids, tokenizer  # noqa: E402

POSITIVE = ["hey what's up", "lol sure thing", "yeah cool see ya", "nah it's fine dude"]
NEGATIVE = [
    "Good afternoon, how may I help you?",
    "Certainly, I would be glad to.",
    "Thank you, until tomorrow.",
    "No, that is quite acceptable, sir.",
]


def reference_states(model, tok, texts, layer, read):
    """Each prompt alone through the model, the layer's output from
    transformers' own hidden_states (entry layer + 1)."""
    rows = []
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0].double()
        rows.append((states[-1] if read == "last" else states.mean(dim=0)).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("read", ["last", "mean"])
def test_vectors_match_a_plain_numpy_computation(read):
    model, tok = build("llama", seed=2, init_range=0.3), tokenizer(chat=False)
    vectors = {
        method: steering.compute_steering_vectors(
            model, tok, POSITIVE, NEGATIVE, [0, 1], method=method, read=read, batch_size=3
        )
        for method in ("mean_difference", "pca")
    }
    for layer in (0, 1):
        p = reference_states(model, tok, POSITIVE, layer, read)
        n = reference_states(model, tok, NEGATIVE, layer, read)
        np.testing.assert_allclose(
            vectors["mean_difference"][layer], p.mean(0) - n.mean(0), rtol=1e-5, atol=1e-5
        )
        # PCA: the top eigenvector of DᵀD, oriented and scaled by the gap.
        d = p - n
        _, eigenvectors = np.linalg.eigh(d.T @ d)
        u = eigenvectors[:, -1]
        gap = (p @ u).mean() - (n @ u).mean()
        expected = u * gap  # flipping the sign of u flips the gap too: the same vector
        np.testing.assert_allclose(vectors["pca"][layer], expected, rtol=1e-4, atol=1e-5)
        assert (p @ vectors["pca"][layer]).mean() > (n @ vectors["pca"][layer]).mean()


def test_bad_pairs_are_refused():
    model, tok = build("llama", seed=2), tokenizer(chat=False)
    with pytest.raises(ConfigError, match="as many negative"):
        steering.compute_steering_vectors(model, tok, POSITIVE, NEGATIVE[:2], [0])
    with pytest.raises(ConfigError, match="at least two pairs"):
        steering.compute_steering_vectors(model, tok, POSITIVE[:1], NEGATIVE[:1], [0], method="pca")
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        steering.compute_steering_vectors(model, tok, POSITIVE, NEGATIVE, [7])
    with pytest.raises(ConfigError, match="non-empty string"):
        steering.compute_steering_vectors(model, tok, ["", "a"], ["b", "c"], [0])


def add_at_layer_output(model, layer, vector):
    """A hook written plainly: adds ``vector`` to the output of model.model.layers[layer]."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + torch.as_tensor(vector, dtype=hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return model.model.layers[layer].register_forward_hook(hook)


def test_a_steering_checkpoint_runs_with_any_strength(tmp_path):
    model, tok = build("llama", seed=2, init_range=0.3), tokenizer(chat=False)
    steering.steering_checkpoint(model, tok, POSITIVE, NEGATIVE, [1], tmp_path / "steer", method="pca")
    config, tensors = checkpoint.load(tmp_path / "steer")
    vector = tensors[f"{config['interventions'][0]['name']}.vector"]
    ids = random_ids(2, 6)
    reft_model = ReftModel.from_pretrained(build("llama", seed=2, init_range=0.3), tmp_path / "steer")
    plain = build("llama", seed=2, init_range=0.3)
    for alpha in (1.0, 2.5, -1.5, 0.0):
        handle = add_at_layer_output(plain, 1, alpha * vector)
        with torch.no_grad():
            expected = plain(input_ids=ids).logits
            got = reft_model(input_ids=ids, strength=alpha).logits
        handle.remove()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_strength_scales_any_edit_in_torch():
    """h + α(Φ(h) − h) for a LoReFT edit at chosen positions, against the
    edit computed by the intervention module and mixed by hand."""
    ids = random_ids(1, 8, seed=1)
    config = ReftConfig([InterventionConfig(layer=1, low_rank_dimension=2, positions="l3")])
    reft_model = get_reft_model(build("llama", seed=1), config)
    with torch.no_grad():
        for p in reft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    intervention = reft_model.interventions[0]
    plain = build("llama", seed=1)
    for alpha in (0.5, 3.0, -1.0):

        def hook(module, args, output, alpha=alpha):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            h = hidden[0, -3:]
            hidden[0, -3:] = h + alpha * (intervention(h, dropout=False) - h)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = plain.model.layers[1].register_forward_hook(hook)
        with torch.no_grad():
            expected = plain(input_ids=ids).logits
            got = reft_model(input_ids=ids, strength=alpha).logits
        handle.remove()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        base = build("llama", seed=1)(input_ids=ids).logits
        torch.testing.assert_close(reft_model(input_ids=ids, strength=0.0).logits, base, rtol=0, atol=0)
        a = reft_model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, strength=0.0)
        assert torch.equal(
            a, build("llama", seed=1).generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        )
    with pytest.raises(ConfigError, match="finite"):
        reft_model(input_ids=ids, strength=float("nan"))


def write_repeng_style(path, directions, model_hint="llama"):
    """A control-vector file laid out as repeng's ControlVector.export_gguf writes it."""
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, vector in directions.items():
        writer.add_tensor(f"direction.{layer}", np.asarray(vector, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_control_vectors_map_direction_n_to_layer_n_output(tmp_path):
    rng = np.random.default_rng(0)
    directions = {1: rng.normal(size=HIDDEN), 2: rng.normal(size=HIDDEN)}
    write_repeng_style(tmp_path / "cv.gguf", directions)
    model = build("llama", seed=1)
    config = control_vector.import_control_vector(tmp_path / "cv.gguf", tmp_path / "steer", base_model=model)
    assert [(i.layer, i.type, i.component, i.positions) for i in config.interventions] == [
        (1, "steer", "block_output", "all"),
        (2, "steer", "block_output", "all"),
    ]
    # llama.cpp adds direction.N to the output of 0-based layer N, on every token.
    plain = build("llama", seed=1)
    handles = [add_at_layer_output(plain, layer, vector) for layer, vector in directions.items()]
    ids = random_ids(2, 5)
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        got = ReftModel.from_pretrained(model, tmp_path / "steer")(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # And back out: the same directions, as llama.cpp's loader reads them.
    written = control_vector.export_control_vector(tmp_path / "steer", tmp_path / "back.gguf")
    read, meta = control_vector.read_control_vector(tmp_path / "back.gguf")
    assert meta == {"architecture": "controlvector", "model_hint": "llama"}
    assert sorted(read) == [1, 2]
    for layer, vector in directions.items():
        np.testing.assert_array_equal(read[layer], vector.astype(np.float32))
        np.testing.assert_array_equal(written[layer], vector.astype(np.float32))
    reader = gguf.GGUFReader(str(tmp_path / "back.gguf"))
    assert int(reader.fields["controlvector.layer_count"].parts[-1][0]) == 2


def test_control_vector_import_without_a_model_and_its_refusals(tmp_path):
    rng = np.random.default_rng(1)
    write_repeng_style(tmp_path / "a.gguf", {3: rng.normal(size=8), 5: rng.normal(size=8)}, "mistral")
    with pytest.warns(UserWarning, match="at least 6 layers"):
        control_vector.import_control_vector(tmp_path / "a.gguf", tmp_path / "a")
    config, _ = checkpoint.load(tmp_path / "a")
    assert config["base_model"]["model_type"] == "mistral" and config["base_model"]["hidden_size"] == 8

    def bad(name, build_file, match):
        path = tmp_path / f"{name}.gguf"
        build_file(path)
        with pytest.raises(InvalidCheckpointError, match=match):
            control_vector.read_control_vector(path)

    def writer(path, tensors, arch="controlvector"):
        w = gguf.GGUFWriter(str(path), arch)
        for key, value in tensors.items():
            w.add_tensor(key, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    bad("zero", lambda p: writer(p, {"direction.0": np.ones(4, np.float32)}), "direction.0")
    bad("name", lambda p: writer(p, {"token_embd.weight": np.ones(4, np.float32)}), "not named direction")
    bad("half", lambda p: writer(p, {"direction.1": np.ones(4, np.float16)}), "not float32")
    bad("matrix", lambda p: writer(p, {"direction.1": np.ones((2, 4), np.float32)}), "one dimension")
    bad(
        "widths",
        lambda p: writer(p, {"direction.1": np.ones(4, np.float32), "direction.2": np.ones(5, np.float32)}),
        "the others 4",
    )
    bad(
        "model",
        lambda p: writer(p, {"direction.1": np.ones(4, np.float32)}, arch="llama"),
        "not 'controlvector'",
    )
    bad("garbage", lambda p: p.write_bytes(b"GGUF" + bytes(range(200))), "not a readable GGUF")
    bad("empty", lambda p: writer(p, {}), "no direction tensors")
    model = build("llama", seed=1)
    write_repeng_style(tmp_path / "deep.gguf", {9: np.ones(HIDDEN)})
    with pytest.raises(ConfigError, match="does not have"):
        control_vector.import_control_vector(tmp_path / "deep.gguf", tmp_path / "deep", base_model=model)
    # Export refuses what llama.cpp cannot express.
    for config, match in [
        (ReftConfig([InterventionConfig(layer=0, type="steer", positions="all")]), "layer 0"),
        (ReftConfig.for_layers([1], low_rank_dimension=2, positions="l1"), "loreft"),
    ]:
        get_reft_model(build("llama", seed=1), config).save_pretrained(tmp_path / "x")
        with pytest.raises(ConfigError, match=match):
            control_vector.export_control_vector(tmp_path / "x", tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()
