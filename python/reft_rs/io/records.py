"""Reading datasets from files, with no torch: JSONL, JSON and CSV.

A record is either a prompt/response pair (``{"prompt": ..., "response":
...}``, for language modelling) or a labelled text (``{"text": ...,
"label": ...}``, for classification and evaluation). For a vision-language
model a record also names its picture: ``"image"``, a file path (or a list
of them), relative to the dataset file's folder unless absolute; the
records read give it as an absolute path. Files are read lazily,
one line at a time, so :func:`read_records` serves datasets larger than
memory; every problem is a :class:`reft_rs.DatasetError` naming the file
and line.

Example::

    for record in read_records("train.jsonl"):
        print(record["prompt"], "->", record["response"])
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from typing import Any

from ..errors import DatasetError

__all__ = ["FIELDS", "read_records", "record_kind"]

# The two kinds of record and the fields that make them.
FIELDS = {"pair": ("prompt", "response"), "labelled": ("text", "label")}


def record_kind(record: Any, where: str) -> str:
    """``"pair"`` or ``"labelled"``; raises naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, found {type(record).__name__}")
    for kind, (first, second) in FIELDS.items():
        if first in record and second in record:
            if not isinstance(record[first], str):
                raise DatasetError(
                    f"{where}: {first!r} must be a string, found {type(record[first]).__name__}"
                )
            if kind == "pair" and not isinstance(record[second], str):
                raise DatasetError(
                    f"{where}: {second!r} must be a string, found {type(record[second]).__name__}"
                )
            return kind
    raise DatasetError(
        f"{where}: needs 'prompt' and 'response' (or 'text' and 'label') fields, found {sorted(record)}"
    )


def _json_lines(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None


def _json_array(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a .json dataset must be a list of records, found {type(data).__name__}")
    for index, record in enumerate(data):
        yield f"{path}: record {index}", record


def _csv_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if None in row:
                raise DatasetError(f"{path}:{reader.line_num}: more values than the header has columns")
            yield f"{path}:{reader.line_num}", row


def _image_paths(value: Any, folder: str, where: str) -> str | list[str]:
    """A record's image path(s), absolute (relative ones from ``folder``)."""
    paths = value if isinstance(value, list) else [value]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise DatasetError(f"{where}: 'image' must be a file path or a list of them, found {value!r}")
    resolved = [os.path.normpath(os.path.join(folder, p)) for p in paths]
    return resolved if isinstance(value, list) else resolved[0]


def read_records(path: str | os.PathLike[str], *, kind: str | None = None) -> Iterator[dict[str, Any]]:
    """The records of a ``.jsonl``, ``.json`` or ``.csv`` file, lazily.

    Args:
        path: The file; its extension picks the format (JSON lines unless
            it ends in ``.json`` or ``.csv``).
        kind: ``"pair"`` or ``"labelled"`` to require one kind; by default
            the first record decides and the rest must match it.

    Raises:
        DatasetError: The file is missing, a line is malformed, or a record
            lacks its fields (the message gives the line).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such dataset file", path)
    if path.endswith(".csv"):
        rows = _csv_rows(path)
    elif path.endswith(".json"):
        rows = _json_array(path)
    else:
        rows = _json_lines(path)
    expected = kind
    empty = True
    folder = os.path.dirname(os.path.abspath(path))
    images: bool | None = None
    for where, record in rows:
        found = record_kind(record, where)
        if images is None:
            images = "image" in record
        elif ("image" in record) != images:
            raise DatasetError(f"{where}: every record names an image, or none does")
        if images:
            record["image"] = _image_paths(record["image"], folder, where)
        if expected is None:
            expected = found
        elif found != expected:
            first, second = FIELDS[expected]
            raise DatasetError(f"{where}: expected {first!r} and {second!r} like the records before it")
        empty = False
        yield record
    if empty:
        raise DatasetError(f"{path}: the dataset has no records", path)
