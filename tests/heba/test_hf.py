"""heba.hf on random-weight small transformers CLIP models, against the block equations by hand.

transformers' CLIPEncoderLayer (models/clip/modeling_clip.py) written out here in plain torch:
``x + out_proj(softmax(q k^T / sqrt(d) [+ causal]) v)`` on ``layer_norm1(x)``, then
``x + fc2(quick_gelu(fc1(layer_norm2(x))))``; the vision tower pools the class token (first)
through ``post_layernorm``, the text tower the end-of-text token (the largest id, the
``eos_token_id == 2`` rule) after ``final_layer_norm``. HeBA as in docs/semantics.md section 1;
AdapterTune ``x = layer(x); x = x + alpha * up(gelu(down(x)))`` in layers ``i % every == 0``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="heba[hf] extra not installed")

from heba.adapters import ScalePolicy  # noqa: E402
from heba.clip.checkpoints import load_adapters, save_adapters  # noqa: E402
from heba.hf import (  # noqa: E402
    attach_adaptertune, attach_heba, load_model, remove_adapters, towers,
)
from tests.clip_utils import one_thread, texts  # noqa: E402

VOCAB, CTX, WIDTH, LAYERS = 100, 16, 64, 3     # VOCAB, CTX: those of tests.clip_utils.texts

_one_thread = pytest.fixture(autouse=True)(one_thread)


def config(layers=LAYERS):
    tower = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=layers,
                 num_attention_heads=2)
    return transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=CTX,
                         bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0),
        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=32)


def tiny_hf(seed=0, layers=LAYERS):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config(layers))
    with torch.no_grad():          # HF leaves unit norms and zero biases: draw everything
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)


def randomize(module, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std
                    + (1.0 if name.endswith("norm.weight") else 0.0))


# --- the equations ---------------------------------------------------------------------------

def spec_heba(a, t, scale):
    if a.modality == "text":
        z = F.linear(F.gelu(F.linear(t, a.down.weight)), a.up.weight)
        return t + scale * F.layer_norm(t + z, (a.dim,), a.norm.weight, a.norm.bias, a.eps)
    B, N, D = t.shape
    side = math.isqrt(N - 1)
    g = t[:, 1:]                                             # the class token passes
    u = torch.einsum("bnd,hd->bnh", g, a.down.weight[:, :, 0, 0])
    v = F.conv2d(u.reshape(B, side, side, -1).permute(0, 3, 1, 2), a.mid.weight, padding=1,
                 groups=a.hidden).permute(0, 2, 3, 1).reshape(B, side * side, -1)
    z = torch.einsum("bnh,dh->bnd", F.gelu(v), a.up.weight[:, :, 0, 0])
    return torch.cat([t[:, :1], g + scale * F.layer_norm(g + z, (D,), a.norm.weight,
                                                            a.norm.bias, a.eps)], 1)


def orig(m):
    return getattr(m, "orig", m)


def attention(at, x, causal):
    B, N, D = x.shape
    h = at.num_heads

    def heads(lin):
        return F.linear(x, lin.weight, lin.bias).reshape(B, N, h, -1).transpose(1, 2)

    q, k, v = heads(at.q_proj), heads(at.k_proj), heads(at.v_proj)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    return F.linear(o, at.out_proj.weight, at.out_proj.bias)


def spec_encoder(layers, x, causal, heba=None, scale=0.0, lowrank=None, alpha=1.0):
    """HF CLIPEncoderLayer by hand; heba {i: HeBALayer}, lowrank {i: LowRankAdapter}."""
    heba, lowrank = heba or {}, lowrank or {}
    for i, layer in enumerate(layers):
        layer = orig(layer)
        h = orig(layer.layer_norm1)(x)
        if i in heba:
            h = spec_heba(heba[i].att_conv, h, scale)
        x = x + attention(layer.self_attn, h, causal)
        y = orig(layer.mlp.fc1)(layer.layer_norm2(x))
        if i in heba:
            y = spec_heba(heba[i].mlp_conv, y, scale)
        x = x + layer.mlp.fc2(y * torch.sigmoid(1.702 * y))      # quick_gelu
        if i in lowrank:
            a = lowrank[i]
            x = x + alpha * F.linear(F.gelu(F.linear(x, a.down.weight, a.down.bias)),
                                     a.up.weight, a.up.bias)
    return x


def spec_image(model, img, **kw):
    vm = model.vision_model
    x = vm.pre_layrnorm(vm.embeddings(img))
    x = spec_encoder(vm.encoder.layers, x, False, **kw)
    return x, model.visual_projection(vm.post_layernorm(x[:, 0]))


def spec_text(model, ids, **kw):
    tm = model.text_model
    x = spec_encoder(tm.encoder.layers, tm.embeddings(input_ids=ids), True, **kw)
    x = tm.final_layer_norm(x)
    return x, model.text_projection(x[torch.arange(len(ids)), ids.argmax(-1)])


def run_image(model, img):
    out = model.vision_model(pixel_values=img)
    return out.last_hidden_state, model.visual_projection(out.pooler_output)


def run_text(model, ids):
    out = model.text_model(input_ids=ids)
    return out.last_hidden_state, model.text_projection(out.pooler_output)


def assert_all_close(got, exp):
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_plain_equations_are_transformers_clip():
    """The hand-written layer is transformers' CLIP (else the tests below would prove nothing)."""
    model, img, ids = tiny_hf(), images(), texts()
    with torch.no_grad():
        assert_all_close(run_image(model, img), spec_image(model, img))
        assert_all_close(run_text(model, ids), spec_text(model, ids))


@pytest.mark.parametrize("towers_,start,end", [("both", 1, None), ("visual", 2, 3),
                                               ("text", 1, 2)])
def test_heba_computes_the_block_equations(towers_, start, end):
    model, img, ids = tiny_hf(), images(), texts()
    policy = ScalePolicy(base_scale=0.4, slow_fast_ratio=1.0)
    ad = attach_heba(model, towers_=towers_, start=start, end=end, policy=policy)
    randomize(ad)
    idx = list(range(start - 1, end or LAYERS))

    def by_block(slots):         # 1-based slots (the published layout), slot 0 empty
        assert len(slots) == LAYERS + 1 and slots[0] is None
        got = {i - 1: layer for i, layer in enumerate(slots) if layer is not None}
        assert sorted(got) == idx
        return got
    vis = by_block(ad.visual_adapter) if towers_ != "text" else {}
    txt = by_block(ad.text_adapter) if towers_ != "visual" else {}
    for layer in vis.values():
        assert layer.att_conv.num_prefix_tokens == 1 and layer.att_conv.grid == (4, 4)
        assert layer.mlp_conv.dim == 4 * WIDTH
    assert all(layer.att_conv.modality == "text" for layer in txt.values())
    got_i, got_t = run_image(model, img), run_text(model, ids)
    assert_all_close(got_i, spec_image(model, img, heba=vis, scale=0.4))
    assert_all_close(got_t, spec_text(model, ids, heba=txt, scale=0.4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"heba_adapters.{k}" for k in ad.state_dict()}
    (got_i[0].square().sum() + got_t[0].square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ad.parameters())


@pytest.mark.parametrize("towers_,every,alpha", [("visual", 2, 1.0), ("both", 1, 0.5)])
def test_adaptertune_computes_the_block_equations(towers_, every, alpha):
    model, img, ids = tiny_hf(), images(), texts()
    with torch.no_grad():
        plain = run_image(model, img)
    ad = attach_adaptertune(model, towers_=towers_, rank=4, every=every, alpha=alpha)
    assert sorted(ad.blocks) == [str(i) for i in range(0, LAYERS, every)]
    assert len(ad.text_blocks) == (LAYERS if towers_ == "both" else 0)
    with torch.no_grad():
        assert_all_close(run_image(model, img), plain)          # zero init: the identity
    randomize(ad)
    vis = {int(k): h.adapter for k, h in ad.blocks.items()}
    txt = {int(k): h.adapter for k, h in ad.text_blocks.items()}
    with torch.no_grad():
        assert_all_close(run_image(model, img), spec_image(model, img, lowrank=vis, alpha=alpha))
        assert_all_close(run_text(model, ids), spec_text(model, ids, lowrank=txt, alpha=alpha))


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_remove_adapters_gives_the_model_back_bit_for_bit(method):
    model, img, ids = tiny_hf(), images(), texts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y0 = run_image(model, img) + run_text(model, ids)
    if method == "heba":
        attach_heba(model)
    else:
        attach_adaptertune(model, towers_="both", rank=4)
    randomize(model.heba_adapters)
    remove_adapters(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        y1 = run_image(model, img) + run_text(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(y0, y1))


# --- one checkpoint for both wirings -------------------------------------------------------

def tiny_open_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=WIDTH, layers=LAYERS, head_width=32),
        text_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=WIDTH, heads=2,
                      layers=LAYERS)).double()


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_open_clip_adapters_load_into_the_hf_wiring(method, tmp_path):
    from heba.clip import wiring
    oc, hf = tiny_open_clip(), tiny_hf()
    if method == "heba":
        wiring.attach_heba(oc, start=2)
        attach_heba(hf, start=2)
    else:
        wiring.attach_adaptertune(oc, towers_="both", rank=4)     # every=1: both rules agree
        attach_adaptertune(hf, towers_="both", rank=4)
    randomize(oc.heba_adapters)
    sd = wiring.adapter_state_dict(oc)
    assert sorted(hf.heba_adapters.state_dict()) == sorted(sd)   # the open_clip wiring's keys
    hf.heba_adapters.load_state_dict(sd, strict=True)
    for k, v in hf.heba_adapters.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # heba's own checkpoint files, written from one and read into the other
    save_adapters(str(tmp_path / "a.safetensors"), oc, oc.heba_adapters.config)
    other = tiny_hf()
    (attach_heba(other, start=2) if method == "heba"
     else attach_adaptertune(other, towers_="both", rank=4))
    load_adapters(str(tmp_path / "a.safetensors"), other)
    for k, v in other.heba_adapters.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_towers_single_tower_models_and_errors():
    cfg = config(2)
    vis = transformers.CLIPVisionModel(cfg.vision_config)
    assert list(towers(vis)) == ["visual"]
    attach_heba(vis, towers_="visual")
    assert len(vis.heba_adapters.visual_adapter) == 2 + 1        # 1-based, slot 0 empty
    with pytest.raises(ValueError, match="already attached"):
        attach_adaptertune(vis)
    txt = transformers.CLIPTextModel(cfg.text_config)
    with pytest.raises(TypeError, match="no visual tower"):
        attach_heba(txt)
    with pytest.raises(TypeError, match="no Hugging Face CLIP towers"):
        attach_heba(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every must be a positive int"):
        attach_adaptertune(txt, towers_="text", every=0)
    with pytest.raises(ValueError, match=r"1 <= start <= end <= 2"):
        attach_heba(txt, towers_="text", end=3)
    assert all(p.requires_grad for p in txt.parameters())


def test_load_model_reads_a_local_folder_only(tmp_path, monkeypatch):
    model = transformers.CLIPModel(config(1))
    model.save_pretrained(tmp_path / "clip")
    loaded = load_model(str(tmp_path / "clip"))
    assert torch.equal(loaded.visual_projection.weight, model.visual_projection.weight)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"^heba.hf needs transformers.*'heba\[hf\]'$"):
        load_model(str(tmp_path / "clip"))
