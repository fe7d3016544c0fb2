"""The engine's readers of GGUF block layouts against the ``gguf`` package's
own (``gguf.quants.dequantize``), on random blocks written by its
``GGUFWriter``; and the typed refusal of layouts the engine does not read."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from reft_rs.engine import Engine, kernel_isa, read_gguf_tensor  # noqa: E402
from reft_rs.errors import ModelLoadError  # noqa: E402

Q = gguf.GGMLQuantizationType
READ = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Offsets of each block's float16 fields (scales, minimums), as ggml lays
# the blocks out.
HALVES = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}


def random_blocks(qtype, rows: int, width: int, rng) -> np.ndarray:
    """``rows`` rows of ``width`` weights as random blocks of ``qtype``,
    their float16 fields finite values of either sign."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows * width // block, size), dtype=np.uint8)
    for at in HALVES[qtype]:
        halves = rng.normal(0, 0.02, size=data.shape[0]).astype(np.float16)
        data[:, at : at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, width // block * size)


def write(path, tensors: dict[str, tuple[np.ndarray, object]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_every_block_layout_dequantizes_as_the_gguf_package_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    rows, width = 5, 512
    tensors = {f"w.{q.name}": (random_blocks(q, rows, width, rng), q) for q in READ}
    floats = rng.normal(size=(rows, width)).astype(np.float32)
    tensors["w.F16"] = (floats.astype(np.float16), Q.F16)
    bf16 = (floats.view(np.uint32) >> 16).astype(np.uint16)
    tensors["w.BF16"] = (bf16, Q.BF16)
    tensors["w.F32"] = (floats, Q.F32)
    path = tmp_path / "blocks.gguf"
    write(path, tensors)
    for name, (data, qtype) in tensors.items():
        # The reference reads raw bytes.
        want = gguf.quants.dequantize(data.view(np.uint8), qtype).reshape(rows, width)
        got = read_gguf_tensor(path, name)
        assert got.shape == (rows, width), name
        assert np.isfinite(want).all()
        # Same float32 operations up to their order (d·(q − 8) against d·q − 8d).
        tolerance = 1e-6 * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=tolerance, err_msg=name)
    assert kernel_isa() in {"avx512", "avx2", "portable"}


@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.IQ2_XXS, Q.TQ2_0])
def test_layouts_the_engine_does_not_read_are_refused_by_tensor_and_type(tmp_path, qtype):
    rng = np.random.default_rng(1)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    width = 256
    data = rng.integers(0, 256, size=(4, width // block * size), dtype=np.uint8)
    path = tmp_path / "iq.gguf"
    write(
        path,
        {"token_embd.weight": (np.ones((4, 32), np.float32), Q.F32), "blk.0.attn_q.weight": (data, qtype)},
    )
    for load in (lambda: read_gguf_tensor(path, "token_embd.weight"), lambda: Engine(path)):
        with pytest.raises(ModelLoadError, match=rf"blk\.0\.attn_q\.weight has type {qtype.name}\b"):
            load()


def test_a_tensor_the_file_lacks_is_named(tmp_path):
    path = tmp_path / "one.gguf"
    write(path, {"a": (np.ones((2, 32), np.float32), Q.F32)})
    with pytest.raises(ModelLoadError, match="no tensor b"):
        read_gguf_tensor(path, "b")
