"""The engine on the real Gemma 3 270M Q4_K_M file (slow).

The reference is transformers on the same file, dequantized to float32 by
transformers' own GGUF reader (``reft_rs.io.pretrained.gemma3_270m_path``),
run over a few hundred positions of English prose (``data/prose.txt``).
The engine must tokenize as transformers does, equal it when the file is
expanded to float32, and stay as close to it on the quantized weights as
llama.cpp does: its largest logit error at most 1.5 times llama.cpp's on the
same tokens. llama.cpp's figures come from llama-cpp-python, live when it is
installed, else as recorded by ``benches/gemma3_llamacpp_logits.py`` in
``data/gemma3_270m_llamacpp.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import reft_rs  # noqa: E402
from reft_rs.io import pretrained  # noqa: E402

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
PROSE = (DATA / "prose.txt").read_text(encoding="utf-8")
RECORDED = json.loads((DATA / "gemma3_270m_llamacpp.json").read_text())


@pytest.fixture(scope="module")
def files():
    try:
        return pretrained.gemma3_270m_gguf(), pretrained.gemma3_270m_path()
    except reft_rs.MissingDependencyError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def reference(files):
    """transformers' tokenizer, model, and float32 logits over the prose."""
    _, folder = files
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = tokenizer(PROSE)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    return tokenizer, model, ids, logits


@pytest.fixture(scope="module")
def engine(files):
    return reft_rs.Engine(files[0])


def _bench():
    """The benchmark script that measures llama.cpp (benches/ is no package)."""
    import importlib.util

    path = Path(__file__).parents[1] / "benches" / "gemma3_llamacpp_logits.py"
    spec = importlib.util.spec_from_file_location("gemma3_llamacpp_logits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def errors(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """Largest and mean |Δ| and top-1 agreement, as the benchmark counts them."""
    return _bench().errors(got, want)


def test_the_file_is_gemma3_with_its_local_and_global_layers(engine):
    assert engine.model_type == "gemma3"
    assert (engine.hidden_size, engine.num_hidden_layers, engine.vocab_size) == (640, 18, 262144)
    assert engine.quantized and engine.has_tokenizer
    assert 1 in engine.eos_token_ids  # <eos>, and <end_of_turn> for chats
    assert 106 in engine.eos_token_ids


@pytest.mark.parametrize(
    "text",
    [
        PROSE,
        "Hello world!  Two spaces,\tand a tab.\n\nNew paragraph   with three spaces.",
        "Ünïcödé, emoji 🙂, 東京, and numbers 1234567.89 in a row",
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
        "   leading spaces and trailing ones   ",
    ],
)
def test_the_gguf_vocabulary_tokenizes_as_transformers(engine, reference, text):
    tokenizer = reference[0]
    want = tokenizer(text)["input_ids"]
    assert engine.encode(text) == want
    assert engine.decode(want[1:]) == tokenizer.decode(want, skip_special_tokens=True)


def test_the_file_expanded_to_float32_equals_transformers(files, reference):
    _, _, ids, want = reference
    got = reft_rs.Engine(files[0], dequantize=True).logits(ids)
    assert len(ids) >= 300
    assert np.abs(got - want).max() <= 1e-3


@pytest.mark.parametrize("int8", [False, True], ids=["16-bit activations", "int8 activations"])
def test_the_quantized_file_is_as_close_to_transformers_as_llama_cpp(files, engine, reference, int8):
    """llama.cpp rounds activations to 8 bits in each product; so does the
    engine with ``int8_activations``, and it must stay within 1.5x of
    llama.cpp's errors. By default the engine's activation blocks are 16-bit
    integers, and its logits follow the dequantized model's closely."""
    _, _, ids, want = reference
    model = reft_rs.Engine(files[0], int8_activations=True) if int8 else engine
    mine = errors(model.logits(ids), want)
    assert RECORDED["token_ids"] == ids  # llama.cpp was measured on these tokens
    llama = RECORDED["llama_cpp"]
    try:
        from llama_cpp import Llama  # noqa: F401
    except ImportError:
        pass
    else:
        llama = errors(_bench().llama_cpp_logits(files[0], ids), want)
    print(f"engine {mine}, llama.cpp {llama}")
    assert mine["top1"] >= 0.95
    assert mine["max_abs"] <= 1.5 * llama["max_abs"]
    assert mine["mean_abs"] <= 1.5 * llama["mean_abs"]
    if not int8:
        assert mine["top1"] >= 0.99 and mine["max_abs"] <= 0.05


def test_greedy_text_follows_transformers(files, engine, reference):
    tokenizer, model, _, _ = reference
    model.generation_config.eos_token_id = None
    expanded = reft_rs.Engine(files[0], dequantize=True)
    prompts = [
        "The capital of France is",
        "Once upon a time, in a small village,",
        "The three primary colours are",
        "To make a cup of tea, first",
    ]
    shared = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
        assert expanded.generate_ids([ids], 24, ignore_eos=True)[0] == want
        got = engine.generate_ids([ids], 24, ignore_eos=True)[0]
        shared.append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want)))
        text = engine.decode(got)
        words = text.split()
        assert len(words) >= 8 and sum(w.strip(".,;:!?'\"").isalpha() for w in words) >= 0.7 * len(words), (
            text
        )
    # The quantized file follows float32's greedy path for many tokens on most prompts.
    assert sorted(shared)[1] >= 8, shared
