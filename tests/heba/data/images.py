"""Images written on the fly for the data tests (random smooth pictures, odd sizes)."""

from __future__ import annotations

import numpy as np


def write_image(path, width, height, seed, fmt=None, quality=90):
    """A random smooth RGB picture ``width x height`` saved at ``path`` (format by extension)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = (rng.random((height // 7 + 2, width // 7 + 2, 3)) * 255).astype("uint8")
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    kw = dict(quality=quality) if str(path).lower().endswith((".jpg", ".jpeg")) else {}
    img.save(path, format=fmt, **kw)
    return str(path)


def image_items_in(tmp_path):
    """Five :class:`Item` JPEGs / PNGs of odd sizes (one wider than 4:3, one taller than 3:4)."""
    from heba.data.sampling import Item
    sizes = [(137, 101), (64, 300), (301, 77), (90, 90), (205, 163)]
    items = []
    for k, (w, h) in enumerate(sizes):
        ext = ".png" if k == 3 else ".jpg"
        path = write_image(tmp_path / f"img{k}{ext}", w, h, seed=100 + k)
        items.append(Item(path, k % 3, f"class {k % 3}"))
    return items


def write_png16(path, levels):
    """A 16-bit PNG of ``levels`` (uint16 ``[H, W]`` grey or ``[H, W, 3]`` RGB), written by
    hand: PIL writes no 16-bit colour PNG."""
    import struct
    import zlib
    h, w = levels.shape[:2]
    colour = 2 if levels.ndim == 3 else 0

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    rows = b"".join(b"\0" + levels[y].astype(">u2").tobytes() for y in range(h))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour,
                                                                 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return str(path)


def write_wide(path, mode, values):
    """``values`` ``[H, W]`` saved as a PIL image of ``mode`` (``I;16``, ``I;16B``: PNG / TIFF
    by extension; ``I``, ``F``: TIFF)."""
    from PIL import Image
    if mode == "I;16B":
        h, w = values.shape
        img = Image.frombytes("I;16B", (w, h), values.astype(">u2").tobytes())
    else:
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        img = Image.fromarray(values.astype(dtype))
    assert img.mode == mode
    img.save(path)
    return str(path)
