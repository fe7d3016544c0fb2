"""The engine on GGUF files of every family, made by llama.cpp's own
converter from the tiny models of ``test_engine_families.py``.

A converted float32 file must give transformers' logits on the folder it
came from, and a checkpoint trained on the folder must apply to the file.
Where llama.cpp's converter and loader drop a setting, the file means what
llama.cpp makes of it, and the comparison stays where both agree:

- no sliding window is written for Mistral, Qwen2 or Phi-3 (llama.cpp runs
  them with full attention): prompts within the window;
- nothing is written for dynamic rope scaling: prompts within the context;
- ``query_pre_attn_scalar`` is not written (llama.cpp scales Gemma's scores
  by the head size): the Gemma 2 model here uses the head size;
- Gemma 3's layer pattern is llama.cpp's (every sixth layer global), so the
  Gemma 3 model here has six layers and the default pattern.

Quantized files (``--outtype q8_0``) are compared with their own float32
expansion.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import reft_rs  # noqa: E402
from reft_rs import ReftConfig, get_reft_model  # noqa: E402

from . import llama_cpp_convert  # noqa: E402
from .test_engine import strengthen  # noqa: E402
from .test_engine_families import FAMILIES, TOLERANCE, _build, _config, _intervention  # noqa: E402
from .tiny_models import VOCAB, WORDS, random_ids  # noqa: E402

# Settings llama.cpp does not carry, set to what it assumes.
CHANGES = {
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3": {"num_hidden_layers": 6, "layer_types": None},
}
# The longest prompt on which the file and the folder mean the same model.
REACH = {"mistral-window": 6, "qwen2-window": 5, "phi3-window": 7, "llama-dynamic": 16}
SENTENCES = [" ".join(WORDS[i : i + 7]) for i in range(0, len(WORDS), 3)] * 20


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per family: the Hugging Face folder and its float32 GGUF file."""
    llama_cpp_convert.source()
    root = tmp_path_factory.mktemp("gguf-families")
    out = {}
    for name in FAMILIES:
        folder = root / name
        _build(name, CHANGES.get(name)).save_pretrained(folder)
        llama_cpp_convert.sentencepiece_vocabulary(
            folder, SENTENCES, VOCAB - 6, prefix=not name.startswith("gemma")
        )
        out[name] = (folder, llama_cpp_convert.convert(folder, root / f"{name}.gguf"))
    return out


def _reference(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_a_converted_file_gives_the_folders_logits_and_tokens(converted, name):
    folder, gguf = converted[name]
    engine = reft_rs.Engine(gguf)
    assert engine.model_type == {"mistral-window": "llama", "gemma3": "gemma3"}.get(
        name, _config(name).model_type.replace("_text", "")
    )
    model = _reference(folder)
    n = min(20, REACH.get(name, 20))
    ids = random_ids(1, n, seed=5)[0]
    with torch.no_grad():
        want = model(input_ids=ids[None]).logits[0].numpy()
    assert np.abs(engine.logits(ids.tolist()) - want).max() <= TOLERANCE
    if name not in REACH:
        expected = model.generate(ids[None], max_new_tokens=16, do_sample=False, pad_token_id=0)[
            0, n:
        ].tolist()
        assert engine.generate_ids([ids.tolist()], 16, ignore_eos=True)[0] == expected


@pytest.mark.parametrize("name", ["llama-llama3", "mistral-window", "qwen3", "gemma2", "gemma3", "phi3"])
def test_a_checkpoint_trained_on_the_folder_applies_to_the_file(converted, name, tmp_path):
    folder, gguf = converted[name]
    config = ReftConfig(
        [
            _intervention("loreft", "attention_output", layer=0),
            _intervention("loreft", "mlp_output", layer=1),
            _intervention("red", "block_output", layer=2),
        ]
    )
    torch.manual_seed(2)
    reft_model = get_reft_model(_reference(folder), config)
    strengthen(reft_model, seed=2)
    reft_model.save_pretrained(tmp_path / "reft")
    ids = random_ids(1, min(12, REACH.get(name, 12)), seed=6)[0]
    with torch.no_grad():
        want = reft_model(input_ids=ids[None]).logits[0].numpy()
    got = reft_rs.Engine(gguf, reft=tmp_path / "reft").logits(ids.tolist())
    assert np.abs(got - want).max() <= TOLERANCE


@pytest.mark.parametrize("name", ["llama-linear", "gemma3"])
def test_the_files_vocabulary_tokenizes_as_sentencepiece(converted, name):
    spm = pytest.importorskip("sentencepiece")
    folder, gguf = converted[name]
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    engine = reft_rs.Engine(gguf)
    for text in [
        "the cat sat on the mat",
        "hello  world what colour",
        " sky sea grass tree one two",
        "answer",
    ]:
        assert engine.encode(text) == [2, *processor.encode(text)], text
        assert engine.decode(engine.encode(text)) == processor.decode(processor.encode(text))


@pytest.mark.parametrize("name", ["llama-llama3", "qwen3", "gemma3", "phi3"])
def test_q8_0_products_follow_the_files_float32_expansion(converted, name, tmp_path):
    """The engine's products with Q8_0 blocks against the same file expanded
    to float32 (whose dequantization the real Gemma 3 and SmolLM2 tests
    check against transformers'): within 1e-3 with 16-bit activation
    blocks (the default), further with llama.cpp's 8-bit ones; and the weights'
    rounding itself moves the logits off the float32 folder's."""
    folder, f32 = converted[name]
    gguf = llama_cpp_convert.convert(folder, tmp_path / "q8_0.gguf", "q8_0")
    ids = random_ids(1, min(20, REACH.get(name, 20)), seed=7)[0].tolist()
    expanded = reft_rs.Engine(gguf, dequantize=True).logits(ids)
    engine = reft_rs.Engine(gguf)
    assert engine.quantized
    close = np.abs(engine.logits(ids) - expanded).max()
    rough = np.abs(reft_rs.Engine(gguf, int8_activations=True).logits(ids) - expanded).max()
    weights = np.abs(reft_rs.Engine(f32).logits(ids) - expanded).max()
    assert close <= 1e-3
    assert close < rough <= 0.2
    assert weights > 1e-3
