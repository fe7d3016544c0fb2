"""reft_rs.positions against plain-Python statements of the rule."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reft_rs
from reft_rs import MASKED, PositionError, PositionSpec
from reft_rs.positions import locate, locate_spans, per_layer

from . import reference

# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("text", "kind", "first", "last", "indices"),
    [
        ("f7+l7", "first_last", 7, 7, None),
        ("f5", "first_last", 5, 0, None),
        ("l4", "first_last", 0, 4, None),
        ("all", "all", 0, 0, None),
        ("0,2,-1", "indices", 0, 0, [0, 2, -1]),
        ("[3, -2]", "indices", 0, 0, [3, -2]),
    ],
)
def test_spec_forms_parse(text, kind, first, last, indices):
    spec = PositionSpec(text)
    assert (spec.kind, spec.first, spec.last, spec.indices) == (kind, first, last, indices)
    assert PositionSpec(str(spec)) == spec


def test_spec_accepts_index_lists_and_reports_groups():
    assert str(PositionSpec([0, 4, -1])) == "0,4,-1"
    assert PositionSpec("f3+l2").group_count() == 2
    assert PositionSpec("f3+l2").group_count(share_weights=True) == 1
    assert PositionSpec("f3+l2").width() == 3
    assert PositionSpec("f3+l2").width(share_weights=True) == 5
    assert PositionSpec("l4").group_count() == 1
    assert PositionSpec("all").width() is None
    assert len({PositionSpec("f1"), PositionSpec("f1"), PositionSpec("l1")}) == 2


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("f-1", "positive integer"),
        ("x3", "unknown form"),
        ("f3+", "nothing after '+'"),
        ("", "empty"),
        ("   ", "empty"),
        ("f0", "at least 1"),
        ("l3+f2", "first part must be f"),
        ("f3+f2", "after '+' expected l"),
        ("f", "followed by the number"),
        ("f2.5", "positive integer"),
        ("1,,2", "empty"),
        ("[1,2", "close with ']'"),
        ("f99999999999", "larger than"),
    ],
)
def test_bad_specs_raise_a_position_error_naming_the_spec(bad, needle):
    with pytest.raises(PositionError) as info:
        locate([10], bad)
    assert f'"{bad}"' in str(info.value)  # the message names the spec
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_spec_types_are_type_errors():
    with pytest.raises(TypeError, match="position spec"):
        locate([10], 3.5)  # type: ignore[arg-type]
    with pytest.raises(PositionError, match="between 1 and"):
        PositionSpec([])


# ---------------------------------------------------------------- pyreft's examples


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 8, 13, 14, 15, 40])
@pytest.mark.parametrize(("first", "last"), [(7, 7), (3, 1), (1, 3), (2, 2)])
@pytest.mark.parametrize("share_weights", [False, True])
@pytest.mark.parametrize("include_last", [True, False])
def test_matches_pyreft_wherever_pyreft_keeps_its_layout(n, first, last, share_weights, include_last):
    last_position = n if include_last else n - 1
    expected = reference.pyreft_locations(
        max(last_position, 0), first, last, share_weights=share_weights, num_interventions=2
    )
    clamped = min(last_position // 2, first) <= 0 or min(last_position // 2, last) <= 0
    if clamped and not share_weights:
        # pyreft switches to the shared layout when a side clamps to zero, so
        # its row widths change from example to example; reft_rs keeps two
        # groups and masks the empty side (the documented rule below).
        expected = reference.locations([n], f"f{first}+l{last}", include_last=include_last)
        expected = [rows[0] for rows in expected]
    got = locate([n], f"f{first}+l{last}", share_weights=share_weights, include_last=include_last)
    groups = got.shape[0]
    assert [got[g, 0].tolist() for g in range(groups)] == expected[:groups]


def test_pyreft_readme_style_examples():
    # 10-token prompt, f3+l3: prefix [0,1,2], suffix [7,8,9]; shared, all six
    assert locate([10], "f3+l3").tolist() == [[[0, 1, 2]], [[7, 8, 9]]]
    assert locate([10], "f3+l3", share_weights=True).tolist() == [[[0, 1, 2, 7, 8, 9]]]
    # pyreft's datasets leave the last prompt token out
    assert locate([11], "f3+l3", include_last=False).tolist() == [[[0, 1, 2]], [[7, 8, 9]]]
    # a 5-token prompt keeps two at each end and masks the rest
    assert locate([5], "f3+l3").tolist() == [[[0, 1, MASKED]], [[3, 4, MASKED]]]


# ---------------------------------------------------------------- the rule, by property

spec_strategy = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 12)).map(lambda fl: f"f{fl[0]}+l{fl[1]}"),
    st.integers(1, 12).map(lambda p: f"f{p}"),
    st.integers(1, 12).map(lambda s: f"l{s}"),
    st.just("all"),
    st.lists(st.integers(-20, 20), min_size=1, max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(
    spec=spec_strategy,
    examples=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)), max_size=30),
    share_weights=st.booleans(),
    include_last=st.booleans(),
    padding_side=st.sampled_from(["left", "right"]),
    extra=st.integers(0, 4),
    parallel=st.booleans(),
)
def test_locate_matches_the_plain_rule(
    spec, examples, share_weights, include_last, padding_side, extra, parallel
):
    lengths = [n for n, _ in examples]
    sequence = [n + response for n, response in examples]
    padded = max(sequence, default=0) + extra
    got = locate(
        np.array(lengths, dtype=np.int64),
        spec,
        share_weights=share_weights,
        include_last=include_last,
        padding_side=padding_side,
        padded_length=padded,
        sequence_lengths=sequence,
        parallel=parallel,
    )
    expected = reference.locations(
        lengths,
        spec,
        share_weights=share_weights,
        include_last=include_last,
        padding_side=padding_side,
        padded_length=padded,
        sequence_lengths=sequence,
    )
    assert got.dtype == np.int64
    assert got.shape[1] == len(lengths)
    assert got.tolist() == expected


def test_left_and_right_padding_point_at_the_same_tokens():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 200, size=n).tolist() for n in (3, 9, 17, 30)]
    responses = [rng.integers(100, 200, size=n).tolist() for n in (5, 1, 8, 2)]
    sequences = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, sequences))
    right = np.full((4, width), 0)
    left = np.full((4, width), 0)
    for i, tokens in enumerate(sequences):
        right[i, : len(tokens)] = tokens
        left[i, width - len(tokens) :] = tokens
    lengths = [len(p) for p in prompts]
    seq_lengths = [len(s) for s in sequences]
    for spec in ("f3+l3", "all", "l2", [0, -1]):
        loc_right = locate(lengths, spec, sequence_lengths=seq_lengths)
        loc_left = locate(lengths, spec, padding_side="left", sequence_lengths=seq_lengths)
        masked = loc_right == MASKED
        assert np.array_equal(masked, loc_left == MASKED)
        batch = np.arange(4)[None, :, None]
        tokens_right = np.where(masked, -5, right[batch, np.where(masked, 0, loc_right)])
        tokens_left = np.where(masked, -5, left[batch, np.where(masked, 0, loc_left)])
        assert np.array_equal(tokens_right, tokens_left), spec
        # and they are prompt tokens, in the prompt's order
        for i, prompt in enumerate(prompts):
            chosen = [t for t in tokens_right[:, i].ravel() if t != -5]
            assert all(t in prompt for t in chosen)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lengths": [3, -1]}, "lengths[1] = -1 is negative"),
        ({"lengths": [3.0, 2.0]}, "must hold integers"),
        ({"lengths": [[3, 2]]}, "one-dimensional"),
        ({"lengths": [5], "padded_length": 4}, "padded_length 4 is shorter"),
        ({"lengths": [5], "padded_length": -1}, "must not be negative"),
        ({"lengths": [5], "sequence_lengths": [4]}, "shorter than the prompt"),
        ({"lengths": [5], "sequence_lengths": [5, 6]}, "2 entries"),
        ({"lengths": [5], "padding_side": "middle"}, "padding_side"),
        ({"lengths": np.array([2**63], dtype=np.uint64)}, "too large"),
    ],
)
def test_bad_inputs_raise_position_errors(kwargs, needle):
    kwargs = {"spec": "f1+l1", **kwargs}
    with pytest.raises(PositionError, match=None) as info:
        locate(**kwargs)
    assert needle in str(info.value)


def test_empty_dataset_and_tiny_prompts():
    assert locate([], "f7+l7").shape == (2, 0, 7)
    assert locate(np.array([], dtype=np.int32), "all").shape == (1, 0, 0)
    assert (locate([0, 1], "f7+l7") == MASKED).all()


# ---------------------------------------------------------------- memory and threads


def test_result_is_shared_with_torch_without_a_copy():
    torch = pytest.importorskip("torch")
    locations = locate(np.arange(1000) % 50, "f7+l7")
    assert not locations.flags.owndata  # memory allocated by Rust, not copied into numpy
    assert locations.flags.writeable and locations.flags.c_contiguous
    tensor = torch.from_numpy(locations)
    assert tensor.data_ptr() == locations.ctypes.data
    tensor[0, 0, 0] = 123
    assert locations[0, 0, 0] == 123


def test_per_layer_is_a_view():
    locations = locate(np.arange(100), "f4+l4")
    layers = per_layer(locations, 6)
    assert layers.shape == (2, 6, 100, 4)
    assert np.shares_memory(layers, locations)
    assert layers.strides[1] == 0
    assert not layers.flags.writeable
    for layer in range(6):
        assert np.array_equal(layers[1, layer], locations[1])
    with pytest.raises(PositionError):
        per_layer(locations, 0)


def test_parallel_and_sequential_agree_on_large_inputs():
    lengths = np.random.default_rng(1).integers(0, 600, size=300_000)
    for share_weights in (False, True):
        a = locate(lengths, "f7+l7", share_weights=share_weights, parallel=True)
        b = locate(lengths, "f7+l7", share_weights=share_weights, parallel=False)
        assert np.array_equal(a, b)


def test_the_interpreter_is_released_while_locating():
    lengths = np.random.default_rng(2).integers(4, 512, size=1_000_000)
    ticks = 0
    worker = threading.Thread(target=lambda: [locate(lengths, "f7+l7", parallel=False) for _ in range(20)])
    worker.start()
    while worker.is_alive():
        ticks += 1
        time.sleep(0)
    worker.join()
    # Holding the interpreter for the whole call would leave this loop a
    # handful of turns; released, it spins freely for the call's duration.
    assert ticks > 1000


def _child_locate(lengths, queue):
    queue.put(locate(lengths, "f7+l7").sum())


def test_safe_in_forked_children_after_parallel_use():
    lengths = np.random.default_rng(3).integers(0, 512, size=400_000)
    expected = locate(lengths, "f7+l7", parallel=True).sum()  # parent uses the thread pool
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_child_locate, args=(lengths, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert results == [expected, expected]


def test_dataloader_workers_can_locate():
    torch = pytest.importorskip("torch")
    locate(np.arange(200_000) % 300, "f7+l7")  # the parent's pool is running

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            lengths = (np.arange(100_000) + index) % 300
            return torch.from_numpy(locate(lengths, "f7+l7"))

    loader = torch.utils.data.DataLoader(Batches(), batch_size=None, num_workers=2, timeout=120)
    batches = list(loader)
    for index, batch in enumerate(batches):
        expected = locate((np.arange(100_000) + index) % 300, "f7+l7", parallel=False)
        assert np.array_equal(batch.numpy(), expected)


# ---------------------------------------------------------------- character spans


def _reference_spans(offsets, spans, width):
    rows = []
    for tokens, span in zip(offsets, spans):
        start, end = span
        chosen = [i for i, (a, b) in enumerate(tokens) if a < b and start < end and a < end and b > start]
        rows.append(chosen + [MASKED] * (width - len(chosen)))
    return rows


def test_spans_follow_a_real_tokenizers_offsets():
    tokenizers = pytest.importorskip("tokenizers")
    words = "the capital of france is paris and the river is the seine".split()
    vocab = {"[UNK]": 0, "[BOS]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(words)))}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 1)]
    )
    texts = ["the capital of france is paris", "paris and the river seine", "the seine"]
    encodings = tokenizer.encode_batch(texts)
    offsets = [e.offsets for e in encodings]
    subjects = ["france is", "the river", "seine"]
    spans = [(t.index(s), t.index(s) + len(s)) for t, s in zip(texts, subjects)]
    got = locate_spans(offsets, spans)
    width = got.shape[2]
    assert got[0].tolist() == _reference_spans(offsets, spans, width)
    for row, encoding, subject in zip(got[0], encodings, subjects):
        assert " ".join(encoding.tokens[i] for i in row if i != MASKED) == subject
    # two spans per example become two groups; concatenated input gives the same
    two = np.array([[spans[i], (0, 3)] for i in range(3)])
    flat = np.concatenate([np.array(o) for o in offsets])
    got_two = locate_spans(flat, two, token_counts=[len(o) for o in offsets])
    assert got_two.shape[0] == 2
    assert got_two[0, :, :width].tolist() == got[0].tolist()
    # left padding shifts every token by its padding
    left = locate_spans(offsets, spans, padding_side="left", padded_length=10)
    for i, o in enumerate(offsets):
        shift = 10 - len(o)
        assert [p - shift if p != MASKED else p for p in left[0, i]] == got[0, i].tolist()


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 40), st.integers(0, 8)), max_size=12),
            st.one_of(st.just((-1, -1)), st.tuples(st.integers(0, 40), st.integers(0, 20))),
        ),
        max_size=10,
    )
)
def test_spans_match_the_plain_rule(data):
    offsets = [[(a, a + w) for a, w in tokens] for tokens, _ in data]
    spans = [(s, s + w) if s >= 0 else (s, w) for _, (s, w) in data]
    got = locate_spans(offsets, spans, parallel=False)
    width = got.shape[2]
    assert got[0].tolist() == _reference_spans(offsets, spans, width)


def test_span_errors():
    offsets = [[(0, 3), (4, 6)]]
    with pytest.raises(PositionError, match="max_positions is 1"):
        locate_spans(offsets, [(0, 6)], max_positions=1)
    with pytest.raises(PositionError, match="invalid"):
        locate_spans(offsets, [(5, 2)])
    with pytest.raises(PositionError, match="char_spans must have shape"):
        locate_spans(offsets, [0, 6])
    with pytest.raises(PositionError, match="add up to"):
        locate_spans(np.array(offsets[0]), [(0, 6)], token_counts=[3])


def test_module_exports():
    assert reft_rs.MASKED == MASKED == -1
    assert reft_rs.positions.locate is locate
