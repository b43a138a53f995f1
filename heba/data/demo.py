"""The built-in demo data: generated coloured shapes (:mod:`heba.data.synthetic`), no files.

A fixed pool of ``pool_per_class`` images per class (``"shifted"`` style), from
which ``shots`` are drawn by ``seed``, and a separate fixed test set; the 64
classes split into base and new halves as every other reader's do.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset

from heba.data.coop import DataError

# The demo's prompts: the tiny CLIP was pretrained on captions like these.
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a drawing of a {}.", "this is a {}.")


class TensorImages(Dataset):
    """``(images[i], labels[i])`` of two tensors ``[N, 3, H, W]``, ``[N]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def subset(self, keep: list) -> "TensorImages":
        """The items of classes ``keep``, relabelled ``0..len(keep)-1``."""
        where = torch.full((int(self.labels.max()) + 1,), -1, dtype=torch.long)
        where[torch.tensor(keep)] = torch.arange(len(keep))
        new = where[self.labels]
        return TensorImages(self.images[new >= 0], new[new >= 0])


def demo_splits(shots: int, seed: int, test_per_class: Optional[int] = None,
                pool_per_class: int = 48, classes: Optional[list] = None):
    """``(classes, train TensorImages, test TensorImages)`` of the generated data set."""
    from heba.data import synthetic
    classes = classes or synthetic.all_classes()
    if shots > pool_per_class:
        raise DataError(f"the built-in data set has {pool_per_class} training images per "
                        f"class, fewer than --shots {shots}")
    n = len(classes)
    pool_ids = synthetic.balanced_ids(n, pool_per_class)
    pool = synthetic.render(pool_ids, classes, seed=1234, style="shifted")
    g = torch.Generator().manual_seed(seed)
    pick = torch.cat([c * pool_per_class + torch.randperm(pool_per_class, generator=g)[:shots]
                      for c in range(n)])
    test_ids = synthetic.balanced_ids(n, test_per_class or 40)
    test = synthetic.render(test_ids, classes, seed=98765, style="shifted")
    return classes, TensorImages(pool[pick], pool_ids[pick]), TensorImages(test, test_ids)
