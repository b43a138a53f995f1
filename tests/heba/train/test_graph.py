"""heba.train.graph: the backbone cast once, the graphed step and why it is off, checkpointed
blocks, the largest batch."""

from __future__ import annotations

import contextlib

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch
import torch.nn.functional as F
from torch import nn

from heba.clip import attach_adaptertune, attach_heba
from heba.clip.wiring import ScalePolicy, remove_adapters
from heba.train.graph import (CheckpointedBlock, GraphedStep, LeanAttention, LeanLayerNorm,
                              LeanQuickGELU, LeanResidualBlock, LeanTimmBlock, LeanTimmStack,
                              LeanTransformer,
                              checkpoint_frozen_blocks,
                              find_max_batch, policy_graphs_reason, prepare_frozen,
                              route_frozen_activations, route_frozen_attention,
                              route_frozen_blocks, route_frozen_norms,
                              uncheckpoint_frozen_blocks, unroute_frozen_activations,
                              route_frozen_transformers,
                              unroute_frozen_attention, unroute_frozen_blocks,
                              unroute_frozen_norms, unroute_frozen_transformers)
from heba.train.prompts import PromptBank
from heba.train.step import AdapterStep, masked_cross_entropy
from heba.train import context as T
from tests.clip_utils import images, randomize_adapters, texts, tiny_clip
from tests.helpers import assert_rel_close, rel_err, requires_gpu, requires_triton_cpu


def adapted(method, seed=0, slow_fast_ratio=0.8, backend="reference"):
    model = tiny_clip(seed=seed).train()
    if method == "heba":
        attach_heba(model, policy=ScalePolicy(slow_fast_ratio=slow_fast_ratio, seed=3),
                    backend=backend)
    else:
        attach_adaptertune(model, "both", rank=4, backend=backend)
    return randomize_adapters(model)


def batch(n_img=4, lengths=(5, 9, 3, 7, 4), seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(0, len(lengths), (n_img,), generator=g)
    return images(n_img, seed=seed), texts(lengths, seed=seed), labels


def clip_loss(model, imgs, txt, labels, label_smoothing=0.0):
    """The CLIP contrastive loss of a batch against the prompts ``txt``: the step the graph,
    the cast and the checkpointing must leave unchanged."""
    img = model.encode_image(imgs, normalize=True)
    tx = model.encode_text(txt, normalize=True)
    logits = model.logit_scale.exp().float() * img.float() @ tx.float().t()
    return masked_cross_entropy(logits, labels, None, label_smoothing)


def adapter_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.heba_adapters.named_parameters()}


# --- 1. cast once ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_cast_once_matches_autocast_fp32_backbone(method):
    """Loss per SGD step: bf16 backbone cast once vs fp32 backbone under autocast (bf16 tol)."""
    runs = []
    for cast in (False, True):
        model = adapted(method, slow_fast_ratio=1.0)
        if cast:
            prepare_frozen(model, torch.bfloat16)
        opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=0.5)
        losses = []
        for s in range(3):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = clip_loss(model, *batch(seed=s), label_smoothing=0.1)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append(losses)
        for name, p in model.heba_adapters.named_parameters():
            assert p.dtype == torch.float32, f"adapter {name} is {p.dtype}"
    ref, fast = runs
    assert len(set(ref)) == 3, "the steps must change the loss for this test to mean anything"
    for i, (a, b) in enumerate(zip(ref, fast)):
        assert abs(a - b) / abs(a) < 2e-2, f"step {i}: cast-once loss {b} vs autocast {a}"


def test_prepare_frozen_dtypes():
    model = adapted("heba")
    n_trainable = sum(p.requires_grad for p in model.parameters())
    prepare_frozen(model, torch.bfloat16)
    assert sum(p.requires_grad for p in model.parameters()) == n_trainable
    adapter_ids = {id(p) for p in model.heba_adapters.parameters()}
    ln_ids = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
              for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        want = torch.float32 if (id(p) in adapter_ids | ln_ids or p.dim() == 0) \
            else torch.bfloat16
        assert p.dtype == want, f"{name}: {p.dtype}, expected {want}"
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    assert model.logit_scale.dtype == torch.float32
    assert model.attn_mask.dtype == torch.bfloat16


def test_prepare_frozen_needs_adapters():
    with pytest.raises(ValueError, match="no heba adapters"):
        prepare_frozen(tiny_clip())


# --- 1b. frozen attention without copies ---------------------------------------------------

# Relative tolerance of every output and gradient, lean attention vs torch's own forward, in
# float32. Under bf16 the two paths round differently (torch's adds the in-projection bias to
# a bf16 product in a second rounding, the lean one uses one addmm): each is compared with the
# float32 result of torch's forward, and the lean one may be off by at most as much as torch's
# own bf16 path plus BF16_MARGIN.
FP32_TOL, BF16_MARGIN = 1e-5, 1e-2


def assert_lean_close(name, lean, torch_fwd, fp32=None):
    """``lean`` vs ``torch_fwd`` (float32, ``fp32`` None), or both vs ``fp32`` (bf16)."""
    if fp32 is None:
        assert_rel_close(name, lean, torch_fwd, FP32_TOL)
        return
    err, err_torch = rel_err(lean.float(), fp32), rel_err(torch_fwd.float(), fp32)
    assert err <= err_torch + BF16_MARGIN, \
        f"{name}: lean bf16 off the float32 result by {err:.3e}, torch's bf16 by {err_torch:.3e}"


@pytest.fixture(scope="module")
def frozen_clip():
    """``frozen_clip(widths)``: a frozen random-weight CLIP, built once per module: the tiny one
    (2 + 2 blocks) or ViT-B/16's widths and depth (12 + 12 blocks, 768 / 512 wide, 77 tokens)
    at 32 px images."""
    import open_clip
    built = {}

    def get(widths):
        if widths not in built:
            if widths == "tiny":
                model = tiny_clip(seed=4)
            else:
                torch.manual_seed(4)
                cfg = open_clip.get_model_config("ViT-B-16")
                model = open_clip.CLIP(**dict(cfg, vision_cfg=dict(cfg["vision_cfg"],
                                                                   image_size=32)))
            built[widths] = model.eval().requires_grad_(False)
        return built[widths]
    yield get
    built.clear()


def clip_forward_backward(model, imgs, txt, precision, seed=0):
    """Image and text features of ``model`` and the gradients of a random projection of them
    with respect to the images and the token embeddings (the text tower's causal mask used)."""
    leaf = []

    def embed_leaf(mod, args, out):
        leaf.append(out.detach().requires_grad_(True))
        return leaf[-1]
    hook = model.token_embedding.register_forward_hook(embed_leaf)
    imgs = imgs.clone().requires_grad_(True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            img, tx = model.encode_image(imgs), model.encode_text(txt)
    finally:
        hook.remove()
    g = torch.Generator().manual_seed(seed)
    (img.float() * torch.randn(img.shape, generator=g)).sum().add(
        (tx.float() * torch.randn(tx.shape, generator=g)).sum()).backward()
    return dict(image_features=img, text_features=tx, grad_images=imgs.grad,
                grad_token_embeddings=leaf[0].grad)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("widths", ["tiny", "vit-b16"])
def test_lean_attention_matches_torch_on_a_clip(frozen_clip, widths, precision):
    """Every frozen attention routed: features and input gradients of both towers as with
    torch's own attention forward; parameters and state_dict keys unchanged."""
    model = frozen_clip(widths)
    blocks = len(model.visual.transformer.resblocks) + len(model.transformer.resblocks)
    context = model.attn_mask.shape[0]
    imgs = images(3, seed=5)
    txt = texts((5, context, 3), context_length=context, seed=5)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    ref = clip_forward_backward(model, imgs, txt, precision)
    fp32 = clip_forward_backward(model, imgs, txt, "fp32") if precision == "bf16" else {}
    assert route_frozen_attention(model) == blocks
    try:
        assert type(model.transformer.resblocks[0].attn) is LeanAttention
        assert list(model.state_dict()) == keys
        assert [id(p) for p in model.parameters()] == params
        out = clip_forward_backward(model, imgs, txt, precision)
    finally:
        assert unroute_frozen_attention(model) == blocks
    assert type(model.transformer.resblocks[0].attn) is nn.MultiheadAttention
    for name in ref:
        assert_lean_close(f"{widths}-{precision} {name}", out[name], ref[name], fp32.get(name))


def _mha_pair(batch_first, seed=0, embed=24, heads=3):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(embed, heads, batch_first=batch_first).requires_grad_(False)
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    lean = nn.MultiheadAttention(embed, heads, batch_first=batch_first)
    lean.load_state_dict(ref.state_dict())
    assert route_frozen_attention(lean.requires_grad_(False)) == 1
    return ref, lean


def _attend(mha, x, **kwargs):
    x = x.clone().requires_grad_(True)
    out, weights = mha(x, x, x, **kwargs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)))
    return out, weights, x.grad


def _masks(n, length, heads):
    g = torch.Generator().manual_seed(6)
    causal = torch.full((length, length), float("-inf")).triu(1)
    drop = torch.rand(length, length, generator=g) < 0.3
    drop.fill_diagonal_(False)                 # every query attends to itself
    return {"none": None, "causal-float": causal,
            "random-float-3d": torch.randn(n * heads, length, length, generator=g),
            "bool-2d": drop, "bool-3d": drop.expand(n * heads, -1, -1).clone()}


@pytest.mark.parametrize("mask", ["none", "causal-float", "random-float-3d", "bool-2d",
                                  "bool-3d"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_lean_attention_masks_and_layouts(batch_first, mask):
    """The lean path (float and bool masks, 2-D and 3-D, both layouts) = torch's forward."""
    n, length, heads = 2, 7, 3
    ref, lean = _mha_pair(batch_first)
    m = _masks(n, length, heads)[mask]
    x = torch.randn((n, length, 24) if batch_first else (length, n, 24))
    want, _, want_grad = _attend(ref, x, need_weights=False, attn_mask=m)
    got, weights, got_grad = _attend(lean, x, need_weights=False, attn_mask=m)
    assert weights is None
    assert_lean_close(f"{mask} output", got, want)
    assert_lean_close(f"{mask} grad x", got_grad, want_grad)


@pytest.mark.parametrize("case", ["key_padding_mask", "need_weights", "is_causal",
                                  "unbatched", "dropout"])
def test_lean_attention_falls_back_to_torch(case):
    """What the lean path does not cover runs torch's own forward: the same result, bit for
    bit, the attention weights included."""
    n, length = 2, 6
    ref, lean = _mha_pair(True)
    x = torch.randn(n, length, 24)
    causal = torch.full((length, length), float("-inf")).triu(1)
    kwargs = dict(need_weights=False)
    if case == "key_padding_mask":
        kwargs["key_padding_mask"] = torch.tensor([[False] * length, [False] * 4 + [True] * 2])
    elif case == "need_weights":
        kwargs = dict(need_weights=True, attn_mask=causal)
    elif case == "is_causal":
        kwargs.update(attn_mask=causal, is_causal=True)
    elif case == "unbatched":
        x = x[0]
    else:
        ref.dropout = lean.dropout = 0.3
        ref.train(), lean.train()
    torch.manual_seed(1)
    want = _attend(ref, x, **kwargs)
    torch.manual_seed(1)
    got = _attend(lean, x, **kwargs)
    for name, a, b in zip(("output", "weights", "grad x"), got, want):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), \
            f"{case}: {name} differs from torch's forward"


def test_route_frozen_attention_only_frozen_plain_modules():
    """Trainable, kdim/vdim and bias_k attention modules keep torch's forward."""
    frozen = nn.MultiheadAttention(8, 2).requires_grad_(False)
    trainable = nn.MultiheadAttention(8, 2)
    cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4).requires_grad_(False)
    biased = nn.MultiheadAttention(8, 2, add_bias_kv=True).requires_grad_(False)
    model = nn.ModuleList([frozen, trainable, cross, biased])
    assert route_frozen_attention(model) == 1
    assert [type(m) for m in model] == [LeanAttention] + [nn.MultiheadAttention] * 3


def _adapted_step(model, precision, seed=2):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = clip_loss(model, *batch(seed=seed))
    loss.backward()
    return dict(loss=loss.detach(), **adapter_grads(model))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prepare_frozen_routes_the_frozen_attention(precision):
    """prepare_frozen routes every block's attention; the adapted step's loss and every adapter
    gradient are those of torch's attention forward (the backbone cast to bf16 under autocast,
    or kept float32)."""
    model = adapted("heba", slow_fast_ratio=1.0)
    fp32 = _adapted_step(model, "fp32") if precision == "bf16" else {}
    keys = list(model.state_dict())
    prepare_frozen(model, torch.bfloat16 if precision == "bf16" else torch.float32)
    assert list(model.state_dict()) == keys
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attn) == 4 and all(type(m) is LeanAttention for m in attn)
    assert unroute_frozen_blocks(model) == 4      # the attention alone (its own test below)
    lean = _adapted_step(model, precision)
    assert unroute_frozen_attention(model) == 4
    ref = _adapted_step(model, precision)
    for name in ref:
        assert_lean_close(f"{precision} {name}", lean[name], ref[name], fp32.get(name))


def test_lean_attention_drops_the_copies_of_the_step():
    """The published step (tiny CLIP) launches no clone and 3 select_backward fewer per block
    with the frozen attention routed (prepare_frozen) than with torch's forward."""
    from benchmarks.launch_count import count_launches
    from benchmarks.step_launches import build
    model, _, run = build("tiny", "reference", batch=2, classes=6)
    blocks = len(model.visual.transformer.resblocks) + len(model.transformer.resblocks)
    run()                                       # lazily built state (optimizer, caches)
    lean = count_launches(run)
    assert unroute_frozen_attention(model) == blocks
    torch_fwd = count_launches(run)
    clones = torch_fwd["by_op"].get("aten.clone", 0)
    assert clones >= 8 * blocks, torch_fwd["by_op"]          # q/k/v contiguous and more
    assert lean["by_op"].get("aten.clone", 0) == 0, lean["by_op"]
    sel = "aten.select_backward"
    assert lean["by_op"].get(sel, 0) == torch_fwd["by_op"][sel] - 3 * blocks, \
        (lean["by_op"].get(sel), torch_fwd["by_op"][sel])
    assert lean["launches"] <= torch_fwd["launches"] - clones - 3 * blocks + blocks, \
        (lean["launches"], torch_fwd["launches"])           # one stack per block added


def _open_clip_norm(cls_name, dim=48, seed=0):
    import open_clip
    torch.manual_seed(seed)
    norm = getattr(open_clip.transformer, cls_name)(dim).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def _normed(norm, x, autocast, device="cpu", seed=8):
    x = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        y = norm(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y))
    return y, x.grad


# Per dtype: one or two roundings of x's dtype apart (the kernels may sum in other orders).
NORM_TOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 1e-5}


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("cls_name", ["LayerNorm", "LayerNormFp32"])
def test_lean_layer_norm_matches_open_clips(cls_name, dtype, autocast):
    """Output (x's dtype) and input gradient as open_clip's LayerNorm computes them, float32
    weights as prepare_frozen keeps them; unrouted, the module is open_clip's again."""
    norm = _open_clip_norm(cls_name)
    x = (torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1)) * 3 + 1).to(dtype)
    ref_y, ref_g = _normed(norm, x, autocast)
    keys = list(norm.state_dict())
    assert route_frozen_norms(nn.Sequential(norm)) == 1 and type(norm) is LeanLayerNorm
    assert list(norm.state_dict()) == keys
    y, g = _normed(norm, x, autocast)
    assert unroute_frozen_norms(nn.Sequential(norm)) == 1
    assert type(norm).__name__ == cls_name and not hasattr(norm, "_heba_original_class")
    assert y.dtype == ref_y.dtype == dtype and g.dtype == dtype
    tol = NORM_TOL[dtype]
    torch.testing.assert_close(y, ref_y, rtol=tol, atol=tol)
    torch.testing.assert_close(g, ref_g, rtol=tol, atol=tol * ref_g.abs().max().item())


def test_route_frozen_norms_only_frozen_open_clip_norms():
    """A trainable open_clip LayerNorm and a plain nn.LayerNorm (float32 out under CUDA
    autocast) keep their own forward."""
    frozen, fp32 = _open_clip_norm("LayerNorm"), _open_clip_norm("LayerNormFp32")
    trainable = _open_clip_norm("LayerNorm").requires_grad_(True)
    plain = nn.LayerNorm(48).requires_grad_(False)
    model = nn.ModuleList([frozen, trainable, plain, fp32])
    assert route_frozen_norms(model) == 2
    assert [type(m).__name__ for m in model] == ["LeanLayerNorm", "LayerNorm", "LayerNorm",
                                                 "LeanLayerNorm"]
    assert type(plain) is nn.LayerNorm
    assert unroute_frozen_norms(model) == 2
    assert [type(m).__name__ for m in model] == ["LayerNorm", "LayerNorm", "LayerNorm",
                                                 "LayerNormFp32"]


def test_lean_layer_norm_drops_the_casts():
    """LayerNormFp32 on a bf16 x: 2 launches (norm and its backward) instead of 6 (the two
    casts each way), counted on the CPU. open_clip's LayerNorm casts only under CUDA
    autocast (the GPU test below)."""
    from benchmarks.launch_count import count_launches
    norm = _open_clip_norm("LayerNormFp32")
    x = torch.randn(2, 5, 48).bfloat16()
    before = count_launches(lambda: _normed(norm, x, autocast=True))["by_op"]
    route_frozen_norms(nn.Sequential(norm))
    after = count_launches(lambda: _normed(norm, x, autocast=True))["by_op"]
    casts = "aten._to_copy"        # the gradient's cast in _normed is one of each count
    assert before[casts] - after[casts] == 4 and after[casts] == 1, (before, after)
    assert after["aten.native_layer_norm"] == after["aten.native_layer_norm_backward"] == 1


@requires_gpu
@pytest.mark.parametrize("cls_name", ["LayerNorm", "LayerNormFp32"])
def test_lean_layer_norm_drops_the_casts_under_cuda_autocast(cls_name):
    from benchmarks.launch_count import count_launches
    norm = _open_clip_norm(cls_name).cuda()
    x = torch.randn(4, 50, 48, device="cuda").bfloat16()
    ref = _normed(norm, x, autocast=True, device="cuda")
    before = count_launches(lambda: _normed(norm, x, autocast=True, device="cuda"))["by_op"]
    route_frozen_norms(nn.Sequential(norm))
    got = _normed(norm, x, autocast=True, device="cuda")
    after = count_launches(lambda: _normed(norm, x, autocast=True, device="cuda"))["by_op"]
    casts = "aten._to_copy"        # the gradient's cast in _normed is one of each count
    assert before[casts] - after[casts] == 4 and after[casts] == 1, (before, after)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=2 ** -7 * b.abs().max().item())


def test_prepare_frozen_routes_the_frozen_norms():
    """Every LayerNorm of the tiny CLIP's towers (2 per block, ln_pre, ln_post, ln_final)
    runs lean after prepare_frozen; the adapters' own LayerNorms (trainable) do not."""
    model = adapted("heba")
    blocks = len(model.visual.transformer.resblocks) + len(model.transformer.resblocks)
    prepare_frozen(model, torch.bfloat16)
    lean = [m for m in model.modules() if type(m) is LeanLayerNorm]
    assert len(lean) == 2 * blocks + 3
    assert not any(type(m) is LeanLayerNorm for m in model.heba_adapters.modules())
    assert unroute_frozen_norms(model) == 2 * blocks + 3


def _quick_gelu_pair(x, dtype):
    """Output and input gradient of open_clip's QuickGELU, then routed, for a ``dtype`` x;
    and the Triton launches of the routed call."""
    import open_clip
    from heba_kernels.runtime import record_launches
    act = open_clip.transformer.QuickGELU()
    runs = []
    for routed in (False, True):
        if routed:
            assert route_frozen_activations(nn.Sequential(act)) == 1
        with record_launches() as rec:
            runs.append(_normed(act, x.to(dtype), autocast=False))
    assert unroute_frozen_activations(nn.Sequential(act)) == 1
    assert type(act) is open_clip.transformer.QuickGELU and not hasattr(act, "_heba_original_class")
    return runs, rec


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lean_quick_gelu_matches_open_clips(dtype):
    """Routed, open_clip's QuickGELU runs heba's fused kernel (one launch each way): output
    and input gradient as open_clip's (in bf16 within its roundings: the fused op rounds
    once, eager after each of its three ops)."""
    x = torch.randn(3, 9, 40, generator=torch.Generator().manual_seed(2)) * 3
    (ref, got), rec = _quick_gelu_pair(x, dtype)
    assert [name for name, _ in rec] == ["_quick_gelu_fwd_kernel", "_quick_gelu_bwd_kernel"]
    tol = NORM_TOL[dtype]
    for a, b in zip(got, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_lean_quick_gelu_falls_back_without_triton(monkeypatch):
    """On a CPU without Triton's interpreter the routed module is open_clip's forward."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(3)) * 3
    (ref, got), rec = _quick_gelu_pair(x, torch.float32)
    assert rec == []
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@requires_triton_cpu
def test_prepare_frozen_fuses_the_quick_gelu():
    """A CLIP built with QuickGELU (as for OpenAI's weights): every MLP's activation is routed
    by prepare_frozen, and one MLP's activation launches 2 kernels, not 8."""
    import open_clip
    from benchmarks.launch_count import count_launches
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, quick_gelu=True,
                           vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                                           head_width=32),
                           text_cfg=dict(context_length=16, vocab_size=100, width=48, heads=2,
                                         layers=2))
    attach_heba(model, policy=ScalePolicy(slow_fast_ratio=1.0, seed=3))
    act = model.visual.transformer.resblocks[0].mlp.gelu
    x = torch.randn(2, 5, 256).bfloat16()
    eager = count_launches(lambda: _normed(act, x, autocast=False))
    prepare_frozen(model, torch.bfloat16)
    assert type(act) is LeanQuickGELU
    fused = count_launches(lambda: _normed(act, x, autocast=False))
    assert eager["launches"] - fused["launches"] == 6, (eager["by_op"], fused["by_op"])
    assert fused["triton"] == 2
    assert unroute_frozen_activations(model) == 4          # 2 + 2 blocks


def _open_clip_block(width=48, heads=2, seed=0, ls=None):
    """A frozen open_clip ResidualAttentionBlock with random LayerNorm parameters (and its
    LayerNorms run as prepare_frozen runs them)."""
    import open_clip
    torch.manual_seed(seed)
    block = open_clip.transformer.ResidualAttentionBlock(width, heads, ls_init_value=ls)
    with torch.no_grad():
        for ln in (block.ln_1, block.ln_2):
            ln.weight.normal_()
            ln.bias.normal_()
    block.requires_grad_(False)
    route_frozen_norms(block)
    route_frozen_attention(block)
    return block


def _block_run(block, x, mask=None, **kw):
    """Output and input gradient of ``block`` on ``x`` (and the launches of the call)."""
    from benchmarks.launch_count import count_launches
    out = {}

    def run():
        xx = x.clone().requires_grad_(True)
        y = block(xx, attn_mask=mask, **kw)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(y))
        out["y"], out["dx"] = y.detach(), xx.grad
    count = count_launches(run)
    return (out["y"], out["dx"]), count


def _assert_routed_block_matches(block, lean_cls, x, mask, dtype):
    """A routed copy of ``block`` (class ``lean_cls``, the same state dict keys): output and
    input gradient as the block's own (bf16 within its roundings), its two fused launches and
    2 launches fewer; unrouted, the block's own class again."""
    import copy
    lean = copy.deepcopy(block)
    assert route_frozen_blocks(nn.Sequential(lean)) == 1 and isinstance(lean, lean_cls)
    assert list(lean.state_dict()) == list(block.state_dict())
    ref, eager = _block_run(block, x, mask)
    got, fused = _block_run(lean, x, mask)
    assert fused["triton"] == 2 and eager["launches"] - fused["launches"] == 2, \
        (eager["by_op"], fused["by_op"])
    tol = NORM_TOL[dtype] * (4 if dtype == torch.bfloat16 else 10)
    for name, a, b in zip(("y", "dx"), got, ref):
        assert a.dtype == dtype
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    assert unroute_frozen_blocks(nn.Sequential(lean)) == 1
    assert type(lean) is type(block) and not hasattr(lean, "_heba_original_class")


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["image", "text-mask", "layer-scale"])
def test_lean_residual_block_matches_open_clips(case, dtype):
    """Routed, a block runs its attention's residual sum and ln_2 as one fused launch each way:
    output and input gradient as open_clip's block (bf16 within its roundings), 2 launches
    fewer (the sum forward, the gradients' sum backward), the same modules and state dict."""
    block = _open_clip_block(ls=0.5 if case == "layer-scale" else None).to(dtype)
    x = (torch.randn(3, 9, 48, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    mask = None
    if case == "text-mask":
        mask = torch.full((9, 9), float("-inf")).triu(1)
    _assert_routed_block_matches(block, LeanResidualBlock, x, mask, dtype)


@requires_triton_cpu
def test_routed_block_survives_torch_save_and_deepcopy(tmp_path):
    """A whole routed block (torch.save of a model after prepare_frozen) loads back routed, and
    deep copies stay routed; both compute what the block did."""
    import copy
    block = _open_clip_block(seed=6)
    route_frozen_blocks(nn.Sequential(block))
    torch.save(block, tmp_path / "block.pt")
    loaded = torch.load(tmp_path / "block.pt", weights_only=False)
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(5))
    ref, _ = _block_run(block, x)
    for other in (loaded, copy.deepcopy(block)):
        assert isinstance(other, LeanResidualBlock) and type(other) is type(block)
        (got, fused) = _block_run(other, x)
        assert fused["triton"] == 2
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
    assert unroute_frozen_blocks(nn.Sequential(loaded)) == 1
    assert type(loaded).__name__ == "ResidualAttentionBlock"


@pytest.mark.parametrize("why", ["no-triton", "trainable-ln_2", "cross-attention"])
def test_lean_residual_block_falls_back(why, monkeypatch):
    """Without Triton, with a trainable ln_2 or for cross-attention the routed block is
    open_clip's own forward, bit for bit."""
    import copy
    block = _open_clip_block()
    kw = {}
    if why == "no-triton":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif why == "trainable-ln_2":
        block.ln_2.weight.requires_grad_(True)
    else:
        import open_clip
        torch.manual_seed(0)
        block = open_clip.transformer.ResidualAttentionBlock(48, 2, is_cross_attention=True)
        block.requires_grad_(False)
        kw = dict(k_x=torch.randn(3, 5, 48), v_x=torch.randn(3, 5, 48))
    lean = copy.deepcopy(block)
    routed = route_frozen_blocks(nn.Sequential(lean))
    assert routed == (0 if why == "cross-attention" else 1)
    x = torch.randn(3, 9, 48, generator=torch.Generator().manual_seed(2))
    (ref, _), (got, fused) = _block_run(block, x, **kw), _block_run(lean, x, **kw)
    assert fused["triton"] == 0
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@requires_triton_cpu
def test_prepare_frozen_fuses_every_blocks_residual_norm():
    """prepare_frozen routes every block of both towers; the adapters wrapped around ln_1 and
    mlp.c_fc still run (the whole model's output and the adapters' gradients as with the
    blocks unrouted); and unrouting puts open_clip's class back."""
    model = adapted("heba", seed=3, slow_fast_ratio=1.0)
    randomize_adapters(model, seed=5)
    prepare_frozen(model, torch.float32)
    blocks = [b for b in model.modules() if isinstance(b, LeanResidualBlock)]
    assert len(blocks) == 4                                # 2 image + 2 text blocks
    imgs, toks = images(2, seed=1), texts(seed=2)
    runs = []
    for routed in (True, False):
        model.zero_grad(set_to_none=True)
        img, txt = model.encode_image(imgs), model.encode_text(toks)
        (img.square().sum() + txt.square().sum()).backward()
        grads = [p.grad.clone() for p in model.heba_adapters.parameters() if p.grad is not None]
        runs.append((img.detach(), txt.detach(), grads))
        if routed:
            assert unroute_frozen_blocks(model) == 4
    (img_a, txt_a, g_a), (img_b, txt_b, g_b) = runs
    assert rel_err(img_a, img_b) < 1e-5 and rel_err(txt_a, txt_b) < 1e-5
    assert len(g_a) == len(g_b) > 0
    for a, b in zip(g_a, g_b):
        assert rel_err(a, b) < 1e-4
    assert not any(isinstance(b, LeanResidualBlock) for b in model.modules())


def _towers_run(model, imgs, toks, autocast):
    """Both towers' features and the adapters' gradients of one forward + backward (and its
    launches)."""
    from benchmarks.launch_count import count_launches
    out = {}

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            img, txt = model.encode_image(imgs), model.encode_text(toks)
        (img.float().square().sum() + txt.float().square().sum()).backward()
        out["img"], out["txt"] = img.detach(), txt.detach()
        out["grads"] = adapter_grads(model)
    return out, count_launches(run)


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layers", [2, 3])
def test_lean_transformer_fuses_the_sums_between_blocks(layers, dtype):
    """prepare_frozen runs each tower's stack as LeanTransformer: a block's MLP sum and the
    next block's ln_1 (wrapped by its attention adapter) in one fused launch each way. Both
    towers' features and every adapter gradient as with the stacks unrouted (bf16 within its
    roundings), 2 launches fewer per pair of neighbouring blocks, the same state dict;
    unrouted, open_clip's class again."""
    model = tiny_clip(seed=4, layers=layers).train()
    attach_heba(model, policy=ScalePolicy(slow_fast_ratio=1.0, seed=3))
    randomize_adapters(model, seed=6)
    prepare_frozen(model, dtype)
    stacks = [m for m in model.modules() if isinstance(m, LeanTransformer)]
    assert len(stacks) == 2 and all(type(m).__name__.startswith("LeanTransformer[") for m in stacks)
    keys = list(model.state_dict())
    imgs, toks = images(2, seed=1), texts((5, 9, 3), seed=2)
    fused, n_fused = _towers_run(model, imgs, toks, dtype == torch.bfloat16)
    assert unroute_frozen_transformers(model) == 2
    assert not any(isinstance(m, LeanTransformer) for m in model.modules())
    assert type(model.transformer).__name__ == "Transformer" and list(model.state_dict()) == keys
    eager, n_eager = _towers_run(model, imgs, toks, dtype == torch.bfloat16)
    assert n_eager["launches"] - n_fused["launches"] == 2 * 2 * (layers - 1), \
        (n_eager["by_op"], n_fused["by_op"])
    assert n_fused["by_op"]["triton:_add_layer_norm_fwd_kernel"] == 2 * (2 * layers - 1)
    tol = 1e-5 if dtype == torch.float32 else 4 * NORM_TOL[torch.bfloat16]
    for name in ("img", "txt"):
        assert rel_err(fused[name], eager[name]) < tol, (name, rel_err(fused[name], eager[name]))
    assert fused["grads"].keys() == eager["grads"].keys() and len(fused["grads"]) > 0
    for name, g in eager["grads"].items():
        assert rel_err(fused["grads"][name], g) < 10 * tol, (name, rel_err(fused["grads"][name], g))


def _stack(layers=3, seed=0, mask=False):
    """A frozen open_clip Transformer of routed blocks (random LayerNorms, layer scale), its
    input and causal mask."""
    import open_clip
    torch.manual_seed(seed)
    tr = open_clip.transformer.Transformer(48, layers, 2, ls_init_value=0.5)
    with torch.no_grad():
        for m in tr.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_()
                m.bias.normal_()
    tr.requires_grad_(False)
    route_frozen_norms(tr)
    route_frozen_attention(tr)
    route_frozen_blocks(tr)
    x = torch.randn(3, 9, 48, generator=torch.Generator().manual_seed(seed + 1)) * 2
    return tr, x, (torch.full((9, 9), float("-inf")).triu(1) if mask else None)


def _stack_run(tr, x, mask):
    xx = x.clone().requires_grad_(True)
    y = tr(xx, attn_mask=mask)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(9)))
    return y.detach(), xx.grad


@requires_triton_cpu
@pytest.mark.parametrize("case", ["image", "text-mask", "hooked-middle", "backward-hooked-middle",
                                  "global-hook", "plain-middle", "checkpointing",
                                  "sequence-first"])
def test_lean_transformer_blocks_that_do_not_split(case):
    """Output and input gradient of a routed stack as its own forward's, whether every block
    splits or one in the middle runs as itself on the summed stream (a forward or backward
    hook on it, or not a routed block), or every block does (a global module hook), and the
    stack's own forward (bit for bit) with gradient checkpointing or a sequence-first
    layout. A hook on a block still runs, once per call, and a global one once per block."""
    import copy
    tr, x, mask = _stack(seed=2, mask=case == "text-mask")
    ref = copy.deepcopy(tr)
    assert route_frozen_transformers(nn.Sequential(tr)) == 1 and isinstance(tr, LeanTransformer)
    calls, handle = [], None
    if case == "hooked-middle":
        tr.resblocks[1].register_forward_hook(lambda *a: calls.append(1))
    elif case == "backward-hooked-middle":
        tr.resblocks[1].register_full_backward_hook(lambda *a: calls.append(1))
    elif case == "global-hook":
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, *a: calls.append(1) if m in set(tr.resblocks) else None)
    elif case == "plain-middle":
        assert unroute_frozen_blocks(nn.Sequential(tr.resblocks[1])) == 1
    elif case == "checkpointing":
        tr.grad_checkpointing = ref.grad_checkpointing = True
    elif case == "sequence-first":
        tr.batch_first = ref.batch_first = False
        x = x.transpose(0, 1).contiguous()
    try:
        got = _stack_run(tr, x, mask)
    finally:
        if handle is not None:
            handle.remove()
    want = _stack_run(ref, x, mask)
    if case in ("checkpointing", "sequence-first"):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        return
    assert calls == {"hooked-middle": [1], "backward-hooked-middle": [1],
                     "global-hook": [1, 1, 1]}.get(case, [])
    for name, a, b in zip(("y", "dx"), got, want):
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


def _timm_block(dim=48, heads=2, seed=0, init_values=None):
    """A frozen timm ViT Block with random LayerNorm parameters."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import Block
    torch.manual_seed(seed)
    block = Block(dim, heads, init_values=init_values)
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.normal_()
            norm.bias.normal_()
    return block.requires_grad_(False)


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("init_values", [None, 0.5], ids=["plain", "layer-scale"])
def test_lean_timm_block_matches_timms(init_values, dtype):
    """Routed, a timm ViT block (AdapterTune's backbone) runs norm1 in x's dtype and its
    attention's residual sum with norm2 as one fused launch each way: output and input
    gradient as timm's block (bf16 within its roundings), 2 launches fewer on a CPU."""
    block = _timm_block(init_values=init_values).to(dtype)
    x = (torch.randn(3, 9, 48, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    _assert_routed_block_matches(block, LeanTimmBlock, x, None, dtype)


@pytest.mark.parametrize("why", ["no-triton", "attn-mask", "trainable-norm1"])
def test_lean_timm_block_falls_back(why, monkeypatch):
    """Without Triton, with an attention mask or a trainable norm the routed block is timm's
    own forward, bit for bit."""
    import copy
    block = _timm_block(seed=3)
    mask = None
    if why == "no-triton":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif why == "attn-mask":
        mask = torch.zeros(9, 9).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1),
                                             float("-inf"))
    else:
        block.norm1.weight.requires_grad_(True)
    lean = copy.deepcopy(block)
    assert route_frozen_blocks(nn.Sequential(lean)) == 1
    x = torch.randn(3, 9, 48, generator=torch.Generator().manual_seed(2))
    (ref, _), (got, fused) = _block_run(block, x, mask), _block_run(lean, x, mask)
    assert fused["triton"] == 0
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@requires_gpu
def test_lean_timm_block_drops_the_norms_casts_under_cuda_autocast():
    """On a GPU under bf16 autocast (the backbone cast once, its norms float32, as
    prepare_frozen leaves them) a routed timm block launches 10 kernels fewer: 4 casts per
    LayerNorm and the residual sum both ways."""
    import copy
    block = _timm_block(seed=4).cuda().bfloat16()
    for norm in (block.norm1, block.norm2):
        norm.float()
    lean = copy.deepcopy(block)
    route_frozen_blocks(nn.Sequential(lean))
    x = torch.randn(4, 50, 48, device="cuda").bfloat16()
    runs = []
    for b in (block, lean):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            runs.append(_block_run(b, x))
    (ref, eager), (got, fused) = runs
    assert eager["launches"] - fused["launches"] == 10, (eager["by_op"], fused["by_op"])
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.bfloat16
        assert rel_err(a, b) < 2 ** -5, rel_err(a, b)


@requires_triton_cpu
@requires_triton_cpu
@pytest.mark.parametrize("method", ["adaptertune", "heba"])
def test_prepare_frozen_routes_timm_blocks_with_adapters(method):
    """A timm ViT with AdapterTune (adapters after the blocks) or HeBA (adapters around
    norm1 and mlp.fc1): prepare_frozen routes every block, each fuses its attention's
    residual sum with norm2 (one launch each way; with HeBA, the attention adapter runs on
    norm1's output as before) and, with HeBA, the stack fuses each block's MLP sum with the
    next block's norm1 (AdapterTune's adapters sit between the blocks: nothing to fuse), and
    the logits and every gradient are as with blocks and stack unrouted."""
    timm = pytest.importorskip("timm")
    from benchmarks.launch_count import count_launches
    from heba import timm as heba_timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=3, embed_dim=48, num_heads=2, num_classes=5)
    if method == "heba":
        heba_timm.attach_heba(model, policy=ScalePolicy(slow_fast_ratio=1.0, seed=3))
    else:
        heba_timm.attach_adaptertune(model, rank=4)
    randomize_adapters(model, seed=2)
    prepare_frozen(model, torch.float32)
    assert sum(isinstance(b, LeanTimmBlock) for b in model.modules()) == 3
    assert isinstance(model.blocks, LeanTimmStack)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    runs = []
    for routed in (True, False):
        out = {}

        def run():
            model.zero_grad(set_to_none=True)
            y = model(imgs)
            y.square().sum().backward()
            out["y"] = y.detach()
            out["grads"] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        count = count_launches(run)
        runs.append((out["y"], out["grads"], count["by_op"]))
        if routed:
            assert unroute_frozen_blocks(model) == 3
            assert unroute_frozen_transformers(model) == 1
            assert type(model.blocks) is nn.Sequential
    (out_a, g_a, ops_a), (out_b, g_b, ops_b) = runs
    # HeBA: 3 norm2 sums and 2 block boundaries, each way; AdapterTune: the 3 norm2 sums, and
    # nothing before the first block's adapter trains, so that block has no backward at all
    fused = (5, 5) if method == "heba" else (3, 2)
    assert (ops_a["triton:_add_layer_norm_fwd_kernel"],
            ops_a["triton:_add_layer_norm_bwd_kernel"]) == fused, ops_a
    assert ops_b["triton:_add_layer_norm_fwd_kernel"] == 0, ops_b
    assert rel_err(out_a, out_b) < 1e-5 and len(g_a) == len(g_b) > 0
    for a, b in zip(g_a, g_b):
        assert rel_err(a, b) < 1e-4


# --- 2. static shapes -----------------------------------------------------------------------


def test_graphs_off_on_cpu_and_for_host_scales():
    """Disabled or off the GPU, every call is eager; host-drawn slow-fast scales keep a step
    from being a graph (they would be replayed as captured)."""
    w = torch.randn(3, requires_grad=True)
    step = GraphedStep(lambda x: ((x * w).sum(),), [w], enabled=False)
    assert step.reason == "disabled"
    step(torch.randn(3))
    assert step.replays == 0 and w.grad is not None
    host = adapted("heba")
    host.heba_policy.draws = "host"
    assert "drawn on the host" in policy_graphs_reason(host.heba_policy)
    assert policy_graphs_reason(host.heba_policy, training=False) is None
    assert policy_graphs_reason(adapted("heba").heba_policy) is None


@pytest.mark.parametrize("method", ["heba", "adaptertune"])
def test_checkpointing_changes_nothing(method):
    """Outputs and adapter grads identical with and without checkpointing, with random
    slow-fast scales (the recomputation must replay the scales drawn in forward)."""
    model = adapted(method, slow_fast_ratio=0.5)
    originals = {n: m for n, m in model.named_modules()}
    imgs, txt, labels = batch()
    results = []
    for ckpt in (False, True):
        if ckpt:
            assert checkpoint_frozen_blocks(model) == 4
            assert isinstance(model.visual.transformer.resblocks[0], CheckpointedBlock)
        if method == "heba":
            model.heba_policy.load_state_dict({"seed": 11, "counters": [0, 0]})
        model.zero_grad(set_to_none=True)
        loss = clip_loss(model, imgs, txt, labels)
        loss.backward()
        results.append((loss.detach(), adapter_grads(model)))
    assert uncheckpoint_frozen_blocks(model) == 4
    assert {n: m for n, m in model.named_modules()} == originals
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1), f"loss {l1} vs {l0}"
    for name in g0:
        assert torch.equal(g0[name], g1[name]), f"grad {name} differs"
    remove_adapters(model)


def test_checkpoint_every_and_errors():
    model = adapted("heba")
    assert checkpoint_frozen_blocks(model, every=2) == 2
    assert not isinstance(model.transformer.resblocks[0], CheckpointedBlock)
    assert isinstance(model.transformer.resblocks[1], CheckpointedBlock)
    with pytest.raises(ValueError, match="already"):
        checkpoint_frozen_blocks(model, every=2)
    with pytest.raises(ValueError, match="positive"):
        checkpoint_frozen_blocks(model, every=0)
    assert model.transformer.get_cast_dtype() == torch.float32   # attributes pass through


@pytest.mark.parametrize("limit", [1, 5, 16, 37, 300])
def test_find_max_batch_bisects(limit):
    tried = []

    def run(b):
        tried.append(b)
        if b > limit:
            raise torch.cuda.OutOfMemoryError("fake OOM")

    assert find_max_batch(run, start=16, limit=1024) == limit
    assert len(tried) <= 2 * 11
    assert find_max_batch(lambda b: None, start=16, limit=100) == 100


def test_find_max_batch_propagates_other_errors():
    def run(b):
        raise RuntimeError("not an OOM")
    with pytest.raises(RuntimeError, match="not an OOM"):
        find_max_batch(run)


# --- GPU: graphs replay the eager step ------------------------------------------------------


@requires_gpu
def test_find_max_batch_on_gpu_grows_with_checkpointing():
    model = adapted("adaptertune", slow_fast_ratio=1.0).cuda()
    prepare_frozen(model)
    opt = torch.optim.SGD(model.heba_adapters.parameters(), lr=0.1)
    _, txt, _ = batch()
    txt = txt.cuda()

    def run(b):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = clip_loss(model, torch.randn(b, 3, 32, 32, device="cuda"), txt,
                             torch.zeros(b, dtype=torch.long, device="cuda"))
        loss.backward()
        opt.step()
        torch.cuda.synchronize()

    # Cap this process at what is allocated now plus 256 MiB so the search ends quickly.
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 2 ** 28) / total)
    try:
        plain = find_max_batch(run, start=256, limit=1 << 20)
        checkpoint_frozen_blocks(model)
        ckpt = find_max_batch(run, start=256, limit=1 << 20)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert 0 < plain < ckpt < 1 << 20, (plain, ckpt)


# --- graphs_reason, GraphedStep --------------------------------------------------------------

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


# CUDA-graph captures are thread-local: with the default ("global") capture mode, any other
# thread's CUDA call that is unsafe during a capture (the DataLoader's pin-memory thread
# allocating pinned memory) aborts the capture (error 900). No GPU here: torch.cuda.graph and
# friends are replaced by recorders, and the captured step runs on the CPU.

@contextlib.contextmanager
def _recording_graph(calls):
    def graph(cuda_graph, **kwargs):
        calls.append(kwargs)
        return contextlib.nullcontext()
    mp = torch.cuda
    saved = (mp.graph, mp.CUDAGraph, mp.graph_pool_handle)
    mp.graph, mp.CUDAGraph, mp.graph_pool_handle = graph, object, lambda: "pool"
    try:
        yield
    finally:
        mp.graph, mp.CUDAGraph, mp.graph_pool_handle = saved


def test_graphed_step_captures_thread_local():
    w = torch.randn(3, requires_grad=True)
    graphed = GraphedStep(lambda x: ((x * w).sum(),), [w])
    calls = []
    with _recording_graph(calls):
        graphed._capture("key", [torch.randn(3)])
    assert calls == [{"pool": "pool", "capture_error_mode": "thread_local"}], calls
    assert w.grad is not None and "key" in graphed._graphs
