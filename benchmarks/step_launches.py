"""Launches per step of the published HeBA step, counted on the CPU (no GPU needed).

    python -m benchmarks.step_launches [--widths vit-b16|tiny] [--backend triton]

The step is heba-train's (:class:`heba.train.step.AdapterStep` after ``prepare_frozen``: the
frozen backbone cast once, its attention without q/k/v copies, its LayerNorms without casts
(CUDA autocast casts ``layer_norm`` in and out, CPU autocast does not: a CPU count never
saw those 4 launches per LayerNorm); bf16 autocast, device-side
slow-fast draws, fused SGD), batch 16, 50 classes with one prompt of 12..32 tokens each (every
class a candidate, as on the published base halves), HeBA adapters in every block of both
towers, QuickGELU as OpenAI's weights need it (fused by ``prepare_frozen`` where Triton
runs, the interpreter included, as is each block's attention residual sum with its ``ln_2``). ``vit-b16``: open_clip's ViT-B/16 blocks and widths
(12 + 12 blocks, 768 / 512 wide) at 32 px images (2 x 2 patches: the same ops per step as at 224 px, on fewer tokens);
``tiny``: the step benchmark's dry-run CLIP (2 + 2).

Counted by :func:`benchmarks.launch_count.count_launches` over one real step:

* ``step[reference]``: the whole step with the reference adapters (measured);
* per adapter call, in the step's order: the call alone (forward + backward, on the
  input, scale and autocast the step gave it, captured), reference and fused;
* per adapter call, the roofline model's launches (:mod:`benchmarks.roofline`);
* the fused step as ``step[reference] - sum(reference calls) + sum(fused calls)``: the
  frozen backbone's ops plus each adapter's own. Measured directly wherever the fused
  backend runs the whole step fast enough (the tiny CLIP in Triton's interpreter; a
  GPU), where the test checks that the two agree exactly.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter

import torch

from benchmarks.launch_count import count_launches

BATCH, CLASSES, NEG = 16, 50, 5


def build(widths: str = "vit-b16", backend: str = "reference", batch: int = BATCH,
          classes: int = CLASSES, seed: int = 0):
    """``(model, step, run)``: the adapted CLIP, its AdapterStep, ``run()`` one step
    (``batch`` images, ``classes`` classes, every one a candidate when ``classes`` is at most
    ``6 * batch``, as at the published 16 / 50)."""
    import open_clip
    from heba.clip import attach_heba
    from heba.clip.wiring import ScalePolicy
    from heba.train.graph import prepare_frozen
    from heba.train.prompts import PromptBank
    from heba.train.step import AdapterStep, draw_step
    torch.manual_seed(seed)
    if widths == "vit-b16":
        cfg = open_clip.get_model_config("ViT-B-16")
        cfg["vision_cfg"] = dict(cfg["vision_cfg"], image_size=32)
        model, image = open_clip.CLIP(**cfg, quick_gelu=True), 32
    elif widths == "tiny":
        model, image = open_clip.CLIP(
            embed_dim=32, quick_gelu=True, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                                          head_width=32),
            text_cfg=dict(context_length=77, vocab_size=100, width=48, heads=2, layers=2)), 32
    else:
        raise ValueError(f"widths must be 'vit-b16' or 'tiny', got {widths!r}")
    model.train()
    attach_heba(model, "both", policy=ScalePolicy(seed=1, draws="device"), backend=backend)
    prepare_frozen(model, torch.bfloat16)
    bank = PromptBank([[str(c)] for c in range(classes)],
                      lambda texts: _prompts(model.vocab_size, classes), "cpu")
    step = AdapterStep(model, bank, 0.1, NEG)
    params = [p for p in model.heba_adapters.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0075, momentum=0.9, weight_decay=5e-4, fused=True)
    g = torch.Generator().manual_seed(2)
    imgs = torch.randn(batch, 3, image, image, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    gen = torch.Generator().manual_seed(3)

    def run():
        mask, pick = draw_step(labels, bank, NEG, "batch", gen)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step(imgs, labels, mask, pick)[0]
        loss.backward()
        opt.step()
    return model, step, run


def _prompts(vocab: int, classes: int) -> torch.Tensor:
    """``[C, 77]``: sot, random words, eot (the largest id) at 12..32 tokens."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(classes, 77, dtype=torch.long)
    for i in range(classes):
        n = int(torch.randint(12, 33, (1,), generator=g))
        tokens[i, 0] = vocab - 2
        tokens[i, 1:n - 1] = torch.randint(1, vocab - 2, (n - 2,), generator=g)
        tokens[i, n - 1] = vocab - 1
    return tokens


def adapters(model) -> list:
    """The HeBA adapter modules of ``model`` (each has ``backend``)."""
    return [m for m in model.heba_adapters.modules() if hasattr(m, "backend")]


def capture_calls(model, run) -> list:
    """Run ``run()`` once; return ``(adapter, x, scale, autocast)`` for every adapter call."""
    calls, handles = [], []

    def hook(mod, args, kwargs):
        x = args[0]
        scale = kwargs.get("scale", args[1] if len(args) > 1 else 1.0)
        if isinstance(scale, torch.Tensor):
            scale = scale.detach().clone()
        calls.append((mod, x.detach().clone().requires_grad_(x.requires_grad), scale,
                      torch.is_autocast_enabled("cpu")))
    for m in adapters(model):
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def call_launches(call, backend: str) -> dict:
    """The counts of one captured adapter call alone (forward + backward) on ``backend``, after
    a first uncounted call (whatever a first call builds once is not the step's)."""
    mod, x, scale, autocast = call
    saved, mod.backend = mod.backend, backend
    try:
        x = x.detach().clone().requires_grad_(x.requires_grad)

        def fwd():
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast \
                    else contextlib.nullcontext():
                return mod(x, scale=scale)
        grad = torch.randn_like(fwd())

        def one():
            for t in (x, *mod.parameters()):
                t.grad = None
            y = fwd()
            y.backward(grad)
        one()                       # lazily built state (the kernels' cached counters), as
        out = count_launches(one)   # the step is counted after a first step
        for p in mod.parameters():
            p.grad = None
        return out
    finally:
        mod.backend = saved


def roofline_launches(call) -> int:
    """The roofline model's launches (forward + backward, Triton and torch) of one captured
    adapter call (:mod:`benchmarks.roofline`, from the launchers' own plans)."""
    from benchmarks.cases import Case
    from benchmarks.roofline import GPUS, triton_costs
    mod, x = call[0], call[1]
    b, n = (x.shape[0], x.shape[1]) if mod.batch_first else (x.shape[1], x.shape[0])
    side = int(round((n - mod.num_prefix_tokens) ** 0.5))
    case = Case("call", f"heba_{mod.modality}", b, n, mod.dim, grid=(side, side))
    gpu = GPUS["H200"]
    return len(triton_costs(case, 2, 2, gpu, False) + triton_costs(case, 2, 2, gpu, True))


def published_step(widths: str = "vit-b16", fused: str = "triton", measure_fused=False,
                   batch: int = BATCH, classes: int = CLASSES, per_call: str = "measured"
                   ) -> dict:
    """The counts of module docstring: ``step_reference``, ``adapter_calls``,
    ``reference_per_call`` / ``fused_per_call`` (lists; ``per_call="roofline"``: the fused
    ones from the roofline model instead of counted), ``roofline_per_call``, ``backbone`` and
    ``backbone_by_op`` (the step less its adapter calls, by ATen op or Triton kernel),
    ``fused_step`` (built from them) and, with ``measure_fused``, ``fused_step_measured`` (the whole step
    on ``fused``)."""
    model, _, run = build(widths, "reference", batch, classes)
    run()                                           # lazily built state (optimizer, caches)
    calls = capture_calls(model, run)
    step_ref = count_launches(run)
    ref_counts = [call_launches(c, "reference") for c in calls]
    ref = [c["launches"] for c in ref_counts]
    by_op = Counter(step_ref["by_op"])
    for c in ref_counts:
        by_op.subtract(c["by_op"])
    roof = [roofline_launches(c) for c in calls]
    fus = roof if per_call == "roofline" else [call_launches(c, fused)["launches"]
                                               for c in calls]
    out = dict(widths=widths, backend=fused, batch=batch, classes=classes, per_call=per_call,
               roofline_per_call=roof, step_reference=step_ref["launches"],
               step_reference_dispatches=step_ref["dispatches"], adapter_calls=len(calls),
               reference_per_call=ref, fused_per_call=fus,
               backbone=step_ref["launches"] - sum(ref),
               backbone_by_op={k: v for k, v in by_op.most_common() if v},
               fused_step=step_ref["launches"] - sum(ref) + sum(fus))
    if measure_fused:
        for m in adapters(model):
            m.backend = fused
        run()
        out["fused_step_measured"] = count_launches(run)["launches"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", choices=("vit-b16", "tiny"), default="vit-b16")
    ap.add_argument("--backend", default="triton", help="the fused backend (default: triton)")
    ap.add_argument("--per-call", choices=("measured", "roofline"), default="roofline",
                    help="the fused adapter calls counted in Triton's interpreter (minutes at "
                         "ViT-B/16 widths) or taken from the roofline model, which the tests "
                         "tie to the counted ones (default: roofline)")
    ap.add_argument("--by-op", action="store_true",
                    help="also list the frozen backbone's launches by ATen op / Triton kernel")
    args = ap.parse_args(argv)
    r = published_step(args.widths, args.backend, per_call=args.per_call)
    n = r["adapter_calls"]
    print(f"published HeBA step ({args.widths}, batch {BATCH}, {CLASSES} classes), counted on "
          f"the CPU:\n  reference adapters: {r['step_reference']} launches "
          f"({r['step_reference_dispatches']} dispatches)\n  frozen backbone, step and "
          f"optimizer: {r['backbone']}\n  {n} adapter calls, {args.backend}: "
          f"{sum(r['fused_per_call'])} launches, {r['per_call']} "
          f"({sum(r['fused_per_call']) / n:.1f} per "
          f"adapter; reference {sum(r['reference_per_call']) / n:.1f})\n  {args.backend} "
          f"step: {r['fused_step']} launches")
    if args.by_op:
        print("  frozen backbone, step and optimizer by op: " + ", ".join(
            f"{k} {v}" for k, v in r["backbone_by_op"].items()))
    return r


if __name__ == "__main__":
    main()
