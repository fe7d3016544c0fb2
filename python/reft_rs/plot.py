"""A line chart written straight to PNG with the standard library (no
matplotlib): used for the loss curve of training runs.

Example::

    reft_rs.plot.line_chart("loss.png", losses, title="training loss")
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence

__all__ = ["line_chart"]

# 3x5 pixel glyphs for the axis labels: digits and a few signs.
_GLYPHS = {
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001001001001",
    "8": "111101111101111",
    "9": "111101111001111",
    ".": "000000000000010",
    "-": "000000111000000",
    "e": "000111101110011",
    " ": "000000000000000",
}

_BACKGROUND = (255, 255, 255)
_AXES = (60, 60, 60)
_GRID = (225, 225, 225)
_LINE = (31, 119, 180)


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if 0.01 <= abs(value) < 10000:
        return f"{value:.3g}"
    return f"{value:.1e}".replace("+", "")


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(_BACKGROUND) * (width * height))

    def dot(self, x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int], thick: int = 1) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        error = dx + dy
        while True:
            for ox in range(thick):
                for oy in range(thick):
                    self.dot(x0 + ox, y0 + oy, colour)
            if x0 == x1 and y0 == y1:
                return
            twice = 2 * error
            if twice >= dy:
                error += dy
                x0 += sx
            if twice <= dx:
                error += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, scale: int = 2) -> None:
        for glyph in text:
            bits = _GLYPHS.get(glyph, _GLYPHS[" "])
            for row in range(5):
                for col in range(3):
                    if bits[row * 3 + col] == "1":
                        for ox in range(scale):
                            for oy in range(scale):
                                self.dot(x + col * scale + ox, y + row * scale + oy, _AXES)
            x += 4 * scale

    def png(self) -> bytes:
        rows = b"".join(
            b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b"")
        )


def line_chart(
    path: str | os.PathLike[str],
    values: Sequence[float],
    *,
    title: str = "",
    width: int = 640,
    height: int = 360,
) -> None:
    """Writes ``values`` (one per step) as a line chart PNG at ``path``, with
    the y range and the step count labelled; ``title`` goes into the file's
    text metadata. Non-finite values are skipped."""
    points = [(i, float(v)) for i, v in enumerate(values) if math.isfinite(float(v))]
    canvas = _Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    low = min((v for _, v in points), default=0.0)
    high = max((v for _, v in points), default=1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    steps = max(len(values) - 1, 1)
    for k in range(5):  # horizontal grid lines with their values
        y = bottom - round(k * (bottom - top) / 4)
        canvas.line(left, y, right, y, _GRID)
        canvas.text(4, y - 5, _label(low + k * (high - low) / 4))
    canvas.line(left, top, left, bottom, _AXES)
    canvas.line(left, bottom, right, bottom, _AXES)
    canvas.text(left - 4, bottom + 12, "0")
    canvas.text(right - 8 * len(str(steps)), bottom + 12, str(steps))

    def place(i: int, v: float) -> tuple[int, int]:
        return (
            left + round(i * (right - left) / steps),
            bottom - round((v - low) * (bottom - top) / (high - low)),
        )

    for (i0, v0), (i1, v1) in zip(points, points[1:]):
        canvas.line(*place(i0, v0), *place(i1, v1), _LINE, thick=2)
    if len(points) == 1:
        x, y = place(*points[0])
        canvas.line(x - 2, y, x + 2, y, _LINE, thick=2)
    data = canvas.png()
    if title:  # a tEXt chunk before IEND
        text = b"Title\x00" + title.encode("latin-1", "replace")
        chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
        data = data[:-12] + chunk + data[-12:]
    with open(path, "wb") as handle:
        handle.write(data)
