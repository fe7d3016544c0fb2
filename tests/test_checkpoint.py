"""reft_rs.io.checkpoint: exact round trips, atomic saves, clear errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest

import reft_rs
from reft_rs.errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidCheckpointError,
    MissingDependencyError,
    UnsupportedFormatError,
)
from reft_rs.io import checkpoint

TYPES = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft", "red", "steer"]
LOW_RANK = {"loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"}
HIDDEN = 12


def make_config(types=TYPES, dtype="float32", **overrides):
    interventions = []
    for index, kind in enumerate(types):
        entry = {
            "name": f"layer_{index % 3}_{kind}",
            "type": kind,
            "layer": index % 3,
            "component": ["block_output", "mlp_output", "attention_output", "block_input"][index % 4],
            "positions": "f3+l3" if kind in LOW_RANK else "all",
            "group": index % 2 if kind in LOW_RANK else 0,
            "low_rank_dimension": 4 if kind in LOW_RANK else None,
            "activation": "gelu" if kind in LOW_RANK else "identity",
            "dropout": 0.1,
            "dtype": dtype,
        }
        if kind == "noreft":
            entry["projection_bias"] = True
        if kind == "steer":
            entry["alpha"] = 2.5
        interventions.append(entry)
    config = {
        "base_model": {
            "name_or_path": "tiny-llama",
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "num_hidden_layers": 3,
        },
        "interventions": interventions,
        "metadata": {"trained_on": "unit tests", "steps": 3},
    }
    config.update(overrides)
    return config


def random_tensors(config, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, dtype, shape in checkpoint.expected_tensors(config):
        values = rng.standard_normal(shape).astype(np.float32)
        if dtype == "bfloat16":
            ml_dtypes = pytest.importorskip("ml_dtypes")
            tensors[key] = values.astype(ml_dtypes.bfloat16)
        else:
            tensors[key] = values.astype(dtype)
    return tensors


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_every_type_round_trips_bit_exactly(tmp_path, dtype):
    config = make_config(dtype=dtype)
    tensors = random_tensors(config)
    # NaN payloads and signed zeros must survive untouched
    first = next(iter(tensors))
    tensors[first].reshape(-1).view(np.uint8)[:4] = [0x01, 0x7F, 0xC1, 0xFF]
    checkpoint.save(tmp_path, config, tensors)
    loaded_config, loaded = checkpoint.load(tmp_path)
    assert sorted(loaded) == sorted(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert loaded[key].shape == value.shape
        assert loaded[key].tobytes() == value.tobytes(), key
    for original, restored in zip(config["interventions"], loaded_config["interventions"]):
        for field, value in original.items():
            assert restored[field] == value, field
    assert loaded_config["metadata"] == config["metadata"]
    assert loaded_config["format_version"] == reft_rs.FORMAT_VERSION
    assert loaded_config["library_version"] == reft_rs.__version__


def test_torch_tensors_round_trip_including_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    config = make_config(dtype="bfloat16")
    generator = torch.Generator().manual_seed(0)
    tensors = {
        key: torch.randn(shape, generator=generator).to(torch.bfloat16)
        for key, _, shape in checkpoint.expected_tensors(config)
    }
    checkpoint.save(tmp_path, config, tensors)
    _, loaded = checkpoint.load(tmp_path, framework="torch")
    for key, value in tensors.items():
        assert loaded[key].dtype == torch.bfloat16
        assert torch.equal(loaded[key].view(torch.int16), value.view(torch.int16))
    # numpy arrays of the same checkpoint carry the same bits
    _, as_numpy = checkpoint.load(tmp_path)
    for key, value in tensors.items():
        assert as_numpy[key].tobytes() == value.view(torch.int16).numpy().tobytes()


def test_loaded_arrays_are_writeable_copies(tmp_path):
    config = make_config(["red"])
    tensors = random_tensors(config)
    checkpoint.save(tmp_path, config, tensors)
    _, loaded = checkpoint.load(tmp_path)
    array = next(iter(loaded.values()))
    array[0] = 42.0  # must not raise, and must not touch the file
    _, again = checkpoint.load(tmp_path)
    assert next(iter(again.values()))[0] != 42.0


def test_expected_tensors_and_paper_parameter_counts():
    config = make_config(["loreft"])
    config["base_model"]["hidden_size"] = 4096
    (rotation, weight, bias) = checkpoint.expected_tensors(config)
    assert [rotation[0], weight[0], bias[0]] == [
        "layer_0_loreft.rotation",
        "layer_0_loreft.weight",
        "layer_0_loreft.bias",
    ]
    assert sum(int(np.prod(shape)) for _, _, shape in (rotation, weight, bias)) == 32_772


def test_normalize_config_fills_defaults():
    minimal = {
        "base_model": {"name_or_path": "m", "model_type": "gpt2", "hidden_size": 8, "num_hidden_layers": 2},
        "interventions": [
            {
                "name": "a",
                "type": "loreft",
                "layer": 1,
                "component": "block_output",
                "positions": "l1",
                "low_rank_dimension": 2,
            }
        ],
    }
    normalized = checkpoint.normalize_config(minimal)
    entry = normalized["interventions"][0]
    assert entry["dtype"] == "float32" and entry["dropout"] == 0.0 and entry["activation"] == "identity"
    assert entry["share_weights"] is False and entry["group"] == 0 and entry["bias"] is True
    assert normalized["format_version"] == reft_rs.FORMAT_VERSION


# ---------------------------------------------------------------- saving


def test_save_replaces_a_checkpoint_and_leaves_no_temporaries(tmp_path):
    first = make_config(["loreft"])
    second = make_config(["red", "steer"])
    checkpoint.save(tmp_path, first, random_tensors(first))
    checkpoint.save(tmp_path, second, random_tensors(second, seed=1))
    assert sorted(os.listdir(tmp_path)) == [checkpoint.CONFIG_FILE, checkpoint.TENSORS_FILE]
    config, tensors = checkpoint.load(tmp_path)
    assert [i["type"] for i in config["interventions"]] == ["red", "steer"]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c, t: t.pop(next(iter(t))), "is missing"),
        (lambda c, t: t.update({"stray": np.zeros(2, np.float32)}), "belongs to no intervention"),
        (lambda c, t: t.update({k: np.zeros(3, np.float32) for k in list(t)[:1]}), "shape"),
        (lambda c, t: t.update({k: v.astype(np.float64) for k, v in list(t.items())[:1]}), "float64"),
        (lambda c, t: c["interventions"][0].update(layer=3), "layer 3 does not exist"),
        (lambda c, t: c["interventions"][0].update(type="megareft"), "unknown intervention type"),
        (lambda c, t: c["interventions"][0].update(low_rank_dimension=99), "low_rank_dimension 99"),
        (lambda c, t: c["interventions"][0].update(component="mlp_input"), "mlp_input"),
        (lambda c, t: c["interventions"][0].update(positions="f-2"), "f-2"),
        (lambda c, t: c["interventions"][0].update(dropuot=0.3), "dropuot"),
        (lambda c, t: c["interventions"][1].update(name=c["interventions"][0]["name"]), "named"),
        (lambda c, t: c.pop("base_model"), "base_model"),
        (lambda c, t: c.update(metadata={"path": object()}), "JSON"),
        (lambda c, t: t.update({k: [1.0, 2.0] for k in list(t)[:1]}), "numpy array or torch tensor"),
        (lambda c, t: t.update({k: np.zeros(4, np.complex64) for k in list(t)[:1]}), "complex64"),
    ],
)
def test_save_refuses_bad_input_without_touching_the_folder(tmp_path, mutate, needle):
    good = make_config(["loreft", "red"])
    checkpoint.save(tmp_path, good, random_tensors(good))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    config = json.loads(json.dumps(good))
    tensors = random_tensors(good, seed=5)
    mutate(config, tensors)
    with pytest.raises(InvalidCheckpointError) as info:
        checkpoint.save(tmp_path, config, tensors)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before


def test_save_into_an_impossible_place_is_an_os_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = make_config(["red"])
    with pytest.raises(CheckpointIOError) as info:
        checkpoint.save(blocker / "ckpt", config, random_tensors(config))
    assert isinstance(info.value, OSError)
    assert str(blocker) in str(info.value)


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    old = make_config(["loreft"])
    old_tensors = random_tensors(old, seed=1)
    checkpoint.save(tmp_path / "ckpt", old, old_tensors)
    new = make_config(["loreft", "red"])
    checkpoint.save(tmp_path / "other", new, random_tensors(new, seed=2))
    # The state a crash between the two renames of a save leaves: the new
    # tensor file in place, the old config, the old tensors kept aside.
    folder = tmp_path / "ckpt"
    os.link(folder / checkpoint.TENSORS_FILE, folder / "reft_model.safetensors.previous")
    shutil.copy(tmp_path / "other" / checkpoint.TENSORS_FILE, folder / "incoming")
    os.replace(folder / "incoming", folder / checkpoint.TENSORS_FILE)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        config, tensors = checkpoint.load(folder)
    assert [i["type"] for i in config["interventions"]] == ["loreft"]
    for key, value in old_tensors.items():
        assert tensors[key].tobytes() == value.tobytes()
    # The header-only reader (the command line's) reads the same, and says so.
    with pytest.warns(RuntimeWarning, match="interrupted"):
        layout_config, layout = checkpoint.read_layout(folder)
    assert layout_config == config
    assert sorted(layout) == sorted((k, str(v.dtype), v.shape) for k, v in old_tensors.items())
    # without the kept file, the mix is refused rather than loaded wrongly
    os.remove(folder / "reft_model.safetensors.previous")
    with pytest.raises(CorruptCheckpointError, match="different save"):
        checkpoint.load(folder)


# ---------------------------------------------------------------- loading


@pytest.fixture
def saved(tmp_path):
    config = make_config(["loreft", "steer"])
    checkpoint.save(tmp_path, config, random_tensors(config))
    return tmp_path


def test_missing_folder_and_files(saved):
    with pytest.raises(CheckpointNotFoundError) as info:
        checkpoint.load(saved / "nowhere")
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.path == str(saved / "nowhere")
    os.remove(saved / checkpoint.TENSORS_FILE)
    with pytest.raises(CheckpointNotFoundError, match=checkpoint.TENSORS_FILE):
        checkpoint.load(saved)
    os.remove(saved / checkpoint.CONFIG_FILE)
    with pytest.raises(CheckpointNotFoundError, match=checkpoint.CONFIG_FILE):
        checkpoint.load(saved)


@pytest.mark.parametrize("cut", [1, 8, 50, -1, -7])
def test_truncated_tensor_files_are_corrupt(saved, cut):
    path = saved / checkpoint.TENSORS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CorruptCheckpointError) as info:
        checkpoint.load(saved)
    assert info.value.path == str(path)
    assert checkpoint.TENSORS_FILE in str(info.value)


def test_garbage_tensor_file_is_corrupt(saved):
    (saved / checkpoint.TENSORS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptCheckpointError):
        checkpoint.load(saved)


def _safetensors_file(header: dict, data: bytes) -> bytes:
    """A file laid out as the safetensors format specifies: the header's
    length as 8 little-endian bytes, the JSON header, then the bytes."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def test_hostile_tensor_headers_are_refused_before_the_tensors_are_read(saved):
    """Headers that claim more than any checkpoint holds, or tensors the
    config does not describe, are refused from the header alone; a file
    with bytes past the tensors is incomplete too."""
    path = saved / checkpoint.TENSORS_FILE
    original = path.read_bytes()
    length = int.from_bytes(original[:8], "little")
    header = json.loads(original[8 : 8 + length])
    cases = [
        # A header length of 2^40 bytes, and nothing after it.
        ((1 << 40).to_bytes(8, "little") + b"{}", "header claims"),
        # 5 GiB of one tensor, none of it present.
        (
            _safetensors_file(
                {"w": {"dtype": "F32", "shape": [1250 * 1000 * 1000], "data_offsets": [0, 5 * 10**9]}}, b""
            ),
            "more than the",
        ),
        # The real header with a tensor the config does not have, its bytes present.
        (
            _safetensors_file(
                {
                    **header,
                    "intruder": {
                        "dtype": "F32",
                        "shape": [2],
                        "data_offsets": [len(original) - 8 - length, len(original) - length],
                    },
                },
                original[8 + length :] + b"\0" * 8,
            ),
            "intruder",
        ),
        # Bytes past the last tensor.
        (original + b"\0" * 16, "not a complete safetensors file"),
    ]
    for data, named in cases:
        path.write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match=named) as info:
            checkpoint.load(saved)
        assert info.value.path == str(path)
    path.write_bytes(original)
    config, tensors = checkpoint.load(saved)[:2]
    assert config is not None and tensors


def _edit_config(folder, edit):
    path = folder / checkpoint.CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("edit", "error", "needle"),
    [
        (lambda c: c["interventions"][0].pop("layer"), InvalidCheckpointError, "missing field `layer`"),
        (lambda c: c.pop("interventions"), InvalidCheckpointError, "interventions"),
        (lambda c: c["interventions"][0].update(type="ultrareft"), InvalidCheckpointError, "ultrareft"),
        (lambda c: c["interventions"][0].update(low_rank_dimension=2), CorruptCheckpointError, "shape"),
        (lambda c: c["interventions"][0].update(dtype="float16"), CorruptCheckpointError, "float16"),
        (lambda c: c["base_model"].update(hidden_size=16), CorruptCheckpointError, "shape"),
        (lambda c: c.update(format_version=99), UnsupportedFormatError, "format_version 99"),
        (lambda c: c.pop("format_version"), InvalidCheckpointError, "format_version"),
    ],
)
def test_bad_configs_are_named(saved, edit, error, needle):
    _edit_config(saved, edit)
    with pytest.raises(error) as info:
        checkpoint.load(saved)
    assert needle in str(info.value)
    assert str(saved) in str(info.value)
    assert info.value.path is not None


def test_config_that_is_not_json(saved):
    (saved / checkpoint.CONFIG_FILE).write_text("{'single': quotes}")
    with pytest.raises(InvalidCheckpointError, match="not valid JSON"):
        checkpoint.load(saved)


def test_bfloat16_to_numpy_needs_ml_dtypes(tmp_path, monkeypatch):
    config = make_config(["red"], dtype="bfloat16")
    checkpoint.save(tmp_path, config, random_tensors(config))
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(MissingDependencyError, match="framework='torch'"):
        checkpoint.load(tmp_path)


def test_errors_pickle_with_their_path(saved):
    with pytest.raises(CheckpointNotFoundError) as info:
        checkpoint.load(saved / "gone")
    restored = pickle.loads(pickle.dumps(info.value))
    assert type(restored) is CheckpointNotFoundError
    assert restored.path == info.value.path
    assert str(restored) == str(info.value)


def test_bad_framework(saved):
    with pytest.raises(ValueError, match="framework"):
        checkpoint.load(saved, framework="jax")  # type: ignore[arg-type]
