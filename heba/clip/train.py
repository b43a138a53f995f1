"""Few-shot training and evaluation of HeBA / AdapterTune adapters on a frozen CLIP.

The engine behind ``heba-train`` (:mod:`heba.cli`); :func:`run_train` and
:func:`run_evaluate` take the parsed arguments. One process, or one per GPU
under ``torchrun`` (DistributedDataParallel over the adapter parameters only).

Training step (HeBA recipe): image features from the adapted image tower;
class embeddings from the adapted text tower for the batch's classes and
``neg_classes`` sampled negatives per image (all classes when there are
fewer), cosine logits times CLIP's logit scale, cross-entropy with label
smoothing over each image's candidates; SGD with momentum, cosine schedule
per step. The scale of every HeBA adapter follows the model's
:class:`heba.clip.wiring.ScalePolicy` (slow-fast while training).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from heba.clip import checkpoints as ckpt
from heba.clip import data as D
from heba.clip.prompts import TextBank, class_prompts, load_descriptions
from heba.clip.fast import GraphedStep, checkpoint_frozen_blocks, prepare_frozen
from heba.clip.wiring import ScalePolicy, attach_adaptertune, attach_heba, count_parameters

CKPT_NAME = "adapters.safetensors"
DEFAULT_OUTPUT = "runs/heba"
BAR_EVERY = 10          # training steps between progress-bar updates (each reads the loss)
DEMO_OUTPUT = "runs/demo"
STATE_NAME = "train_state.pt"
# Configuration fields a checkpoint must share with the run that loads it.
MODEL_FIELDS = ("method", "model", "towers", "start", "end", "reduction", "rank", "every",
                "alpha")
RESUME_FIELDS = MODEL_FIELDS + ("pretrained", "dataset", "split", "shots", "seed", "classes",
                                "epochs", "batch_size", "lr")


# --- environment -----------------------------------------------------------------------------

class _NetworkGuard:
    """Refuse every outgoing connection inside the block (remembering that one was tried)."""

    def __init__(self, allowed: bool):
        self.allowed, self.tripped, self._saved = allowed, None, None

    def __enter__(self):
        if self.allowed:
            return self
        guard = self

        def refuse(*args, **kwargs):
            guard.tripped = args[1] if len(args) > 1 else (args[0] if args else "?")
            raise OSError("network access is disabled by heba-train (pass --allow-download)")

        self._saved = (socket.socket.connect, socket.create_connection, socket.getaddrinfo)
        socket.socket.connect = lambda self_, *a, **k: refuse(self_, *a, **k)
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        # huggingface_hub: answer from the local cache at once (no retries with
        # back-off against the refused socket), and keep its warnings quiet.
        self._hf = None
        try:
            from huggingface_hub import constants
            self._hf = (constants, constants.HF_HUB_OFFLINE)
            constants.HF_HUB_OFFLINE = True
        except Exception:
            pass
        logging.disable(logging.ERROR)
        return self

    def __exit__(self, *exc):
        if self._saved:
            socket.socket.connect, socket.create_connection, socket.getaddrinfo = self._saved
            logging.disable(logging.NOTSET)
            if self._hf is not None:
                self._hf[0].HF_HUB_OFFLINE = self._hf[1]
        return False


def set_cpu_threads(n: Optional[int]) -> int:
    """Intra-op threads on the CPU: ``n``, or as many cores as other processes leave idle.

    Measured on a 2-core machine whose other processes kept ~4 threads busy:
    a tiny-CLIP training step took 0.37 s with 1 thread and 8 s with 2 (OpenMP
    threads spin-waiting for a core), so a busy machine gets fewer threads.
    """
    if n is None:
        cores = os.cpu_count() or 1
        try:
            idle = cores - os.getloadavg()[0]
        except OSError:
            idle = cores
        n = max(1, min(torch.get_num_threads(), int(idle + 0.5)))
    torch.set_num_threads(n)
    return n


def setup_distributed(device_arg: str):
    """``(rank, world, device)``; joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise D.UsageError("--device cuda but no CUDA GPU is visible")
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        if want_cuda:
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        return rank, world, torch.device("cpu")
    return 0, 1, torch.device("cuda" if want_cuda else "cpu")


def _barrier(world):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_ctx(device, precision, cache: bool = True):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision], cache_enabled=cache)


def resolve_precision(precision, device):
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


# --- model -----------------------------------------------------------------------------------

def load_clip(name: str, pretrained: Optional[str], allow_download: bool):
    """``(model, train_transform, eval_transform, tokenizer, info)``; no network unless allowed.

    ``name="tiny"``: the demo's tiny CLIP; ``pretrained`` ``"builtin"`` (the
    shipped weights), ``"none"`` (random) or a local weights file. Other names
    are open_clip models; ``pretrained`` a tag (``openai``, ...), a local file,
    or ``"none"``.
    """
    import open_clip
    from heba.clip import synthetic, tiny
    pre = None if pretrained in (None, "", "none") else pretrained
    # A randomly initialised model (pretrained "none", for tests) must be the same
    # model when a checkpoint is evaluated or resumed: draw it from a fixed seed.
    torch.manual_seed(0)
    if name == "tiny":
        if pre not in (None, "builtin") and not os.path.isfile(pre):
            raise D.UsageError(f"--pretrained {pre}: no such file (the tiny model takes "
                               f"'builtin', 'none' or a weights file)")
        model, tok = tiny.load_tiny_clip(pretrained=pre == "builtin")
        if pre not in (None, "builtin"):
            _load_weights_file(model, pre)
        size = tiny.CONFIG["vision_cfg"]["image_size"]
        mean, std = synthetic.MEAN, synthetic.STD
        from open_clip.transform import image_transform
        return (model, image_transform(size, True, mean, std),
                image_transform(size, False, mean, std), tok)
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower() in m.lower()][:5]
        raise D.UsageError(f"unknown model {name!r}" + (f" (did you mean {', '.join(close)}?)"
                                                        if close else
                                                        "; see open_clip.list_models()"))
    if pre is not None and not os.path.isfile(pre):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pre not in tags:
            raise D.UsageError(f"--pretrained {pre!r} is neither a file nor a tag of {name} "
                               f"({', '.join(tags) or 'none'})")
    guard = _NetworkGuard(allow_download)
    try:
        with guard:
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(name, pretrained=pre)
            tok = open_clip.get_tokenizer(name)
    except Exception as err:
        if guard.tripped is not None or (not allow_download and pre is not None
                                         and not os.path.isfile(pre)):
            raise D.UsageError(f"{name} / {pre} is not in the local cache and downloading is "
                               f"off: pass --allow-download, or --pretrained /path/to/file")
        raise D.UsageError(f"cannot build {name} with pretrained={pre}: "
                           f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return model.eval(), train_tf, eval_tf, tok


def _load_weights_file(model, path):
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in state.items()})
    except Exception as err:
        raise D.UsageError(f"cannot load weights {path}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0]}") from None


def attach(model, cfg: dict, backend: str = "auto"):
    """Wire the adapters ``cfg`` describes (the same for training, resuming, evaluating)."""
    if cfg["method"] == "heba":
        policy = ScalePolicy(base_scale=cfg["base_scale"], novel_scale=cfg["novel_scale"],
                             scale_factor=cfg["scale_factor"],
                             slow_fast_ratio=cfg["slow_fast_ratio"], seed=cfg["seed"])
        try:
            attach_heba(model, towers_=cfg["towers"], start=cfg["start"], end=cfg["end"],
                        reduction=cfg["reduction"], policy=policy, backend=backend)
        except ValueError as err:
            raise D.UsageError(str(err)) from None
    else:
        attach_adaptertune(model, towers_=cfg["towers"], rank=cfg["rank"], every=cfg["every"],
                           alpha=cfg["alpha"], backend=backend)
    return model


class AdapterStep(nn.Module):
    """One training step's forward, as the module DistributedDataParallel wraps.

    It registers the adapters only (DDP broadcasts and all-reduces nothing
    else); the frozen CLIP is held by reference.
    """

    def __init__(self, model, bank: TextBank, neg_classes: int, label_smoothing: float):
        super().__init__()
        self.adapters = model.heba_adapters
        self._model = (model,)
        self.bank, self.neg_classes, self.label_smoothing = bank, neg_classes, label_smoothing
        self.text_adapted = any(n.startswith(("text_adapter", "text_blocks"))
                                for n, _ in self.adapters.named_parameters())
        self._frozen_text = None

    @property
    def model(self):
        return self._model[0]

    def class_features(self, classes: Optional[torch.Tensor]):
        if self.text_adapted:
            return self.bank.features(self.model, classes)
        if self._frozen_text is None:             # frozen text tower: encode every class once
            with torch.no_grad():
                self._frozen_text = self.bank.features(self.model)
        return self._frozen_text if classes is None else self._frozen_text[classes]

    def forward(self, images, labels, candidates: Optional[torch.Tensor]):
        img = F.normalize(self.model.encode_image(images).float(), dim=-1)       # [B, E]
        scale = self.model.logit_scale.exp().float()
        if not self.text_adapted:
            # Frozen text: every class embedding exists already; gather the candidates'
            # logits (no torch.unique, hence no host sync: a CUDA graph can hold this step).
            logits = scale * img @ self.class_features(None).T                # [B, C]
            if candidates is None:
                target = labels
            else:
                logits, target = logits.gather(1, candidates), torch.zeros_like(labels)
        elif candidates is None:                      # every class is a candidate
            txt = self.class_features(None)                                    # [C, E]
            logits, target = scale * img @ txt.T, labels
        else:                                         # [B, 1 + k]: true class first
            needed, inv = torch.unique(candidates, return_inverse=True)
            txt = self.class_features(needed)                                  # [U, E]
            logits = (scale * img @ txt.T).gather(1, inv)                      # [B, 1 + k]
            target = torch.zeros_like(labels)
        loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        return loss, (logits.argmax(1) == target).float().mean()


def sample_candidates(labels, n_classes: int, k: int, generator) -> Optional[torch.Tensor]:
    """``[B, 1 + k]``: each label, then ``k`` other classes drawn without replacement.

    None when ``k`` covers every other class (then all classes are candidates).
    One ``multinomial`` call for the whole batch.
    """
    if k <= 0 or k >= n_classes - 1:
        return None
    w = torch.ones(len(labels), n_classes, device=labels.device)
    w.scatter_(1, labels[:, None], 0.0)
    neg = torch.multinomial(w, k, replacement=False, generator=generator)      # [B, k]
    return torch.cat([labels[:, None], neg], 1)


# --- data ------------------------------------------------------------------------------------

def build_data(cfg: dict, train_tf, eval_tf, test_per_class: Optional[int]):
    """``(classes, train_ds [train classes], {split: (class indices, test_ds)})``."""
    if cfg["dataset"] is None:
        classes, train, test = D.builtin_splits(cfg["shots"], cfg["seed"],
                                                test_per_class=test_per_class or 40)
        train_labels, test_labels = train.labels.tolist(), test.labels.tolist()
    else:
        classes, train_items, test_items = D.folder_splits(cfg["dataset"], cfg["shots"],
                                                           cfg["seed"], test_per_class)
        train, test = D.ImageList(train_items, train_tf), D.ImageList(test_items, eval_tf)
        train_labels, test_labels = [y for _, y in train_items], [y for _, y in test_items]
    n = len(classes)
    if cfg["split"] == "base2novel":
        if n < 2:
            raise D.UsageError("base-to-novel needs at least 2 classes (or use --split all)")
        base, novel = D.base_novel(n)
        evals = {"base": (base, D.Relabel(test, test_labels, base)),
                 "novel": (novel, D.Relabel(test, test_labels, novel))}
        train_ds = D.Relabel(train, train_labels, base)
        train_classes = base
    else:
        evals = {"all": (list(range(n)), test)}
        train_ds, train_classes = train, list(range(n))
    return classes, train_ds, train_classes, evals


def make_bank(classes, idx, tokenizer, cfg, device):
    names = [classes[i] for i in idx]
    if cfg.get("descriptions"):
        every = load_descriptions(cfg["descriptions"], classes)        # checked against all
        prompts = class_prompts(names, descriptions={c: every[c] for c in names})
    else:
        prompts = class_prompts(names, templates=cfg.get("templates"))
    return TextBank(prompts, tokenizer, len(names), device=device)


# --- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, evals: dict, banks: dict, device, precision, batch_size, workers=0):
    """``{split: accuracy %}`` (and ``"hm"``, the harmonic mean of base and novel)."""
    was = model.training
    model.eval()
    policy = getattr(model, "heba_policy", None)
    out = {}
    try:
        for split, (_, ds) in evals.items():
            if policy is not None:
                policy.set_mode("novel" if split == "novel" else "base")
            with autocast_ctx(device, precision):
                txt = banks[split].features(model)                                 # [C, E]
            correct = total = 0
            loader = torch.utils.data.DataLoader(ds, batch_size=max(batch_size, 64),
                                                 num_workers=workers)
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                with autocast_ctx(device, precision):
                    img = F.normalize(model.encode_image(images).float(), dim=-1)
                correct += (img @ txt.float().T).argmax(1).eq(labels).sum().item()
                total += len(labels)
            out[split] = 100.0 * correct / max(total, 1)
    finally:
        if policy is not None:
            policy.set_mode("base")
        model.train(was)
    if "base" in out and "novel" in out:
        b, n = out["base"], out["novel"]
        out["hm"] = 2 * b * n / (b + n) if b + n > 0 else 0.0
    return out


def format_acc(acc: dict) -> str:
    names = {"base": "base", "novel": "novel", "hm": "HM", "all": "accuracy"}
    return "  ".join(f"{names[k]} {v:5.1f}%" for k, v in acc.items())


# --- training --------------------------------------------------------------------------------

def run_config(args) -> dict:
    """The configuration saved with a checkpoint (and compared on --resume / evaluate)."""
    method = args.method
    towers = args.towers or ("both" if method == "heba" else "visual")
    model = args.model or ("tiny" if args.dataset is None else "ViT-B-16")
    pretrained = args.pretrained or ("builtin" if model == "tiny" else "openai")
    return dict(
        method=method, model=model, pretrained=pretrained, towers=towers,
        start=args.start if method == "heba" else None,
        end=args.end if method == "heba" else None,
        reduction=args.reduction if method == "heba" else None,
        rank=args.rank if method == "adaptertune" else None,
        every=args.every if method == "adaptertune" else None,
        alpha=args.alpha if method == "adaptertune" else None,
        base_scale=args.base_scale, novel_scale=args.novel_scale,
        scale_factor=args.scale_factor, slow_fast_ratio=args.slow_fast_ratio,
        dataset=os.path.abspath(args.dataset) if args.dataset else None,
        split=args.split, shots=args.shots, seed=args.seed,
        templates=list(args.template) if args.template else None,
        descriptions=os.path.abspath(args.descriptions) if args.descriptions else None,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        neg_classes=args.neg_classes,
    )


def check_same(saved: dict, cfg: dict, fields, path):
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {cfg.get(k)!r}" for k in fields
            if saved.get(k) != cfg.get(k)]
    if diff:
        raise D.UsageError(f"checkpoint {path} is from another configuration ({'; '.join(diff)})")


def fast_setup(model, args, precision) -> list:
    """Cast the frozen backbone once and checkpoint the frozen blocks, as ``args`` ask.

    Returns notes for the log. Casting once is numerically autocast (the backbone's
    matmuls ran in ``precision`` anyway) without re-casting ~all weights every step;
    the adapters keep fp32 master weights, LayerNorms and the logit scale stay fp32.
    """
    notes = []
    if precision != "fp32" and not args.no_cast_once:
        prepare_frozen(model, PRECISIONS[precision])
        notes.append(f"frozen backbone cast once to {precision}")
    else:
        notes.append("backbone kept in fp32" + (" (--no-cast-once)" if precision != "fp32"
                                                 else ""))
    if args.checkpoint_blocks:
        n = checkpoint_frozen_blocks(model, every=args.checkpoint_blocks)
        notes.append(f"{n} frozen blocks checkpointed")
    return notes


def graphs_reason(args, device, world, precision, model, step_mod) -> Optional[str]:
    """Why the training step cannot be a CUDA graph here (None when it can)."""
    if args.no_cuda_graphs:
        return "--no-cuda-graphs"
    if device.type != "cuda":
        return "not on a GPU"
    if world > 1:
        return "DistributedDataParallel"
    if precision == "fp16":
        return "fp16 loss scaling"
    if step_mod.text_adapted:
        return ("the text tower is adapted: which prompts a step encodes (negative sampling) "
                "and how many tokens it runs are decided on the host")
    policy = getattr(model, "heba_policy", None)
    if policy is not None and policy.slow_fast_ratio < 1.0:
        return "HeBA's slow-fast scale is drawn on the host per adapter call"
    return None


def run_train(args, log=print) -> nn.Module:
    """Train adapters as ``args`` says; returns the adapted model (on its device)."""
    from tqdm import tqdm
    rank, world, device = setup_distributed(args.device)
    if device.type == "cpu":
        set_cpu_threads(args.threads)
    is_main = rank == 0
    log = log if is_main else (lambda *a, **k: None)
    cfg = run_config(args)
    precision = resolve_precision(args.precision, device)
    out_dir = args.output
    overwrite = args.overwrite
    if out_dir is None:
        # The built-in demo writes runs/demo and may run again over its own last run;
        # a real run's default directory is never overwritten without --overwrite.
        out_dir = DEMO_OUTPUT if cfg["dataset"] is None else DEFAULT_OUTPUT
        overwrite = overwrite or (cfg["dataset"] is None and not args.resume)
    ck_path, state_path = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, STATE_NAME)
    has_ckpt = os.path.exists(ckpt._config_path(ck_path))
    if has_ckpt and not (args.resume or overwrite):
        raise D.UsageError(f"{out_dir} already holds a checkpoint: pass --resume to continue it "
                           f"or --overwrite to start over")
    if args.resume and not has_ckpt:
        raise D.UsageError(f"--resume: {out_dir} holds no checkpoint ({CKPT_NAME} + json)")
    if args.epochs < 1 or args.batch_size < 1 or args.shots < 1:
        raise D.UsageError("--epochs, --batch-size and --shots must be >= 1")
    if args.checkpoint_blocks < 0:
        raise D.UsageError(f"--checkpoint-blocks must be >= 0 (0: off), got {args.checkpoint_blocks}")

    # Everything that can fail on bad input happens before anything is written;
    # the data set is checked first, as it is the cheapest to check.
    if cfg["dataset"] is not None:
        D.folder_splits(cfg["dataset"], cfg["shots"], cfg["seed"], args.test_per_class)
    model, train_tf, eval_tf, tok = load_clip(cfg["model"], cfg["pretrained"],
                                              args.allow_download)
    classes, train_ds, train_classes, evals = build_data(cfg, train_tf, eval_tf,
                                                         args.test_per_class)
    cfg["classes"] = classes
    saved = None
    if args.resume:
        saved = ckpt.read_config(ck_path)
        check_same(saved, cfg, RESUME_FIELDS, ck_path)
    banks = {s: make_bank(classes, idx, tok, cfg, device) for s, (idx, _) in evals.items()}
    train_bank = make_bank(classes, train_classes, tok, cfg, device)

    torch.manual_seed(cfg["seed"])               # the same adapter init on every rank
    model = attach(model, cfg, args.backend).to(device)
    trainable, total = count_parameters(model)
    fast_notes = fast_setup(model, args, precision)
    step_mod = AdapterStep(model, train_bank, cfg["neg_classes"], cfg["label_smoothing"])
    params = [p for p in model.heba_adapters.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    sampler = None
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg["seed"])
    per_rank = math.ceil(len(train_ds) / world)
    steps_per_epoch = max(1, math.ceil(per_rank / cfg["batch_size"]))
    total_steps = steps_per_epoch * cfg["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16"
                                  and device.type == "cuda")
    start_epoch = 0
    if saved is not None:
        ckpt.load_adapters(ck_path, model)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("epoch") != saved.get("epoch"):
            raise D.UsageError(f"{out_dir}: {STATE_NAME} (epoch {state.get('epoch')}) and "
                               f"{CKPT_NAME} (epoch {saved.get('epoch')}) disagree")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        if "policy_rng" in state and getattr(model, "heba_policy", None) is not None:
            model.heba_policy._rng.setstate(_tuple(state["policy_rng"]))
    train_step = step_mod
    graph_off = graphs_reason(args, device, world, precision, model, step_mod)
    fast_notes.append("CUDA graphs " + ("on" if graph_off is None else f"off ({graph_off})"))
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_step = DDP(step_mod, device_ids=[device.index] if device.type == "cuda" else None,
                         gradient_as_bucket_view=True)

    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if is_main and not args.resume and os.path.exists(metrics_path):
        os.unlink(metrics_path)           # --overwrite: a fresh log

    def record(obj):
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(obj) + "\n")

    src = "built-in generated shapes" if cfg["dataset"] is None else cfg["dataset"]
    log(f"heba-train: {cfg['method']} on {cfg['model']} ({cfg['pretrained']}), {src}: "
        f"{len(classes)} classes, {len(train_classes)} trained, {cfg['shots']} shots; "
        f"{trainable:,} trainable of {total:,} parameters; device {device}"
        + (f" x{world}" if world > 1 else "") + f", {precision}")
    log("fast path: " + "; ".join(fast_notes))
    acc_before = None
    if start_epoch == 0 and not args.no_eval_before:
        if is_main:
            acc_before = evaluate(model, evals, banks, device, precision, cfg["batch_size"],
                                  args.workers)
            log(f"before training: {format_acc(acc_before)}")
            record(dict(event="eval", epoch=0, **acc_before))
        _barrier(world)

    gen = torch.Generator(device=device)
    pin = device.type == "cuda"
    model.train()

    def forward(images, labels, *cand):
        with autocast_ctx(device, precision, cache=graph_off is not None):
            loss, acc = train_step(images, labels, cand[0] if cand else None)
        return scaler.scale(loss), loss, acc

    graphed = GraphedStep(forward, params, enabled=graph_off is None)
    for epoch in range(start_epoch, cfg["epochs"]):
        # Every random draw of an epoch follows from (seed, epoch, rank), so a
        # resumed run is the uninterrupted one: augmentations (global RNG),
        # shuffling, negatives.
        torch.manual_seed(cfg["seed"] * 100_003 + epoch * 1_009 + rank)
        gen.manual_seed(cfg["seed"] * 100_003 + epoch * 1_009 + rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg["batch_size"],
                                                 sampler=sampler, num_workers=args.workers,
                                                 drop_last=False, pin_memory=pin)
        else:
            g = torch.Generator().manual_seed(cfg["seed"] * 7_919 + epoch)
            loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg["batch_size"],
                                                 shuffle=True, generator=g,
                                                 num_workers=args.workers, pin_memory=pin)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not is_main
                   or args.quiet, leave=False, file=sys.stderr, dynamic_ncols=True)
        t0, seen, n_batches = time.time(), 0, 0
        # Summed on the device; the host reads them every BAR_EVERY steps, not every step
        # (a sync per step would stop the host from queueing the next step's work).
        loss_sum = torch.zeros((), device=device)
        acc_sum = torch.zeros((), device=device)
        for images, labels in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            cand = sample_candidates(labels, train_bank.n_classes, cfg["neg_classes"], gen)
            opt.zero_grad(set_to_none=True)
            _, loss, acc = graphed(images, labels, *(() if cand is None else (cand,)))
            scaler.step(opt)
            scaler.update()
            sched.step()
            n_batches += 1
            seen += len(labels)
            loss_sum += loss.float()
            acc_sum += acc.float()
            if not bar.disable and (n_batches % BAR_EVERY == 0 or n_batches == len(loader)):
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                                img_s=f"{seen * world / max(time.time() - t0, 1e-9):.0f}")
        bar.close()
        loss_sum, acc_sum = loss_sum.item(), acc_sum.item()
        dt = time.time() - t0
        rec = dict(event="train", epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch,
                   loss=loss_sum / max(n_batches, 1), train_acc=100 * acc_sum / max(n_batches, 1),
                   lr=sched.get_last_lr()[0], img_per_s=seen * world / max(dt, 1e-9),
                   seconds=dt, graph_replays=graphed.replays)
        if device.type == "cuda":
            rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        record(rec)
        if not args.quiet:
            log(f"epoch {epoch + 1}/{cfg['epochs']}: loss {rec['loss']:.3f}  "
                f"lr {rec['lr']:.2e}  {rec['img_per_s']:.0f} img/s")
        ev = None
        last = epoch + 1 == cfg["epochs"]
        if is_main and (last or (args.eval_every and (epoch + 1) % args.eval_every == 0)):
            ev = evaluate(model, evals, banks, device, precision, cfg["batch_size"],
                          args.workers)
            record(dict(event="eval", epoch=epoch + 1, **ev))
            if not last:
                log(f"epoch {epoch + 1} eval: {format_acc(ev)}")
        if is_main:
            _save(model, opt, sched, cfg, epoch + 1, ck_path, state_path, ev)
        _barrier(world)
        if last and is_main:
            if acc_before is not None:
                log(f"before training: {format_acc(acc_before)}")
            log(f"after training:  {format_acc(ev)}")
            log(f"adapters: {ck_path}; metrics: {metrics_path}")
    return model


def _tuple(x):
    return tuple(_tuple(i) for i in x) if isinstance(x, list) else x


def _save(model, opt, sched, cfg, epoch, ck_path, state_path, acc):
    state = dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch)
    policy = getattr(model, "heba_policy", None)
    if policy is not None:
        state["policy_rng"] = _listify(policy._rng.getstate())
    ckpt.atomic_torch_save(state, state_path)
    ckpt.save_adapters(ck_path, model, dict(cfg, epoch=epoch, accuracy=acc))


def _listify(x):
    return [_listify(i) for i in x] if isinstance(x, (tuple, list)) else x


def run_evaluate(args, log=print) -> dict:
    """Evaluate a checkpoint written by :func:`run_train`; returns ``{split: accuracy}``."""
    if not os.path.exists(args.checkpoint):
        raise D.UsageError(f"checkpoint {args.checkpoint} does not exist")
    path = args.checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    saved = ckpt.read_config(path)
    cfg = dict(saved)
    if args.model is not None and args.model != saved["model"]:
        raise D.UsageError(f"checkpoint {path} is from another configuration "
                           f"(model: checkpoint {saved['model']!r} vs now {args.model!r})")
    if args.pretrained is not None:
        cfg["pretrained"] = args.pretrained
    if args.dataset is not None:
        cfg["dataset"] = os.path.abspath(args.dataset)
    if args.split is not None:
        cfg["split"] = args.split
    _, _, device = setup_distributed(args.device)
    if device.type == "cpu":
        set_cpu_threads(args.threads)
    precision = resolve_precision(args.precision, device)
    if cfg["dataset"] is not None:
        D.folder_splits(cfg["dataset"], cfg["shots"], cfg["seed"], args.test_per_class)
    model, train_tf, eval_tf, tok = load_clip(cfg["model"], cfg["pretrained"],
                                              args.allow_download)
    classes, _, _, evals = build_data(cfg, train_tf, eval_tf, args.test_per_class)
    model = attach(model, cfg, args.backend)
    ckpt.load_adapters(path, model)
    model.to(device)
    banks = {s: make_bank(classes, idx, tok, cfg, device) for s, (idx, _) in evals.items()}
    acc = evaluate(model, evals, banks, device, precision, cfg["batch_size"], args.workers)
    log(f"{path}: {format_acc(acc)}")
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(dict(event="evaluate", checkpoint=path, **acc)) + "\n")
    return acc
