"""heba.data.folder: ImageFolder splits."""

from __future__ import annotations


def test_folder_test_per_class_keeps_that_many(tmp_path):
    """folder-test-per-class-off-by-one: ``--test-per-class N`` keeps N test images per
    class (the first N of each class folder, in sorted order, not used for training)."""
    from heba.data.folder import folder_split
    from tests.clip_utils import image_folder
    root = image_folder(tmp_path / "imgs", per_class=6)
    full = folder_split(root, shots=2, seed=1)
    sp = folder_split(root, shots=2, seed=1, test_per_class=3)
    assert sp.train == full.train
    for c in range(4):
        first = [it for it in full.test if it.label == c][:3]
        assert [it for it in sp.test if it.label == c] == first


def test_dot_files_are_skipped_as_the_coop_readers_do(tmp_path):
    """macOS ``._*`` AppleDouble files (not images, image extensions) and other dot names
    are not listed, in a single tree and in train/ + test/ trees."""
    import os
    from heba.data.coop import listdir_nohidden
    from heba.data.folder import folder_split
    from tests.clip_utils import image_folder
    root = image_folder(tmp_path / "imgs", per_class=4)
    clean = folder_split(root, shots=2, seed=3)
    for c in os.listdir(root):
        with open(os.path.join(root, c, "._0.png"), "wb") as f:
            f.write(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")   # AppleDouble header
        open(os.path.join(root, c, ".hidden.jpg"), "wb").close()
    os.makedirs(os.path.join(root, ".Trashes"))
    assert folder_split(root, shots=2, seed=3) == clean
    assert all(not n.startswith(".") for n in listdir_nohidden(os.path.join(root, c)))
    two = image_folder(tmp_path / "two" / "train", per_class=3)
    image_folder(tmp_path / "two" / "test", per_class=2)
    for sub in ("train", "test"):
        for c in os.listdir(two):
            open(os.path.join(tmp_path, "two", sub, c, "._x.jpg"), "wb").close()
    sp = folder_split(str(tmp_path / "two"), shots=2, seed=0)
    assert not any(os.path.basename(it.path).startswith(".") for it in sp.train + sp.test)
    assert len(sp.test) == 2 * 4
