"""reft_rs.spans against numpy fancy indexing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reft_rs import MASKED, LocationError, ShapeError
from reft_rs.positions import locate
from reft_rs.spans import gather, scatter

ml_dtypes = pytest.importorskip("ml_dtypes")
DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


def reference_gather(hidden, locations):
    groups, batch, width = locations.shape
    out = np.zeros((groups, batch, width, hidden.shape[2]), dtype=hidden.dtype)
    valid = locations != MASKED
    g, b, k = np.nonzero(valid)
    out[g, b, k] = hidden[b, locations[g, b, k]]
    return out


def reference_scatter(hidden, locations, values):
    result = hidden.copy()
    groups, batch, width = locations.shape
    for g in range(groups):  # later groups win, as documented
        for b in range(batch):
            for k in range(width):
                if locations[g, b, k] != MASKED:
                    result[b, locations[g, b, k]] = values[g, b, k]
    return result


@st.composite
def batches(draw):
    batch = draw(st.integers(0, 5))
    sequence = draw(st.integers(1, 12))
    hidden = draw(st.integers(1, 9))
    groups = draw(st.integers(1, 3))
    width = draw(st.integers(0, 5))
    locations = draw(hnp.arrays(np.int64, (groups, batch, width), elements=st.integers(MASKED, sequence - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    states = draw(
        hnp.arrays(np.float32, (batch, sequence, hidden), elements=st.floats(-1e3, 1e3, width=32))
    ).astype(dtype)
    return states, locations


@settings(max_examples=200, deadline=None)
@given(data=batches(), parallel=st.booleans())
def test_gather_matches_fancy_indexing(data, parallel):
    hidden, locations = data
    got = gather(hidden, locations, parallel=parallel)
    expected = reference_gather(hidden, locations)
    assert got.dtype == hidden.dtype
    assert got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()  # bitwise, masked slots zero


@settings(max_examples=200, deadline=None)
@given(data=batches(), parallel=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_scatter_matches_assignment(data, parallel, seed):
    hidden, locations = data
    values = np.random.default_rng(seed).standard_normal((*locations.shape, hidden.shape[2]))
    values = values.astype(np.float32).astype(hidden.dtype)
    expected = reference_scatter(hidden, locations, values)
    scatter(hidden, locations, values, parallel=parallel)
    assert hidden.tobytes() == expected.tobytes()


def test_round_trip_on_large_batches_is_exact_and_leaves_other_tokens_alone():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 128, size=64)
    hidden = rng.standard_normal((64, 128, 96)).astype(np.float32)
    original = hidden.copy()
    locations = locate(lengths, "f7+l7")
    states = gather(hidden, locations)
    assert np.array_equal(states, reference_gather(hidden, locations))
    scatter(hidden, locations, states * 0 + 5.0)
    touched = np.zeros(hidden.shape[:2], dtype=bool)
    g, b, k = np.nonzero(locations != MASKED)
    touched[b, locations[g, b, k]] = True
    assert (hidden[touched] == 5.0).all()
    assert np.array_equal(hidden[~touched], original[~touched])


def test_non_contiguous_inputs_to_gather_are_fine():
    hidden = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 8, 6).transpose(0, 2, 1)
    locations = np.array([[[0, 5], [MASKED, 2]]])
    assert np.array_equal(gather(hidden, locations), reference_gather(hidden, locations))


@pytest.mark.parametrize(
    ("locations", "error", "needle"),
    [
        (np.array([[[5]]]), LocationError, "locations[0, 0, 0] = 5"),
        (np.array([[[-2]]]), LocationError, "= -2"),
        (np.array([[[0], [1]]]), ShapeError, "batch of 2"),
        (np.array([[0]]), ShapeError, "(groups, batch, positions)"),
        (np.array([[[0.5]]]), ShapeError, "integers"),
    ],
)
def test_bad_locations(locations, error, needle):
    hidden = np.zeros((1, 5, 3), dtype=np.float32)
    with pytest.raises(error) as info:
        gather(hidden, locations)
    assert needle in str(info.value)
    values = np.zeros((*np.atleast_3d(locations).shape, 3), dtype=np.float32)
    with pytest.raises((error, ShapeError)):
        scatter(hidden, locations, values)
    assert (hidden == 0).all()


def test_location_errors_are_index_errors():
    with pytest.raises(IndexError):
        gather(np.zeros((1, 2, 2), np.float32), np.array([[[2]]]))


def test_scatter_checks_values_and_target():
    hidden = np.zeros((2, 4, 3), dtype=np.float32)
    locations = np.array([[[0], [1]]])
    with pytest.raises(ShapeError, match="hidden size 4 but the hidden states have 3"):
        scatter(hidden, locations, np.zeros((1, 2, 1, 4), np.float32))
    with pytest.raises(ShapeError, match="leading shape"):
        scatter(hidden, locations, np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ShapeError, match="values must have shape"):
        scatter(hidden, locations, np.zeros((2, 1, 3), np.float32))
    with pytest.raises(TypeError, match="float64"):
        scatter(hidden, locations, np.zeros((1, 2, 1, 3), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        scatter(
            np.zeros((2, 3, 4), np.float32).transpose(0, 2, 1), locations, np.zeros((1, 2, 1, 3), np.float32)
        )
    frozen = np.zeros((2, 4, 3), dtype=np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        scatter(frozen, locations, np.ones((1, 2, 1, 3), np.float32))
    assert (frozen == 0).all()


def test_unsupported_storage():
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        gather(np.zeros((1, 2, 2), np.int32), np.array([[[0]]]))
    with pytest.raises(TypeError, match="numpy array"):
        gather([[[1.0]]], np.array([[[0]]]))
    with pytest.raises(ShapeError, match="batch, sequence, hidden"):
        gather(np.zeros((2, 2), np.float32), np.array([[[0]]]))
