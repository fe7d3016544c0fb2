"""Gathering hidden states at intervention positions and scattering edits back.

These are the numpy face of the Rust kernels that the CPU inference engine
uses. Both take a ``(batch, sequence, hidden)`` array of hidden states and a
``(groups, batch, positions)`` locations array from
:func:`reft_rs.positions.locate`; masked slots (-1) are read as zeros and
never written. Storage may be float32, float64, float16 or bfloat16
(``ml_dtypes.bfloat16``); copies are bitwise, so no precision is lost.

Example::

    >>> hidden = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    >>> locations = reft_rs.positions.locate([5, 3], "l1")
    >>> states = gather(hidden, locations)      # (1, 2, 1, 3)
    >>> scatter(hidden, locations, states * 2)  # edits in place
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from .errors import ShapeError

__all__ = ["gather", "scatter"]

_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


def _storage_view(array: np.ndarray) -> np.ndarray:
    """The array itself for float32/float64, a uint16 view for 2-byte floats."""
    if array.dtype in _NATIVE:
        return array
    if array.dtype.itemsize == 2 and (array.dtype.kind == "f" or array.dtype.name == "bfloat16"):
        return array.view(np.uint16)
    raise TypeError(f"hidden states must be float32, float64, float16 or bfloat16, found {array.dtype}")


def _locations(locations: Any) -> np.ndarray:
    array = np.asarray(locations)
    if array.ndim != 3:
        raise ShapeError(f"locations must have shape (groups, batch, positions), found {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise ShapeError(f"locations must hold integers, found dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _hidden(hidden: Any) -> np.ndarray:
    if not isinstance(hidden, np.ndarray):
        raise TypeError(f"hidden states must be a numpy array, found {type(hidden).__name__}")
    if hidden.ndim != 3:
        raise ShapeError(f"hidden states must have shape (batch, sequence, hidden), found {hidden.shape}")
    return hidden


def gather(hidden: np.ndarray, locations: Any, *, parallel: bool = True) -> np.ndarray:
    """Copies the hidden states at ``locations`` into a new array.

    Args:
        hidden: ``(batch, sequence, hidden)`` states.
        locations: ``(groups, batch, positions)`` token indices, -1 for unused.
        parallel: Split large inputs across threads.

    Returns:
        ``(groups, batch, positions, hidden)`` states of ``hidden``'s dtype,
        zeros in masked slots; ``out[g, b, k] == hidden[b, locations[g, b, k]]``.

    Raises:
        ShapeError: The batch sizes disagree.
        LocationError: A location is outside ``0..sequence`` (and not -1).
    """
    hidden = _hidden(hidden)
    storage = np.ascontiguousarray(_storage_view(hidden))
    out = _core.gather(storage, _locations(locations), parallel=bool(parallel))
    return out if out.dtype == hidden.dtype else out.view(hidden.dtype)


def scatter(hidden: np.ndarray, locations: Any, values: np.ndarray, *, parallel: bool = True) -> None:
    """Writes ``values`` into ``hidden`` at ``locations``, in place.

    Args:
        hidden: ``(batch, sequence, hidden)`` states; C-contiguous and writeable.
        locations: ``(groups, batch, positions)`` token indices, -1 for unused.
        values: ``(groups, batch, positions, hidden)`` states, ``hidden``'s dtype.
        parallel: Split large inputs across threads.

    Masked slots are skipped. Where two slots name the same token, the later
    group (then the later slot) wins.

    Raises:
        ShapeError: ``values`` does not match the locations and hidden size.
        LocationError: A location is outside ``0..sequence`` (and not -1).
    """
    hidden = _hidden(hidden)
    if not hidden.flags.c_contiguous:
        raise ValueError("scatter writes in place: hidden must be C-contiguous (np.ascontiguousarray first)")
    if not isinstance(values, np.ndarray) or values.ndim != 4:
        shape = getattr(values, "shape", None)
        raise ShapeError(f"values must have shape (groups, batch, positions, hidden), found {shape}")
    if values.dtype != hidden.dtype:
        raise TypeError(f"values are {values.dtype} but the hidden states are {hidden.dtype}")
    _core.scatter(
        _storage_view(hidden),
        _locations(locations),
        np.ascontiguousarray(_storage_view(values)),
        parallel=bool(parallel),
    )
