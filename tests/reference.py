"""Plain-Python statements of the rules reft_rs implements in Rust.

Tests compare the Rust results against these, one example at a time, written
for clarity rather than speed. The benchmark in ``benches/`` times
:func:`pyreft_locations` as the baseline.
"""

from __future__ import annotations

MASKED = -1


def parse_first_last(spec: str) -> tuple[int, int]:
    """``"f3+l2"`` -> ``(3, 2)``, ``"f3"`` -> ``(3, 0)``, ``"l2"`` -> ``(0, 2)``."""
    first = last = 0
    for part in spec.split("+"):
        part = part.strip()
        if part.startswith("f"):
            first = int(part[1:])
        else:
            last = int(part[1:])
    return first, last


def rows_for_example(
    spec: str | list[int],
    n: int,
    *,
    share_weights: bool,
    include_last: bool,
) -> list[list[int]]:
    """The chosen positions of one prompt of ``n`` tokens, one list per group."""
    usable = n if include_last else max(n - 1, 0)
    if isinstance(spec, list):
        chosen = []
        for index in spec:
            position = usable + index if index < 0 else index
            chosen.append(position if 0 <= position < usable else MASKED)
        return [chosen]
    if spec == "all":
        return [list(range(usable))]
    first, last = parse_first_last(spec)
    head = list(range(min(usable // 2, first)))
    tail = list(range(usable - min(usable // 2, last), usable))
    if first > 0 and last > 0 and not share_weights:
        return [head, tail]
    return [head + tail]


def locations(
    lengths: list[int],
    spec: str | list[int],
    *,
    share_weights: bool = False,
    include_last: bool = True,
    padding_side: str = "right",
    padded_length: int | None = None,
    sequence_lengths: list[int] | None = None,
) -> list[list[list[int]]]:
    """The whole ``(groups, examples, width)`` array as nested lists."""
    sequence = list(lengths) if sequence_lengths is None else list(sequence_lengths)
    padded = max(sequence, default=0) if padded_length is None else padded_length
    per_example = []
    for n, total in zip(lengths, sequence):
        offset = padded - total if padding_side == "left" else 0
        rows = rows_for_example(spec, n, share_weights=share_weights, include_last=include_last)
        per_example.append([[p + offset if p != MASKED else MASKED for p in row] for row in rows])
    if isinstance(spec, list):
        width = len(spec)
    elif spec == "all":
        width = max((n if include_last else max(n - 1, 0) for n in lengths), default=0)
    else:
        first, last = parse_first_last(spec)
        width = max(first, last) if (first > 0 and last > 0 and not share_weights) else first + last
    groups = len(rows_for_example(spec, 0, share_weights=share_weights, include_last=include_last))
    return [
        [row[group] + [MASKED] * (width - len(row[group])) for row in per_example] for group in range(groups)
    ]


def rows_in_tokens(
    tokens: list[int],
    n: int,
    spec: str | list[int],
    image_token: int,
    *,
    share_weights: bool,
    include_last: bool,
) -> list[list[int]]:
    """The chosen positions of one vision-language prompt of ``n`` tokens: an
    ``image`` spec counts over the image tokens, any other over the rest (the
    text); the last prompt token is never chosen without ``include_last``."""
    images = isinstance(spec, str) and spec.startswith("image")
    if images:
        spec = spec.partition(":")[2].replace("first", "f").replace("last", "l") or "all"
    if isinstance(spec, str) and "," in spec:
        spec = [int(i) for i in spec.split(",")]
    usable = n if include_last else max(n - 1, 0)
    candidates = [i for i in range(usable) if (tokens[i] == image_token) == images]
    rows = rows_for_example(spec, len(candidates), share_weights=share_weights, include_last=True)
    return [[candidates[p] if p != MASKED else MASKED for p in row] for row in rows]


def pyreft_locations(
    last_position: int, first_n: int, last_n: int, *, share_weights: bool, num_interventions: int
) -> list[list[int]]:
    """pyreft's ``get_intervention_locations`` rule for one example (pad -1),
    restated: one list per intervention."""
    first = min(last_position // 2, first_n)
    last = min(last_position // 2, last_n)
    pad = (first_n - first) + (last_n - last)
    if share_weights or first == 0 or last == 0:
        row = list(range(first)) + list(range(last_position - last, last_position)) + [MASKED] * pad
        return [row] * num_interventions
    left = list(range(first)) + [MASKED] * (first_n - first)
    right = list(range(last_position - last, last_position)) + [MASKED] * (last_n - last)
    width = max(len(left), len(right))
    left += [MASKED] * (width - len(left))
    right += [MASKED] * (width - len(right))
    return [left] * (num_interventions // 2) + [right] * (num_interventions // 2)
