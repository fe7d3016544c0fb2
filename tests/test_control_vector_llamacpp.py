"""A control vector exported by reft_rs, run in llama.cpp (llama-cpp-python)
and in the Rust engine on the same GGUF file: the same greedy tokens, and
only when the engine steers the layer that llama.cpp numbers as N.

llama.cpp runs in a child process: the vector is loaded the way its
``common_control_vector_load`` lays it out (``direction.N`` at offset
``n_embd * (N - 1)`` of one buffer) and applied with
``llama_apply_adapter_cvec`` over every layer, with a float32 KV cache as the
engine keeps (llama.cpp's default float16 cache moves the greedy text a
dozen tokens in). Optional: skipped without
llama-cpp-python, or where its build cannot run on this CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

import reft_rs  # noqa: E402
from reft_rs.experiments import steering  # noqa: E402
from reft_rs.io import control_vector, pretrained  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n"
NEW = 16

LLAMA_CPP = r"""
import ctypes, json, sys
import numpy as np
import llama_cpp
from reft_rs.io import control_vector

model, vector, prompt, new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
llm = llama_cpp.Llama(
    model_path=model, n_threads=2, n_ctx=256, n_batch=128, verbose=False, type_k=0, type_v=0  # float32 KV, as the engine
)
if vector != "-":
    directions, _ = control_vector.read_control_vector(vector)
    n_embd = llm.n_embd()
    data = np.zeros(n_embd * max(directions), dtype=np.float32)
    for layer, values in directions.items():
        data[n_embd * (layer - 1) : n_embd * layer] += values
    pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    status = llama_cpp.llama_apply_adapter_cvec(llm.ctx, pointer, data.size, n_embd, 1, n_layer - 1)
    assert status == 0, status
tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
out = []
for token in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
    if token == llm.token_eos() or len(out) >= new:
        break
    out.append(int(token))
print(json.dumps(out))
"""


def llama_cpp_tokens(model, vector):
    result = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP, str(model), str(vector), PROMPT, str(NEW)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode < 0:
        pytest.skip(f"llama-cpp-python crashed on this machine (signal {-result.returncode})")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_an_exported_vector_steers_llama_cpp_as_it_steers_the_engine(tmp_path):
    try:
        gguf_file = pretrained.smollm2_gguf()
    except reft_rs.MissingDependencyError as error:
        pytest.skip(str(error))
    model, tokenizer = pretrained.load_smollm2()
    vectors = steering.compute_steering_vectors(
        model,
        tokenizer,
        ["the ocean is deep and blue", "waves crash on the shore"],
        ["mountains rise above the clouds", "the desert is dry and hot"],
        [12],
    )
    steering.save_steering_vectors(model, vectors, tmp_path / "steer")
    control_vector.export_control_vector(tmp_path / "steer", tmp_path / "steer.gguf")
    # llama.cpp's arithmetic: activations rounded to 8 bits in each quantized product.
    engine = reft_rs.Engine(gguf_file, int8_activations=True)
    ids = engine.encode(PROMPT, add_special_tokens=False)
    plain = engine.generate_ids([ids], NEW)[0]
    assert llama_cpp_tokens(gguf_file, "-") == plain  # the two agree without a vector...
    theirs = llama_cpp_tokens(gguf_file, tmp_path / "steer.gguf")
    # ...and with it, where the engine steers layer 12 and only there.
    replies = {}
    for layer in (11, 12, 13):
        steering.save_steering_vectors(model, {layer: vectors[12]}, tmp_path / f"at{layer}")
        engine.add_adapter(f"at{layer}", tmp_path / f"at{layer}")
        replies[layer] = engine.generate_ids([ids], NEW, adapter=f"at{layer}")[0]
    assert replies[12] != plain  # the vector changes the reply
    assert replies[12] == theirs
    assert replies[11] != theirs and replies[13] != theirs
