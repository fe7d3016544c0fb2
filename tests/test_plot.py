"""The PNG line chart: a valid file whose drawn line follows the values."""

from __future__ import annotations

import struct
import zlib

from reft_rs.plot import line_chart


def read_png(path):
    """(width, height, rows of RGB triples, text chunks) of an 8-bit RGB PNG
    with unfiltered rows, as line_chart writes them."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        position += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (chunks[0][0], depth, colour, chunks[-1][0]) == (b"IHDR", 8, 2, b"IEND")
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    rows = []
    for y in range(height):
        line = raw[y * stride : (y + 1) * stride]
        assert line[0] == 0
        rows.append([tuple(line[1 + 3 * x : 4 + 3 * x]) for x in range(width)])
    texts = [body for kind, body in chunks if kind == b"tEXt"]
    return width, height, rows, texts


def test_the_line_falls_where_the_values_fall(tmp_path):
    values = [4.0 - 0.1 * i for i in range(31)]
    values[10] = float("nan")  # skipped; its neighbours are joined
    line_chart(tmp_path / "loss.png", values, title="loss", width=320, height=200)
    width, height, rows, texts = read_png(tmp_path / "loss.png")
    assert (width, height) == (320, 200) and texts == [b"Title\x00loss"]
    blue = (31, 119, 180)
    columns = {}
    for y, row in enumerate(rows):
        for x, pixel in enumerate(row):
            if pixel == blue:
                columns.setdefault(x, []).append(y)
    xs = sorted(columns)
    assert xs[0] <= 72 and xs[-1] >= width - 22  # it spans the plot area
    first, last = min(columns[xs[0]]), max(columns[xs[-1]])
    assert first < 30 and last > height - 50  # from the top left to the bottom right
    middle = xs[len(xs) // 2]
    assert first < min(columns[middle]) < last


def test_flat_and_single_values_still_draw(tmp_path):
    for values in ([1.0, 1.0, 1.0], [2.5], []):
        line_chart(tmp_path / "c.png", values)
        read_png(tmp_path / "c.png")
