"""Test accuracy of an adapted model: one classifier per test set, base / novel / HM.

The published evaluation (VLM-HeBA ``CustomCLIP.forward`` at test time): the
classifier of a test set is the normalised mean of its classes' prompt
features (:meth:`heba.train.prompts.PromptBank.features`); an image goes to
the class of largest cosine, in fp32 (Dassl's ``test()`` runs without
autocast; heba's default ``eval_precision="train"`` evaluates at the run's
precision, ``"fp32"`` as published). Novel classes are evaluated at the base
scale by default (``novel_eval="base"``: the published code never switches to
its declared novel scale); ``"novel"`` uses ``novel_scale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heba.train.runtime import autocast_ctx


@torch.no_grad()
def evaluate(model, evals: dict, banks: dict, device, precision: str, batch_size: int = 128,
             workers: int = 0, novel_eval: str = "base") -> dict:
    """``{split: accuracy %}`` for ``evals[split] = (classnames, dataset)``, plus ``"hm"``.

    ``banks[split]``: that split's :class:`PromptBank`. HM is the harmonic mean
    of ``base`` and ``novel`` when both are there.
    """
    was = model.training
    model.eval()
    policy = getattr(model, "heba_policy", None)
    out = {}
    try:
        for split, (_, ds) in evals.items():
            if policy is not None:
                policy.set_mode("novel" if split == "novel" and novel_eval == "novel"
                                else "base")
            with autocast_ctx(device, precision):
                txt = banks[split].features(model)                               # [C, E]
            out[split] = accuracy(model, ds, txt, device, precision, batch_size, workers)
    finally:
        if policy is not None:
            policy.set_mode("base")
        model.train(was)
    if "base" in out and "novel" in out:
        out["hm"] = harmonic_mean(out["base"], out["novel"])
    return out


def accuracy(model, ds, txt, device, precision, batch_size, workers) -> float:
    correct = total = 0
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast_ctx(device, precision):
            img = F.normalize(model.encode_image(images).float(), dim=-1)
        correct += (img @ txt.float().T).argmax(1).eq(labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def harmonic_mean(a: float, b: float) -> float:
    """>>> harmonic_mean(80.0, 60.0)
    68.57142857142857
    """
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def format_acc(acc: dict) -> str:
    names = {"base": "base", "novel": "novel", "hm": "HM", "all": "accuracy"}
    return "  ".join(f"{names.get(k, k)} {v:5.1f}%" for k, v in acc.items())


def evaluate_checkpoint(path: str, overrides: dict, opts, log=print) -> dict:
    """Evaluate a checkpoint: heba's own, or one the published trainer wrote; ``{split: acc}``.

    heba's checkpoints carry their configuration (``overrides`` may change the
    data: ``source``, ``dataset``, ``root``, ``split``, ...; the adapters'
    fields must match). A published ``model.pth.tar-<N>`` carries none: the run
    is the ``heba`` recipe with ``overrides``, its towers and layers read from
    the file (published layer ``i`` into block ``i``).
    """
    from heba.clip import checkpoints as ckpt
    from heba.train import backbones
    from heba.train import data as run_data
    from heba.train import preflight
    from heba.train.config import MODEL_FIELDS, Config, make_config
    from heba.train.recipe import make_bank
    from heba.train.runtime import resolve_precision, set_cpu_threads, setup_distributed
    kind, file = ckpt.find_checkpoint(path)
    if kind == "heba":
        saved = ckpt.read_config(file, require=MODEL_FIELDS)
        cfg = Config.from_dict(dict(saved, **overrides))
        bad = [f"{k}: checkpoint {saved.get(k)!r} vs now {overrides[k]!r}"
               for k in MODEL_FIELDS if k in overrides and overrides[k] != saved.get(k)]
        if bad:
            from heba.train.config import UsageError
            raise UsageError(f"checkpoint {file} is from another configuration "
                             f"({'; '.join(bad)})")
        state = None
    else:
        state = ckpt.read_published(file)
        cfg = make_config("heba", **dict(overrides, **ckpt.published_layout(state)))
    _, _, device = setup_distributed(opts.device)
    preflight.check_options(opts)
    preflight.check_config(cfg)
    preflight.check_backend(opts.backend, device)
    if device.type == "cpu":
        set_cpu_threads(opts.threads)
    precision = resolve_precision(cfg.precision, device, cfg.gpu_precision)
    precision = "fp32" if cfg.eval_precision == "fp32" else precision
    data = run_data.build(cfg)
    preflight.check_images([ds for _, ds in data.evals.values()])
    bb = backbones.load(cfg, opts.allow_download)
    run_data.set_transforms(data, bb.train_transform, bb.eval_transform)
    model = backbones.attach(bb.model, cfg, opts.backend)
    if state is None:
        ckpt.load_adapters(file, model)
    else:
        ckpt.load_adapter_state(model, state, file)
    model.to(device)
    banks = {s: make_bank(names, cfg, bb.tokenizer, device) for s, (names, _) in
             data.evals.items()}
    acc = evaluate(model, data.evals, banks, device, precision, cfg.test_batch_size,
                   opts.workers, cfg.novel_eval)
    log(f"{file}: {format_acc(acc)}")
    return acc
