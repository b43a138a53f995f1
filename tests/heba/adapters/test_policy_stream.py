"""Device-side slow-fast scales (heba.adapters.ScalePolicy): the published draw, resumable,
graphable, replayed by checkpointed blocks.

The published draw (VLM-HeBA trainers/heba.py ``return_{text,visual}_adapter``, called once
per block by clip/model.py ``ModifiedResidualAttentionBlock.forward``): per tower forward,
per block, one draw shared by the block's ``att_conv`` and ``mlp_conv``; the scale is
``base * factor`` when ``rand > SLOW_FAST_RATIO``.
"""

from __future__ import annotations

import math

import pytest
import torch

from heba.clip import attach_heba
from heba.clip import wiring
from heba.adapters import policy
from heba.clip.wiring import ScalePolicy
from heba.train.graph import checkpoint_frozen_blocks
from heba.train.step import masked_cross_entropy
from tests.clip_utils import images, randomize_adapters, texts, tiny_clip
from tests.helpers import requires_gpu

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

CPU = torch.device("cpu")


# --- a host re-implementation of the stream, written from its definition -----------------

def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def host_scales(seed, tower, n_blocks, forward, ratio=0.8, base=0.025, factor=2.25, pos=0):
    """The scales of forward number ``forward`` (0-based) of ``tower``, one per block
    (``pos=1``: the MLP adapters' own draws, ``per_block=False``)."""
    t = {"visual": 0, "text": 1}[tower]
    k0 = _lowbias32(_lowbias32((seed & 0xFFFFFFFF) ^ 0x9E3779B9) ^ (seed >> 32))
    out = []
    for b in range(n_blocks):
        key = _lowbias32(k0 ^ ((pos << 24) | (t << 16) | b))
        u = (_lowbias32(key ^ (forward & 0xFFFFFFFF)) >> 8) / 2 ** 24   # uniform in [0, 1)
        out.append(base * factor if u >= ratio else base)
    return out


def device_scales(pol, tower, n):
    """The scales one forward of ``tower`` hands its blocks (in order, as a forward asks)."""
    return [pol.scale(True, tower, i, device=CPU) for i in range(n)]


@pytest.mark.parametrize("seed", [0, 7, 2 ** 40 + 3])
def test_device_draws_match_host_reimplementation(seed):
    pol = ScalePolicy(seed=seed, slow_fast_ratio=0.8)
    host = ScalePolicy(seed=seed, slow_fast_ratio=0.8, draws="host")
    for p in (pol, host):
        p.bind("visual", 5)
        p.bind("text", 3)
    for f in range(40):
        for tower, n in (("visual", 5), ("text", 3)):
            got = device_scales(pol, tower, n)        # block 0's call starts a forward
            assert all(isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype == torch.float32
                       for s in got)
            want = host_scales(seed, tower, n, f)
            # float32 of the Python float: what the float path hands the kernels
            assert [s.item() for s in got] == [float(torch.tensor(w)) for w in want], (tower, f)
            assert device_scales(host, tower, n) == want
    assert pol.state_dict() == {"seed": seed, "counters": [40, 40]}


def test_draw_frequency_and_independence(monkeypatch):
    """P(fast) = 1 - ratio per block; blocks, towers and forwards are independent draws."""
    # 4000 forwards: the stream's element-wise form (the one-launch kernel draws the same
    # bits, tests/heba_kernels/test_slow_fast.py; in Triton's CPU interpreter it is slow)
    monkeypatch.setattr(policy, "_one_launch", lambda device: False)
    pol = ScalePolicy(seed=1, slow_fast_ratio=0.8)
    pol.bind("visual", 12)
    pol.bind("text", 12)
    rows = []
    for _ in range(2000):
        row = []
        for tower in ("visual", "text"):
            pol.begin(tower, CPU, training=True)
            row.append(pol._current[tower][:, 0] > 0.03)
        rows.append(torch.cat(row))
    fast = torch.stack(rows).double()                       # [forwards, 24]
    sd = math.sqrt(0.2 * 0.8 / fast.shape[0])
    assert (fast.mean(0) - 0.2).abs().max() < 5 * sd, fast.mean(0)
    corr = torch.corrcoef(fast.T) - torch.eye(24, dtype=torch.float64)
    assert corr.abs().max() < 0.1, corr.abs().max()
    lag = torch.corrcoef(torch.cat([fast[:-1], fast[1:]], 1).T)[:24, 24:].diagonal()
    assert lag.abs().max() < 0.1, lag
    assert ScalePolicy(seed=1).state_dict()["seed"] == 1
    assert ScalePolicy().seed != ScalePolicy().seed             # None: a fresh seed


def test_eval_and_no_slow_fast_are_floats():
    pol = ScalePolicy(seed=0)
    pol.bind("text", 2)
    pol.begin("text", CPU, training=False)
    assert pol.scale(False, "text", 0) == 0.025
    pol.set_mode("novel")
    assert pol.scale(False, "text", 1) == 0.010
    off = ScalePolicy(slow_fast_ratio=1.0)
    off.bind("visual", 2)
    off.begin("visual", CPU, training=True)
    assert off.scale(True, "visual", 1) == 0.025 and not off.random
    assert ScalePolicy(slow_fast_ratio=0.0).random
    for bad in (dict(slow_fast_ratio=1.5), dict(draws="gpu")):
        with pytest.raises(ValueError):
            ScalePolicy(**bad)
    with pytest.raises(ValueError, match="tower"):
        ScalePolicy().scale(True)


def test_resume_continues_the_stream():
    a = ScalePolicy(seed=5, slow_fast_ratio=0.5)
    a.bind("text", 4)
    for _ in range(7):
        a.begin("text", CPU, training=True)
    state = a.state_dict()
    b = ScalePolicy(seed=123, slow_fast_ratio=0.5)        # the resumed run's fresh policy
    b.bind("text", 4)
    b.load_state_dict(state)
    for _ in range(5):
        a.begin("text", CPU, training=True)
        b.begin("text", CPU, training=True)
        assert torch.equal(a._current["text"], b._current["text"])
    assert a.state_dict() == b.state_dict() == {"seed": 5, "counters": [0, 12]}


# --- wired into a model -------------------------------------------------------------------

def _spy(monkeypatch):
    """Record ``(adapter, scale)`` for every HeBA adapter call."""
    seen = []
    orig = wiring.HeBAAdapter.forward

    def spy(self, x, scale=1.0):
        seen.append((self, scale))
        return orig(self, x, scale)
    monkeypatch.setattr(wiring.HeBAAdapter, "forward", spy)
    return seen


def test_one_draw_per_block_and_tower_shared_by_both_adapters(monkeypatch):
    model = tiny_clip(layers=3)
    attach_heba(model, policy=ScalePolicy(seed=2, slow_fast_ratio=0.5), backend="reference")
    randomize_adapters(model)
    model.train()
    seen = _spy(monkeypatch)
    sites = {}
    for tower in ("visual", "text"):
        for i, layer in enumerate(_layers(model, tower)):
            sites[id(layer.att_conv)] = (tower, i, "att")
            sites[id(layer.mlp_conv)] = (tower, i, "mlp")
    per_forward = []
    for f in range(6):
        seen.clear()
        model.encode_image(images(2))
        model.encode_text(texts())
        calls = [(sites[id(a)], s) for a, s in seen]
        assert len(calls) == 12                               # 3 blocks x 2 adapters x 2 towers
        by_block = {}
        for (tower, i, pos), s in calls:
            by_block.setdefault((tower, i), []).append(s)
        for key, (att, mlp) in by_block.items():
            # the same element of the same forward's draw (one memory location)
            assert att.data_ptr() == mlp.data_ptr(), f"{key}: att_conv and mlp_conv differ"
        per_forward.append({k: float(v[0]) for k, v in by_block.items()})
        for tower in ("visual", "text"):
            want = host_scales(2, tower, 3, f, ratio=0.5)
            assert [per_forward[-1][(tower, i)] for i in range(3)] == \
                [float(torch.tensor(w)) for w in want]
    assert model.heba_policy.state_dict()["counters"] == [6, 6]
    model.eval()
    seen.clear()
    with torch.no_grad():
        model.encode_text(texts())
    assert [s for _, s in seen] == [0.025] * 6
    assert model.heba_policy.state_dict()["counters"] == [6, 6]   # evaluation draws nothing


def test_per_call_draws(monkeypatch):
    """per_block=False: each adapter draws its own scale (position 1 = the MLP adapter)."""
    model = tiny_clip(layers=3)
    attach_heba(model, "text", policy=ScalePolicy(seed=6, slow_fast_ratio=0.5, per_block=False),
                backend="reference")
    model.train()
    seen = _spy(monkeypatch)
    for f in range(4):
        seen.clear()
        model.encode_text(texts())
        got = [float(s) for _, s in seen]                 # att 0, mlp 0, att 1, mlp 1, ...
        want = [float(torch.tensor(w)) for pair in zip(
            host_scales(6, "text", 3, f, 0.5), host_scales(6, "text", 3, f, 0.5, pos=1))
            for w in pair]
        assert got == want, f
    assert "per_block=False" in repr(model.heba_policy)


def _layers(model, tower):
    return [m for m in getattr(model.heba_adapters, f"{tower}_adapter") if m is not None]


def _loss(model, imgs, txt, labels):
    """The CLIP contrastive loss of a batch against the prompts ``txt``."""
    img = model.encode_image(imgs, normalize=True)
    tx = model.encode_text(txt, normalize=True)
    logits = model.logit_scale.exp().float() * img.float() @ tx.float().t()
    return masked_cross_entropy(logits, labels)


def test_float_path_equals_tensor_path_bitwise():
    """draws="host" (Python floats) and draws="device" (0-d tensors): the same stream, so the
    same losses and gradients, bit for bit (heba.ops reads tensor and float alike)."""
    out = []
    for draws in ("host", "device"):
        model = tiny_clip()
        attach_heba(model, policy=ScalePolicy(seed=4, slow_fast_ratio=0.5, draws=draws),
                    backend="reference")
        randomize_adapters(model)
        model.train()
        losses, grads = [], []
        for s in range(3):
            model.zero_grad(set_to_none=True)
            loss = _loss(model, images(3, seed=s), texts(), torch.tensor([0, 2, 1]))
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.heba_adapters.parameters()])
        out.append((losses, grads))
    (l0, g0), (l1, g1) = out
    assert len({float(x) for x in l0}) == 3
    for a, b in zip(l0, l1):
        assert torch.equal(a, b), (a, b)
    for ga, gb in zip(g0, g1):
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)


def test_checkpointed_blocks_replay_the_draw_across_two_forwards():
    """Two forwards of each tower before one backward (the second draws anew): the
    checkpointed recomputation of the first must use the first forward's scales."""
    results = []
    for ckpt in (False, True):
        model = tiny_clip()
        attach_heba(model, policy=ScalePolicy(seed=1, slow_fast_ratio=0.5), backend="reference")
        randomize_adapters(model)
        model.train()
        if ckpt:
            checkpoint_frozen_blocks(model)
        labels = torch.tensor([0, 1, 2])
        loss = _loss(model, images(3, seed=0), texts(), labels) + \
            2 * _loss(model, images(3, seed=1), texts(), labels)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.heba_adapters.parameters()]))
    for tower in ("visual", "text"):    # seed 1: the two forwards draw differently
        assert host_scales(1, tower, 2, 0, 0.5) != host_scales(1, tower, 2, 1, 0.5)
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


# --- GPU: the draws inside a captured CUDA graph --------------------------------------------

@requires_gpu
def test_graph_replay_draws_new_scales():
    """A captured tower forward replays the hash and the counter increment: replay k gives
    the scales of eager forward k, and the counter ends where the eager run ends."""
    pol = ScalePolicy(seed=3, slow_fast_ratio=0.5)
    pol.bind("visual", 6)
    dev = torch.device("cuda")
    out = torch.zeros(6, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        pol.begin("visual", dev, training=True)               # warm-up: device tensors made
        out.copy_(pol._current["visual"])
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pol.begin("visual", dev, training=True)
        out.copy_(pol._current["visual"])
    replayed = []
    for _ in range(8):
        g.replay()
        replayed.append(out.cpu().tolist())
    want = [[float(torch.tensor(w)) for w in host_scales(3, "visual", 6, f, ratio=0.5)]
            for f in range(1, 9)]
    assert replayed == want
    assert pol.state_dict()["counters"] == [9, 0]
