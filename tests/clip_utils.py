"""Tiny random-weight open_clip models and inputs for the tests/test_clip_*.py files."""

from __future__ import annotations

import torch

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
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


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
