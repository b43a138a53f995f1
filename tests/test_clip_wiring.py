"""heba.clip.wiring: adapters where the published method puts them, and off again exactly."""

from __future__ import annotations

import copy
import math

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch
import torch.nn.functional as F

from heba.clip import wiring
from heba.clip.wiring import (ScalePolicy, attach_adaptertune, attach_heba, count_parameters,
                              encode_text, remove_adapters)
from tests.clip_utils import images, randomize_adapters, texts, tiny_clip


# --- an independent expectation: SPEC.md's block equations written out by hand -------------

def spec_adapter(a, t, scale):
    """SPEC.md section 1 for one HeBAAdapter ``a`` on batch-first tokens ``t`` [B, N, D]."""
    if a.modality == "text":
        z = F.linear(F.gelu(F.linear(t, a.down.weight)), a.up.weight)
        return t + scale * F.layer_norm(t + z, (a.dim,), a.norm.weight, a.norm.bias, a.eps)
    P = a.num_prefix_tokens
    B, N, D = t.shape
    side = math.isqrt(N - P)
    g = t[:, P:]
    u = torch.einsum("bnd,hd->bnh", g, a.down.weight[:, :, 0, 0])
    u = u.reshape(B, side, side, -1).permute(0, 3, 1, 2)
    v = F.conv2d(u, a.mid.weight, padding=1, groups=a.hidden)
    v = v.permute(0, 2, 3, 1).reshape(B, side * side, -1)
    z = torch.einsum("bnh,dh->bnd", F.gelu(v), a.up.weight[:, :, 0, 0])
    out = g + scale * F.layer_norm(g + z, (D,), a.norm.weight, a.norm.bias, a.eps)
    return torch.cat([t[:, :P], out], 1)


def spec_tower(blocks, layers, x, scale, attn_mask=None):
    """Run open_clip blocks on batch-first ``x`` with HeBA adapters ``layers`` {index: HeBALayer}."""
    for i, blk in enumerate(blocks):
        ln_1 = getattr(blk.ln_1, "orig", blk.ln_1)          # the original modules
        c_fc = getattr(blk.mlp.c_fc, "orig", blk.mlp.c_fc)
        h = ln_1(x)
        if i in layers:
            h = spec_adapter(layers[i].att_conv, h, scale)
        x = x + blk.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        y = c_fc(blk.ln_2(x))
        if i in layers:
            y = spec_adapter(layers[i].mlp_conv, y, scale)
        x = x + blk.mlp.c_proj(blk.mlp.gelu(y))
    return x


def spec_encode_image(model, img, layers, scale):
    v = model.visual
    x = v._embeds(img)
    x = spec_tower(v.transformer.resblocks, layers, x, scale)
    pooled, _ = v._pool(x)
    return pooled @ v.proj


def spec_encode_text(model, text, layers, scale):
    x = model.token_embedding(text) + model.positional_embedding
    x = spec_tower(model.transformer.resblocks, layers, x, scale, model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), text.argmax(-1)]
    return x @ model.text_projection


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("start,end", [(1, None), (2, 3), (3, 3)], ids=["all", "L2-3", "L3"])
@pytest.mark.parametrize("mode", ["base", "novel"])
def test_heba_matches_spec_block_equations(start, end, mode):
    model = tiny_clip(layers=3)
    adapters = attach_heba(model, start=start, end=end)
    randomize_adapters(model)
    model.heba_policy.set_mode(mode)
    scale = 0.025 if mode == "base" else 0.010
    n = 3 - start + 1 if end is None else end - start + 1
    # published layout: slot i holds block i's adapters (1-based), slot 0 and the rest empty
    vis = {i - 1: layer for i, layer in enumerate(adapters.visual_adapter) if layer is not None}
    txt = {i - 1: layer for i, layer in enumerate(adapters.text_adapter) if layer is not None}
    assert len(vis) == n and len(txt) == n and min(vis) == start - 1
    img, tok = images(), texts()
    with torch.no_grad():
        got_i, got_t = model.encode_image(img), model.encode_text(tok)
        exp_i = spec_encode_image(model, img, vis, scale)
        exp_t = spec_encode_text(model, tok, txt, scale)
        plain_i = spec_encode_image(model, img, {}, scale)
    torch.testing.assert_close(got_i, exp_i, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t, exp_t, rtol=1e-5, atol=1e-5)
    # the adapters matter: without them the features differ
    assert (got_i - plain_i).abs().max() > 1e-3


def test_adapter_shapes_and_kinds():
    model = tiny_clip(layers=2)
    ad = attach_heba(model)
    v0, t0 = ad.visual_adapter[1], ad.text_adapter[1]
    assert (v0.att_conv.modality, v0.att_conv.dim, v0.att_conv.hidden) == ("visual", 64, 16)
    assert (v0.mlp_conv.dim, v0.mlp_conv.hidden) == (256, 64)          # 4D -> D
    assert v0.att_conv.grid == (4, 4) and v0.att_conv.num_prefix_tokens == 1
    assert (t0.att_conv.modality, t0.att_conv.dim, t0.mlp_conv.dim) == ("text", 48, 192)
    keys = set(ad.state_dict())
    assert "visual_adapter.1.mlp_conv.mid.weight" in keys
    assert "text_adapter.1.att_conv.norm.bias" in keys and "text_adapter.2.att_conv.norm.bias" in keys
    assert not any(k.split(".")[1] == "0" for k in keys)          # slot 0 is empty, as published
    assert not any(".mid." in k for k in keys if k.startswith("text_adapter"))


def test_freeze_and_count():
    model = tiny_clip()
    total_before = sum(p.numel() for p in model.parameters())
    ad = attach_heba(model, towers_="visual")
    trainable, total = count_parameters(model)
    n_adapter = sum(p.numel() for p in ad.parameters())
    assert trainable == n_adapter and total == total_before + n_adapter
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("heba_adapters.visual_adapter.") for n in names)
    # gradients reach every adapter parameter and nothing else
    model.train()
    # every token (the pooled class token alone does not see the last MLP adapter)
    loss = model.visual.transformer(model.visual._embeds(images())).square().sum()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_remove_restores_exactly(method):
    model = tiny_clip()
    model.logit_scale.requires_grad_(False)           # a flag that must come back as it was
    img, tok = images(), texts()
    with torch.no_grad():
        before = (model.encode_image(img), model.encode_text(tok))
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    if method == "heba":
        attach_heba(model)
        randomize_adapters(model)
    else:
        attach_adaptertune(model, towers_="both", init="small")
    with torch.no_grad():
        during = model.encode_image(img)
    assert not torch.equal(during, before[0])
    remove_adapters(model)
    with torch.no_grad():
        after = (model.encode_image(img), model.encode_text(tok))
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [type(m) for m in model.modules()] == modules
    assert not hasattr(model, "heba_adapters")
    with pytest.raises(ValueError, match="no heba adapters"):
        remove_adapters(model)


def test_attach_twice_and_bad_range():
    model = tiny_clip()
    with pytest.raises(ValueError, match="start <= end"):
        attach_heba(model, start=2, end=5)
    assert all(p.requires_grad for p in model.parameters())   # failed attach left nothing
    attach_heba(model)
    with pytest.raises(ValueError, match="already attached"):
        attach_adaptertune(model)


def test_seq_first_transformer_same_as_batch_first():
    """Adapters get the transformer's batch_first: a seq-first tower gives the same features."""
    import open_clip
    model = tiny_clip()
    vt = model.visual.transformer
    seq = open_clip.transformer.Transformer(width=64, layers=2, heads=2, batch_first=False)
    seq.load_state_dict(vt.state_dict())
    model_sf = copy.deepcopy(model)
    model_sf.visual.transformer = seq
    ad = attach_heba(model, towers_="visual")
    ad_sf = attach_heba(model_sf, towers_="visual")
    randomize_adapters(model)
    ad_sf.load_state_dict(ad.state_dict())
    assert ad_sf.visual_adapter[1].att_conv.batch_first is False
    img = images(n=2)
    with torch.no_grad():
        a, b = model.encode_image(img), model_sf.encode_image(img)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_scale_policy():
    pol = ScalePolicy(seed=0)
    assert pol.scale(False) == 0.025
    pol.set_mode("novel")
    assert pol.scale(False) == 0.010
    pol.bind("text", 1)
    draws = []
    for _ in range(4000):           # one draw per block and tower forward (tests/test_graph_step)
        draws.append(float(pol.scale(True, "text", 0)))   # block 0: a new forward's draw
    assert set(draws) == {float(torch.tensor(0.025)), float(torch.tensor(0.025 * 2.25))}
    frac_fast = sum(d > 0.03 for d in draws) / len(draws)
    assert abs(frac_fast - 0.2) < 0.03, frac_fast
    assert {ScalePolicy(slow_fast_ratio=1.0).scale(True) for _ in range(100)} == {0.025}
    with pytest.raises(ValueError):
        pol.set_mode("all")


def test_adapters_read_policy_scale():
    """The scale each adapter call sees is the policy's, drawn per block and forward while
    training (a 0-d tensor on the device)."""
    model = tiny_clip()
    attach_heba(model, towers_="text")
    seen = []
    orig = wiring.HeBAAdapter.forward

    def spy(self, x, scale=1.0):
        seen.append(scale)
        return orig(self, x, scale)

    wiring.HeBAAdapter.forward = spy
    try:
        model.eval()
        with torch.no_grad():
            model.encode_text(texts())
        assert seen == [0.025] * 4
        seen.clear()
        model.heba_policy = None    # the wrappers hold their own reference
        model.train()
        with torch.no_grad():
            for _ in range(50):
                model.encode_text(texts())
    finally:
        wiring.HeBAAdapter.forward = orig
    assert len(seen) == 200
    assert {float(s) for s in seen} == {float(torch.tensor(0.025)), float(torch.tensor(0.05625))}


def test_adaptertune_placement():
    model = tiny_clip(layers=4)
    img = images()
    with torch.no_grad():
        plain = model.encode_image(img)
    ad = attach_adaptertune(model, rank=4, every=2)
    assert sorted(ad.blocks.keys()) == ["1", "3"] and len(ad.text_blocks) == 0
    with torch.no_grad():
        assert torch.equal(model.encode_image(img), plain)    # zero init: the identity
        for p in ad.parameters():
            p.copy_(0.3 * torch.randn_like(p))
        got = model.encode_image(img)
        v = model.visual
        x = v._embeds(img)
        for i, blk in enumerate(v.transformer.resblocks):
            if str(i) in ad.blocks:
                blk = blk.orig
            x = blk(x)
            if str(i) in ad.blocks:
                a = ad.blocks[str(i)].adapter
                x = x + F.linear(F.gelu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight,
                                 a.up.bias)
        exp = v._pool(x)[0] @ v.proj
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert count_parameters(model)[0] == 2 * (4 * 64 + 4 + 64 * 4 + 64)


def test_encode_text_truncation_equals_full():
    model = tiny_clip(layers=2)
    attach_heba(model)
    randomize_adapters(model)
    tok = texts(lengths=(4, 7, 3))          # longest eot at 6 of 16
    with torch.no_grad():
        full = model.encode_text(tok)
        short = encode_text(model, tok)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
    # and it really ran 7 tokens: the adapters saw 7-token sequences
    seen = []
    h = model.heba_adapters.text_adapter[1].att_conv.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        encode_text(model, tok, normalize=True)
    h.remove()
    assert seen == [7]


@pytest.mark.parametrize("name,size,grid,heba_millions", [
    ("ViT-B-32", 224, 7, 87.2), ("ViT-B-16", 224, 14, 87.2),
    ("ViT-L-14", 224, 16, 274.7), ("ViT-L-14-336", 336, 24, 274.7)])
def test_real_clip_sizes_on_meta(name, size, grid, heba_millions):
    """Every released ViT size wires up (shapes only: the model lives on the meta device)."""
    import open_clip
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta")
    adapters = attach_heba(model)
    layers = len(model.visual.transformer.resblocks)
    assert len(adapters.visual_adapter) == layers + 1          # slot 0 empty, as published
    assert len(adapters.text_adapter) == len(model.transformer.resblocks) + 1
    assert adapters.visual_adapter[1].att_conv.grid == (grid, grid)
    trainable, total = count_parameters(model)
    assert round(trainable / 1e6, 1) == heba_millions          # 87.2M for B/16 as published
    assert trainable == sum(p.numel() for p in adapters.parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if not n.startswith("heba_adapters."))
    with torch.device("meta"):
        img = model.encode_image(torch.empty(2, 3, size, size))
    assert img.shape == (2, model.visual.output_dim)
    remove_adapters(model)
    at = attach_adaptertune(model, "both", rank=16)
    assert (len(at.blocks), len(at.text_blocks)) == (layers, len(model.transformer.resblocks))
    with torch.device("meta"):
        assert model.encode_image(torch.empty(2, 3, size, size)).shape == img.shape
