"""The Rust engine on the real SmolLM2-135M-Instruct, against the torch path.

Float32 safetensors (the cached conversion): logits within 1e-3 of the torch
path with the same checkpoint, and 64 identical greedy tokens. The GGUF file
itself: expanded to float32 it agrees with transformers' own GGUF loading
within 1e-3; with its Q4_1 blocks kept, activations are rounded to 8-bit
blocks inside each matrix product (as llama.cpp does), so logits move by up to
about one unit and the check is on the distributions instead (KL divergence).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

import reft_rs  # noqa: E402
from reft_rs import InterventionConfig, ReftConfig, get_reft_model  # noqa: E402
from reft_rs.io import pretrained  # noqa: E402

pytestmark = pytest.mark.slow

TEXT = (
    "The history of the Roman Empire spans many centuries, beginning with the founding of the city "
    "and ending with the fall of Constantinople. Its legacy"
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        gguf_file = pretrained.smollm2_gguf()
    except reft_rs.MissingDependencyError as error:
        pytest.skip(str(error))
    model, tokenizer = pretrained.load_smollm2()
    model.generation_config.eos_token_id = None  # the engine side passes ignore_eos
    config = ReftConfig(
        ReftConfig.for_layers([3, 9, 18, 24], low_rank_dimension=4, positions="f5+l5").interventions
        + [
            InterventionConfig(layer=5, type="red", component="mlp_output"),
            InterventionConfig(
                layer=12, type="direft", component="attention_output", low_rank_dimension=2, positions="l3"
            ),
        ]
    )
    reft_model = get_reft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for intervention in reft_model.interventions:
            if intervention.kind == "red":
                intervention.scale.copy_(1 + 0.2 * torch.randn(intervention.dim, generator=generator))
            else:
                intervention.weight.mul_(4)
    path = tmp_path_factory.mktemp("smollm2-reft") / "reft"
    reft_model.save_pretrained(path)
    return reft_model, tokenizer, pretrained.smollm2_path(), gguf_file, path


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_float32_logits_and_greedy_tokens_match_the_torch_path(smollm2):
    reft_model, tokenizer, folder, _, path = smollm2
    engine = reft_rs.Engine(folder, reft=path, threads=2)
    ids = tokenizer(TEXT)["input_ids"]
    assert engine.encode(TEXT) == ids
    with torch.no_grad():
        expected = reft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
        plain = reft_model.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = engine.logits(ids)
    assert np.abs(expected - plain).max() > 1.0
    assert np.abs(got - expected).max() <= 1e-3
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What do bees make?"}], tokenize=False, add_generation_prompt=True
    )
    assert engine.apply_chat_template([{"role": "user", "content": "What do bees make?"}]) == prompt
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    torch_tokens = reft_model.generate(torch.tensor([prompt_ids]), max_new_tokens=64, do_sample=False)
    torch_tokens = torch_tokens[0, len(prompt_ids) :].tolist()
    assert engine.generate_ids([prompt_ids], 64, ignore_eos=True)[0] == torch_tokens


def test_gguf_agrees_with_transformers_gguf_loading(smollm2):
    reft_model, tokenizer, folder, gguf_file, path = smollm2
    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        # load_smollm2 reads the GGUF file with transformers (dequantized to float32)
        reference = reft_model.model(input_ids=torch.tensor([ids])).logits[0].numpy()
        edited = reft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    expanded = reft_rs.Engine(gguf_file, dequantize=True, threads=2)
    assert not expanded.quantized and expanded.encode(TEXT) == ids
    assert np.abs(expanded.logits(ids) - reference).max() <= 1e-3
    # A checkpoint trained on the Hugging Face model applies to the GGUF file.
    with_reft = reft_rs.Engine(gguf_file, reft=path, dequantize=True, threads=2)
    assert np.abs(with_reft.logits(ids) - edited).max() <= 1e-3

    quantized = reft_rs.Engine(gguf_file, threads=2)
    assert quantized.quantized
    got = quantized.logits(ids)
    p = np.exp(log_softmax(reference))
    kl = (p * (log_softmax(reference) - log_softmax(got))).sum(-1)
    # Measured: mean 0.0025, max 0.008 nats; a wrong layout or rotary
    # pairing gives KL of several nats.
    assert kl.mean() < 0.02 and kl.max() < 0.05, kl
    assert (got.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
    reply = quantized.chat("What colour is the sky?", max_new_tokens=12)
    assert "blue" in reply.lower()
