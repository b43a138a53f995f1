"""Tiny random-weight open_clip models and inputs for the model-level tests, and the
expectations those tests hold them to, taken from outside heba: the published HeBA
constants, docs/semantics.md's block equations written out with plain torch (``spec_*``, run on a
pristine copy of the model), and adapter weights drawn under the published state-dict
names (``heba_weights``, ``lowrank_weights``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB = 100


def tiny_clip(seed=0, layers=2, image_size=32, patch_size=8, width=64, text_width=48,
              context_length=16, embed_dim=32):
    import open_clip
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg=dict(image_size=image_size, patch_size=patch_size, width=width,
                        layers=layers, head_width=32),
        text_cfg=dict(context_length=context_length, vocab_size=VOCAB, width=text_width,
                      heads=2, layers=layers))
    # open_clip leaves some weights at their defaults (zero biases, unit norms):
    # draw everything so that every term matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def randomize_adapters(model, seed=1, std=0.2):
    """Non-zero weights everywhere in the adapters (a zero ``up`` would hide half of them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heba_adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, p in model.heba_adapters.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(1.0)
    return model


def images(n=3, size=32, seed=0):
    """``n`` random images, ``size`` an int or ``(H, W)``."""
    g = torch.Generator().manual_seed(seed)
    H, W = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, H, W, generator=g)


def texts(lengths=(5, 9, 3), context_length=16, seed=0):
    """Token rows like open_clip's tokenizer makes: sot, words, eot (the largest id), zeros."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), context_length, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0] = VOCAB - 2
        out[i, 1:n - 1] = torch.randint(1, VOCAB - 2, (n - 2,), generator=g)
        out[i, n - 1] = VOCAB - 1
    return out


def image_folder(root, classes=("red circle", "blue square", "green triangle", "yellow cross"),
                 per_class=5, seed=0):
    """An ImageFolder tree of generated 32x32 PNGs, ``root/<class>/<i>.png``."""
    from heba.clip.synthetic import save_png_folder
    return save_png_folder(str(root), list(classes), per_class, seed=seed)


def one_thread():
    """Tests run on 2 shared cores: 1 intra-op thread avoids OpenMP spin-waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- expectations from outside heba ----------------------------------------------------------
# The published HeBA recipe (github Jahid12012021/VLM-HeBA: trainers/heba.py RobustAdapterBlock
# and AdapterLearner, configs/trainers/HeBA/base2new.yaml, train.py extend_cfg) and docs/semantics.md,
# written here as numbers: never read from the adapters heba builds.
EPS = 1e-5                # nn.LayerNorm(input_dim): PyTorch's default eps
REDUCTION = 4             # RobustAdapterBlock(reduction=4): att D -> D/4, mlp 4D -> 4D/4
PREFIX = 1                # visual: the class token passes through (torch.split [1, N-1])
BASE_SCALE = 0.025        # ADAPTER_SCALE_BASE
NOVEL_SCALE = 0.010       # ADAPTER_SCALE_NOVEL
SCALE_FACTOR = 2.25       # ADAPTER_SCALE_FACTOR
SLOW_FAST_RATIO = 0.8     # SLOW_FAST_RATIO: base scale with probability 0.8 while training


def spec_heba(t, w, scale, visual, grid=None, eps=EPS, prefix=PREFIX):
    """docs/semantics.md section 1 written out with plain torch, for batch-first tokens ``t`` [B, N, D].

    ``w``: the adapter's weights under the published names (``down.weight``,
    ``mid.weight``, ``up.weight``, ``norm.weight``, ``norm.bias``); ``grid``:
    ``(H, W)`` of the visual patch grid (token ``prefix + i*W + j`` is row ``i``,
    column ``j``). Everything else is an argument: nothing is read from heba.
    """
    D = t.shape[-1]
    if not visual:
        z = F.linear(F.gelu(F.linear(t, w["down.weight"])), w["up.weight"])
        return t + scale * F.layer_norm(t + z, (D,), w["norm.weight"], w["norm.bias"], eps)
    B, N, _ = t.shape
    H, W = grid
    assert N == prefix + H * W, (N, prefix, grid)
    g = t[:, prefix:]                                          # [B, H*W, D], row-major grid
    u = g @ w["down.weight"][:, :, 0, 0].T                     # 1x1 conv = per-token linear
    h = u.shape[-1]
    u = u.transpose(1, 2).reshape(B, h, H, W)
    v = F.conv2d(u, w["mid.weight"], padding=1, groups=h)      # 3x3 depthwise, zero padding
    v = v.reshape(B, h, H * W).transpose(1, 2)
    z = F.gelu(v) @ w["up.weight"][:, :, 0, 0].T               # exact (erf) GELU
    out = g + scale * F.layer_norm(g + z, (D,), w["norm.weight"], w["norm.bias"], eps)
    return torch.cat([t[:, :prefix], out], 1)


def spec_block(blk, x, att=None, mlp=None, attn_mask=None):
    """One pristine open_clip ResidualAttentionBlock with docs/semantics.md's adapter placement.

    ``att`` / ``mlp``: callables applied to ``ln_1(x)`` and to ``mlp.c_fc(ln_2(x))``
    (None: no adapter).
    """
    h = blk.ln_1(x)
    if att is not None:
        h = att(h)
    x = x + blk.ls_1(blk.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0])
    y = blk.mlp.c_fc(blk.ln_2(x))
    if mlp is not None:
        y = mlp(y)
    return x + blk.ls_2(blk.mlp.c_proj(blk.mlp.gelu(y)))


def spec_tower(blocks, x, weights, scale, visual, grid=None, attn_mask=None, eps=EPS):
    """HeBA blocks: ``weights`` {1-based layer: {"att_conv": w, "mlp_conv": w}}."""
    for i, blk in enumerate(blocks):
        w = weights.get(i + 1)
        att = mlp = None
        if w is not None:
            def att(t, w=w):
                return spec_heba(t, w["att_conv"], scale, visual, grid, eps)

            def mlp(t, w=w):
                return spec_heba(t, w["mlp_conv"], scale, visual, grid, eps)
        x = spec_block(blk, x, att, mlp, attn_mask)
    return x


def spec_lowrank_tower(blocks, x, weights, alpha, attn_mask=None):
    """AdapterTune: ``x = block(x); x = x + alpha * up(gelu(down(x)))`` after the blocks in
    ``weights`` {0-based block: {"down.weight", "down.bias", "up.weight", "up.bias"}}."""
    for i, blk in enumerate(blocks):
        x = spec_block(blk, x, attn_mask=attn_mask)
        w = weights.get(i)
        if w is not None:
            z = F.gelu(F.linear(x, w["down.weight"], w["down.bias"]))
            x = x + alpha * F.linear(z, w["up.weight"], w["up.bias"])
    return x


def spec_encode_image(pristine, img, tower):
    """open_clip's encode_image on a pristine (adapter-free) model, ``tower(blocks, x)`` for
    the transformer."""
    v = pristine.visual
    x = tower(v.transformer.resblocks, v._embeds(img))
    pooled, _ = v._pool(x)
    return pooled @ v.proj


def spec_encode_text(pristine, text, tower, pos_embedding=None):
    """open_clip's encode_text (argmax pooling) on a pristine model; ``pos_embedding``
    replaces the model's (a leaf whose gradient is the tower's x-path gradient)."""
    pos = pristine.positional_embedding if pos_embedding is None else pos_embedding
    x = pristine.token_embedding(text) + pos
    x = tower(pristine.transformer.resblocks, x, pristine.attn_mask)
    x = pristine.ln_final(x)
    x = x[torch.arange(x.shape[0]), text.argmax(-1)]
    return x @ pristine.text_projection


def heba_weights(vis_dim, txt_dim, layers, start=1, end=None, towers=("visual", "text"),
                 seed=1, std=1.0):
    """Random HeBA weights under the published state-dict names and shapes.

    ``{"visual_adapter.<L>.<att_conv|mlp_conv>.<param>": tensor}`` for the 1-based
    layers ``start..end``; shapes from REDUCTION (att: ``D -> D/4``, mlp: ``4D -> D``),
    visual 1x1 / 3x3 depthwise convs, text linears; no biases but the LayerNorm's.
    Drawn so that every term matters (``std`` scales the bottleneck weights).
    """
    g = torch.Generator().manual_seed(seed)
    end = layers if end is None else end
    sd = {}
    for tower, D in (("visual", vis_dim), ("text", txt_dim)):
        if tower not in towers:
            continue
        for L in range(start, end + 1):
            for pos, dim in (("att_conv", D), ("mlp_conv", 4 * D)):
                h = dim // REDUCTION
                k = f"{tower}_adapter.{L}.{pos}."
                down = torch.randn(h, dim, generator=g) * std / dim ** 0.5
                up = torch.randn(dim, h, generator=g) * std / h ** 0.5
                if tower == "visual":
                    down, up = down[:, :, None, None], up[:, :, None, None]
                    sd[k + "mid.weight"] = torch.randn(h, 1, 3, 3, generator=g) * std / 3
                sd[k + "down.weight"], sd[k + "up.weight"] = down, up
                sd[k + "norm.weight"] = 1 + 0.5 * torch.randn(dim, generator=g)
                sd[k + "norm.bias"] = 0.5 * torch.randn(dim, generator=g)
    return sd


def lowrank_weights(dim, rank, blocks, prefix="blocks", seed=2, std=0.3):
    """Random AdapterTune weights under the published names ``blocks.<i>.adapter.*``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in blocks:
        k = f"{prefix}.{i}.adapter."
        sd[k + "down.weight"] = torch.randn(rank, dim, generator=g) / dim ** 0.5
        sd[k + "down.bias"] = std * torch.randn(rank, generator=g)
        sd[k + "up.weight"] = torch.randn(dim, rank, generator=g) / rank ** 0.5
        sd[k + "up.bias"] = std * torch.randn(dim, generator=g)
    return sd


def per_layer(sd, tower):
    """``{L: {"att_conv": {param: t}, "mlp_conv": {...}}}`` from a published HeBA state dict."""
    out = {}
    for k, v in sd.items():
        t, L, pos, param = k.split(".", 3)
        if t == f"{tower}_adapter":
            out.setdefault(int(L), {}).setdefault(pos, {})[param] = v
    return out


def per_block(sd, prefix="blocks"):
    """``{i: {param: t}}`` from AdapterTune keys ``<prefix>.<i>.adapter.<param>``."""
    out = {}
    for k, v in sd.items():
        p, i, _, param = k.split(".", 3)
        if p == prefix:
            out.setdefault(int(i), {})[param] = v
    return out


def quiet_blocks(model, factor):
    """Shrink every block's ``ln_1`` and ``mlp.c_fc`` outputs by ``factor``: the adapters'
    LayerNorm then sees rows of variance ~``factor**2``, where its eps shows."""
    with torch.no_grad():
        for tr in (model.visual.transformer, model.transformer):
            for blk in tr.resblocks:
                for m in (blk.ln_1, blk.mlp.c_fc):
                    m.weight.mul_(factor)
                    m.bias.mul_(factor)
    return model


def load_heba(model, sd):
    """Load published-name HeBA weights into ``model.heba_adapters`` (strict: names and shapes)."""
    model.heba_adapters.load_state_dict(sd, strict=True)


def heba_grads(model, keys):
    """``{published key: .grad}`` of the model's HeBA parameters."""
    return {k: model.heba_adapters.get_parameter(k).grad for k in keys}
