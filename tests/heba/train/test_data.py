"""The run's loaders: workers sized for the device, one loader per run, evaluation in one sync."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from heba.data.demo import demo_splits
from heba.data.folder import ImageList
from heba.data.testcrops import PreparedCrops, clear_memory
from heba.train import data as D
from heba.train.backbones.openclip import dassl_transforms
from heba.train.config import UsageError
from tests.heba.data.images import image_items_in

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def image_items(tmp_path):
    return image_items_in(tmp_path)


def _cfg(seed=3, batch=2, drop_last=False):
    return SimpleNamespace(seed=seed, batch_size=batch, drop_last=drop_last)


def test_workers_auto_is_a_share_of_the_cores_on_a_gpu_only():
    assert D.resolve_workers("auto", torch.device("cpu")) == 0
    assert 1 <= D.resolve_workers("auto", torch.device("cuda")) <= 16
    assert D.resolve_workers("4", torch.device("cuda")) == 4
    for bad in (-1, "two", 1.5, True):
        with pytest.raises(UsageError, match=r"--workers must be >= 0 \(an integer, or 'auto'"):
            D.resolve_workers(bad, torch.device("cpu"))


def _epochs(loader, epochs):
    return [[(x.clone(), y.clone()) for x, y in loader.epoch(e)] for e in epochs]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v)
                                    for (x, y), (u, v) in zip(a, b))


def test_one_loader_per_run_reproducible_by_seed_and_epoch(image_items):
    ds = ImageList(image_items, dassl_transforms(48, MEAN, STD)[0])    # no image reduced
    one = D.train_loader(ds, _cfg(), "cpu", workers=0)
    assert one.dataset.pipeline == "fast" and len(one) == 3
    e0, e1 = _epochs(one, [0, 1])
    assert len(one.epoch(5)) == len(e0) == 3
    x, y = e0[0]
    assert x.dtype == torch.float32 and x.shape == (2, 3, 48, 48) and y.dtype == torch.long
    assert not _same(e0, e1)
    workers = D.train_loader(ds, _cfg(), "cpu", workers=1)           # persistent worker
    assert workers.loader.persistent_workers
    w1, w0 = _epochs(workers, [1, 0])
    assert _same(w0, e0) and _same(w1, e1), "the batches depend on the workers"
    resumed = D.train_loader(ds, _cfg(), "cpu")
    assert _same(_epochs(resumed, [1])[0], e1), "a resumed run sees other batches"
    pub = D.train_loader(ds, _cfg(), "cpu", pipeline="published")
    p0 = _epochs(pub, [0])[0]
    step = 1 / 255 / min(STD)
    assert all(torch.equal(y, v) and (x - u).abs().max() <= 1.001 * step
               for (x, y), (u, v) in zip(p0, e0))
    with pytest.raises(UsageError, match="--pipeline must be one of fast, published"):
        D.train_loader(ds, _cfg(), "cpu", pipeline="pil")


def test_demo_tensors_batched_as_todays_loader():
    _, train, _ = demo_splits(2, seed=1)
    cfg = _cfg(seed=1, batch=10, drop_last=True)           # 128 images: 8 left over
    loader = D.train_loader(train, cfg, "cpu")
    shuffle, _ = D.epoch_seeds(cfg.seed, 2)
    g = torch.Generator().manual_seed(shuffle)
    today = torch.utils.data.DataLoader(train, batch_size=10, shuffle=True, generator=g,
                                        drop_last=True)
    e2, e3 = _epochs(loader, [2, 3])
    assert len(loader) == len(e2) == 12
    assert _same(e2, list(today))
    assert not _same(e2, e3), "every epoch sees the images in the same order"
    # the seeds heba's recipe has always drawn an epoch from (runs resume across versions)
    assert D.epoch_seeds(3, 2, 1) == (3 * 7_919 + 2, 3 * 100_003 + 2 * 1_009 + 1)


def test_eval_accuracy_counts_on_the_device_as_a_plain_loop(image_items, tmp_path):
    clear_memory()
    ds = ImageList(image_items, dassl_transforms(24, MEAN, STD)[1])

    def predict(images):                           # a fixed "classifier" of the pixels
        return (images.mean((1, 2, 3)) * 1000).long() % 3

    ref = sum(int(predict(x[None])[0] == y) for x, y in ds) * 100.0 / len(ds)
    got = D.eval_accuracy(predict, ds, "cpu", batch_size=2, cache_dir=str(tmp_path))
    assert got == pytest.approx(ref, abs=1e-9)
    assert isinstance(D.prepare_eval(ds), PreparedCrops)
    assert D.prepare_eval(ds.items) is ds.items           # not an image list: left as it is
    assert D.eval_accuracy(predict, ds, "cpu", batch_size=3) == got
    clear_memory()


class _Noisy(torch.utils.data.Dataset):
    """A data set whose items draw from the worker's global generator (a random transform)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.rand(2) + i, i


def test_random_transforms_in_workers_follow_seed_and_epoch():
    cfg = _cfg(batch=3)
    run = D.train_loader(_Noisy(), cfg, "cpu", workers=1)
    assert not run.loader.persistent_workers     # worker seeds drawn anew each epoch
    e0, e1 = _epochs(run, [0, 1])
    resumed = _epochs(D.train_loader(_Noisy(), cfg, "cpu", workers=1), [1])[0]
    assert _same(resumed, e1) and not _same(e0, e1)


# --- the transform each split of a CLIP run is given ---------------------------------------

@pytest.fixture(scope="module", params=["fast", "published"])
def clip_run(request, tmp_path_factory):
    """A base-to-novel CLIP run on an ImageFolder after setup (``--pipeline`` each way): its
    data and training."""
    pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
    from heba import cli
    from heba.train.recipe import TrainRecipe
    from tests.clip_utils import image_folder
    root = tmp_path_factory.mktemp("clip_ds")
    folder = image_folder(root / "ds", per_class=4)
    args = cli.parse_args([folder, "--model", "tiny", "--pretrained", "none", "--shots", "2",
                           "--batch-size", "2", "--quiet", "--threads", "1", "--device", "cpu",
                           "--pipeline", request.param, "-o", str(root / "out")])
    recipe = TrainRecipe(cli.make_train_config(args), cli.run_options(args, demo=False),
                         log=lambda *a, **k: None)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    recipe.setup()
    try:
        yield recipe
    finally:
        recipe.cleanup()
        torch.set_num_threads(n)


def _dassl(size, train: bool):
    """The published (CoOp / Dassl) pipelines, written out: bicubic RandomResizedCrop(scale
    0.08..1) + flip for training, bicubic Resize + CenterCrop for testing; the tiny CLIP's
    normalisation."""
    from torchvision import transforms as T
    from heba.clip.synthetic import MEAN as TINY_MEAN, STD as TINY_STD
    bicubic = T.InterpolationMode.BICUBIC
    crop = ([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic),
             T.RandomHorizontalFlip()] if train else
            [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)])
    return T.Compose(crop + [T.ToTensor(), T.Normalize(TINY_MEAN, TINY_STD)])


def _size(recipe):
    size = recipe.model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


def test_clip_evaluation_splits_are_the_published_test_pipeline(clip_run):
    """Every evaluation split (base, novel): the deterministic Dassl test transform, and the
    batches an evaluation reads are those images, the same at every read."""
    from heba.data.pipeline import read_rgb
    evals = clip_run.data.evals
    assert set(evals) == {"base", "novel"}
    published = _dassl(_size(clip_run), train=False)
    for name, (_, ds) in evals.items():
        want = torch.stack([published(read_rgb(it.path)) for it in ds.items])
        torch.manual_seed(0)
        direct = torch.stack([ds[i][0] for i in range(len(ds))])
        torch.manual_seed(1)
        assert torch.equal(direct, torch.stack([ds[i][0] for i in range(len(ds))])), name
        assert torch.equal(direct, want), f"{name}: not Resize + CenterCrop"
        reads = [torch.cat([x for x, _ in D.eval_batches(ds, 3, "cpu")]) for _ in range(2)]
        assert torch.equal(reads[0], reads[1]), f"{name}: two evaluations read different images"
        assert torch.allclose(reads[0], want, atol=1e-5), \
            f"{name}: evaluation batches off by {(reads[0] - want).abs().max():.3g}"


def test_clip_training_split_is_the_published_augmentation(clip_run):
    """The training split: the Dassl training transform (same draws as the written-out one);
    the run's loader gives other crops at every epoch, none the test crop."""
    from heba.data.pipeline import read_rgb
    ds = clip_run.data.train
    img = read_rgb(ds.items[0].path)
    published = _dassl(_size(clip_run), train=True)
    for seed in range(4):
        torch.manual_seed(seed)
        got = ds[0][0]
        torch.manual_seed(seed)
        assert torch.equal(got, published(img)), f"draw {seed} is not the published pipeline's"
    centre = _dassl(_size(clip_run), train=False)
    test_crops = sorted(float(centre(read_rgb(it.path)).sum()) for it in ds.items)
    epochs = [sorted(float(x.sum()) for xs, _ in clip_run.tr.loader(e) for x in xs)
              for e in (0, 1)]
    assert len(epochs[0]) == len(ds.items)
    assert epochs[0] != epochs[1], "the training crops do not change between epochs"
    assert all(not math.isclose(a, b, rel_tol=1e-4) for a, b in zip(epochs[0], test_crops))
