"""Adapted CLIP models end to end, on the reference and on the Triton backend.

A training step (loss.backward() through both towers), a checkpoint round trip and,
on a GPU, a captured CUDA graph, each checked against docs/semantics.md's block equations
written out with plain torch on a pristine copy of the model (tests/clip_utils.py),
with the published constants. The gradient rule is checked against its definition
(docs/semantics.md section 1, the published ``gradient_scale_layer`` pair around each adapter):
the adapters' parameter gradients are the true gradients divided by the scale, the
gradients reaching the frozen network (the image, the text positional embedding)
are the true ones.

The Triton cases run in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``,
as in CI): one layer, two images, a 3x5 grid, a few seconds each; without the
interpreter they run on the GPU, with docs/semantics.md's tf32 tolerance.
"""

from __future__ import annotations

import copy
import os

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch

from heba.clip.checkpoints import load_adapters, load_published_checkpoint, save_adapters
from heba.clip.wiring import ScalePolicy, attach_adaptertune, attach_heba
from tests.clip_utils import (BASE_SCALE, SCALE_FACTOR, heba_grads, heba_weights, images,
                              load_heba, lowrank_weights, per_block, per_layer, spec_encode_image,
                              spec_encode_text, spec_lowrank_tower, spec_tower, texts, tiny_clip)
from tests.helpers import assert_rel_close, requires_gpu, requires_triton_cpu

VIS_D, TXT_D = 64, 48
SIZE, GRID = (24, 40), (3, 5)          # a non-square model: 8x8 patches of 24x40 images
TRITON = pytest.param("triton", marks=requires_triton_cpu)


def layers_for(backend):
    return 2 if backend == "reference" else 1          # the interpreter is slow: one layer


def device_for(backend):
    """Triton on the CPU needs the interpreter; without it, the GPU."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "cuda" if backend == "triton" and not interpret else "cpu"


def tol(device, fp32=1e-5):
    return 2e-3 if device == "cuda" else fp32           # docs/semantics.md: tf32 matrix units < 1e-3


def loss_weights(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)


def spec_heba_features(pristine, img, tok, w, scale, pos=None):
    vis, txt = per_layer(w, "visual"), per_layer(w, "text")
    fi = spec_encode_image(pristine, img, lambda b, x: spec_tower(b, x, vis, scale, True, GRID))
    ft = spec_encode_text(pristine, tok, lambda b, x, m: spec_tower(b, x, txt, scale, False,
                                                                    attn_mask=m), pos)
    return fi, ft


def spec_step(pristine, img, tok, sd, scale, features):
    """Plain-autograd loss, features and gradients of docs/semantics.md's equations (no gradient rule)."""
    w = {k: v.detach().clone().requires_grad_(True) for k, v in sd.items()}
    img = img.detach().clone().requires_grad_(True)
    pos = pristine.positional_embedding.detach().clone().requires_grad_(True)
    fi, ft = features(pristine, img, tok, w, scale, pos)
    ri, rt = (r.to(fi.device) for r in loss_weights())
    ((fi * ri).sum() + (ft * rt).sum()).backward()
    return (fi.detach(), ft.detach()), {k: v.grad for k, v in w.items()}, img.grad, pos.grad


def model_step(model, img, tok):
    """The same loss through the adapted model: features, image and text x-path gradients."""
    model.train()
    model.positional_embedding.requires_grad_(True)       # a frozen tensor on the x path
    img = img.detach().clone().requires_grad_(True)
    fi, ft = model.encode_image(img), model.encode_text(tok)
    ri, rt = (r.to(fi.device) for r in loss_weights())
    ((fi * ri).sum() + (ft * rt).sum()).backward()
    return (fi.detach(), ft.detach()), img.grad, model.positional_embedding.grad


@pytest.mark.parametrize("backend,ratio,rescale", [
    ("reference", 1.0, None), ("reference", 0.0, None), ("reference", 0.0, False),
    pytest.param("triton", 0.0, None, marks=requires_triton_cpu)],
    ids=["reference-slow", "reference-fast", "reference-plain-grads", "triton-fast"])
def test_heba_training_step(backend, ratio, rescale):
    """slow_fast_ratio 1.0: every call at the base scale; 0.0: every call at base x factor.
    ``rescale=None``: the wiring's default gradient rule, which must be the published one."""
    scale = BASE_SCALE if ratio == 1.0 else BASE_SCALE * SCALE_FACTOR
    layers, dev = layers_for(backend), device_for(backend)
    pristine = tiny_clip(layers=layers, image_size=SIZE).to(dev).train()
    model = copy.deepcopy(pristine)
    kw = {} if rescale is None else dict(rescale_param_grad=rescale)
    attach_heba(model, policy=ScalePolicy(slow_fast_ratio=ratio, seed=0), backend=backend, **kw)
    sd = {k: v.to(dev) for k, v in heba_weights(VIS_D, TXT_D, layers).items()}
    load_heba(model, sd)
    img, tok = images(n=2, size=SIZE).to(dev), texts(lengths=(5, 9)).to(dev)
    feats, img_grad, pos_grad = model_step(model, img, tok)
    exp_feats, exp_w, exp_img, exp_pos = spec_step(pristine, img, tok, sd, scale,
                                                   spec_heba_features)
    assert_rel_close("image features", feats[0], exp_feats[0], tol(dev))
    assert_rel_close("text features", feats[1], exp_feats[1], tol(dev))
    # x path: the true gradient
    assert_rel_close("image grad", img_grad, exp_img, tol(dev, 1e-4))
    assert_rel_close("text positional-embedding grad", pos_grad, exp_pos, tol(dev, 1e-4))
    # parameters: the true gradient / scale (published gradient_scale_layer pair), or plain
    div = 1.0 if rescale is False else scale
    got = heba_grads(model, sd)
    for k in sd:
        assert got[k] is not None, k
        assert_rel_close(f"grad {k}", got[k], exp_w[k] / div, tol(dev, 1e-4))


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_adaptertune_training_step(backend):
    """Both towers, every 2nd block from block 0, alpha 0.7: plain gradients everywhere."""
    layers, rank, alpha, dev = 2 * layers_for(backend), 4, 0.7, device_for(backend)
    blocks = list(range(0, layers, 2))
    pristine = tiny_clip(layers=layers, image_size=SIZE).to(dev).train()
    model = copy.deepcopy(pristine)
    ad = attach_adaptertune(model, "both", rank=rank, every=2, alpha=alpha, backend=backend)
    sd = {k: v.to(dev) for k, v in {**lowrank_weights(VIS_D, rank, blocks),
          **lowrank_weights(TXT_D, rank, blocks, prefix="text_blocks", seed=3)}.items()}
    ad.load_state_dict(sd, strict=True)

    def features(pristine, img, tok, w, scale, pos):
        vis, txt = per_block(w), per_block(w, "text_blocks")
        fi = spec_encode_image(pristine, img, lambda b, x: spec_lowrank_tower(b, x, vis, alpha))
        ft = spec_encode_text(pristine, tok, lambda b, x, m: spec_lowrank_tower(b, x, txt, alpha,
                                                                                m), pos)
        return fi, ft

    img, tok = images(n=2, size=SIZE).to(dev), texts(lengths=(5, 9)).to(dev)
    feats, img_grad, pos_grad = model_step(model, img, tok)
    exp_feats, exp_w, exp_img, exp_pos = spec_step(pristine, img, tok, sd, None, features)
    assert_rel_close("image features", feats[0], exp_feats[0], tol(dev))
    assert_rel_close("text features", feats[1], exp_feats[1], tol(dev))
    assert_rel_close("image grad", img_grad, exp_img, tol(dev, 1e-4))
    assert_rel_close("text positional-embedding grad", pos_grad, exp_pos, tol(dev, 1e-4))
    params = dict(ad.named_parameters())
    for k in sd:
        assert_rel_close(f"grad {k}", params[k].grad, exp_w[k], tol(dev, 1e-4))


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_checkpoint_round_trip(backend, tmp_path):
    """Weights saved from one backend load into the other (heba's own file, and the published
    Dassl file ``adapter_learner/model.pth.tar-<epoch>``) and give docs/semantics.md's features."""
    layers = layers_for(backend)
    pristine = tiny_clip(layers=layers, image_size=SIZE)
    src = copy.deepcopy(pristine)
    attach_heba(src, backend="reference")
    sd = heba_weights(VIS_D, TXT_D, layers)
    load_heba(src, sd)
    own = str(tmp_path / "own" / "adapters.safetensors")
    save_adapters(own, src, {"method": "heba"})
    dassl = tmp_path / "run" / "adapter_learner" / "model.pth.tar-5"
    dassl.parent.mkdir(parents=True)
    torch.save({"state_dict": {**sd, "tk_prompts": torch.zeros(3, 2, 77, dtype=torch.long)},
                "epoch": 5, "optimizer": None, "scheduler": None}, dassl)

    dev = device_for(backend)
    dst = copy.deepcopy(pristine).to(dev)
    attach_heba(dst, backend=backend)
    load_adapters(own, dst)
    img, tok = images(n=2, size=SIZE), texts(lengths=(5, 9))
    with torch.no_grad():
        got = dst.encode_image(img.to(dev)).cpu(), dst.encode_text(tok.to(dev)).cpu()
        exp = spec_heba_features(pristine, img, tok, sd, BASE_SCALE)
    assert_rel_close("image features", got[0], exp[0], tol(dev))
    assert_rel_close("text features", got[1], exp[1], tol(dev))

    pub = copy.deepcopy(pristine)
    attach_heba(pub, backend=backend)
    load_published_checkpoint(pub, str(dassl))
    for k, v in sd.items():
        assert torch.equal(pub.heba_adapters.get_parameter(k), v), k
    # and back: saved from this backend, read by the reference
    back = str(tmp_path / "back" / "adapters.safetensors")
    save_adapters(back, dst, {"method": "heba"})
    ref = copy.deepcopy(pristine)
    attach_heba(ref, backend="reference")
    load_adapters(back, ref)
    for (k, a), (_, b) in zip(ref.heba_adapters.state_dict().items(),
                              src.heba_adapters.state_dict().items()):
        assert torch.equal(a.cpu(), b), k
    assert os.path.getsize(back) == os.path.getsize(own)


# --- GPU: a captured step replays docs/semantics.md's step ---------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cuda_graph_step_is_the_spec_step(backend):
    """Forward and backward of both towers captured in one CUDA graph, replayed on new inputs:
    features and gradients equal docs/semantics.md's equations computed eagerly (float32)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _graph_step(backend)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _graph_step(backend):
    pristine = tiny_clip(layers=2, image_size=SIZE).cuda().train()
    model = copy.deepcopy(pristine)
    attach_heba(model, policy=ScalePolicy(slow_fast_ratio=1.0), backend=backend)
    sd = {k: v.cuda() for k, v in heba_weights(VIS_D, TXT_D, 2).items()}
    load_heba(model, sd)
    model.train()
    keys = list(sd)
    params = [model.heba_adapters.get_parameter(k) for k in keys]
    ri, rt = (r.cuda() for r in loss_weights())
    s_img = images(n=2, size=SIZE).cuda()
    s_tok = texts(lengths=(5, 9)).cuda()

    def step():
        fi, ft = model.encode_image(s_img), model.encode_text(s_tok)
        grads = torch.autograd.grad((fi * ri).sum() + (ft * rt).sum(), params)
        return fi, ft, grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (1, 2):
        s_img.copy_(images(n=2, size=SIZE, seed=seed).cuda())
        s_tok.copy_(texts(lengths=(7, 4), seed=seed).cuda())
        graph.replay()
        torch.cuda.synchronize()
        exp_feats, exp_w, _, _ = spec_step(pristine, s_img, s_tok, sd, BASE_SCALE,
                                           spec_heba_features)
        t = 1e-4 if backend == "reference" else 2e-3       # triton: tf32 matrix units
        assert_rel_close(f"replay {seed}: image features", out[0], exp_feats[0], t)
        assert_rel_close(f"replay {seed}: text features", out[1], exp_feats[1], t)
        for k, g in zip(keys, out[2]):
            assert_rel_close(f"replay {seed}: grad {k}", g, exp_w[k] / BASE_SCALE, t)
