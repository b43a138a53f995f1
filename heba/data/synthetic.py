"""Generated images of coloured shapes: the built-in demo's data, deterministic by seed.

Every image is a shape of one colour on a background, rendered in torch from a
handful of drawn numbers (centre, size, colour jitter, background, noise), so a
data set is a seed and a list of classes, never files. Two styles:

* ``"clean"``: flat dark background, saturated colours. The tiny CLIP shipped
  with heba was pretrained on these, with captions (``heba.clip.tiny``).
* ``"shifted"``: the demo's downstream task. Textured, brighter backgrounds,
  colours pulled toward grey, smaller shapes and pixel noise: the pretrained
  model still recognises something, and few-shot adaptation has room to help.
"""

from __future__ import annotations

import torch

COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.15, 0.8), "orange": (1.0, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95), "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "dot")
SIZE_WORDS = ("small", "large")

# Normalisation of the generated images (as open_clip's preprocess does for photos).
MEAN, STD = (0.3, 0.3, 0.3), (0.3, 0.3, 0.3)


def all_classes():
    """Every ``"<color> <shape>"`` class name, in a fixed order."""
    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def _masks(shape_ids, cx, cy, r, size):
    """Shape masks ``[N, size, size]`` (float in [0, 1], lightly anti-aliased)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size       # [S]
    y = coords.view(1, size, 1)
    x = coords.view(1, 1, size)
    cx, cy, r = cx.view(-1, 1, 1), cy.view(-1, 1, 1), r.view(-1, 1, 1)
    dx, dy = x - cx, y - cy
    ax, ay = dx.abs(), dy.abs()
    d = (dx * dx + dy * dy).sqrt()
    soft = 1.5 / size                                                      # edge width

    def inside(signed):  # signed < 0 inside; a soft step over ~1.5 px
        return (0.5 - signed / soft).clamp(0, 1)

    cands = torch.stack([
        inside(d - r),                                                     # circle
        inside(torch.maximum(ax, ay) - 0.8 * r),                           # square
        inside(torch.maximum(dy - 0.8 * r, ax - (dy + r) / 1.8)),          # triangle
        torch.maximum(inside(torch.maximum(ax - 0.3 * r, ay - r)),
                      inside(torch.maximum(ay - 0.3 * r, ax - r))),        # cross
        inside(d - r) * (1 - inside(d - 0.55 * r)),                       # ring
        inside(ax + ay - 1.1 * r),                                         # diamond
        inside(torch.maximum(ax - 1.1 * r, ay - 0.3 * r)),                 # bar
        inside(d - 0.35 * r),                                              # dot
    ], 1)                                                                  # [N, 8, S, S]
    return cands[torch.arange(len(shape_ids)), shape_ids]


def render(class_ids, classes, seed=0, style="clean", size=32, normalize=True):
    """Images ``[N, 3, size, size]`` of ``classes[class_ids[i]]``, reproducible from ``seed``.

    Args:
        class_ids: ``[N]`` long tensor of indices into ``classes``.
        classes: ``"<color> <shape>"`` names.
        seed: the generator seed; the same arguments always give the same images.
        style: ``"clean"`` or ``"shifted"`` (see the module docstring).
        normalize: subtract ``MEAN`` and divide by ``STD``.
    """
    if style not in ("clean", "shifted"):
        raise ValueError(f"style must be 'clean' or 'shifted', got {style!r}")
    g = torch.Generator().manual_seed(int(seed))
    class_ids = torch.as_tensor(class_ids, dtype=torch.long)
    n = len(class_ids)
    names = [classes[i].split() for i in class_ids.tolist()]
    rgb = torch.tensor([COLORS[c] for c, _ in names])                      # [N, 3]
    shape_ids = torch.tensor([SHAPES.index(s) for _, s in names])
    u = lambda *s: torch.rand(*s, generator=g)                             # noqa: E731
    if style == "clean":
        r = 0.18 + 0.14 * u(n)
        bg = 0.05 + 0.15 * u(n, 3)
        rgb = (rgb + 0.08 * (u(n, 3) - 0.5)).clamp(0, 1)
        noise, texture = 0.02, 0.0
    else:
        r = 0.15 + 0.12 * u(n)
        bg = 0.15 + 0.3 * u(n, 3)
        grey = rgb.mean(1, keepdim=True)
        rgb = (0.75 * rgb + 0.25 * grey + 0.15 * (u(n, 3) - 0.5)).clamp(0, 1)
        noise, texture = 0.06, 0.18
    margin = r + 0.02
    cx = margin + (1 - 2 * margin) * u(n)
    cy = margin + (1 - 2 * margin) * u(n)
    mask = _masks(shape_ids, cx, cy, r, size).unsqueeze(1)                 # [N, 1, S, S]
    img = bg.view(n, 3, 1, 1).expand(n, 3, size, size).clone()
    if texture:
        coarse = u(n, 3, 4, 4) - 0.5
        img = img + texture * torch.nn.functional.interpolate(coarse, size=(size, size),
                                                              mode="bilinear",
                                                              align_corners=False)
    img = img * (1 - mask) + rgb.view(n, 3, 1, 1) * mask
    img = (img + noise * torch.randn(img.shape, generator=g)).clamp(0, 1)
    if normalize:
        img = (img - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return img


def balanced_ids(n_classes, per_class):
    """``[n_classes * per_class]`` class ids, class-major."""
    return torch.arange(n_classes).repeat_interleave(per_class)


def save_png_folder(root, classes, per_class, seed=0, style="shifted", size=32):
    """Write an ImageFolder tree ``root/<class>/<i>.png`` (for tests and examples)."""
    import os
    from PIL import Image
    ids = balanced_ids(len(classes), per_class)
    imgs = render(ids, classes, seed=seed, style=style, size=size, normalize=False)
    for k, (cid, img) in enumerate(zip(ids.tolist(), imgs)):
        d = os.path.join(root, classes[cid].replace(" ", "_"))
        os.makedirs(d, exist_ok=True)
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(os.path.join(d, f"{k:05d}.png"))
    return root
