"""The image check on damaged files of each kind, written on the fly; fast and full modes."""

from __future__ import annotations

import pytest

from heba.data import check as C
from heba.data.coop import DataError
from tests.heba.data.images import write_image

GOOD = ["a.jpg", "b.png", "c.gif", "d.bmp", "e.webp"]


def _cut(path, keep):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    return path


def _damage_header(path):
    data = bytearray(open(path, "rb").read())
    data[2:40] = bytes(range(200, 238))                   # the first segments overwritten
    open(path, "wb").write(bytes(data))
    return path


def _bad(tmp_path):
    """``{kind: path}`` of damaged files."""
    d = tmp_path
    out = {"empty": str(d / "empty.jpg"), "text": str(d / "notes.jpg")}
    open(out["empty"], "wb").close()
    open(out["text"], "w").write("this is not an image\n")
    out["jpeg-truncated"] = _cut(write_image(d / "t.jpg", 300, 200, 1), 0.6)
    out["jpeg-truncated-header"] = _cut(write_image(d / "h.jpg", 300, 200, 2), 300)
    out["jpeg-damaged-header"] = _damage_header(write_image(d / "x.jpg", 300, 200, 3))
    out["png-truncated"] = _cut(write_image(d / "t.png", 120, 90, 4), 0.7)
    out["gif-truncated"] = _cut(write_image(d / "t.gif", 120, 90, 5), 0.7)
    out["bmp-truncated"] = _cut(write_image(d / "t.bmp", 120, 90, 6), 0.7)
    out["webp-truncated"] = _cut(write_image(d / "t.webp", 120, 90, 7), 0.7)
    return out


@pytest.mark.parametrize("mode", C.MODES)
def test_good_images_pass(tmp_path, mode):
    paths = [write_image(tmp_path / n, 97, 61, k) for k, n in enumerate(GOOD)]
    assert all(C.image_error(p, mode) is None for p in paths)
    assert C.check_images(paths + paths[:1], mode) == len(paths)


@pytest.mark.parametrize("mode", C.MODES)
def test_each_kind_of_damage_is_caught_in_one_line(tmp_path, mode):
    for kind, path in _bad(tmp_path).items():
        why = C.image_error(path, mode)
        assert why and "\n" not in why, f"{kind} ({mode}) passed"
        with pytest.raises(DataError) as err:
            C.check_images([path], mode)
        msg = str(err.value)
        assert msg.startswith(f"image {path} cannot be read (") and "\n" not in msg, kind


def test_fast_check_names_what_is_wrong(tmp_path):
    bad = _bad(tmp_path)
    assert C.image_error(bad["empty"]) == "empty file"
    assert "end-of-image" in C.image_error(bad["jpeg-truncated"])
    assert "IEND" in C.image_error(bad["png-truncated"])
    assert "UnidentifiedImageError" in C.image_error(bad["text"])


def test_first_bad_named_and_the_rest_counted(tmp_path):
    bad = sorted(_bad(tmp_path).values())
    good = write_image(tmp_path / "ok.jpg", 50, 40, 9)
    with pytest.raises(DataError, match=f"image {bad[0]} cannot be read .*; "
                                        f"{len(bad) - 1} more unreadable"):
        C.check_images(bad + [good])
    with pytest.raises(ValueError, match="mode must be one of fast, full"):
        C.check_images([good], "quick")


@pytest.mark.parametrize("mode", C.MODES)
def test_wide_images_checked_by_the_readers_rule(tmp_path, mode):
    """16-bit grey and float images in range pass; values the readers refuse (float outside
    [0, 1], 32-bit integers past 65535) are named with the mode, in both modes, before
    training; a truncated 16-bit PNG is caught."""
    import numpy as np
    from tests.heba.data.images import write_wide
    rng = np.random.default_rng(11)
    good = [write_wide(tmp_path / "g16.png", "I;16", rng.integers(0, 65536, (20, 30))),
            write_wide(tmp_path / "g16b.tif", "I;16B", rng.integers(0, 65536, (20, 30))),
            write_wide(tmp_path / "gf.tif", "F", rng.random((20, 30)))]
    assert [C.image_error(p, mode) for p in good] == [None] * 3
    assert C.check_images(good, mode) == 3
    bad = {"mode F": write_wide(tmp_path / "hdr.tif", "F", rng.uniform(0, 4, (20, 30))),
           "mode I": write_wide(tmp_path / "big.tif", "I", rng.integers(0, 2 ** 20, (20, 30)))}
    for words, path in bad.items():
        with pytest.raises(DataError) as err:
            C.check_images([path], mode)
        msg = str(err.value)
        assert msg.startswith(f"image {path} cannot be read (not 8-bit RGB: {words}") \
            and "\n" not in msg, msg
    cut = _cut(write_wide(tmp_path / "cut16.png", "I;16", rng.integers(0, 65536, (90, 120))),
               0.5)
    assert C.image_error(cut, mode), "a truncated 16-bit PNG passed"
