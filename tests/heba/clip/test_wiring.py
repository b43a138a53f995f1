"""heba.clip.wiring: adapters where the published method puts them, and off again exactly."""

from __future__ import annotations

import copy

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch

from heba.clip import wiring
from heba.clip.wiring import (attach_adaptertune, attach_heba, count_parameters,
                              encode_text, remove_adapters)
from heba.nn import HeBAAdapter
from tests.clip_utils import (BASE_SCALE, EPS, NOVEL_SCALE, PREFIX, SCALE_FACTOR, SLOW_FAST_RATIO,
                              heba_weights, images, load_heba, lowrank_weights, per_block,
                              per_layer, quiet_blocks, randomize_adapters, spec_encode_image,
                              spec_encode_text, spec_lowrank_tower, spec_tower, texts, tiny_clip)


# Expectations come from outside heba: the published constants and docs/semantics.md's block equations
# written out with plain torch (tests/clip_utils.py), run on a pristine copy of the model.

VIS_D, TXT_D, PATCH = 64, 48, 8          # tiny_clip's widths and patch size


def first(adapters, tower):
    """The first adapted layer's HeBALayer of ``tower`` (whatever the container's layout)."""
    return next(m for m in getattr(adapters, f"{tower}_adapter") if m is not None)


def heba_pair(layers=3, size=32, start=1, end=None, seed=1, **attach):
    """(pristine, adapted) tiny CLIPs with published-name random adapter weights ``sd``."""
    pristine = tiny_clip(layers=layers, image_size=size)
    model = copy.deepcopy(pristine)
    attach_heba(model, start=start, end=end, **attach)
    sd = heba_weights(VIS_D, TXT_D, layers, start, end, seed=seed)
    load_heba(model, sd)
    return pristine, model, sd


def spec_features(pristine, img, tok, sd, scale, grid, eps=EPS):
    vis, txt = per_layer(sd, "visual"), per_layer(sd, "text")
    fi = spec_encode_image(pristine, img, lambda b, x: spec_tower(b, x, vis, scale, True, grid,
                                                                  eps=eps))
    ft = spec_encode_text(pristine, tok, lambda b, x, m: spec_tower(b, x, txt, scale, False,
                                                                    attn_mask=m, eps=eps))
    return fi, ft


def grid_of(size):
    H, W = (size, size) if isinstance(size, int) else size
    return (H // PATCH, W // PATCH)


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, (24, 40)], ids=["grid4x4", "grid3x5"])
@pytest.mark.parametrize("start,end", [(1, None), (2, 3), (3, 3)], ids=["all", "L2-3", "L3"])
@pytest.mark.parametrize("mode,scale", [("base", BASE_SCALE), ("novel", NOVEL_SCALE)])
def test_heba_features_are_the_spec_equations(size, start, end, mode, scale):
    """Both towers in eval: the published placement, eps, prefix, widths, grid and scales."""
    pristine, model, sd = heba_pair(size=size, start=start, end=end)
    model.heba_policy.set_mode(mode)
    img, tok = images(size=size), texts()
    grid = grid_of(size)
    with torch.no_grad():
        got_i, got_t = model.encode_image(img), model.encode_text(tok)
        exp_i, exp_t = spec_features(pristine, img, tok, sd, scale, grid)
        plain_i = pristine.encode_image(img)
        swapped_i, _ = spec_features(pristine, img, tok, sd, scale, grid[::-1])
    torch.testing.assert_close(got_i, exp_i, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t, exp_t, rtol=1e-5, atol=1e-5)
    # the test sees what it checks: the adapters, and on 3x5 the grid's orientation
    assert (got_i - plain_i).abs().max() > 1e-3
    if grid[0] != grid[1]:
        assert (got_i - swapped_i).abs().max() > 1e-3


@pytest.mark.parametrize("eps", [None, 1e-3, 1e-7], ids=["default", "1e-3", "1e-7"])
def test_layernorm_eps_at_model_level(eps):
    """Rows of variance ~1e-5 reach the adapters' LayerNorm: its eps shows in the features.
    ``None``: the wiring's default must be the published 1e-5; else every adapter's eps is set."""
    pristine = quiet_blocks(tiny_clip(layers=2, image_size=(24, 40)), 3e-3)
    model = copy.deepcopy(pristine)
    attach_heba(model)
    sd = heba_weights(VIS_D, TXT_D, 2)
    load_heba(model, sd)
    if eps is not None:
        for m in model.heba_adapters.modules():
            if isinstance(m, HeBAAdapter):
                m.eps = m.norm.eps = eps
    want = EPS if eps is None else eps
    img, tok = images(size=(24, 40)), texts()
    with torch.no_grad():
        got = torch.cat([model.encode_image(img), model.encode_text(tok)])
        exp = torch.cat(spec_features(pristine, img, tok, sd, BASE_SCALE, (3, 5), eps=want))
        other = torch.cat(spec_features(pristine, img, tok, sd, BASE_SCALE, (3, 5),
                                        eps=want * 10))
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert (got - other).abs().max() > 1e-3           # a 10x different eps would show


def test_published_names_shapes_and_policy():
    """State-dict names and shapes of the published checkpoints (strict load of weights drawn
    with REDUCTION 4: att D -> D/4, mlp 4D -> D; visual convs, text linears); published scales."""
    _, model, sd = heba_pair(layers=2)
    ad = model.heba_adapters
    assert set(ad.state_dict()) == set(sd)           # visual_adapter.<1-based layer>.att_conv...
    assert not any(".mid." in k for k in ad.state_dict() if k.startswith("text_adapter"))
    v, t = first(ad, "visual"), first(ad, "text")
    assert v.att_conv.grid == (4, 4) and v.att_conv.num_prefix_tokens == PREFIX
    assert (v.att_conv.eps, t.mlp_conv.eps) == (EPS, EPS)
    pol = model.heba_policy
    assert (pol.base_scale, pol.novel_scale, pol.scale_factor, pol.slow_fast_ratio) == \
        (BASE_SCALE, NOVEL_SCALE, SCALE_FACTOR, SLOW_FAST_RATIO)


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
    assert first(ad_sf, "visual").att_conv.batch_first is False
    img = images(n=2)
    with torch.no_grad():
        a, b = model.encode_image(img), model_sf.encode_image(img)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("every,alpha,towers_", [
    (1, 1.0, "visual"), (2, 0.5, "visual"), (3, 2.0, "both"), (2, -1.5, "both")])
def test_adaptertune_published_placement_and_alpha(every, alpha, towers_):
    """Published AdapterTune (src/models/vit_adapter.py): blocks with ``i % every == 0``
    (0-based) get ``x = block(x); x = x + alpha * up(gelu(down(x)))``."""
    layers, rank = 4, 4
    adapted = [i for i in range(layers) if i % every == 0]
    pristine = tiny_clip(layers=layers)
    model = copy.deepcopy(pristine)
    ad = attach_adaptertune(model, towers_=towers_, rank=rank, every=every, alpha=alpha)
    sd = lowrank_weights(VIS_D, rank, adapted)
    if towers_ == "both":
        sd.update(lowrank_weights(TXT_D, rank, adapted, prefix="text_blocks", seed=3))
    assert set(ad.state_dict()) == set(sd)
    img, tok = images(), texts()
    with torch.no_grad():
        assert torch.equal(model.encode_image(img), pristine.encode_image(img))   # zero init
        ad.load_state_dict(sd, strict=True)
        got_i, got_t = model.encode_image(img), model.encode_text(tok)
        vis, txt = per_block(sd), per_block(sd, "text_blocks")
        exp_i = spec_encode_image(pristine, img, lambda b, x: spec_lowrank_tower(b, x, vis, alpha))
        exp_t = spec_encode_text(pristine, tok,
                                 lambda b, x, m: spec_lowrank_tower(b, x, txt, alpha, m))
    torch.testing.assert_close(got_i, exp_i, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t, exp_t, rtol=1e-5, atol=1e-5)
    assert (got_i - pristine.encode_image(img)).abs().max() > 1e-3
    n_towers = 2 if towers_ == "both" else 1
    assert count_parameters(model)[0] == sum(v.numel() for v in sd.values())
    assert len(sd) == 4 * len(adapted) * n_towers


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
    h = first(model.heba_adapters, "text").att_conv.register_forward_pre_hook(
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
    assert first(adapters, "visual").att_conv.grid == (grid, grid)
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
