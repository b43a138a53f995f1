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

from heba.clip import checkpoints as ckpt
from heba.data import sampling
from heba.data.sampling import Item

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


# --- checkpoints ---------------------------------------------------------------------------

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


def test_checkpoint_set_changed_in_place_is_named(tmp_path):
    """set-sha-compared-with-itself: a file of a committed set changed after the commit,
    same size (so only its sha256 can tell), fails read_set naming the file."""
    ckpt.write_set(str(tmp_path), 3, {"a.bin": lambda p: open(p, "wb").write(b"abcd")})
    assert ckpt.read_set(str(tmp_path)).epoch == 3
    with open(tmp_path / "epoch_3" / "a.bin", "wb") as f:
        f.write(b"abce")
    with pytest.raises(ckpt.CheckpointError, match=r"a\.bin does not match its manifest"):
        ckpt.read_set(str(tmp_path))


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
