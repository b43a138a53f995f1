"""``--resume`` restores every piece of a run's training state: one test per piece.

A run stopped after its first epoch's set is committed, then resumed, must be the
uninterrupted run (:mod:`heba.train.loop`: every draw of an epoch follows from
``(seed, epoch, rank)``): at the start of every epoch it trains, the same optimizer,
scheduler and slow-fast state; at every step the same sample order, the same crops and the
same candidate and prompt draws; at the end the same adapters, bit for bit. Each piece has
its own test, so a resume that drops one piece names it. Both recipes: CLIP (heba) and a
timm classifier. (The fp16 loss scaler, enabled on a GPU only, is checked on the save and
restore pair directly.)
"""

from __future__ import annotations

import copy
import os
import re
import shutil

import pytest
import torch

from heba import cli
from heba.train import loop
from heba.train import run_folder as rf
from tests.clip_utils import image_folder, one_thread  # noqa: F401

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

# CLIP (heba recipe: SGD, per-epoch cosine); three epochs, so that a scheduler restored wrong
# shows in the third epoch's learning rate (the second's is read from the optimizer's state);
# the visual tower's last two blocks only, slow-fast at 0.5, so that the scale draws of two
# forwards differ; six classes and one negative per class, so that a batch's candidate set is
# a draw.
CLIP_ARGS = ["--model", "tiny", "--pretrained", "none", "--shots", "2", "--epochs", "3",
             "--batch-size", "2", "--split", "all", "--towers", "visual", "--start", "3",
             "--slow-fast-ratio", "0.5", "--neg-per-class", "1", "--no-eval-before",
             "--quiet", "--threads", "1"]
CLASSES = ("red circle", "blue square", "green triangle", "yellow cross", "cyan ring",
           "white bar")
# A timm classifier (AdapterTune's AdamW, per-step warm-up and cosine) with HeBA adapters
# (slow-fast on), on an ImageFolder with a validation split.
CLASSIFIER_ARGS = ["--quiet", "--epochs", "3", "--batch-size", "4", "--method", "heba",
                   "--slow-fast-ratio", "0.5", "--warmup-epochs", "1", "--device", "cpu"]
STOPPED_AFTER = 1           # epochs committed before the stop


class Stop(BaseException):
    """The process ends here (not an error the command line reports)."""


def _weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "adapters.safetensors"))


@pytest.fixture(scope="module", params=["clip", "classifier"])
def command(request, tmp_path_factory):
    """The data and arguments of a run of each recipe (``-o`` and ``--resume`` added later)."""
    root = tmp_path_factory.mktemp("ds")
    if request.param == "clip":
        return [image_folder(root, CLASSES, per_class=3), *CLIP_ARGS]
    pytest.importorskip("timm", reason="needs timm (pip install 'heba[timm]')")
    from tests.heba.train.test_classify import TINY, image_folder as split_folders
    return [split_folders(root, n_train=6, n_test=2), *TINY, *CLASSIFIER_ARGS]


def _recorded(argv) -> dict:
    """Run ``heba-train argv``; what each epoch started from and each step was given:
    ``{"epochs": {epoch: {piece: state}}, "steps": {epoch: [{piece: value}]}}``."""
    seen = {"epochs": {}, "steps": {}}
    real = loop.train_epoch

    def train_epoch(run, tr, epoch, inputs, tally):
        policy = tr.step.model.heba_policy
        seen["epochs"][epoch] = copy.deepcopy(dict(
            optimizer=tr.opt.state_dict(), scheduler=tr.sched.state_dict(),
            slow_fast=policy.state_dict()))
        steps = seen["steps"][epoch] = []

        def spy(images, labels):
            out = inputs(images, labels)        # CLIP: + the candidate mask and prompt picks
            steps.append(dict(order=labels.clone(), crops=images.clone(),
                              draws=tuple(t.clone() for t in out[2:])))
            return out
        return real(run, tr, epoch, spy, tally)
    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "train_epoch", train_epoch)
    try:
        assert cli.main(argv) == 0
    finally:
        mp.undo()
    return seen


@pytest.fixture(scope="module")
def reference(command, tmp_path_factory):
    """The uninterrupted run: its records and final adapters."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    return dict(_recorded([*command, "-o", out]), weights=_weights(out))


@pytest.fixture(scope="module")
def stopped(command, tmp_path_factory):
    """A run folder holding the first epoch's committed set, nothing after it."""
    out = str(tmp_path_factory.mktemp("stopped") / "run")

    def hook(what):
        if re.search(rf"/epoch_{STOPPED_AFTER}$", what):
            raise Stop(what)
    rf.WRITE_HOOK = hook
    try:
        with pytest.raises(Stop):
            cli.main([*command, "-o", out])
    finally:
        rf.WRITE_HOOK = None
    assert rf.read_set(out).epoch == STOPPED_AFTER
    return out


@pytest.fixture(scope="module")
def resumed(command, stopped, tmp_path_factory):
    """The stopped run resumed to its end: its records and final adapters."""
    out = str(tmp_path_factory.mktemp("resumed") / "run")
    shutil.copytree(stopped, out)
    return dict(_recorded([*command, "-o", out, "--resume"]), weights=_weights(out))


def _same(a, b) -> bool:
    """Equal nested state (dicts, lists, tuples, tensors bitwise, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_the_resumed_run_trains_the_remaining_epochs_only(reference, resumed):
    assert sorted(resumed["epochs"]) == list(range(STOPPED_AFTER, 3))
    assert sorted(reference["epochs"]) == [0, 1, 2]


@pytest.mark.parametrize("piece", ["optimizer", "scheduler", "slow_fast"])
def test_resume_restores_the_state_each_epoch_starts_from(piece, reference, resumed):
    """The optimizer (moments, learning rate), the scheduler (its step count) and the slow-fast
    stream (seed, forward counters) at the start of every resumed epoch."""
    for epoch, state in resumed["epochs"].items():
        assert _same(state[piece], reference["epochs"][epoch][piece]), \
            f"{piece} at the start of epoch {epoch + 1}: {state[piece]} != " \
            f"{reference['epochs'][epoch][piece]}"


@pytest.mark.parametrize("piece", ["order", "crops", "draws"])
def test_resume_continues_every_random_stream(piece, reference, resumed):
    """The sampler's epoch (the sample order), the augmentation stream (the crops) and the
    candidate / prompt draws (the CLIP step's generator), step by step."""
    for epoch, steps in resumed["steps"].items():
        want = reference["steps"][epoch]
        assert len(steps) == len(want) > 0
        for i, (got, ref) in enumerate(zip(steps, want)):
            assert _same(got[piece], ref[piece]), f"{piece} of epoch {epoch + 1}, step {i}"


def test_resume_ends_on_the_uninterrupted_adapters(reference, resumed):
    for name, ref in reference["weights"].items():
        assert torch.equal(resumed["weights"][name], ref), name


def _training(scale: float):
    """The pieces of :class:`heba.train.loop.Training` a save and a restore read, with an
    enabled loss scaler (fp16 on a GPU; enabled on the CPU here to hold a state)."""
    from types import SimpleNamespace
    p = torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 4.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=3, enabled=True)
    return SimpleNamespace(opt=opt, sched=sched, scaler=scaler, params=[p], workers=None)


def test_resume_restores_the_loss_scaler(tmp_path):
    """The fp16 loss scaler (scale, growth tracker) is saved with the set and restored."""
    from types import SimpleNamespace
    from heba.train.preflight import load_train_state
    tr = _training(2.0 ** 10)
    for inf in (True, False, False):       # one skipped step (scale halved), two grown toward
        tr.opt.zero_grad()
        loss = tr.params[0].sum() * (float("inf") if inf else 1.0)
        tr.scaler.scale(loss).backward()
        tr.scaler.step(tr.opt)
        tr.scaler.update()
    saved = tr.scaler.state_dict()
    assert saved["scale"] == 2.0 ** 9 and saved["_growth_tracker"] == 2
    run = SimpleNamespace(opts=SimpleNamespace(output=str(tmp_path)))
    latest = loop.save_epoch(run, tr, torch.nn.Module(), 1, {})
    fresh = _training(2.0 ** 16)
    state = load_train_state(latest.file(rf.STATE_NAME))
    loop.restore(fresh, torch.nn.Module(), SimpleNamespace(state=state, start_epoch=1))
    assert fresh.scaler.state_dict() == saved
