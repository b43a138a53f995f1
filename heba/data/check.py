"""Is every image of a run readable? A header-and-end check by default, a full decode on request.

``mode="fast"`` reads each file's header with PIL (format, size: a damaged
header fails here) and checks that the file is whole without decoding it:

* JPEG: the marker segments from SOI up to the start of scan are walked (each
  segment's length must fit in the file) and an end-of-image marker (FF D9)
  must follow the scan within the file's last 4 KiB (a truncated JPEG has
  none: entropy-coded data never holds an unescaped FF D9);
* PNG: the chunks are walked by their lengths up to an IEND chunk at the end;
* GIF: the trailer byte (3B) ends the file; BMP: the file holds the size its
  header declares; WebP: the RIFF size is the file's;
* any other format: decoded in full (there is no cheap test of it).

Empty files and files that are no image are caught by both modes. Images of
more than 8 bits a sample (16-bit grey, 32-bit integer or float) are decoded
in both modes and refused when :func:`heba.data.pipeline.to_rgb`, the rule
every reader opens images by, refuses their values.
``mode="full"`` decodes every image (JPEG at 1/8 scale: every byte is still
entropy-decoded). Each failure is one line naming the file; files found good
are remembered by ``(path, size, mtime, mode)`` for the process.

Example::

    >>> image_error("/no/such/file.jpg")
    'cannot open it (FileNotFoundError)'
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from heba.data.coop import DataError
from heba.data.pipeline import WIDE_MODES, ImageModeError, to_rgb

MODES = ("fast", "full")
TAIL = 4096
_CHECKED: set = set()


def check_images(paths, mode: str = "fast", threads: Optional[int] = None) -> int:
    """Check every file of ``paths``; raises :class:`DataError` naming the first bad one
    (and how many more there are); returns how many distinct files were checked."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    paths = sorted(set(paths))
    todo = [p for p in paths if _stamp(p, mode) not in _CHECKED]
    n = threads or max(1, min(8, os.cpu_count() or 1))
    if n == 1:
        errors = [image_error(p, mode) for p in todo]
    else:
        with ThreadPoolExecutor(n) as pool:
            errors = list(pool.map(lambda p: image_error(p, mode), todo))
    bad = [(p, e) for p, e in zip(todo, errors) if e]
    _CHECKED.update(_stamp(p, mode) for p, e in zip(todo, errors) if not e)
    if bad:
        more = f"; {len(bad) - 1} more unreadable" if len(bad) > 1 else ""
        raise DataError(f"image {bad[0][0]} cannot be read ({bad[0][1]}){more}: every image "
                        f"is checked before training; repair or remove it")
    return len(paths)


def forget_checked() -> None:
    """Forget which files were found good (the next check reads them all again)."""
    _CHECKED.clear()


def _stamp(path: str, mode: str):
    try:
        st = os.stat(path)
    except OSError:
        return (path, None, None, mode)
    return (path, st.st_size, st.st_mtime_ns, mode)


def image_error(path: str, mode: str = "fast") -> Optional[str]:
    """Why ``path`` is not a whole, readable image (None when it is); one line."""
    from PIL import Image
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
            f.seek(max(0, size - TAIL))
            tail = f.read()
    except OSError as err:
        return f"cannot open it ({type(err).__name__})"
    if size == 0:
        return "empty file"
    try:
        with Image.open(path) as img:
            fmt = img.format
            if img.mode in WIDE_MODES:              # the values decide: read_rgb's rule
                to_rgb(img)
                return None
            if mode == "full" or fmt not in _ENDS:
                if fmt == "JPEG":
                    img.draft("RGB", (64, 64))
                img.load()
                return None
            w, h = img.size
        if w < 1 or h < 1:
            return f"header gives size {w}x{h}"
    except ImageModeError as err:
        return f"not 8-bit RGB: {err}"
    except Exception as err:
        return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return _ENDS[fmt](path, size, head, tail)


def _jpeg_end(path, size, head, tail) -> Optional[str]:
    sos = _jpeg_scan_start(path, size)
    if isinstance(sos, str):
        return sos
    start = max(sos, size - len(tail))
    if tail.rfind(b"\xff\xd9", start - (size - len(tail))) < 0:
        return "truncated JPEG: no end-of-image marker after the image data"
    return None


def _jpeg_scan_start(path, size):
    """Offset of the start-of-scan segment's data, or why the segments are damaged."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return "damaged JPEG header: no start-of-image marker"
        pos = 2
        while True:
            f.seek(pos)
            seg = f.read(4)
            if len(seg) < 4 or seg[0] != 0xFF:
                return f"damaged JPEG header: no marker at byte {pos}"
            if seg[1] == 0xFF:                      # fill byte
                pos += 1
                continue
            length = int.from_bytes(seg[2:4], "big")
            if length < 2 or pos + 2 + length > size:
                return f"truncated JPEG: a header segment at byte {pos} runs past the end"
            if seg[1] == 0xDA:                      # start of scan
                return pos + 2 + length
            pos += 2 + length


def _png_end(path, size, head, tail) -> Optional[str]:
    with open(path, "rb") as f:
        pos = 8
        while pos + 12 <= size:
            f.seek(pos)
            chunk = f.read(8)
            length = int.from_bytes(chunk[:4], "big")
            pos += 12 + length
            if chunk[4:8] == b"IEND":
                return None if pos <= size else "truncated PNG: the end chunk runs past the end"
    return "truncated PNG: no end chunk (IEND)"


def _gif_end(path, size, head, tail) -> Optional[str]:
    return None if tail.rstrip(b"\0")[-1:] == b";" else "truncated GIF: no trailer byte"


def _bmp_end(path, size, head, tail) -> Optional[str]:
    declared = int.from_bytes(head[2:6], "little")
    return None if size >= declared else f"truncated BMP: {size} of {declared} bytes"


def _webp_end(path, size, head, tail) -> Optional[str]:
    declared = int.from_bytes(head[4:8], "little") + 8
    return None if size >= declared else f"truncated WebP: {size} of {declared} bytes"


_ENDS = {"JPEG": _jpeg_end, "PNG": _png_end, "GIF": _gif_end, "BMP": _bmp_end,
         "WEBP": _webp_end}
