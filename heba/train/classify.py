"""Image classification on a timm backbone: the published AdapterTune protocol on heba's engine.

What the published trainer does (salimkhazem/adaptertune ``src/train/trainer.py``,
``scripts/train.py``), and heba with it:

1. **Data.** A whole training set (not few shots) minus a seeded 10% validation
   split, and the test set (:func:`heba.data.vision.load_vision_dataset`: the
   published readers, split rule and transforms). The loader shuffles and keeps
   the last partial batch.
2. **Model.** The timm backbone with a new ``N``-class linear head, wired by
   ``cfg.method`` (:mod:`heba.train.backbones.timm`).
3. **Step.** ``logits = model(images)``, ``cross_entropy(label_smoothing)`` (0),
   backward, ``clip_grad_norm_(1.0)``, AdamW step, then the per-step cosine with
   warm-up (:mod:`heba.train.optim`).
4. **Evaluation.** Top-1 and top-5 (``k <= N`` only) and the loss on the
   validation split after every epoch; the test split once, after the last
   epoch, with the *last* epoch's model (the published ``best.pt`` is saved at
   the best validation top-1 but not what the test reports). The best
   validation epoch is kept in the summary.

A run folder holds what :class:`heba.train.recipe.TrainRecipe` writes
(:mod:`heba.train.run_folder`, checked first by :mod:`heba.train.preflight`):
``config.json``; per saved epoch one set ``epoch_<N>/`` with
``adapters.safetensors`` (every trained tensor: the adapters in their published
names, ``head.*``, or the whole model for ``full``), ``adapters.json`` (config,
epoch, accuracy, class names) and ``train_state.pt`` (optimizer, scheduler,
epoch, best validation; ``--resume``), the finished run's adapters copied to the
top; ``metrics.jsonl``
(``train`` / ``eval`` records with ``top1`` / ``top5`` / ``loss``);
``summary.md`` and ``summary.json`` (the published summary's keys:
``best_val_acc``, ``best_epoch``, ``test_acc``, plus ``test_acc5``).

Example::

    >>> from heba.train.config import make_config
    >>> cfg = make_config("adaptertune", model="timm:vit_small_patch16_224",
    ...                   source="vision", dataset="cifar10", root="/data")
    >>> # ClassifyRecipe(cfg, RunOptions(output="runs/c10")).run()["accuracy"]
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from heba.clip import checkpoints as ckpt
from heba.clip.wiring import count_parameters
from heba.train import backbones
from heba.train import optim
from heba.train import preflight
from heba.train import run_folder as rf
from heba.train.config import MODEL_FIELDS, Config, UsageError
from heba.train.evaluate import format_acc
from heba.train.graph import GraphedStep, graphs_reason, prepare_frozen
from heba.train.recipe import RunOptions, TrainRecipe, _isatty
from heba.train.runtime import (PRECISIONS, autocast_ctx, barrier, resolve_precision,
                                set_cpu_threads, setup_distributed)

__all__ = ["ClassifyStep", "ClassifyRecipe", "topk_correct", "evaluate_split", "build_data",
           "is_classification", "evaluate_checkpoint", "trainable_state", "DATASET_NAMES"]

# The command line's data set names -> heba.data.vision's.
DATASET_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN",
                 "oxford_pets": "OxfordIIITPet", "food101": "Food101",
                 "flowers102": "Flowers102", "fgvc_aircraft": "FGVCAircraft",
                 "tiny_imagenet": "TinyImageNet", "imagenet_r": "ImageNetR",
                 "imagefolder": "ImageFolder",
                 # the published configs/datasets/<name>.yaml names
                 "pets": "OxfordIIITPet", "flowers": "Flowers102", "fgvc": "FGVCAircraft",
                 "tinyimagenet": "TinyImageNet"}
TOPK = (1, 5)                      # published metrics.topk, those <= the class count


def is_classification(model: str) -> bool:
    """Whether ``--backbone model`` is run by this module (a ``timm:`` classifier)."""
    return getattr(backbones.library(model), "TASK", "clip") == "classify"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks) -> torch.Tensor:
    """``[len(ks)]`` float: how many rows of ``logits [B, C]`` have ``labels [B]`` in their top k.

    >>> topk_correct(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]]), torch.tensor([0, 2]),
    ...              (1, 2)).tolist()
    [0.0, 2.0]
    """
    top = logits.topk(max(ks), dim=1).indices                   # [B, kmax], sorted
    hit = top.eq(labels[:, None])
    return torch.stack([hit[:, :k].any(1).sum() for k in ks]).float()


class ClassifyStep(nn.Module):
    """``forward(images [B,3,H,W], labels [B]) -> (mean loss, top-k hit counts [len(ks)])``."""

    text_adapted = False            # for heba.train.recipe.graphs_reason

    def __init__(self, model: nn.Module, ks, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.ks, self.label_smoothing = model, tuple(ks), label_smoothing

    def forward(self, images, labels):
        logits = self.model(images).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return loss, topk_correct(logits.detach(), labels, self.ks)


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
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
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


def build_data(cfg):
    """The :class:`heba.data.vision.VisionData` of ``cfg`` (PIL images; transforms set later)."""
    from heba.data.vision import load_vision_dataset
    name = DATASET_NAMES.get(str(cfg.dataset).lower(), cfg.dataset)
    try:
        data = load_vision_dataset(name, cfg.root, seed=cfg.seed, val_split=cfg.val_split,
                                   transforms=(None, None))
    except (FileNotFoundError, ValueError, ImportError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"--dataset {cfg.dataset} --root {cfg.root}: {msg}") from None
    if len(data.train) == 0 or len(data.test) == 0 or data.num_classes < 2:
        raise UsageError(f"{cfg.dataset} under {cfg.root}: {len(data.train)} training and "
                         f"{len(data.test)} test images of {data.num_classes} classes; "
                         f"need both and at least 2 classes")
    return data


def _set_transforms(data, train_tf, eval_tf):
    data.train.transform, data.val.transform, data.test.transform = train_tf, eval_tf, eval_tf


def head_prefix(model) -> str:
    head = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is head) + "."


def trainable_state(model, method: str) -> dict:
    """Every tensor a run trains, by name: HeBA's container keys + ``head.*``; otherwise the
    model's own state-dict names of the trainable parameters (AdapterTune: the published
    ``blocks.<i>.adapter.*`` + ``head.*``); ``full``: the whole state dict."""
    if method == "full":
        return dict(model.state_dict())
    if method == "heba":
        pre = head_prefix(model)
        out = dict(model.heba_adapters.state_dict())
        out.update({pre + k: v for k, v in model.get_classifier().state_dict().items()})
        return out
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, method: str, state: dict, name: str) -> None:
    """Load :func:`trainable_state` ``state`` into ``model`` (wired as the run was); checked."""
    own = trainable_state(model, method)
    missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unknown or bad:
        raise ckpt.CheckpointError(f"{name} does not fit the model: missing {missing[:4]}, "
                                   f"unexpected {unknown[:4]}, other shapes {bad[:4]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k].to(v.dtype))


def trainable_writers(model, method: str, meta: dict) -> dict:
    """``{"adapters.safetensors": write(path), "adapters.json": write(path)}``: the
    :func:`trainable_state` (taken now) and ``meta``; one file each."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in trainable_state(model, method).items()}
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    return {rf.CKPT_NAME: lambda path: save_file(state, path, metadata={"format": "pt"}),
            rf.CKPT_JSON: lambda path: rf.write_text(path, text)}


def save_trainable(path: str, model, method: str, meta: dict) -> None:
    """``path`` (safetensors) + ``path.json``: :func:`trainable_state` and ``meta``; JSON last."""
    writers = trainable_writers(model, method, meta)
    rf.atomic_write(path, writers[rf.CKPT_NAME])
    rf.atomic_write(rf.config_path(path), writers[rf.CKPT_JSON])


class ClassifyRecipe(TrainRecipe):
    """:class:`TrainRecipe`'s stages for a classifier (module docstring); same folder, resume."""

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Check everything that can fail on bad input, then build; nothing is written here."""
        cfg, opts = self.cfg, self.opts
        self.rank, self.world, self.device = setup_distributed(opts.device)
        self.plan = preflight.validate(cfg, opts, self.device)
        if self.device.type == "cpu":
            set_cpu_threads(opts.threads)
        self.precision = resolve_precision(cfg.precision, self.device, cfg.gpu_precision)
        self.ck_path = os.path.join(opts.output, rf.CKPT_NAME)
        self.latest = self.plan.latest
        if opts.checkpoint_blocks:
            raise UsageError("--checkpoint-blocks is for open_clip towers, not timm backbones")
        self.data = build_data(cfg)                # the data set first: cheapest to check
        self.ks = tuple(k for k in TOPK if k <= self.data.num_classes)
        lib = backbones.library(cfg.model)
        torch.manual_seed(cfg.seed)                # published set_seed: the head's init
        bb = lib.load(cfg, opts.allow_download, num_classes=self.data.num_classes)
        _set_transforms(self.data, bb.train_transform, bb.eval_transform)
        self.model = lib.attach(bb.model, cfg, opts.backend).to(self.device)
        self.fast_notes = self._fast_setup()
        self.step = ClassifyStep(self.model, self.ks, cfg.label_smoothing)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._build_optimizer()
        self.best = dict(best_val_acc=0.0, best_epoch=None)
        self.start_epoch = 0 if self.latest is None else self._load_state(self.plan)
        self.graph_off = graphs_reason(opts, self.device, self.world, self.precision,
                                       self.model, self.step, self.opt)
        self.fast_notes.append("CUDA graphs " + ("on" if self.graph_off is None
                                                 else f"off ({self.graph_off})"))
        self.train_step = self.step
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.train_step = DDP(self.step, device_ids=[self.device.index]
                                  if self.device.type == "cuda" else None)

    def _fast_setup(self) -> list:
        if self.precision != "fp32" and self.opts.cast_once and \
                getattr(self.model, "heba_adapters", None) is not None:
            prepare_frozen(self.model, PRECISIONS[self.precision])
            return [f"frozen backbone cast once to {self.precision}"]
        return [f"backbone kept in {'fp32' if self.precision == 'fp32' else 'fp32 + autocast'}"]

    def _load_state(self, plan) -> int:
        from safetensors.torch import load_file
        path = plan.latest.file(rf.CKPT_NAME)
        load_trainable(self.model, self.cfg.method, load_file(path), path)
        state = plan.state
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.best = dict(state.get("best", self.best))
        policy = getattr(self.model, "heba_policy", None)
        if "scale_policy" in state and policy is not None:
            policy.load_state_dict(state["scale_policy"])     # the slow-fast stream goes on
        return plan.start_epoch

    # --- train ---------------------------------------------------------------------------

    def train(self) -> Optional[dict]:
        """Every epoch from ``start_epoch``: train, validate; test after the last (rank 0)."""
        cfg, opts = self.cfg, self.opts
        self.metrics_path = os.path.join(opts.output, rf.METRICS_NAME)
        if self.rank == 0:
            self._prepare_folder()              # TrainRecipe's: the plan's first writes
        barrier(self.world)
        self._announce()
        if self.plan.note:
            self.log(self.plan.note)
        if self.plan.mode == "finished":
            return self._already_finished()
        self.model.train()
        self.graphed = GraphedStep(self._forward, self.params, enabled=self.graph_off is None)
        test = None
        for epoch in range(self.start_epoch, cfg.epochs):
            rec = self.train_epoch(epoch)
            self.record(rec)
            val = self._validate(epoch + 1) if self.rank == 0 else None
            if not opts.quiet:
                self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {rec['loss']:.3f}  "
                         f"lr {rec['lr']:.2e}  {rec['img_per_s']:.0f} img/s"
                         + (f"  val {format_acc(_acc(val))}" if val else ""))
            if self.rank == 0 and epoch + 1 == cfg.epochs:
                test = self.evaluate()
                self.record(dict(event="eval", split="test", epoch=epoch + 1, **test))
            if self.rank == 0:
                self.save_checkpoint(epoch + 1, dict(val=val, test=test))
            barrier(self.world)
        if self.rank == 0 and test is not None:
            self._finish(test)
        return None if test is None else _acc(test)

    def _validate(self, epoch: int) -> Optional[dict]:
        if len(self.data.val) == 0:
            return None
        val = self.evaluate(self.data.val)
        self.record(dict(event="eval", split="val", epoch=epoch, **val))
        if val["top1"] > self.best["best_val_acc"]:          # published: strictly better
            self.best = dict(best_val_acc=val["top1"], best_epoch=epoch)
        return val

    def _announce(self):
        cfg, d = self.cfg, self.data
        trainable, total = count_parameters(self.model)
        self.log(f"heba-train: {cfg.method} ({cfg.recipe} recipe) on {cfg.model} "
                 f"({cfg.pretrained}), {d.name} ({cfg.root}): {d.num_classes} classes, "
                 f"{len(d.train)} train / {len(d.val)} val / {len(d.test)} test images; "
                 f"{trainable:,} trainable of {total:,} parameters; device {self.device}"
                 + (f" x{self.world}" if self.world > 1 else "") + f", {self.precision}")
        self.log("fast path: " + "; ".join(self.fast_notes))

    def _forward(self, images, labels):
        with autocast_ctx(self.device, self.precision, cache=self.graph_off is not None):
            loss, hits = self.train_step(images, labels)
        return self.scaler.scale(loss), loss, hits

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training set (published ``train_one_epoch``); the metrics record."""
        from tqdm import tqdm
        cfg, seed = self.cfg, self.cfg.seed * 100_003 + epoch * 1_009 + self.rank
        torch.manual_seed(seed)                   # augmentations (global RNG)
        loader = self._loader(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=self.rank != 0 or self.opts.quiet or not _isatty(sys.stderr),
                   file=sys.stderr, dynamic_ncols=True)
        t0, seen, n = time.time(), 0, 0
        loss_sum = torch.zeros((), device=self.device)          # read once, at the end
        hit_sum = torch.zeros(len(self.ks), device=self.device)
        for images, labels in bar:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            self.opt.zero_grad(set_to_none=True)
            _, loss, hits = self.graphed(images, labels)
            optim.clip_gradients(self.params, cfg.grad_clip, self.scaler, self.opt)
            self.scaler.step(self.opt)
            self.scaler.update()
            if cfg.schedule == "step":
                self.sched.step()
            n, seen = n + 1, seen + len(labels)
            loss_sum += loss.float() * len(labels)
            hit_sum += hits
        bar.close()
        lr = self.lr()
        if cfg.schedule == "epoch":
            self.sched.step()
        dt = time.time() - t0
        rec = dict(event="train", epoch=epoch + 1, step=(epoch + 1) * len(loader),
                   loss=loss_sum.item() / max(seen, 1), lr=lr,
                   img_per_s=seen * self.world / max(dt, 1e-9), seconds=dt,
                   graph_replays=self.graphed.replays)
        rec.update({f"top{k}": 100.0 * h / max(seen, 1) for k, h in zip(self.ks,
                                                                       hit_sum.tolist())})
        if self.device.type == "cuda":
            rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return rec

    # --- evaluate, save, finish ----------------------------------------------------------

    def evaluate(self, ds=None) -> dict:
        """``{"loss", "top1", "top5"}`` on the test split (or ``ds``)."""
        return evaluate_split(self.model, self.data.test if ds is None else ds, self.device,
                              self.precision, self.ks, self.cfg.test_batch_size,
                              self.opts.workers, self.cfg.label_smoothing)

    def save_checkpoint(self, epoch: int, acc: Optional[dict]) -> None:
        """The trained tensors + config (safetensors + JSON) and the optimizer state."""
        state = dict(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                     epoch=epoch, best=self.best)
        policy = getattr(self.model, "heba_policy", None)
        if policy is not None:
            state["scale_policy"] = policy.state_dict()
        files = trainable_writers(self.model, self.cfg.method,
                                  dict(self.cfg.to_dict(), epoch=epoch, accuracy=acc,
                                       classnames=list(self.data.classnames)))
        files[rf.STATE_NAME] = lambda path: torch.save(state, path)
        self.latest = rf.write_set(self.opts.output, epoch, files)

    def _already_finished(self):
        """A finished run resumed: its saved test accuracy; the final files if missing."""
        if self.rank != 0:
            return None
        test = (self.plan.saved.get("accuracy") or {}).get("test")
        if test is None:
            return None
        if not rf.is_published(self.opts.output, self.latest):
            self._finish(test)
        else:
            self.log(f"after training: test {format_acc(_acc(test))}")
        return _acc(test)

    def _finish(self, test: dict) -> None:
        trainable, total = count_parameters(self.model)
        summary = dict(best_val_acc=self.best["best_val_acc"], best_epoch=self.best["best_epoch"],
                       test_acc=test["top1"], test_acc5=test.get("top5"), test_loss=test["loss"],
                       trainable_params=trainable, total_params=total)
        text = json.dumps(summary, indent=2) + "\n"
        out = self.opts.output
        rf.atomic_write(os.path.join(out, "summary.json"), lambda tmp: open(tmp, "w").write(text))
        c = self.cfg
        rows = "".join(f"| test top-{k} | {test[f'top{k}']:.2f} |\n" for k in self.ks)
        if summary["best_epoch"] is not None:
            rows += f"| best val top-1 (epoch {summary['best_epoch']}) | " \
                    f"{summary['best_val_acc']:.2f} |\n"
        md = (f"# {c.recipe}: {c.method} on {c.model}, {self.data.name}, seed {c.seed}\n\n"
              f"{trainable:,} trainable of {total:,} parameters; test: the last epoch's model\n\n"
              f"| metric | % |\n|---|---|\n{rows}")
        rf.publish_final(out, self.latest, md)     # adapters + JSON from the last set, summary.md
        self.log(f"after training: test {format_acc(_acc(test))}")
        self.log(f"checkpoint: {self.ck_path}; metrics: {self.metrics_path}")


def _acc(metrics: dict) -> dict:
    """``{"top-1": .., "top-5": ..}`` of an evaluation record (for :func:`format_acc`)."""
    return {f"top-{k[3:]}": v for k, v in metrics.items() if k.startswith("top")}


# --- the command line's side: configuration, seeds, evaluating a checkpoint -----------------

HEBA_ADAPTER_FIELDS = ("start", "end", "reduction", "slow_fast_ratio", "rank", "every", "alpha")


def data_source(over: dict) -> dict:
    """``over`` with the command line's data (``--dataset`` / a folder) as ``source="vision"``."""
    over = dict(over)
    if over.get("source") == "folder":
        over.update(source="vision", root=over["dataset"], dataset="imagefolder")
    elif over.get("source") == "coop":
        over["source"] = "vision"
    if over.get("source") == "vision":
        known = DATASET_NAMES
        if str(over.get("dataset")).lower() not in known:
            raise UsageError(f"--dataset {over.get('dataset')}: a timm backbone trains on "
                             f"{', '.join(n for n in known if n != 'imagefolder')} (under "
                             f"--root DIR) or an ImageFolder path")
    return over


def config_from_cli(over: dict, recipe: Optional[str]) -> Config:
    """The :class:`Config` of a ``timm:NAME`` command line (default recipe ``adaptertune``).

    ``--method heba`` takes HeBA's adapter settings (the ``heba`` recipe's) unless given;
    ``--model-kwargs`` is JSON.
    """
    from heba.train.config import RECIPES, make_config
    over = data_source(over)
    if over.get("source") != "vision":
        raise UsageError(f"--backbone {over.get('model')}: give --dataset NAME --root DIR or "
                         f"an ImageFolder path (no built-in demo data for a classifier)")
    kw = over.get("model_kwargs")
    if isinstance(kw, str):
        try:
            over["model_kwargs"] = json.loads(kw)
        except json.JSONDecodeError as err:
            raise UsageError(f"--model-kwargs is not JSON: {err}") from None
        if not isinstance(over["model_kwargs"], dict):
            raise UsageError(f"--model-kwargs must be a JSON object, got {kw}")
    recipe = recipe or "adaptertune"
    if over.get("method") == "heba" and recipe in RECIPES and \
            RECIPES[recipe].get("method") != "heba":
        heba_defaults = Config()
        for f in HEBA_ADAPTER_FIELDS:
            over.setdefault(f, getattr(heba_defaults, f))
        over.setdefault("towers", "visual")
    over.setdefault("pretrained", backbones.library(over["model"]).DEFAULT_PRETRAINED)
    return make_config(recipe, **over)


def run(cfg: Config, opts: RunOptions, seeds=None, log=print) -> dict:
    """One run, or one per seed (``<output>/seed<S>``) and ``classification.json`` / ``.md``:
    test top-1 / top-5 per seed, mean +- std (published: seeds 0, 1, 2)."""
    import dataclasses
    from heba.train import protocols
    if not seeds:
        return ClassifyRecipe(cfg, opts, log).run()
    protocols._check_seeds(seeds, opts, cfg)   # and every seed folder's plan, first
    runs = [dataclasses.replace(cfg, seed=s) for s in seeds]
    for c in runs:                      # every seed's data checked before anything is written
        build_data(c)
    rows = {}
    for c in runs:
        log(f"== classification, {c.dataset}, seed {c.seed}")
        acc = ClassifyRecipe(c, protocols._seed_opts(opts, c.seed), log).run()["accuracy"]
        if acc is not None:
            rows[c.seed] = acc
    if not rows:
        return {}
    cols = tuple(k for k in ("top-1", "top-5") if all(k in r for r in rows.values()))
    ms = {k: protocols.mean_std(r[k] for r in rows.values()) for k in cols}
    result = dict(protocol="classification", dataset=cfg.dataset, recipe=cfg.recipe,
                  seeds=list(rows), per_seed=rows, mean={k: v[0] for k, v in ms.items()},
                  std={k: v[1] for k, v in ms.items()})
    protocols._write(opts.output, "classification", result, cols, log)
    return result


def find_checkpoint(path: str) -> Optional[str]:
    """heba's ``adapters.safetensors`` (or its folder), or a published ``last.pt`` / ``best.pt``."""
    if os.path.isdir(path):
        for name in ("adapters.safetensors", "last.pt", "best.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        latest = rf.read_set(path)            # an unfinished heba run: its latest epoch
        return latest.file(rf.CKPT_NAME) if latest else None
    return path if os.path.isfile(path) else None


def handles_checkpoint(path: str, over: dict) -> bool:
    """Whether ``heba-train evaluate --checkpoint path`` is a classifier's (timm) evaluation."""
    file = find_checkpoint(path)
    if file and file.endswith(".safetensors") and os.path.isfile(rf.config_path(file)):
        return is_classification(ckpt.read_config(file).get("model", ""))
    return is_classification(over.get("model", ""))


def _heba_checkpoint(file: str, over: dict):
    saved = ckpt.read_config(file)
    bad = [f"{k}: checkpoint {saved.get(k)!r} vs now {over[k]!r}"
           for k in MODEL_FIELDS + ("pretrained",) if k in over and over[k] != saved.get(k)]
    if bad:
        raise UsageError(f"checkpoint {file} is from another configuration ({'; '.join(bad)})")
    data = {k: v for k, v in data_source(over).items()
            if k in ("source", "dataset", "root", "val_split", "precision")}
    return Config.from_dict(dict(saved, **data)), saved


def evaluate_checkpoint(path: str, over: dict, opts: RunOptions, log=print) -> dict:
    """Test top-1 / top-5 of heba's classifier checkpoint or a published AdapterTune
    ``best.pt`` / ``last.pt`` (then ``--backbone timm:NAME --dataset ... --root`` say which
    backbone and data; ``--method full`` for a published full fine-tuning run)."""
    from safetensors.torch import load_file
    file = find_checkpoint(path)
    if file is None:
        raise ckpt.CheckpointError(f"checkpoint {path} does not exist (adapters.safetensors, "
                                   f"a published last.pt / best.pt, or their folder)")
    heba_own = file.endswith(".safetensors")
    if heba_own:
        cfg, saved = _heba_checkpoint(file, over)
    else:
        cfg, saved = config_from_cli(over, None), None
    _, _, device = setup_distributed(opts.device)
    if device.type == "cpu":
        set_cpu_threads(opts.threads)
    precision = resolve_precision(cfg.precision, device, cfg.gpu_precision)
    data = build_data(cfg)
    if saved is not None and saved.get("classnames") not in (None, list(data.classnames)):
        raise UsageError(f"{file} was trained on other classes than {cfg.dataset} has here")
    lib = backbones.library(cfg.model)
    torch.manual_seed(cfg.seed)
    model = lib.load(cfg, opts.allow_download, num_classes=data.num_classes).model
    if heba_own:
        model = lib.attach(model, cfg, opts.backend)
        load_trainable(model, cfg.method, load_file(file), file)
    else:
        _load_published(model, file, cfg, opts.backend)
    ks = tuple(k for k in TOPK if k <= data.num_classes)
    data.test.transform = _eval_transform(lib, model)
    acc = evaluate_split(model.to(device), data.test, device, precision, ks,
                         cfg.test_batch_size, opts.workers, cfg.label_smoothing)
    log(f"{file}: test {format_acc(_acc(acc))}  loss {acc['loss']:.6f}")
    return _acc(acc)


def _eval_transform(lib, model):
    from heba.data.vision import build_transforms
    return build_transforms(lib.input_size(model))[1]


def _load_published(model, file: str, cfg: Config, backend: str) -> None:
    """A published AdapterTune checkpoint: adapters + head (checked backbone), or everything."""
    from heba import timm as heba_timm
    if cfg.method == "full":
        state = heba_timm._model_state(heba_timm._read(file)[1], file)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ckpt.CheckpointError(f"{file} does not fit {cfg.model}: "
                                       f"{str(err).splitlines()[0]}") from None
        return
    heba_timm.load_published_checkpoint(model, file, alpha=cfg.alpha or 1.0, backend=backend)
