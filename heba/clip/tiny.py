"""The tiny CLIP behind the built-in demo: architecture, word tokenizer, pretraining.

A 4-layer ViT (32x32 images, 8x8 patches: a class token and a 4x4 grid,
width 96) and a 4-layer causal text transformer (width 96, a 10-token
context over a word vocabulary), both open_clip modules (``open_clip.CLIP``),
so heba wires it exactly as it wires ViT-B/16. It was pretrained
contrastively, CLIP-style, on generated image-caption pairs
(:mod:`heba.clip.synthetic`, ``"clean"`` style: "a photo of a red circle.")
by :func:`pretrain`; the weights ship in ``heba/clip/assets/tiny_clip.safetensors``
(float16, ~2 MB). Rebuild them with::

    python -m heba.clip.tiny --out heba/clip/assets/tiny_clip.safetensors

If the file is missing, :func:`load_tiny_clip` pretrains once and caches the
result under ``~/.cache/heba``.
"""

from __future__ import annotations

import math
import os
import re
import time

import torch
import torch.nn.functional as F

from heba.clip import synthetic

CONFIG = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=96, layers=4, head_width=32),
    text_cfg=dict(context_length=10, width=96, heads=3, layers=4),
)
WORDS = ("a", "an", "the", "photo", "picture", "drawing", "of", "small", "large", "big",
         "shape", "colored", "coloured", "bright", "dark", "this", "is", "one", "on",
         "background", "blurry", "itap", "my") + tuple(synthetic.COLORS) + synthetic.SHAPES
ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_clip.safetensors")
CAPTIONS = ("a photo of a {}.", "a {}.", "a picture of a {}.", "{}", "a drawing of a {}.",
            "the {}.", "this is a {}.", "a {} shape.")


class WordTokenizer:
    """Lower-case word tokenizer over a fixed vocabulary, laid out like open_clip's.

    Row = ``[sot, w1, ..., wn, eot, 0, ...]``; ``eot`` is the largest id, so
    open_clip's ``argmax`` pooling finds it; unknown words map to ``unk`` (1).
    """

    def __init__(self, words=WORDS, context_length=CONFIG["text_cfg"]["context_length"]):
        self.words = tuple(words)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}   # 0 pad, 1 unk
        self.vocab_size = len(self.words) + 4
        self.sot, self.eot = self.vocab_size - 2, self.vocab_size - 1
        self.context_length = context_length

    def encode(self, text: str):
        return [self.index.get(w, 1) for w in re.findall(r"[a-z]+", text.lower())]

    def __call__(self, texts, context_length=None):
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot] + self.encode(t)[: n - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def build_model(tokenizer=None):
    """A randomly initialised tiny CLIP (``open_clip.CLIP``)."""
    import open_clip
    tokenizer = tokenizer or WordTokenizer()
    text_cfg = dict(CONFIG["text_cfg"], vocab_size=tokenizer.vocab_size)
    return open_clip.CLIP(embed_dim=CONFIG["embed_dim"], vision_cfg=CONFIG["vision_cfg"],
                          text_cfg=text_cfg)


def pretrain(steps=1500, batch_size=128, lr=2e-3, seed=0, log=print):
    """Contrastive pretraining on generated (image, caption) pairs; returns the model (eval)."""
    torch.manual_seed(seed)
    tok = WordTokenizer()
    model = build_model(tok).train()
    classes = synthetic.all_classes()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        ids = torch.randint(len(classes), (batch_size,), generator=g)
        imgs = synthetic.render(ids, classes, seed=seed * 1_000_003 + step, style="clean")
        tmpl = torch.randint(len(CAPTIONS), (batch_size,), generator=g).tolist()
        text = tok([CAPTIONS[t].format(classes[i]) for t, i in zip(tmpl, ids.tolist())])
        img_f, txt_f, logit_scale = model(imgs, text)
        logits = logit_scale * img_f @ txt_f.T
        same = (ids[:, None] == ids[None, :]).float()        # several captions can match an image
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"pretrain step {step:5d}/{steps} loss {loss.item():.3f} "
                f"({time.time() - t0:.0f}s)")
    return model.eval()


def save(model, path):
    from safetensors.torch import save_file
    from heba.clip.checkpoints import atomic_write
    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def load_tiny_clip(pretrained=True, log=print):
    """``(model, tokenizer)``: the shipped pretrained tiny CLIP (float32, eval), or a random one."""
    tok = WordTokenizer()
    model = build_model(tok)
    if pretrained:
        from safetensors.torch import load_file
        path = ASSET
        if not os.path.exists(path):
            path = os.path.join(os.path.expanduser("~/.cache/heba"), "tiny_clip.safetensors")
            if not os.path.exists(path):
                if log:
                    log(f"heba: {ASSET} is missing; pretraining the tiny CLIP once "
                        f"(a few minutes), cached in {path}")
                save(pretrain(log=log), path)
        state = load_file(path)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in state.items()})
    return model.eval(), tok


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="pretrain the demo's tiny CLIP")
    p.add_argument("--out", default=ASSET)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = pretrain(steps=a.steps, batch_size=a.batch_size, seed=a.seed)
    save(model, a.out)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
