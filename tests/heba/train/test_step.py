"""heba.train.step: the published candidate set in static slots, the masked loss, the sync-free
step (no host sync: a CUDA graph can capture it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heba.clip import attach_adaptertune, attach_heba, encode_text
from heba.clip.wiring import ScalePolicy
from heba.train.graph import GraphedStep
from heba.train.prompts import PromptBank
from heba.train.step import (AdapterStep, candidate_count, candidate_mask, candidate_slots,
                             draw_step, masked_cross_entropy, text_length)
from tests.clip_utils import images, randomize_adapters, texts, tiny_clip
from tests.helpers import assert_rel_close, requires_gpu

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")


# --- the static candidate set -------------------------------------------------------------

def _bank(n_classes, n_prompts=3, device="cpu"):
    """Prompts of 3..8 tokens (sot, words, eot = the largest id), ``n_prompts`` per class."""
    g = torch.Generator().manual_seed(n_classes)

    def tok(texts):
        out = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, _ in enumerate(texts):
            n = int(torch.randint(3, 9, (1,), generator=g))
            out[i, 0], out[i, n - 1] = 98, 99
            out[i, 1:n - 1] = torch.randint(1, 98, (n - 2,), generator=g)
        return out
    return PromptBank([[f"{c}-{t}" for t in range(n_prompts)] for c in range(n_classes)], tok,
                      device)


@pytest.mark.parametrize("n_classes,batch,neg", [(40, 6, 5), (40, 6, 1), (12, 4, 5), (5, 8, 5)])
def test_candidate_slots_hold_the_published_set(n_classes, batch, neg):
    """Over many draws: the published set fits the K static slots, in ascending class order,
    and ``slot`` renumbers every label as the published ``torch.unique(return_inverse)``."""
    g = torch.Generator().manual_seed(0)
    k = candidate_count(n_classes, batch, neg)
    for _ in range(200):
        labels = torch.randint(0, n_classes, (batch,), generator=g)
        mask = candidate_mask(labels, n_classes, neg, g)
        classes, valid, slot = candidate_slots(mask, k)
        cand = mask.nonzero().squeeze(1)                      # the published order
        assert classes.shape == valid.shape == (k,) and int(valid.sum()) == len(cand) <= k
        assert torch.equal(classes[valid], cand)
        assert sorted(classes.tolist()) == sorted(set(classes.tolist()))   # no class twice
        assert torch.equal(classes[slot[cand]], cand)
        if k < n_classes:
            assert torch.equal(slot[labels], torch.searchsorted(cand, labels))


def _published_loss(model, bank, images, labels, mask, pick, eps=0.1):
    """The published step (VLM-HeBA CustomCLIP.forward, training) for given draws: the
    candidates gathered (sorted), labels renumbered into them, their prompts encoded at the
    full context, LabelSmoothingCrossEntropy (eps / K * sum(-log p) + (1 - eps) * nll)."""
    import torch.nn.functional as F
    cand = mask.nonzero().squeeze(1)
    target = torch.tensor([cand.tolist().index(y) for y in labels.tolist()])
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(bank.tokens[cand, pick[cand]]), dim=-1)
    logp = F.log_softmax(model.logit_scale.exp() * img @ txt.T, dim=-1)
    return (-logp.sum(-1) * eps / len(cand)
            + (1 - eps) * F.nll_loss(logp, target, reduction="none")).mean()


@pytest.mark.parametrize("n_classes", [30, 9])        # 30 > K = 4 * 3: slots; 9 <= K: all
def test_static_step_equals_published_step(n_classes):
    """Same draws (candidates, prompts, slow-fast scales): the static step's loss and adapter
    gradients equal the published eager computation's."""
    model = tiny_clip()
    attach_heba(model, policy=ScalePolicy(seed=8, slow_fast_ratio=0.5), backend="reference")
    randomize_adapters(model)
    model.train()
    bank = _bank(n_classes)
    step = AdapterStep(model, bank, 0.1, neg_per_class=2)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, n_classes, (4,), generator=g)
    mask, pick = draw_step(labels, bank, 2, "batch", g)
    assert (candidate_count(n_classes, 4, 2) < n_classes) == (n_classes == 30)
    results = []
    for fn in (lambda: step(images(4), labels, mask, pick)[0],
               lambda: _published_loss(model, bank, images(4), labels, mask, pick)):
        model.heba_policy.load_state_dict({"seed": 8, "counters": [5, 5]})   # same scales
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.heba_adapters.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# Host syncs a step must not make: reads of device values into Python, and ops whose output
# shape depends on the data (nonzero, unique, masked_select, boolean-mask indexing).
_SYNCS = {"item", "tolist", "nonzero", "argwhere", "unique", "unique_consecutive",
          "masked_select", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
          "repeat_interleave", "bincount", "equal", "allclose", "is_nonzero",
          "_local_scalar_dense"}


class _SyncRecorder(torch.overrides.TorchFunctionMode):
    """Records every torch function / Tensor method that would sync the host on a GPU."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _SYNCS:
            self.calls.append(name)
        if name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                         for a in _flat(args[1:])):
            self.calls.append("boolean-mask indexing")
        return func(*args, **(kwargs or {}))


def _flat(xs):
    for x in xs:
        if isinstance(x, (tuple, list)):
            yield from _flat(x)
        else:
            yield x


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_step_makes_no_host_sync(method):
    """The whole training step (draws, forward, backward, optimizer) calls nothing that would
    sync a GPU; the recorder itself catches the published code's syncs (checked first)."""
    model = tiny_clip()
    if method == "heba":
        attach_heba(model, policy=ScalePolicy(seed=1, slow_fast_ratio=0.5), backend="reference")
    else:
        attach_adaptertune(model, "visual", rank=4, backend="reference")
    model.train()
    bank = _bank(30)
    step = AdapterStep(model, bank, 0.1, neg_per_class=2)
    opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=0.1, momentum=0.9)
    graphed = GraphedStep(lambda *x: step(*x), list(model.heba_adapters.parameters()))
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 30, (4,), generator=g)
    with _SyncRecorder() as rec:
        _published_loss(model, bank, images(4), labels, *draw_step(labels, bank, 2, "batch", g))
    assert {"nonzero", "tolist"} <= set(rec.calls), rec.calls
    if not step.text_adapted:
        step.frozen_features()       # once per run, before the first step (not per step)
    for s in range(3):
        imgs, labels = images(4, seed=s), torch.randint(0, 30, (4,), generator=g)
        with _SyncRecorder() as rec:
            mask, pick = draw_step(labels, bank, 2, "batch", g)
            opt.zero_grad(set_to_none=True)
            loss, acc = graphed(imgs, labels, mask, pick)
            opt.step()
        assert rec.calls == [], f"step {s}: {rec.calls}"
    assert torch.isfinite(loss)


def test_graphs_requested_on_cpu_run_the_eager_step():
    """GraphedStep around the real step on the CPU: every call eager, results unchanged."""
    runs = []
    for enabled in (True, False):
        model = tiny_clip()
        attach_heba(model, policy=ScalePolicy(seed=2, slow_fast_ratio=0.5), backend="reference")
        randomize_adapters(model)
        model.train()
        bank = _bank(9)
        step = AdapterStep(model, bank, 0.1, neg_per_class=2)
        params = list(model.heba_adapters.parameters())
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        graphed = GraphedStep(lambda *x: step(*x), params, enabled=enabled, warmup=1)
        g = torch.Generator().manual_seed(0)
        losses = []
        for s in range(4):
            labels = torch.randint(0, 9, (4,), generator=g)
            mask, pick = draw_step(labels, bank, 2, "batch", g)
            opt.zero_grad(set_to_none=True)
            losses.append(graphed(images(4, seed=s), labels, mask, pick)[0])
            opt.step()
        assert graphed.replays == 0
        runs.append((torch.stack(losses), [p.detach().clone() for p in params]))
    (l0, p0), (l1, p1) = runs
    assert torch.equal(l0, l1) and len(set(l0.tolist())) == 4
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)


def _gpu_run(method, graphs, steps=8, n_classes=30, precision=torch.bfloat16):
    """The heba-train step on a GPU: cast once, autocast, device draws, fused SGD with a
    per-step cosine, GraphedStep; returns (losses, final adapter weights, GraphedStep)."""
    from heba.train.graph import prepare_frozen
    torch.manual_seed(0)
    model = tiny_clip().cuda().train()
    if method == "heba":
        attach_heba(model, policy=ScalePolicy(seed=4, slow_fast_ratio=0.5))
    else:
        attach_adaptertune(model, "visual", rank=4)
    randomize_adapters(model)
    prepare_frozen(model, precision)
    bank = _bank(n_classes, device="cuda")
    step = AdapterStep(model, bank, 0.1, neg_per_class=2)
    params = list(model.heba_adapters.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / 8)))

    def fn(*x):
        with torch.autocast("cuda", dtype=precision, cache_enabled=not graphs):
            return step(*x)
    graphed = GraphedStep(fn, params, enabled=graphs, warmup=2)
    gen = torch.Generator(device="cuda").manual_seed(5)
    data = torch.Generator().manual_seed(6)
    losses = []
    for s in range(steps):
        b = 4 if s % 4 else 3                                   # two shapes, two graphs
        imgs = torch.randn(b, 3, 32, 32, generator=data).cuda()
        labels = torch.randint(0, n_classes, (b,), generator=data).cuda()
        if graphs and s == steps - 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")          # a replayed step: no host sync
        try:
            mask, pick = draw_step(labels, bank, 2, "batch", gen)
            opt.zero_grad(set_to_none=True)
            loss, _ = graphed(imgs, labels, mask, pick)
            opt.step()
            sched.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        losses.append(loss)
    return [float(x) for x in losses], [p.detach().float().cpu() for p in params], graphed


@requires_gpu
@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_graph_replay_equals_eager_steps(method):
    """The real step, replayed as CUDA graphs (two batch shapes, slow-fast draws, new
    candidates and prompts every step, a per-step LR schedule) equals the eager steps."""
    from tests.helpers import assert_rel_close
    l0, p0, _ = _gpu_run(method, graphs=False)
    l1, p1, graphed = _gpu_run(method, graphs=True)
    assert graphed.reason is None and graphed.replays >= 3, (graphed.reason, graphed.replays)
    assert len(set(l0)) == len(l0)
    assert l1 == pytest.approx(l0, rel=2e-2)
    for i, (a, b) in enumerate(zip(p0, p1)):
        assert_rel_close(f"param {i}", b, a, 2e-2)


@requires_gpu
@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_cli_default_runs_replay_graphs(tmp_path, capsys, method):
    """heba-train's default HeBA run (fp16 as published, slow-fast on, text tower adapted)
    and the AdapterTune run replay forward + backward as CUDA graphs; the log says so."""
    import json
    from heba import cli
    from tests.clip_utils import image_folder
    folder = image_folder(tmp_path / "ds", per_class=6)
    out = tmp_path / "run"
    rc = cli.main([folder, "--method", method, "--model", "tiny", "--pretrained", "none",
                   "--shots", "4", "--epochs", "3", "--batch-size", "4", "--quiet",
                   "--no-eval-before", "--split", "all", "-o", str(out)])
    log, err = capsys.readouterr()
    assert rc == 0, err
    assert "CUDA graphs on (forward + backward, one graph per batch shape)" in log, log
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in recs if r["event"] == "train"]
    assert train[-1]["graph_replays"] > 0 and all(math.isfinite(r["loss"]) for r in train)


# --- the masked loss and the text length ------------------------------------------------------

def test_masked_cross_entropy_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    for eps in (0.0, 0.1):
        assert_rel_close(f"eps={eps}", masked_cross_entropy(logits, labels, None, eps),
                         F.cross_entropy(logits, labels, label_smoothing=eps), 1e-6)
        padded = torch.cat([logits, 1e3 * torch.randn(6, 3, generator=g)], 1)
        valid = torch.tensor([True] * 5 + [False] * 3)
        assert_rel_close(f"padded eps={eps}", masked_cross_entropy(padded, labels, valid, eps),
                         F.cross_entropy(logits, labels, label_smoothing=eps), 1e-6)


def test_text_length_gives_identical_features():
    model = tiny_clip()
    attach_heba(model, policy=ScalePolicy(slow_fast_ratio=1.0, seed=3), backend="reference")
    model = randomize_adapters(model).eval()
    txt = texts((5, 9, 3), context_length=16)
    assert text_length(txt, 8) == 16 and text_length(txt[[0, 2]], 8) == 8
    assert text_length(txt[[2]], 4) == 4 and text_length(txt, 32) == 16
    with torch.no_grad():
        full = model.encode_text(txt)
        exact = encode_text(model, txt)
        for length in (9, 12, 16):
            assert_rel_close(f"length {length}", encode_text(model, txt, length=length), full,
                             1e-5)
        assert_rel_close("wiring.encode_text", exact, full, 1e-5)
        # too short a context must change the features: the check above can fail
        assert (encode_text(model, txt, length=8) - full).abs().max() > 1e-3


@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_text_length_never_cuts_before_the_last_end_of_text(multiple):
    """By definition: the shortest multiple of ``multiple`` (or the full context) that still
    holds every row's end-of-text token (CLIP's largest id), for the end-of-text at every
    position of a 16-token context, alone and in a bank with shorter rows."""
    context = 16
    for eot in range(2, context):
        row = texts((eot + 1, 3), context_length=context)                # eot at index `eot`
        for tokens in (row[:1], row, row.flip(0), row.view(1, 2, context)):
            want = min(context, -(-(eot + 1) // multiple) * multiple)
            got = text_length(tokens, multiple)
            assert got == want, f"end-of-text at {eot}, multiple {multiple}: {got} != {want}"
            assert tokens[..., :got].amax() == tokens.amax()              # the eot is kept


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
