"""heba-train's fast path: cast-once backbone, checkpointed blocks, graphed fwd+bwd (GraphedStep)."""

from __future__ import annotations

import json
import os

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch
import torch.nn.functional as F

from heba import cli
from heba.clip import attach_adaptertune, attach_heba
from heba.train import recipe as T
from heba.train.graph import GraphedStep
from heba.train.prompts import PromptBank
from heba.train.step import AdapterStep, candidate_mask
from heba.clip.wiring import ScalePolicy
from tests.clip_utils import image_folder, one_thread, randomize_adapters, tiny_clip  # noqa: F401
from tests.helpers import assert_rel_close, requires_gpu

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

FAST = ["--model", "tiny", "--pretrained", "none", "--shots", "2", "--epochs", "2",
        "--batch-size", "4", "--quiet", "--threads", "1", "--no-eval-before", "--split", "all"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ds"), per_class=4)


def train_losses(folder, out, capsys, *extra):
    rc = cli.main([folder, *FAST, "-o", str(out), *extra])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [l["loss"] for l in lines if l["event"] == "train"], stdout


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_cast_once_cli_matches_autocast(folder, tmp_path, capsys, method):
    """bf16 with the backbone cast once = bf16 autocast over an fp32 backbone, up to rounding."""
    args = ("--method", method, "--precision", "bf16")
    once, log = train_losses(folder, tmp_path / "once", capsys, *args)
    assert "frozen backbone cast once to bf16" in log and "CUDA graphs off (not on a GPU)" in log
    every, log = train_losses(folder, tmp_path / "every", capsys, *args, "--no-cast-once")
    assert "backbone kept in fp32 (--no-cast-once)" in log
    fp32, _ = train_losses(folder, tmp_path / "fp32", capsys, "--method", method)
    for a, b, c in zip(once, every, fp32):
        assert abs(a - b) <= 2e-2 * abs(b), (once, every)
        assert abs(a - c) <= 5e-2 * abs(c), (once, fp32)     # and both near fp32


def test_checkpointed_blocks_change_nothing(folder, tmp_path, capsys):
    plain, _ = train_losses(folder, tmp_path / "plain", capsys)
    ck, log = train_losses(folder, tmp_path / "ck", capsys, "--checkpoint-blocks", "1")
    assert "8 frozen blocks checkpointed" in log          # 4 blocks x 2 towers
    assert ck == pytest.approx(plain, rel=1e-5)
    from safetensors.torch import load_file
    a = load_file(os.path.join(tmp_path / "plain", T.CKPT_NAME))
    b = load_file(os.path.join(tmp_path / "ck", T.CKPT_NAME))
    assert set(a) == set(b)                               # block wrappers rename nothing
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_checkpoint_blocks_bad_value(folder, tmp_path, capsys):
    rc = cli.main([folder, *FAST, "-o", str(tmp_path / "x"), "--checkpoint-blocks", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--checkpoint-blocks must be >= 0" in err


def _args(no_cuda_graphs=False):
    return T.RunOptions(cuda_graphs=not no_cuda_graphs)


def test_graphs_reasons():
    cuda = torch.device("cuda", 0)
    heba = tiny_clip()
    attach_heba(heba, "visual", policy=ScalePolicy(slow_fast_ratio=0.8))
    at = tiny_clip()
    attach_adaptertune(at, "visual", rank=4)
    bank = PromptBank([["a"], ["b"]], lambda t: torch.zeros(len(t), 16, dtype=torch.long))
    step_at = AdapterStep(at, bank, 0.1)
    from heba.train.graph import graphs_reason as reason
    assert reason(_args(), cuda, 1, "bf16", at, step_at) is None
    assert reason(_args(no_cuda_graphs=True), cuda, 1, "bf16", at, step_at) == "--no-cuda-graphs"
    assert reason(_args(), torch.device("cpu"), 1, "bf16", at, step_at) == "not on a GPU"
    assert reason(_args(), cuda, 2, "bf16", at, step_at) == "DistributedDataParallel"
    assert "fp16 loss scaling" in reason(_args(), cuda, 1, "fp16", at, step_at)
    fused = type("FusedSGD", (), {"_step_supports_amp_scaling": True})()   # SGD(fused=True)
    assert reason(_args(), cuda, 1, "fp16", at, step_at, fused) is None
    # device-side slow-fast draws and static candidate slots: graphs on for the default runs
    assert reason(_args(), cuda, 1, "bf16", heba, AdapterStep(heba, bank, 0)) is None
    host = tiny_clip()
    attach_heba(host, "both", policy=ScalePolicy(slow_fast_ratio=0.8, draws="host"))
    assert "slow-fast" in reason(_args(), cuda, 1, "bf16", host, AdapterStep(host, bank, 0))
    host.heba_policy.slow_fast_ratio = 1.0
    assert reason(_args(), cuda, 1, "bf16", host, AdapterStep(host, bank, 0)) is None
    both = tiny_clip()
    attach_adaptertune(both, "both", rank=4)
    assert reason(_args(), cuda, 1, "bf16", both, AdapterStep(both, bank, 0)) is None


def test_frozen_text_step_masks_candidates():
    """Frozen text tower: the step masks all-class logits (static shapes, no host sync); loss,
    accuracy and gradients equal those over the gathered candidate set."""
    model = tiny_clip()
    attach_adaptertune(model, "visual", rank=4)
    randomize_adapters(model)
    tok = lambda texts: torch.tensor([[98, 1 + int(t), 99] + [0] * 13 for t in texts])  # noqa
    bank = PromptBank([[str(c), str(c + 20)] for c in range(12)], tok)
    step = AdapterStep(model, bank, label_smoothing=0.1)
    assert not step.text_adapted
    imgs = torch.randn(5, 3, 32, 32)
    labels = torch.tensor([0, 3, 3, 7, 1])
    g = torch.Generator().manual_seed(1)
    mask = candidate_mask(labels, 12, 1, g)
    pick = torch.randint(0, 2, (12,), generator=g)
    assert int(mask.sum()) == 8                    # 4 batch classes + 1 negative each
    loss, acc = step(imgs, labels, mask, pick)
    loss.backward()
    got = [p.grad.clone() for p in model.heba_adapters.parameters()]
    model.zero_grad(set_to_none=True)
    cls = mask.nonzero().squeeze(1)
    img = F.normalize(model.encode_image(imgs), dim=-1)
    with torch.no_grad():
        txt = F.normalize(model.encode_text(bank.tokens[cls, pick[cls]]), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T
    target = torch.searchsorted(cls, labels)
    exp = F.cross_entropy(logits, target, label_smoothing=0.1)
    exp.backward()
    torch.testing.assert_close(loss.detach(), exp.detach(), rtol=1e-5, atol=1e-6)
    assert acc.item() == (logits.argmax(1) == target).float().mean().item()
    for a, p in zip(got, model.heba_adapters.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_graphed_step_eager_on_cpu():
    """Off the GPU GraphedStep is fn + backward: same outputs, same gradients."""
    torch.manual_seed(0)
    w = torch.randn(6, 3, requires_grad=True)
    x = torch.randn(4, 6)

    def fn(inp):
        y = (inp @ w).tanh()
        return y.square().sum(), y.mean()

    step = GraphedStep(fn, [w])
    loss, mean = step(x)
    assert not loss.requires_grad and step.replays == 0
    g = w.grad.clone()
    w.grad = None
    ref = fn(x)
    ref[0].backward()
    torch.testing.assert_close(loss, ref[0].detach())
    torch.testing.assert_close(mean, ref[1].detach())
    torch.testing.assert_close(g, w.grad)


@requires_gpu
def test_graphed_step_matches_eager_on_gpu():
    """Replayed graphs (two shapes, an LR schedule, zero_grad between steps) = eager steps."""
    runs = []
    for enabled in (False, True):
        model = tiny_clip().cuda().train()
        attach_adaptertune(model, "visual", rank=4)
        randomize_adapters(model)
        params = list(model.heba_adapters.parameters())
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

        def fn(imgs, labels):
            feats = F.normalize(model.encode_image(imgs), dim=-1)
            logits = 10 * feats @ feats[:4].T
            return F.cross_entropy(logits, labels), logits.mean()

        step = GraphedStep(fn, params, enabled=enabled, warmup=1)
        losses = []
        for s in range(8):
            b = 6 if s % 3 else 5
            g = torch.Generator().manual_seed(s)
            imgs = torch.randn(b, 3, 32, 32, generator=g).cuda()
            labels = torch.randint(0, 4, (b,), generator=g).cuda()
            opt.zero_grad(set_to_none=True)
            loss, _ = step(imgs, labels)
            opt.step()
            sched.step()
            losses.append(loss.item())
        if enabled:
            assert step.reason is None and step.replays >= 4, (step.reason, step.replays)
        runs.append((losses, [p.detach().cpu() for p in params]))
    (l0, p0), (l1, p1) = runs
    assert l1 == pytest.approx(l0, rel=1e-4)
    for i, (a, b) in enumerate(zip(p0, p1)):
        assert_rel_close(f"param {i}", b, a, 1e-4)
