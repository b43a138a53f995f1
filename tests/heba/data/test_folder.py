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
