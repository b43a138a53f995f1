"""The training pipeline against today's (torchvision transforms on PIL, global generator).

Stated tolerance of ``"fast"`` vs ``"published"``: torchvision's antialiased
bicubic on uint8 tensors and PIL's bicubic use the same kernel and fixed-point
rounding; measured here they differ by at most 1 level of 255 per pixel, a
mean under 0.25 level. ``"published"`` is today's image bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision import transforms as T

from heba.data import pipeline as P
from heba.data.coop import DataError
from heba.data.folder import ImageList
from heba.train.backbones.openclip import dassl_transforms

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZE = 48


def published_tf(size=SIZE):
    return dassl_transforms(size, MEAN, STD)


@pytest.mark.parametrize("hw", [(375, 500), (90, 120), (517, 333), (300, 64), (7, 900),
                                (900, 7), (1, 1)])
def test_draw_box_is_torchvision_get_params(hw):
    h, w = hw
    rrc = published_tf()[0].transforms[0]
    torch.manual_seed(11)
    ref = [(rrc.get_params(torch.empty(()).expand(3, h, w), rrc.scale, rrc.ratio),
            bool(torch.rand(1) < 0.5)) for _ in range(40)]
    g = torch.Generator().manual_seed(11)
    mine = [(P.draw_box(h, w, rrc.scale, rrc.ratio, g), P.draw_flip(0.5, g)) for _ in range(40)]
    assert mine == ref


def test_spec_reads_the_published_transforms():
    train, test = published_tf(224)
    spec = P.TrainSpec.from_transform(train)
    assert spec == P.TrainSpec(224, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, MEAN, STD, "bicubic")
    ev = P.EvalSpec.from_transform(test)
    assert ev.mean == MEAN and "Resize(size=224, interpolation=bicubic" in ev.key()
    assert P.TrainSpec.from_transform(test) is None
    side = P.keep_short(spec)                  # the least side whose smallest crop is >= 224
    assert side == 915 and math.sqrt(0.08 * 0.75) * side >= 224 > math.sqrt(0.06) * (side - 1)
    assert P.EvalSpec.from_transform(train) is None          # random: never prepared once


def test_spec_reads_open_clips_transforms():
    from open_clip import image_transform
    spec = P.TrainSpec.from_transform(image_transform(64, is_train=True))
    assert spec == P.TrainSpec(64, (0.9, 1.0), (3 / 4, 4 / 3), None, MEAN, STD, "bicubic")
    ev = P.EvalSpec.from_transform(image_transform(64, is_train=False))
    assert ev is not None and "CenterCrop(size=(64, 64))" in ev.key()
    assert "ConvertMode" not in ev.key()


def _today(items, epoch_seed, shuffle_seed, batch):
    """Today's loader (heba.train.recipe before the pipeline): batches and recorded boxes."""
    train, _ = published_tf()
    boxes, get = [], T.RandomResizedCrop.get_params

    def record(img, scale, ratio):
        boxes.append(get(img, scale, ratio))
        return boxes[-1]

    ds = ImageList(items, train)
    g = torch.Generator().manual_seed(shuffle_seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=g)
    torch.manual_seed(epoch_seed)
    orig = T.RandomResizedCrop.get_params
    T.RandomResizedCrop.get_params = staticmethod(record)
    try:
        out = [(x, y) for x, y in loader]
    finally:
        T.RandomResizedCrop.get_params = staticmethod(orig)
    return out, boxes


@pytest.mark.parametrize("pipeline", ["published", "fast"])
def test_same_boxes_and_images_as_today(image_items, pipeline):
    spec = P.TrainSpec.from_transform(published_tf()[0])
    today, boxes = _today(image_items, epoch_seed=5, shuffle_seed=9, batch=2)
    ds = P.train_images(image_items, spec, pipeline)
    assert ds.pipeline == pipeline
    sampler = P.EpochSampler(len(ds), spec, ds.sizes)
    sampler.set_epoch(0, shuffle_seed=9, aug_seed=5)
    tickets = list(sampler)
    assert [t[1:5] for t in tickets] == boxes
    got = torch.stack([P.normalize_on_device(ds[t][0][None], MEAN, STD)[0] for t in tickets])
    ref = torch.cat([x for x, _ in today])
    labels = torch.tensor([ds[t][1] for t in tickets])
    assert torch.equal(labels, torch.cat([y for _, y in today]))
    step = 1 / 255 / min(STD)                              # one uint8 level, normalised
    diff = (got - ref).abs()
    if pipeline == "published":
        assert diff.max() < 1e-5, f"published vs today: max {diff.max():.2e}"
    else:
        assert diff.max() <= step * 1.001, f"fast vs today: max {diff.max() / step:.2f} levels"
        assert diff.mean() <= 0.25 * step, f"fast vs today: mean {diff.mean() / step:.3f} levels"


def test_normalize_on_device_is_to_tensor_then_normalize():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    ref = torch.stack([T.Normalize(MEAN, STD)(T.functional.to_tensor(i.permute(1, 2, 0).numpy()))
                       for i in x])
    assert torch.equal(P.normalize_on_device(x, MEAN, STD), ref)


def test_reduced_store_keeps_boxes_in_original_coordinates(image_items):
    spec = P.TrainSpec.from_transform(published_tf()[0])
    full = P.train_images(image_items, spec, "fast", max_short=None)
    small = P.train_images(image_items, spec, "fast", max_short=40)
    assert small.sizes == full.sizes                       # boxes drawn on the file's size
    assert all(min(h, w) <= 40 for h, w in small.decoded.stored.tolist())
    assert small.decoded.nbytes < full.decoded.nbytes
    sampler = P.EpochSampler(len(full), spec, full.sizes)
    sampler.set_epoch(0, 1, 2)
    for t in sampler:
        a, b = full[t][0].float(), small[t][0].float()
        assert a.shape == b.shape == (3, SIZE, SIZE)
        assert (a - b).abs().mean() < 25, "the reduced image's crop is another region"
    assert P.scale_box((10, 20, 30, 40), (100, 200), (50, 100)) == (5, 10, 15, 20)
    assert P.scale_box((0, 0, 100, 200), (100, 200), (100, 200)) == (0, 0, 100, 200)


def test_over_the_cap_falls_back_to_pil_per_sample(image_items):
    spec = P.TrainSpec.from_transform(published_tf()[0])
    ds = P.train_images(image_items, spec, "fast", cache_bytes=1000)
    assert ds.decoded is None and "over the cap" in ds.note
    ref = P.train_images(image_items, spec, "published")
    t = (2, 3, 4, 50, 60, True)
    assert torch.equal(ds[t][0], ref[t][0])
    with pytest.raises(ValueError, match="pipeline must be one of"):
        P.train_images(image_items, spec, "quick")


def test_a_damaged_image_is_named(image_items):
    spec = P.TrainSpec.from_transform(published_tf()[0])
    with open(image_items[2].path, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(DataError, match=f"image {image_items[2].path} cannot be read"):
        P.train_images(image_items, spec, "fast")


def test_distributed_order_is_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler
    for rank in range(3):
        s = DistributedSampler(range(10), num_replicas=3, rank=rank, shuffle=True, seed=4)
        s.set_epoch(2)
        assert P.epoch_order(10, 0, 2, world=3, rank=rank, dist_seed=4) == list(s)


# --- images of more than 8 bits a sample ---------------------------------------------------------

def _rgb_levels(path):
    import numpy as np
    img = P.read_rgb(path)
    assert img.mode == "RGB"
    return np.asarray(img)


@pytest.mark.parametrize("mode, ext", [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif"),
                                       ("F", ".tif")])
def test_wide_grey_is_scaled_by_its_modes_range_not_clipped(tmp_path, mode, ext):
    """16-bit grey: round(v / 257); 32-bit integer in 0..65535: the same; float in [0, 1]:
    round(v * 255). The image ``convert("RGB")`` gave was almost all white."""
    import numpy as np
    from tests.heba.data.images import write_wide
    rng = np.random.default_rng(7)
    v = rng.integers(0, 65536, (9, 13))
    if mode == "F":
        v = rng.random((9, 13)).astype(np.float32)
        v[0, 0], v[0, 1] = 0.0, 1.0
        expect = np.rint(v.astype(np.float64) * 255)
    else:
        expect = np.rint(v / 257)
    got = _rgb_levels(write_wide(tmp_path / f"wide{ext}", mode, v))
    assert got.shape == (9, 13, 3) and (got == got[..., :1]).all()
    bad = np.argwhere(got[..., 0] != expect)
    assert bad.size == 0, f"{mode}: {len(bad)} pixels off, first at {bad[0].tolist()}: " \
                          f"{got[tuple(bad[0])][0]} vs {expect[tuple(bad[0])]}"


def test_sixteen_bit_colour_png_is_within_a_level_of_v_over_257(tmp_path):
    import numpy as np
    from tests.heba.data.images import write_png16
    v = np.random.default_rng(8).integers(0, 65536, (6, 11, 3))
    v[0, 0] = (0, 65535, 32768)
    got = _rgb_levels(write_png16(tmp_path / "rgb16.png", v)).astype(np.int64)
    diff = np.abs(got - np.rint(v / 257))
    assert diff.max() <= 1, f"16-bit RGB PNG: {diff.max()} levels off at " \
                            f"{np.unravel_index(diff.argmax(), diff.shape)}"
    assert got[0, 0, :2].tolist() == [0, 255]


@pytest.mark.parametrize("mode, values, words", [
    ("F", (-0.5, 0.25), ["mode F", "from -0.5 to 0.25", "[0, 1]"]),
    ("F", (0.0, 300.0), ["mode F", "from 0 to 300"]),
    ("I", (0, 70000), ["mode I", "from 0 to 70000", "0..65535"]),
    ("I", (-3, 10), ["mode I", "from -3 to 10"]),
])
def test_wide_values_out_of_range_are_refused_in_one_line(tmp_path, mode, values, words):
    import numpy as np
    from tests.heba.data.images import write_wide
    v = np.random.default_rng(9).uniform(*values, (4, 5))
    v[0, 0], v[0, 1] = values
    path = write_wide(tmp_path / "wide.tif", mode, v)
    with pytest.raises(DataError) as err:
        P.read_rgb(path)
    msg = str(err.value)
    assert "\n" not in msg and f"image {path}" in msg, msg
    assert all(w in msg for w in words), msg


def test_train_and_test_crops_read_wide_images_by_one_rule(tmp_path, image_items):
    """The fast and published training pipelines and the prepared test crops all see the
    scaled 16-bit image, not the clipped one."""
    import numpy as np
    from heba.data.sampling import Item
    from heba.data.testcrops import prepare_crops
    from tests.heba.data.images import write_wide
    v = np.random.default_rng(10).integers(0, 65536, (60, 70))
    path = write_wide(tmp_path / "grey16.png", "I;16", v)
    items = [Item(path, 0, "grey"), *image_items[1:]]
    spec = P.TrainSpec.from_transform(published_tf()[0])
    t = (0, 0, 0, 60, 70, False)
    fast, slow = (P.train_images(items, spec, p, max_short=None)[t][0] for p in P.PIPELINES)
    ref = P.crop_resize_pil(P.read_rgb(path), t[1:5], SIZE)
    assert torch.equal(slow, P.pil_to_uint8(ref))
    assert (fast.float() - slow.float()).abs().max() <= 1
    assert slow.float().mean() < 200, "clipped to white"
    ev = P.EvalSpec.from_transform(published_tf()[1])
    crops = prepare_crops(items, ev, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(crops.images[0], P.pil_to_uint8(ev.pil(P.read_rgb(path))))
    assert crops.images[0].float().mean() < 200, "clipped to white"
