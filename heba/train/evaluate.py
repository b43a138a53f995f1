"""Test accuracy: a CLIP's base / novel / HM, a classifier's top-k; evaluating a checkpoint.

The published evaluation (VLM-HeBA ``CustomCLIP.forward`` at test time): the
classifier of a test set is the normalised mean of its classes' prompt
features (:meth:`heba.train.prompts.PromptBank.features`); an image goes to
the class of largest cosine, in fp32 (Dassl's ``test()`` runs without
autocast; heba's default ``eval_precision="train"`` evaluates at the run's
precision, ``"fp32"`` as published). Novel classes are evaluated at the base
scale by default (``novel_eval="base"``: the published code never switches to
its declared novel scale); ``"novel"`` uses ``novel_scale``.

A classifier (the AdapterTune protocol) reports its loss and top-1 / top-5 on a
split (:func:`evaluate_split`). :func:`evaluate_checkpoint` evaluates any
checkpoint, heba's or a published trainer's, with the recipe it belongs to
(:func:`find_checkpoint` says which).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from heba.clip import checkpoints as ckpt
from heba.train import backbones
from heba.train import data as run_data
from heba.train import preflight
from heba.train import run_folder as rf
from heba.train import vision
from heba.train.config import MODEL_FIELDS, Config, UsageError, make_config
from heba.train.context import runtime
from heba.train.metrics import format_acc, harmonic_mean, topk_correct, topk_acc
from heba.train.prompts import make_bank
from heba.train.runtime import autocast_ctx
from heba.train.trainable import load_published_classifier, load_trainable_file

__all__ = ["evaluate", "accuracy", "evaluate_split", "harmonic_mean", "format_acc",
           "find_checkpoint", "evaluate_checkpoint"]


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
    """Top-1 % of ``model``'s images of ``ds`` against the class features ``txt [C, E]``."""
    from heba.train.data import eval_accuracy

    def predict(images):
        with autocast_ctx(device, precision):
            img = F.normalize(model.encode_image(images).float(), dim=-1)
        return (img @ txt.float().T).argmax(1)

    return eval_accuracy(predict, ds, device, batch_size, workers)


@torch.no_grad()
def evaluate_split(model, ds, device, precision: str, ks, batch_size: int = 128,
                   workers: int = 0, label_smoothing: float = 0.0) -> dict:
    """``{"loss", "top1", "top5"}`` (% of ``ds``; ``top<k>`` for ``k`` in ``ks``) of ``model``."""
    was = model.training
    model.eval()
    loss = torch.zeros((), device=device)
    hits = torch.zeros(len(ks), device=device)
    n = 0
    try:
        from heba.train.data import eval_batches
        for images, labels in eval_batches(ds, batch_size, device, workers):
            with autocast_ctx(device, precision):
                logits = model(images).float()
            loss += F.cross_entropy(logits, labels, label_smoothing=label_smoothing,
                                    reduction="sum")
            hits += topk_correct(logits, labels, ks)
            n += len(labels)
    finally:
        model.train(was)
    out = {"loss": loss.item() / max(n, 1)}
    out.update({f"top{k}": 100.0 * h / max(n, 1) for k, h in zip(ks, hits.tolist())})
    return out


# --- a checkpoint, by the recipe it belongs to -----------------------------------------------

def find_checkpoint(path: str, over: dict) -> tuple[str, str, str]:
    """``(recipe, kind, file)`` of ``heba-train evaluate --checkpoint path``: ``recipe`` is
    ``"classify"`` (a timm classifier's) or ``"clip"``; ``kind`` ``"heba"`` (safetensors +
    JSON: the file, a run folder's final adapters, else its latest set's) or ``"published"``
    (a Dassl ``model.pth.tar-<N>`` or its run folder; an AdapterTune ``last.pt`` /
    ``best.pt`` or their folder). The recipe is the saved configuration's, else the
    command line's ``--backbone``."""
    file = _heba_file(path)
    if file and os.path.isfile(ckpt.config_path(file)):
        classify = vision.is_classification(ckpt.read_config(file).get("model", ""))
    else:
        classify = vision.is_classification(over.get("model", ""))
    if not classify:
        return ("clip", "heba", file) if file else ("clip",) + ckpt.find_checkpoint(path)
    if file:
        return "classify", "heba", file
    if os.path.isdir(path):
        for name in ("last.pt", "best.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return "classify", "published", os.path.join(path, name)
    elif os.path.isfile(path):
        return "classify", "published", path
    raise ckpt.CheckpointError(f"checkpoint {path} does not exist (adapters.safetensors, "
                               f"a published last.pt / best.pt, or their folder)")


def _heba_file(path: str):
    """heba's adapters file of ``path``: the file itself, a run folder's final
    ``adapters.safetensors``, else its latest committed set's (an unfinished run); None."""
    if os.path.isfile(path):
        return path if path.endswith(".safetensors") else None
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, rf.CKPT_NAME)):
        return os.path.join(path, rf.CKPT_NAME)
    latest = rf.read_set(path)
    return latest.file(rf.CKPT_NAME) if latest and rf.CKPT_NAME in latest.files else None


def evaluate_checkpoint(path: str, overrides: dict, opts, log=print) -> dict:
    """Evaluate a checkpoint, heba's or one a published trainer wrote, with its recipe.

    heba's checkpoints carry their configuration (``overrides`` may change the
    data: ``source``, ``dataset``, ``root``, ``split``, ...; the adapters'
    fields must match). A published CLIP ``model.pth.tar-<N>`` carries none: the
    run is the ``heba`` recipe with ``overrides``, its towers and layers read from
    the file (published layout ``i`` into block ``i``). A published AdapterTune
    ``best.pt`` / ``last.pt``: ``--backbone timm:NAME --dataset ... --root`` say
    which backbone and data (``--method full`` for a full fine-tuning run).
    Returns ``{split: accuracy %}`` (CLIP) or ``{"top-1": .., "top-5": ..}``.
    """
    recipe, kind, file = find_checkpoint(path, overrides)
    if recipe == "classify":
        return _evaluate_classifier(kind, file, overrides, opts, log)
    return _evaluate_clip(kind, file, overrides, opts, log)


def _same_model(saved: dict, over: dict, fields, file: str) -> None:
    bad = [f"{k}: checkpoint {saved.get(k)!r} vs now {over[k]!r}"
           for k in fields if k in over and over[k] != saved.get(k)]
    if bad:
        raise UsageError(f"checkpoint {file} is from another configuration ({'; '.join(bad)})")


def _evaluate_clip(kind: str, file: str, overrides: dict, opts, log) -> dict:
    state = None
    if kind == "heba":
        saved = ckpt.read_config(file, require=MODEL_FIELDS)
        _same_model(saved, overrides, MODEL_FIELDS, file)
        cfg = Config.from_dict(dict(saved, **overrides))
    else:
        state = ckpt.read_published(file)
        cfg = make_config("heba", **dict(overrides, **ckpt.published_layout(state)))
    device, precision = runtime(cfg, opts)
    precision = "fp32" if cfg.eval_precision == "fp32" else precision
    data = run_data.build(cfg)
    preflight.check_images([ds for _, ds in data.evals.values()], mode=opts.check_images)
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


def _classifier_config(kind: str, file: str, over: dict):
    """``(cfg, saved JSON or None)`` of a classifier checkpoint under the command line ``over``."""
    if kind != "heba":
        return vision.classifier_config(over, None), None
    saved = ckpt.read_config(file)
    _same_model(saved, over, MODEL_FIELDS + ("pretrained",), file)
    data = {k: v for k, v in vision.data_source(over).items()
            if k in ("source", "dataset", "root", "val_split", "precision")}
    return Config.from_dict(dict(saved, **data)), saved


def _evaluate_classifier(kind: str, file: str, over: dict, opts, log) -> dict:
    cfg, saved = _classifier_config(kind, file, over)
    device, precision = runtime(cfg, opts)
    data = vision.build_data(cfg)
    if saved is not None and saved.get("classnames") not in (None, list(data.classnames)):
        raise UsageError(f"{file} was trained on other classes than {cfg.dataset} has here")
    lib = backbones.library(cfg.model)
    torch.manual_seed(cfg.seed)
    model = lib.load(cfg, opts.allow_download, num_classes=data.num_classes).model
    if kind == "heba":
        model = lib.attach(model, cfg, opts.backend)
        load_trainable_file(model, cfg.method, file)
    else:
        load_published_classifier(model, file, cfg, opts.backend)
    data.test.transform = vision.eval_transform(lib, model)
    acc = evaluate_split(model.to(device), data.test, device, precision,
                         vision.topk(data.num_classes), cfg.test_batch_size, opts.workers,
                         cfg.label_smoothing)
    log(f"{file}: test {format_acc(topk_acc(acc))}  loss {acc['loss']:.6f}")
    return topk_acc(acc)
