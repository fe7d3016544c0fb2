"""Choosing the token positions each intervention edits.

A position spec says which prompt tokens of each example an intervention
edits:

- ``"f{p}+l{s}"``: the first ``p`` and the last ``s`` prompt tokens;
  ``"f{p}"`` and ``"l{s}"`` take one end only (pyreft's forms);
- ``"all"``: every prompt token;
- explicit token indices, ``[0, 2, -1]`` or ``"0,2,-1"`` (negative indices
  count back from the end of the prompt; indices past a prompt are masked);
- on a vision-language model, ``"image"`` (every image token of the prompt)
  or ``"image:"`` with any of the forms above counted over the image tokens
  alone (``"image:f4"``, ``"image:l4"``, also written ``"image:first4"``,
  ``"image:last4"``), while the other forms count over the prompt's text
  tokens only, skipping the image placeholders (:func:`locate_in_tokens`).

The selection follows pyreft's clamp rule: with ``n`` prompt tokens, an
example keeps the first ``min(n // 2, p)`` and the last ``min(n // 2, s)``,
so the two ends never overlap. :func:`locate` applies it to a whole dataset
in Rust and returns one ``int64`` array of shape
``(groups, examples, max_positions)`` with :data:`MASKED` (-1) in unused
slots, never a real token.

Groups: with ``share_weights=True`` (or a one-sided spec, ``"all"``, or an
index list) there is one group; otherwise ``"f{p}+l{s}"`` gives a prefix group
(0) and a suffix group (1), one intervention each per layer. Interventions at
different layers reuse their group's block as a view (:func:`per_layer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from . import _core
from ._core import MASKED, PositionSpec
from .errors import PositionError

__all__ = [
    "IGNORE_INDEX",
    "MASKED",
    "PositionSpec",
    "locate",
    "locate_in_tokens",
    "locate_spans",
    "per_layer",
]

#: The label of a token the loss skips (transformers' and torch's
#: ``ignore_index``): the prompt, whose end the positions are counted from.
IGNORE_INDEX = -100

PaddingSide = Literal["left", "right"]


def _int64_vector(values: Any, name: str) -> np.ndarray:
    """``values`` as a contiguous int64 vector, refusing non-integers."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise PositionError(f"{name} must be one-dimensional, found shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise PositionError(f"{name} must hold integers, found dtype {array.dtype}")
    if array.dtype.kind == "u" and array.dtype.itemsize == 8 and int(array.max()) > np.iinfo(np.int64).max:
        raise PositionError(f"{name} holds a value too large for int64")
    return np.ascontiguousarray(array, dtype=np.int64)


def _padded_length(padded_length: int | None) -> int | None:
    if padded_length is None:
        return None
    if isinstance(padded_length, bool) or not isinstance(padded_length, (int, np.integer)):
        raise PositionError(f"padded_length must be an integer or None, found {padded_length!r}")
    if padded_length < 0:
        raise PositionError(f"padded_length must not be negative, found {padded_length}")
    return int(padded_length)


def locate(
    lengths: Sequence[int] | np.ndarray,
    spec: str | Sequence[int] | PositionSpec,
    *,
    share_weights: bool = False,
    include_last: bool = True,
    padding_side: PaddingSide = "right",
    padded_length: int | None = None,
    sequence_lengths: Sequence[int] | np.ndarray | None = None,
    parallel: bool = True,
) -> np.ndarray:
    """Chooses the intervention positions of every example of a dataset.

    Args:
        lengths: Prompt length (in tokens) of each example.
        spec: A position spec: ``"f7+l7"``, ``"f5"``, ``"l3"``, ``"all"``,
            a list of token indices, or a :class:`PositionSpec`.
        share_weights: One group holding first and last positions (one
            intervention per layer) instead of a prefix and a suffix group.
        include_last: Whether the last prompt token may be chosen (the ReFT
            paper's scripts). ``False`` follows pyreft's library datasets,
            which leave it out.
        padding_side: ``"right"`` or ``"left"``: where the batch's padding
            sits. Left padding moves each example's positions right by its
            padding, ``padded_length - sequence_length``.
        padded_length: Length of the padded batch. Defaults to the longest
            sequence; any value given is checked against every sequence.
        sequence_lengths: Tokens per example in the batch (prompt plus
            response) when they differ from ``lengths``; needed to place
            left padding in training batches. Defaults to ``lengths``.
        parallel: Split large inputs across threads (the interpreter is
            released either way). Safe in forked DataLoader workers.

    Returns:
        An ``int64`` array of shape ``(groups, len(lengths), max_positions)``
        with :data:`MASKED` in unused slots. It owns Rust-allocated memory and
        is writeable, so ``torch.from_numpy`` shares it without a copy.

    Raises:
        PositionError: A bad spec (naming it and what is wrong), negative
            lengths, or padding that does not fit.

    Example::

        >>> locate([10, 3], "f2+l2")
        array([[[ 0,  1],
                [ 0, -1]],
        <BLANKLINE>
               [[ 8,  9],
                [ 2, -1]]])
    """
    lengths_array = _int64_vector(lengths, "lengths")
    sequence = None if sequence_lengths is None else _int64_vector(sequence_lengths, "sequence_lengths")
    return _core.locate(
        lengths_array,
        spec,
        share_weights=bool(share_weights),
        include_last=bool(include_last),
        padding_side=padding_side,
        padded_length=_padded_length(padded_length),
        sequence_lengths=sequence,
        parallel=bool(parallel),
    )


def locate_in_tokens(
    tokens: Sequence[Sequence[int]] | Sequence[np.ndarray],
    lengths: Sequence[int] | np.ndarray,
    spec: str | Sequence[int] | PositionSpec,
    image_token_id: int,
    *,
    share_weights: bool = False,
    include_last: bool = True,
    padding_side: PaddingSide = "right",
    padded_length: int | None = None,
    sequence_lengths: Sequence[int] | np.ndarray | None = None,
    parallel: bool = True,
) -> np.ndarray:
    """:func:`locate` for a vision-language model's prompts, from their
    token ids: image specs (``"image"``, ``"image:l4"``...) choose among the
    prompt's image tokens (``image_token_id``, the placeholders the
    processor expanded), every other spec among its text tokens only.

    Args:
        tokens: Each example's token ids, unpadded, prompt first (a list of
            lists or arrays).
        lengths: Prompt tokens per example.
        spec: The position spec.
        image_token_id: The image placeholder's id (the model config's
            ``image_token_id``).
        sequence_lengths: Tokens per example in the padded batch; by
            default the length of each row of ``tokens``.
        Others: as in :func:`locate`; positions are counted in the whole
        (padded) sequence.

    Returns:
        The ``(groups, examples, max_positions)`` int64 array.

    Example::

        >>> locate_in_tokens([[5, 9, 9, 9, 6, 7]], [6], "image", image_token_id=9)
        array([[[1, 2, 3]]])
        >>> locate_in_tokens([[5, 9, 9, 9, 6, 7]], [6], "f1+l1", image_token_id=9, share_weights=True)
        array([[[0, 5]]])
    """
    rows = [_int64_vector(row, "tokens[i]") for row in tokens]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    lengths_array = _int64_vector(lengths, "lengths")
    if len(lengths_array) != len(rows):
        raise PositionError(f"{len(rows)} token rows but {len(lengths_array)} lengths")
    sequence = None if sequence_lengths is None else _int64_vector(sequence_lengths, "sequence_lengths")
    return _core.locate_in_tokens(
        flat,
        offsets,
        lengths_array,
        spec,
        int(image_token_id),
        share_weights=bool(share_weights),
        include_last=bool(include_last),
        padding_side=padding_side,
        padded_length=_padded_length(padded_length),
        sequence_lengths=sequence,
        parallel=bool(parallel),
    )


def locate_spans(
    offsets: Sequence[Any] | np.ndarray,
    char_spans: Sequence[Any] | np.ndarray,
    *,
    token_counts: Sequence[int] | np.ndarray | None = None,
    max_positions: int | None = None,
    padding_side: PaddingSide = "right",
    padded_length: int | None = None,
    sequence_lengths: Sequence[int] | np.ndarray | None = None,
    parallel: bool = True,
) -> np.ndarray:
    """Chooses, per example, the tokens that overlap character spans of its text.

    Use it to intervene on a named part of a prompt (a subject, an entity)
    whatever its tokenization: the tokenizer's offset mapping says which
    characters each token covers.

    Args:
        offsets: Each example's token offsets, ``(start, end)`` character
            pairs (``tokenizer(texts, return_offsets_mapping=True)
            ["offset_mapping"]``); or, with ``token_counts``, all examples'
            pairs concatenated into one ``(total_tokens, 2)`` array.
            Zero-width tokens (special tokens) are never chosen.
        char_spans: ``(examples, 2)`` spans, one group, or
            ``(examples, groups, 2)``; each ``(start, end)``, end exclusive, or
            ``(-1, -1)`` for none.
        token_counts: Tokens per example when ``offsets`` is concatenated.
        max_positions: Width of the output; defaults to the largest
            selection. A selection wider than this is an error, never cut.
        padding_side, padded_length, sequence_lengths, parallel: As in
            :func:`locate` (sequence lengths default to the token counts).

    Returns:
        An ``int64`` array of shape ``(groups, examples, max_positions)``.

    Example::

        >>> offsets = [[(0, 0), (0, 5), (5, 8), (8, 12)]]   # "<s>Paris is big"
        >>> locate_spans(offsets, [(0, 5)])
        array([[[1]]])
    """
    if token_counts is None:
        per_example = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in offsets]
        counts = np.array([len(o) for o in per_example], dtype=np.int64)
        flat = np.concatenate(per_example) if per_example else np.zeros((0, 2), dtype=np.int64)
    else:
        counts = _int64_vector(token_counts, "token_counts")
        flat = np.asarray(offsets)
        if flat.ndim != 2 or flat.shape[-1] != 2:
            raise PositionError(
                f"with token_counts, offsets must have shape (total_tokens, 2), found {flat.shape}"
            )
    spans = np.asarray(char_spans)
    if spans.size == 0 and len(counts) == 0:
        spans = np.zeros((0, 1, 2), dtype=np.int64)
    if spans.ndim == 2:
        spans = spans[:, None, :]
    if spans.ndim != 3 or spans.shape[-1] != 2:
        raise PositionError(
            f"char_spans must have shape (examples, 2) or (examples, groups, 2), found {spans.shape}"
        )
    for name, array in (("offsets", flat), ("char_spans", spans)):
        if array.size and array.dtype.kind not in "iu":
            raise PositionError(f"{name} must hold integers, found dtype {array.dtype}")
    sequence = None if sequence_lengths is None else _int64_vector(sequence_lengths, "sequence_lengths")
    return _core.locate_char_spans(
        np.ascontiguousarray(flat, dtype=np.int64),
        counts,
        np.ascontiguousarray(spans, dtype=np.int64),
        max_positions=max_positions,
        padding_side=padding_side,
        padded_length=_padded_length(padded_length),
        sequence_lengths=sequence,
        parallel=bool(parallel),
    )


def per_layer(locations: np.ndarray, num_layers: int) -> np.ndarray:
    """Repeats each group's locations for ``num_layers`` layers, without copying.

    Args:
        locations: ``(groups, examples, width)`` from :func:`locate`.
        num_layers: How many layers intervene with each group.

    Returns:
        A read-only ``(groups, num_layers, examples, width)`` view of
        ``locations`` (stride 0 along the layer axis):
        ``per_layer(loc, L)[g, l]`` is ``loc[g]`` for every ``l``.
    """
    if locations.ndim != 3:
        raise PositionError(f"locations must be (groups, examples, width), found shape {locations.shape}")
    if num_layers < 1:
        raise PositionError(f"num_layers must be at least 1, found {num_layers}")
    groups, examples, width = locations.shape
    return np.broadcast_to(locations[:, None], (groups, num_layers, examples, width))
