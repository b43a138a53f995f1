"""heba.timm: AdapterTune and HeBA on random-weight tiny timm ViTs, against equations written here.

The expectations are the published code's equations written out by hand in plain torch:
AdapterTune from salimkhazem/adaptertune src/models/adapters.py (``Adapter.forward``:
``alpha * up(gelu(down(x)))``, exact GELU, Xavier ``down``, zero ``up``) and
src/models/vit_adapter.py (``AdapterBlock``: ``x = block(x); x = x + adapter(x)``,
adapters in blocks ``idx % every == 0``, width ``model.embed_dim``, every block
wrapped, keys ``blocks.<i>.block.*`` / ``blocks.<i>.adapter.*``); timm's
``vision_transformer.Block`` / ``Attention`` / ``Mlp`` written out for the HeBA
positions; HeBA's adapter as in docs/semantics.md section 1.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm", reason="heba[timm] extra not installed")

from heba.adapters import CheckpointError, ScalePolicy  # noqa: E402
from heba.timm import (  # noqa: E402
    attach_adaptertune, attach_heba, load_published_checkpoint, remove_adapters,
)
from tests.clip_utils import one_thread  # noqa: E402
from tests.helpers import requires_gpu, requires_triton_cpu  # noqa: E402


_one_thread = pytest.fixture(autouse=True)(one_thread)


def tiny_vit(seed=0, depth=3, img_size=(32, 48), reg_tokens=2, num_classes=5, dtype=None,
             **kw):
    """A random-weight ViT: 4x6 patch grid, class + 2 register tokens, biases and norms drawn."""
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size,
                          patch_size=8, depth=depth, embed_dim=32, num_heads=2,
                          reg_tokens=reg_tokens, num_classes=num_classes, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(dtype or torch.float64).eval()


def images(model, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = model.patch_embed.img_size
    return torch.randn(n, 3, H, W, generator=g, dtype=torch.float64)


def randomize(modules, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std
                        + (1.0 if name.endswith("norm.weight") else 0.0))


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# --- the published AdapterTune equations, by hand ----------------------------------------------

def published_adapter_delta(p: dict, x, alpha):
    """adapters.py Adapter.forward: alpha * up(gelu(down(x))); p: down/up weight/bias tensors."""
    h = F.gelu(x @ p["down.weight"].t() + p["down.bias"])
    return alpha * (h @ p["up.weight"].t() + p["up.bias"])


def published_forward(plain_blocks, model, img, adapters: dict, alpha):
    """vit_adapter.AdapterBlock over every block, then timm's norm / token pool / head."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    for i, blk in enumerate(plain_blocks):
        x = blk(x)
        if i in adapters:
            x = x + published_adapter_delta(adapters[i], x, alpha)
    x = model.norm(x)
    return model.head(model.fc_norm(x[:, 0]))


def published_keys(plain_state: dict, n_blocks: int, every: int) -> list:
    """The published state-dict layout: every block under .block, adapters where i % every == 0."""
    keys = []
    for k in plain_state:
        parts = k.split(".")
        keys.append(".".join(parts[:2] + ["block"] + parts[2:]) if parts[0] == "blocks" else k)
    for i in range(0, n_blocks, every):
        keys += [f"blocks.{i}.adapter.{p}.{w}" for p in ("down", "up") for w in ("weight", "bias")]
    return sorted(keys)


def adapter_tensors(model, i):
    a = model.blocks[i].adapter
    return {k: v for k, v in a.state_dict().items()}


@pytest.mark.parametrize("every,alpha", [(1, 1.0), (2, 0.5)], ids=["every1", "every2-alpha0.5"])
def test_adaptertune_computes_the_published_blocks(every, alpha):
    model = tiny_vit()
    plain = [blk for blk in model.blocks]
    plain_state = state_copy(model)
    img = images(model)
    with torch.no_grad():
        y0 = model(img)
    ad = attach_adaptertune(model, rank=4, every=every, alpha=alpha)
    idx = list(range(0, 3, every))
    assert sorted(int(k) for k in ad.blocks) == idx
    assert sorted(model.state_dict()) == published_keys(plain_state, 3, every)
    assert sorted(ad.state_dict()) == sorted(k for k in model.state_dict() if ".adapter." in k)
    with torch.no_grad():
        torch.testing.assert_close(model(img), y0, rtol=0, atol=0)   # zero init: the identity
    randomize([model.blocks[i].adapter for i in idx])
    out = model(img)
    exp = published_forward(plain, model, img, {i: adapter_tensors(model, i) for i in idx}, alpha)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-12)
    assert (out - y0).abs().max() > 1e-3                        # the adapters matter
    # gradients: adapters and head only, equal to the hand-written expression's
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in model.state_dict() if ".adapter." in k or k.startswith("head.")}
    g = torch.randn_like(out)
    out.backward(g)
    leaves = {i: {k: v.detach().clone().requires_grad_(True)
                  for k, v in adapter_tensors(model, i).items()} for i in idx}
    published_forward(plain, model, img, leaves, alpha).backward(g)
    for i in idx:
        for k, p in model.blocks[i].adapter.named_parameters():
            torch.testing.assert_close(p.grad, leaves[i][k].grad, rtol=1e-9, atol=1e-12)


def test_adaptertune_starts_from_the_published_init():
    """Under one seed, the published construction order (per block: Linear(D, r), Linear(r, D),
    xavier_uniform_(down.weight), zeros) draws the same numbers as attach_adaptertune."""
    model = tiny_vit(dtype=torch.float32)
    torch.manual_seed(7)
    expected = {}
    for i in range(0, 3, 2):
        down, up = nn.Linear(32, 4), nn.Linear(4, 32)
        nn.init.xavier_uniform_(down.weight)
        nn.init.zeros_(down.bias)
        nn.init.normal_(up.weight, std=1e-4)
        nn.init.normal_(up.bias, std=1e-4)
        expected[i] = {"down.weight": down.weight, "down.bias": down.bias,
                       "up.weight": up.weight, "up.bias": up.bias}
    torch.manual_seed(7)
    attach_adaptertune(model, rank=4, every=2, init="small")
    for i in expected:
        for k, v in adapter_tensors(model, i).items():
            assert torch.equal(v, expected[i][k]), (i, k)


@pytest.mark.parametrize("method", ["adaptertune", "heba"])
def test_remove_adapters_gives_the_model_back_bit_for_bit(method):
    model = tiny_vit()
    model.blocks[1].attn.qkv.weight.requires_grad_(False)      # flags come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = state_copy(model)
    img = images(model)
    with torch.no_grad():
        y0 = model(img)
    if method == "heba":
        attach_heba(model)
    else:
        attach_adaptertune(model, rank=4, every=2)
    randomize([model.heba_adapters])
    with torch.no_grad():
        assert not torch.equal(model(img), y0)
    model.train()
    remove_adapters(model)
    model.eval()
    assert_same_state(model.state_dict(), before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(type(b).__name__ == "Block" for b in model.blocks)
    assert not hasattr(model, "heba_adapters") and not hasattr(model, "heba_policy")
    with torch.no_grad():
        assert torch.equal(model(img), y0)
    with pytest.raises(ValueError, match="no heba adapters attached"):
        remove_adapters(model)


# --- HeBA at timm's positions, by hand -----------------------------------------------------

def spec_heba(a, t, scale, grid):
    """docs/semantics.md section 1 (visual) on [B, N, D] tokens: prefix passes, the rest an H x W grid."""
    P, (H, W) = a.num_prefix_tokens, grid
    B, N, D = t.shape
    assert N == P + H * W
    g = t[:, P:]
    u = torch.einsum("bnd,hd->bnh", g, a.down.weight[:, :, 0, 0])
    u = u.reshape(B, H, W, -1).permute(0, 3, 1, 2)
    v = F.conv2d(u, a.mid.weight, padding=1, groups=a.hidden).permute(0, 2, 3, 1)
    z = torch.einsum("bnh,dh->bnd", F.gelu(v.reshape(B, H * W, -1)), a.up.weight[:, :, 0, 0])
    out = g + scale * F.layer_norm(g + z, (D,), a.norm.weight, a.norm.bias, a.eps)
    return torch.cat([t[:, :P], out], 1)


def timm_attention(attn, x):
    """timm Attention (no qk-norm): qkv, per-head softmax(q k^T / sqrt(d)) v, proj."""
    B, N, D = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, heads, -1) \
        .permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    o = (w @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(o, attn.proj.weight, attn.proj.bias)


def spec_heba_forward(model, img, layers: dict, scale, grid):
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    for i, blk in enumerate(model.blocks):
        norm1 = getattr(blk.norm1, "orig", blk.norm1)
        fc1 = getattr(blk.mlp.fc1, "orig", blk.mlp.fc1)
        h = norm1(x)
        if i in layers:
            h = spec_heba(layers[i].att_conv, h, scale, grid)
        x = x + blk.ls1(timm_attention(blk.attn, h))
        y = fc1(blk.norm2(x))
        if i in layers:
            y = spec_heba(layers[i].mlp_conv, y, scale, grid)
        x = x + blk.ls2(blk.mlp.fc2(F.gelu(y)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("cfg", [
    dict(reg_tokens=2, img_size=(32, 48), init_values=0.5, start=2, end=3),
    dict(reg_tokens=0, img_size=(40, 24), class_token=False, global_pool="avg", start=1, end=None),
], ids=["cls+2reg-grid4x6-layerscale-blocks2..3", "noprefix-grid5x3-avgpool"])
def test_heba_computes_the_block_equations(cfg):
    cfg = dict(cfg)
    start, end = cfg.pop("start"), cfg.pop("end")
    model = tiny_vit(**cfg)
    grid = tuple(model.patch_embed.grid_size)
    img = images(model)
    policy = ScalePolicy(base_scale=0.4, slow_fast_ratio=1.0)
    ad = attach_heba(model, start=start, end=end, policy=policy)
    first = start - 1
    assert len(ad.visual_adapter) == 3 + 1                  # 1-based slots, slot 0 empty
    layers = {i - 1: layer for i, layer in enumerate(ad.visual_adapter) if layer is not None}
    assert sorted(layers) == list(range(first, end or 3))
    for layer in layers.values():
        assert layer.att_conv.num_prefix_tokens == model.num_prefix_tokens
        assert layer.att_conv.grid == grid and layer.mlp_conv.dim == 4 * 32
    randomize([ad])
    out = model(img)
    exp = spec_heba_forward(model, img, layers, 0.4, grid)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-12)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"heba_adapters.{k}" for k in ad.state_dict()} | {"head.weight",
                                                                             "head.bias"}
    # every token (with token pooling the last block's MLP adapter cannot reach the output)
    model.forward_features(img).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.parameters())


def test_heba_and_adaptertune_refuse_what_they_cannot_wire():
    model = tiny_vit()
    with pytest.raises(ValueError, match="every must be a positive int"):
        attach_adaptertune(model, every=0)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        attach_adaptertune(model, rank=0)
    with pytest.raises(ValueError, match=r"1 <= start <= end <= 3"):
        attach_heba(model, start=2, end=5)
    model.blocks[1] = nn.Identity()
    with pytest.raises(TypeError, match="block 1 is a Identity"):
        attach_heba(model)
    assert all(p.requires_grad for p in model.parameters())     # nothing frozen on refusal
    attach_adaptertune(model, rank=2)                           # any block: wrapped whole
    with pytest.raises(ValueError, match="already attached"):
        attach_heba(model)
    with pytest.raises(TypeError, match="dynamic_img_size"):
        attach_heba(tiny_vit(dynamic_img_size=True))


# --- the published checkpoint --------------------------------------------------------------

def published_checkpoint(model, every=2, rank=4, seed=3, epoch=49):
    """A file as the published trainer writes it: the wrapped model's state_dict, optimizer,
    epoch (src/train/trainer.py: ``{"model": ..., "optimizer": ..., "epoch": ...}``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if parts[0] == "blocks":
            k = ".".join(parts[:2] + ["block"] + parts[2:])
        if k.startswith("head."):
            v = torch.randn(v.shape, generator=g, dtype=v.dtype)
        sd[k] = v.clone()
    D = model.embed_dim
    for i in range(0, len(model.blocks), every):
        for name, shape in (("down.weight", (rank, D)), ("down.bias", (rank,)),
                            ("up.weight", (D, rank)), ("up.bias", (D,))):
            sd[f"blocks.{i}.adapter.{name}"] = 0.3 * torch.randn(shape, generator=g,
                                                                 dtype=torch.float64)
    opt = {"state": {0: {"step": torch.tensor(10.0)}}, "param_groups": [{"lr": 1e-3,
                                                                          "params": [0]}]}
    return {"model": sd, "optimizer": opt, "epoch": epoch}


def test_published_checkpoint_loads_and_computes_the_published_model(tmp_path):
    model = tiny_vit()
    plain = [blk for blk in model.blocks]
    img = images(model)
    ckpt = published_checkpoint(model)
    torch.save(ckpt, tmp_path / "best.pt")
    got = load_published_checkpoint(model, tmp_path / "best.pt")
    assert got["epoch"] == 49 and "optimizer" in got
    assert model.heba_adapters.config["rank"] == 4 and model.heba_adapters.config["every"] == 2
    sd = ckpt["model"]
    adapters = {i: {k[len(f"blocks.{i}.adapter."):]: v for k, v in sd.items()
                    if k.startswith(f"blocks.{i}.adapter.")} for i in (0, 2)}
    with torch.no_grad():
        exp = published_forward(plain, model, img, adapters, 1.0)
        torch.testing.assert_close(model(img), exp, rtol=1e-10, atol=1e-12)
    assert torch.equal(model.head.weight, sd["head.weight"])
    # the layouts agree: the published state dict loads strictly into the wired model
    model.load_state_dict(sd, strict=True)
    # into a model already wired the same way, from a dict
    other = tiny_vit()
    attach_adaptertune(other, rank=4, every=2)
    load_published_checkpoint(other, ckpt)
    with torch.no_grad():
        assert torch.equal(other(img), model(img))
    # the container holds the model's own adapter modules: they move with the model
    other.float()
    assert other.heba_adapters.blocks["2"].adapter.up.weight is other.blocks[2].adapter.up.weight
    assert other.heba_adapters.blocks["2"].adapter.up.weight.dtype == torch.float32


def test_published_head_only_checkpoint_loads_its_head():
    model = tiny_vit()
    sd = {k: (v + 1 if k.startswith("head.") else v).clone() for k, v in model.state_dict().items()}
    load_published_checkpoint(model, {"model": sd, "optimizer": {}, "epoch": 0})
    assert torch.equal(model.head.bias, sd["head.bias"]) and getattr(model, "heba_adapters",
                                                                       None) is None


def test_checkpoint_of_another_backbone_does_not_load(tmp_path):
    model = tiny_vit()
    before = state_copy(model)
    with pytest.raises(CheckpointError, match=r"not of this backbone's weights: \d+ of \d+"):
        load_published_checkpoint(model, published_checkpoint(tiny_vit(seed=5)))
    with pytest.raises(CheckpointError, match="not of this backbone: .* it misses"):
        load_published_checkpoint(model, published_checkpoint(tiny_vit(depth=2)))
    with pytest.raises(CheckpointError, match="differ in shape"):
        load_published_checkpoint(model, published_checkpoint(tiny_vit(img_size=(32, 32))))
    seven = published_checkpoint(model)
    seven["model"]["head.weight"], seven["model"]["head.bias"] = torch.randn(7, 32), torch.randn(7)
    with pytest.raises(CheckpointError, match=r"head .*\(7, 32\).* does not fit"):
        load_published_checkpoint(model, seven)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_published_checkpoint(model, tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_published_checkpoint(model, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not a published AdapterTune checkpoint"):
        load_published_checkpoint(model, {"model": {"x": 1}})
    assert_same_state(model.state_dict(), before)              # nothing loaded, nothing wired
    attach_heba(model)
    with pytest.raises(CheckpointError, match="wired with heba"):
        load_published_checkpoint(model, published_checkpoint(tiny_vit()))
    other = tiny_vit()
    attach_adaptertune(other, rank=4, every=1)
    with pytest.raises(CheckpointError, match="missing key"):
        load_published_checkpoint(other, published_checkpoint(tiny_vit(), every=2))
    # shapes only: other pretrained weights of the same architecture are accepted on request
    load_published_checkpoint(tiny_vit(), published_checkpoint(tiny_vit(seed=5)), check="shapes")


# --- backends and the optional dependency --------------------------------------------------

def _run_both(model, img):
    out = model(img)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.heba_adapters.parameters()]


def _compare_backends(method, device, dtype, tol):
    torch.manual_seed(0)
    runs = []
    for backend in ("reference", "auto" if device == "cuda" else "triton"):
        # interpreter-sized: one block, a 3 x 4 grid
        model = tiny_vit(dtype=dtype, depth=1, reg_tokens=1, img_size=(24, 32)).to(device)
        if method == "heba":
            attach_heba(model, backend=backend,
                        policy=ScalePolicy(base_scale=0.5, slow_fast_ratio=1.0))
        else:
            attach_adaptertune(model, rank=4, backend=backend)
        randomize([model.heba_adapters])
        runs.append(_run_both(model, images(model).to(device, dtype)))
    (o_ref, g_ref), (o, g) = runs
    torch.testing.assert_close(o, o_ref, rtol=tol, atol=tol)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@requires_triton_cpu
@pytest.mark.parametrize("method", ["adaptertune", "heba"])
def test_triton_backend_passes_through(method):
    _compare_backends(method, "cuda" if torch.cuda.is_available() else "cpu", torch.float32, 1e-4)


@requires_gpu
@pytest.mark.parametrize("method", ["adaptertune", "heba"])
def test_fused_backends_on_gpu(method):
    _compare_backends(method, "cuda", torch.float32, 1e-3)


def test_missing_timm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    model = tiny_vit()
    with pytest.raises(ImportError, match=r"^heba.timm needs timm.*pip install 'heba\[timm\]'$"):
        attach_heba(model)


def test_importing_heba_timm_and_hf_imports_neither_library():
    code = ("import sys, heba.timm, heba.hf; "
            "print(sorted(m for m in ('timm', 'transformers', 'open_clip') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- strict loading: each mismatch of a published best.pt / last.pt refused in one line -------

def _changed(ck, change):
    """``(key, word the message must hold)`` after making ``change`` to ``ck["model"]``."""
    sd = ck["model"]
    if change == "unexpected-adapter-key":          # an adapter tensor AdapterTune has not
        sd["blocks.0.adapter.mid.weight"] = torch.randn(4, 4, dtype=torch.float64)
        return "blocks.0.adapter.mid.weight", "lacks"
    if change == "unexpected-backbone-key":
        sd["blocks.1.block.ls1.gamma"] = torch.ones(32, dtype=torch.float64)
        return "blocks.1.ls1.gamma", "lacks"
    if change == "unexpected-head-key":
        sd["head.scale"] = torch.ones(5, dtype=torch.float64)
        return "scale", "head"
    if change == "missing-adapter-key":
        del sd["blocks.2.adapter.up.bias"]
        return "blocks.2.adapter.up.bias", "missing"
    if change == "missing-backbone-key":
        del sd["blocks.1.block.norm2.weight"]
        return "blocks.1.norm2.weight", "misses"
    sd["blocks.2.adapter.up.weight"] = torch.randn(32, 5, dtype=torch.float64)
    return "blocks.2.adapter.up.weight", "shape"


@pytest.mark.parametrize("change", ["unexpected-adapter-key", "unexpected-backbone-key",
                                    "unexpected-head-key", "missing-adapter-key",
                                    "missing-backbone-key", "wrong-shape"])
@pytest.mark.parametrize("wired", [False, True], ids=["plain", "wired"])
def test_published_file_is_loaded_strictly(tmp_path, change, wired):
    model = tiny_vit()
    if wired:
        attach_adaptertune(model, rank=4, every=2)
    ck = published_checkpoint(tiny_vit())
    key, what = _changed(ck, change)
    path = str(tmp_path / "best.pt")
    torch.save(ck, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_published_checkpoint(model, path)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and path in msg and what in msg, msg
    # refused before anything is kept: a plain model whose adapters do not load comes back
    # unwired, a wired one with its adapters unchanged
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a refused load"
    assert torch.equal(model.head.weight, before["head.weight"])
