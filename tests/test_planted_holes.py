"""Tests for the holes the planted-bug run (``python -m tests.plant_bugs``) found.

Each test pins an expectation from outside the code under test (a published
constant, the published code's rule, a hand-computed number) that the rest
of the suite left open; the planted bug it catches is named in its docstring.
All of them run on the CPU in a few seconds.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from heba.clip import checkpoints as ckpt
from heba.data import sampling
from heba.data.sampling import Item
from heba.train import evaluate as ev

PUBLISHED_EPS = 1e-5          # VLM-HeBA: nn.LayerNorm(dim) in every adapter (PyTorch default)


# --- ops validation ------------------------------------------------------------------------

def test_grid_with_fewer_cells_than_tokens_and_infinite_scale_are_errors():
    """ops-grid-product-loose, ops-inf-scale-accepted: grid=(2, 5) for 11 patch tokens
    (fewer cells, not only more) and scale=+-inf fail in one line naming the argument."""
    import heba.nn
    from tests.helpers import tokens
    a = heba.nn.HeBAAdapter(16, modality="visual", grid=(2, 5), backend="reference")
    with pytest.raises(ValueError, match=r"num_prefix_tokens \+ H\*W"):
        a(tokens(2, 1 + 11, 16))
    b = heba.nn.HeBAAdapter(16, modality="text", backend="reference")
    for bad in (float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            b(tokens(2, 3, 16), scale=bad)


# --- wiring --------------------------------------------------------------------------------

def _independent_visual(x, a, scale, H, W):
    """One HeBA visual adapter on ``x [B, 1 + H*W, D]``, float64, from SPEC.md section 1."""
    x = x.double()
    cls, t = x[:, :1], x[:, 1:]
    B, _, D = t.shape
    u = t @ a.down.weight.double().flatten(1).T                          # [B, HW, h]
    img = u.transpose(1, 2).reshape(B, -1, H, W)                         # row-major grid
    v = F.conv2d(img, a.mid.weight.double(), padding=1, groups=img.shape[1])
    v = v.reshape(B, -1, H * W).transpose(1, 2)
    z = F.gelu(v) @ a.up.weight.double().flatten(1).T
    y = t + z
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    yhat = (y - mu) / torch.sqrt(var + PUBLISHED_EPS)
    out = t + scale * (yhat * a.norm.weight.double() + a.norm.bias.double())
    return torch.cat([cls, out], 1)


def _capture_adapter_calls(model):
    """Record ``(adapter, input, scale, output)`` of every adapter call of ``model``."""
    from heba.clip import wiring
    calls, orig = [], wiring.HeBAAdapter.forward

    def spy(self, x, scale=1.0):
        out = orig(self, x, scale)
        calls.append((self, x.detach(), scale, out.detach()))
        return out

    return calls, orig, spy


def test_wiring_non_square_grid_and_published_eps():
    """wiring-grid-hw-swap, wiring-eps: a 32x48 image with patch 8 is a 4x6 grid (row-major),
    every adapter's LayerNorm uses eps 1e-5; rows of tiny variance make eps matter."""
    pytest.importorskip("open_clip")
    import open_clip

    from heba.clip import wiring
    from tests.clip_utils import randomize_adapters
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=(32, 48), patch_size=8,
                                                         width=32, layers=1, head_width=16),
                           text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2,
                                         layers=1)).eval()
    wiring.attach_heba(model, towers_="visual")
    randomize_adapters(model)
    calls, orig, spy = _capture_adapter_calls(model)
    wiring.HeBAAdapter.forward = spy
    try:
        with torch.no_grad():
            model.encode_image(torch.randn(2, 3, 32, 48))
    finally:
        wiring.HeBAAdapter.forward = orig
    assert len(calls) == 2
    for a, x, scale, out in calls:
        assert x.shape[1] == 1 + 4 * 6
        # near-constant rows: var ~ 1e-6, so eps 1e-5 vs 1e-6 changes yhat by ~2x
        xs = x.mean(-1, keepdim=True) + 1e-3 * (x - x.mean(-1, keepdim=True)) / x.std(
            -1, keepdim=True)
        with torch.no_grad():
            got = a(xs, scale=scale).double()
        exp = _independent_visual(xs, a, scale, 4, 6)
        assert (got - exp).norm() / exp.norm() < 1e-5
        torch.testing.assert_close(out.double(), _independent_visual(x, a, scale, 4, 6),
                                   rtol=1e-4, atol=1e-5)


# --- checkpoints ---------------------------------------------------------------------------

def _heba_model():
    pytest.importorskip("open_clip")
    from heba.clip import attach_heba
    from tests.clip_utils import randomize_adapters, tiny_clip
    model = tiny_clip(layers=2)
    attach_heba(model)
    return randomize_adapters(model)


def test_ddp_prefixed_published_checkpoint_loads(tmp_path):
    """ckpt-module-prefix-kept: a learner saved from inside DistributedDataParallel has
    ``module.``-prefixed keys (and tk_prompts); it loads into a plain model."""
    src = _heba_model()
    state = {"module." + k: v.clone() for k, v in src.heba_adapters.state_dict().items()}
    state["module.tk_prompts"] = torch.zeros(3, 77, dtype=torch.long)
    path = tmp_path / "model.pth.tar-5"
    torch.save({"state_dict": state, "epoch": 5}, path)
    from heba.clip import attach_heba
    from tests.clip_utils import tiny_clip
    dst = tiny_clip(layers=2, seed=3)
    attach_heba(dst)
    ckpt.load_published_checkpoint(dst, str(path))
    for k, v in src.heba_adapters.state_dict().items():
        assert torch.equal(dst.heba_adapters.state_dict()[k], v), k


def test_find_checkpoint_takes_the_largest_epoch_numerically(tmp_path):
    """ckpt-latest-lexicographic: the Dassl trainer's ``model.pth.tar-<N>``, N as a number."""
    folder = tmp_path / "adapter_learner"
    folder.mkdir()
    for n in (2, 5, 10):
        (folder / f"model.pth.tar-{n}").write_bytes(b"x")
    (folder / "model-best.pth.tar").write_bytes(b"x")
    assert ckpt.find_checkpoint(str(tmp_path)) == ("published",
                                                   str(folder / "model.pth.tar-10"))


def test_published_layout_reads_first_and_last_layer():
    """ckpt-layout-end: a checkpoint adapting layers 3..12 (1-based) of both towers."""
    keys = {f"{t}_adapter.{i}.{m}.norm.bias": None for t in ("visual", "text")
            for i in range(3, 13) for m in ("att_conv", "mlp_conv")}
    assert ckpt.published_layout(keys) == dict(towers="both", start=3, end=12)
    assert ckpt.published_layout({"text_adapter.7.att_conv.up.weight": None}) == dict(
        towers="text", start=7, end=7)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    """ckpt-write-in-place: a write that dies half way leaves the previous file intact
    and no temporary file behind."""
    path = str(tmp_path / "adapters.json")
    ckpt.atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(path, broken)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["adapters.json"]


# --- data ----------------------------------------------------------------------------------

def test_fewshot_group_of_exactly_shots_is_drawn():
    """fewshot-equal-size-group: Dassl's ``if len(items) >= num_shots: random.sample``;
    a class with exactly ``shots`` images is drawn too (reordered, generator advanced)."""
    exact = [Item(f"/e/{i}", 0, "e") for i in range(4)]
    more = [Item(f"/m/{i}", 1, "m") for i in range(9)]
    for seed in (1, 2, 3):
        random.seed(seed)
        expected = random.sample(exact, 4) + random.sample(more, 4)
        assert sampling.fewshot(exact + more, 4, random.Random(seed)) == expected


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


# --- evaluation ----------------------------------------------------------------------------

def test_harmonic_mean_by_hand():
    """eval-hm-arithmetic: HM = 2ab / (a + b)."""
    assert ev.harmonic_mean(80.0, 60.0) == pytest.approx(480.0 / 7.0)
    assert ev.harmonic_mean(90.0, 10.0) == pytest.approx(18.0)
    assert ev.harmonic_mean(0.0, 0.0) == 0.0


class _ScaleProbe(torch.nn.Module):
    """A stand-in model: 'image features' are one-hot at the label the policy's scale implies."""

    def __init__(self):
        super().__init__()
        from heba.clip.wiring import ScalePolicy
        self.heba_policy = ScalePolicy(seed=0)
        self.seen = []

    def encode_image(self, images):
        s = self.heba_policy.scale(self.training)
        self.seen.append(s)
        return F.one_hot(torch.full((len(images),), int(s == 0.025)), 2).float()


class _Bank:
    def features(self, model):
        return torch.eye(2)


@pytest.mark.parametrize("novel_eval,novel_scale", [("base", 0.025), ("novel", 0.010)])
def test_evaluation_scale_per_split(novel_eval, novel_scale):
    """eval-novel-scale-always: novel classes at the base scale unless novel_eval='novel'
    (the published code never switches scale); base always at 0.025; HM by hand."""
    model = _ScaleProbe()
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.ones(4, dtype=torch.long))
    evals = {"base": (["a", "b"], ds), "novel": (["a", "b"], ds)}
    acc = ev.evaluate(model, evals, {"base": _Bank(), "novel": _Bank()}, torch.device("cpu"),
                      "fp32", batch_size=4, novel_eval=novel_eval)
    assert model.seen == [0.025, novel_scale]
    assert acc["base"] == 100.0 and acc["novel"] == (100.0 if novel_scale == 0.025 else 0.0)
    assert acc["hm"] == (100.0 if novel_scale == 0.025 else 0.0)
    assert model.heba_policy.mode == "base"


# --- the training loop ---------------------------------------------------------------------

def test_loader_order_changes_per_epoch():
    """recipe-same-order-every-epoch, ddp-sampler-epoch-not-set: a new shuffle every epoch
    (Dassl's RandomSampler draws from the advancing global generator; DistributedSampler
    after set_epoch), the same one for the same (seed, epoch)."""
    from types import SimpleNamespace

    from heba.train import recipe as R
    from heba.train.config import make_config
    ds = torch.utils.data.TensorDataset(torch.arange(40))
    for world in (1, 2):                    # 2: the DistributedSampler of rank 0 (set_epoch)
        fake = SimpleNamespace(cfg=make_config("heba", batch_size=4, seed=1),
                               data=SimpleNamespace(train=ds), world=world, rank=0,
                               opts=SimpleNamespace(workers=0), device=torch.device("cpu"))

        def order(epoch):
            return torch.cat([b[0] for b in R.TrainRecipe._loader(fake, epoch)]).tolist()

        assert len(set(order(0))) == 40 // world and order(0) == order(0)
        assert order(0) != order(1) and order(1) != order(2)


def test_momentum_one_is_refused():
    """preflight-momentum-one: momentum must be < 1 (1 never decays a gradient)."""
    from heba.train.config import UsageError, make_config
    from heba.train.preflight import check_config
    check_config(make_config("heba", momentum=0.9))
    with pytest.raises(UsageError, match=r"--momentum must be in \[0, 1\), got 1.0"):
        check_config(make_config("heba", momentum=1.0))
