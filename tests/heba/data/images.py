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
