"""heba.train.vision: the transform each split of a classification run is given.

The published AdapterTune code (``src/datasets``: torchvision's ``RandomResizedCrop(img_size)``
+ ``RandomHorizontalFlip()`` for training, ``Resize(256)`` + ``CenterCrop(img_size)`` for
evaluation, then ``ToTensor`` and ImageNet's ``Normalize``): the training split gets the
augmenting transform, validation and test the deterministic one. Checked on the splits a
classifier run actually builds (:class:`heba.train.classify.ClassifyRecipe`), against the
pipelines written out here with torchvision's functional ops.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm", reason="needs timm (pip install 'heba[timm]')")

from torchvision import transforms as T  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from heba import cli  # noqa: E402
from heba.train.classify import ClassifyRecipe  # noqa: E402
from tests.clip_utils import one_thread  # noqa: E402,F401
from tests.heba.train.test_classify import KW, TINY, image_folder  # noqa: E402

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # published
SIZE = KW["img_size"]                       # the tiny backbone's input size


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """The train / val / test splits of a classifier run on an ImageFolder, after setup."""
    root = tmp_path_factory.mktemp("ds")
    folder = image_folder(root / "ds", n_train=8, n_test=2)
    args = cli.parse_args([folder, *TINY, "--quiet", "--epochs", "1", "--device", "cpu",
                           "-o", str(root / "out")])
    recipe = ClassifyRecipe(cli.make_train_config(args), cli.run_options(args, demo=False),
                            log=lambda *a, **k: None)
    recipe.setup()
    try:
        yield {name: getattr(recipe.data, name) for name in ("train", "val", "test")}
    finally:
        recipe.cleanup()


def _raw(split, i=0):
    """The PIL image behind item ``i`` of a split."""
    return split.base[split.indices[i]][0]


def _published_eval(img):
    return TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(img, 256), SIZE)),
                        IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("name", ["val", "test"])
def test_evaluation_splits_get_the_published_deterministic_transform(splits, name):
    split = splits[name]
    assert len(split) > 0
    for i in range(min(len(split), 3)):
        torch.manual_seed(i)
        first = split[i][0]
        torch.manual_seed(1000 + i)                 # another RNG state: nothing is drawn
        again = split[i][0]
        assert torch.equal(first, again), f"{name}[{i}] differs between two reads"
        want = _published_eval(_raw(split, i))
        assert first.shape == want.shape == (3, SIZE, SIZE)
        assert torch.equal(first, want), \
            f"{name}[{i}]: max |diff| {(first - want).abs().max():.3g} from Resize+CenterCrop"


def test_training_split_gets_the_published_augmentation(splits):
    split = splits["train"]
    img = _raw(split)
    published = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    draws = []
    for seed in range(6):
        torch.manual_seed(seed)
        got = split[0][0]
        torch.manual_seed(seed)
        assert torch.equal(got, published(img)), f"draw {seed} is not the published pipeline's"
        draws.append(got)
    assert got.shape == (3, SIZE, SIZE)
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1, "the crops never change"
    assert not torch.equal(draws[0], _published_eval(img))
