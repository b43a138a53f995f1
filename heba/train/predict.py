"""Classify new images with a trained run: a ready classifier from a run folder.

:func:`load_classifier` turns a run folder (or its ``adapters.safetensors``)
into a :class:`Classifier`: the adapted model with the run's adapters, its
evaluation preprocessing, the class names, the text classifier (normalised
mean of each class's prompt features, as the run's evaluation builds it), the
run's device and precision. ``Classifier.predict`` takes image files, folders
(searched recursively) or list files (``.txt``: one image path per line,
relative to the list file) and returns the top-k classes and scores of each
image, in batches. Scores are the softmax of ``logit_scale x cosine`` over the
classes (``logit_scale``: the model's own, 100 for a model without one).

    from heba.train.predict import load_classifier
    clf = load_classifier("runs/demo")
    for row in clf.predict(["photos/"], top_k=3):
        print(row["path"], row["classes"], row["scores"])

On the command line (``heba-train predict``)::

    heba-train predict --run runs/demo photos/ list.txt --top-k 3 --out preds.csv

The class names are every class the run was tested on (base then novel
classes for a base-to-novel run; they come from the run's data, so its
``--root`` must still be there), or any list given with ``classnames``
(``--classes a,b,c`` or ``--classes FILE``, one per line): CLIP classifies
into any set of names. The adapters run at the base scale, as the run's own
evaluation does by default.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LIST_EXTENSIONS = (".txt", ".lst")


@dataclass
class Classifier:
    """A trained run ready to classify images.

    Attributes:
        model: the adapted backbone, in eval mode on ``device``.
        preprocess: PIL image -> tensor ``[3, H, W]`` (the run's evaluation transform).
        classnames: the ``C`` class names, in the order of ``text``'s rows.
        text: the text classifier ``[C, E]`` (normalised), float32.
        device, precision: where and at which precision the model runs.
        config: the run's :class:`heba.train.config.Config`.
    """

    model: torch.nn.Module
    preprocess: Callable
    classnames: list
    text: torch.Tensor
    device: torch.device
    precision: str
    config: object

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, C]`` of preprocessed images ``[B, 3, H, W]``."""
        from heba.train.runtime import autocast_ctx
        with autocast_ctx(self.device, self.precision):
            img = self.model.encode_image(images.to(self.device))
        img = F.normalize(img.float(), dim=-1)
        scale = getattr(self.model, "logit_scale", None)
        scale = float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0
        return (scale * img @ self.text.T).softmax(dim=-1)

    def predict(self, inputs: Sequence[str], top_k: int = 5, batch_size: int = 64) -> list:
        """``[{"path", "classes": [top_k names], "scores": [top_k floats]}]`` per image.

        ``inputs``: image files, folders (recursive) or list files (module docstring).
        """
        from heba.data.pipeline import read_rgb
        if top_k < 1 or batch_size < 1:
            from heba.train.config import UsageError
            raise UsageError(f"--top-k and --batch-size must be >= 1 (got {top_k}, "
                             f"{batch_size})")
        paths = collect_images(inputs)
        k = min(top_k, len(self.classnames))
        rows = []
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            batch = []
            for p in chunk:         # one 8-bit rule for every image heba reads
                batch.append(self.preprocess(read_rgb(p)))
            top = self.scores(torch.stack(batch)).topk(k, dim=-1)
            for p, val, idx in zip(chunk, top.values.tolist(), top.indices.tolist()):
                rows.append({"path": p, "classes": [self.classnames[j] for j in idx],
                             "scores": val})
        return rows


def load_classifier(run: str, classnames: Optional[Sequence[str]] = None, device: str = "auto",
                    backend: str = "auto", allow_download: bool = False) -> Classifier:
    """The :class:`Classifier` of the run folder (or adapters file) ``run``.

    Args:
        run: a run folder (its final adapters, else its latest saved epoch) or
            its ``adapters.safetensors``.
        classnames: the classes to choose from (default: the run's test classes).
        device: ``"auto"`` (CUDA when visible), ``"cuda"`` or ``"cpu"``.
        backend: the adapters' backend (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``).
        allow_download: let open_clip fetch the backbone's weights.
    """
    from heba.clip import checkpoints as ckpt
    from heba.train import backbones, preflight
    from heba.train.config import MODEL_FIELDS, Config, UsageError
    from heba.train.evaluate import find_checkpoint
    from heba.train.prompts import make_bank
    from heba.train.runtime import autocast_ctx, resolve_precision, setup_distributed
    recipe, kind, file = find_checkpoint(run, {})
    if recipe == "classify":
        raise UsageError(f"--run {run}: a timm classification run; predict takes CLIP runs")
    if kind != "heba":
        raise UsageError(f"--run {run}: a published checkpoint carries no configuration; "
                         f"predict needs a heba run folder")
    cfg = Config.from_dict(ckpt.read_config(file, require=MODEL_FIELDS))
    _, _, dev = setup_distributed(device)
    preflight.check_backend(backend, dev)
    names = list(classnames) if classnames else run_classnames(cfg)
    if not names:
        raise UsageError("--classes: expected at least one class name")
    precision = resolve_precision(cfg.precision, dev, cfg.gpu_precision)
    precision = "fp32" if cfg.eval_precision == "fp32" else precision
    bb = backbones.load(cfg, allow_download)
    model = backbones.attach(bb.model, cfg, backend)
    ckpt.load_adapters(file, model)
    model.to(dev).eval()
    bank = make_bank(names, cfg, bb.tokenizer, dev)
    with torch.no_grad(), autocast_ctx(dev, precision):
        text = bank.features(model).float()
    return Classifier(model, bb.eval_transform, names, text, dev, precision, cfg)


def run_classnames(cfg) -> list:
    """Every class ``cfg``'s run was tested on: base then novel, or all."""
    from heba.train import data as run_data
    data = run_data.build(cfg)
    return [name for names, _ in data.evals.values() for name in names]


def collect_images(inputs: Sequence[str]) -> list:
    """The image paths of ``inputs`` (files, folders searched recursively, list files)."""
    from heba.train.config import UsageError
    out = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(item) for f in files
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            if not found:
                raise UsageError(f"{item}: the folder holds no images "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif os.path.isfile(item) and item.lower().endswith(LIST_EXTENSIONS):
            base = os.path.dirname(os.path.abspath(item))
            with open(item) as f:
                listed = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            out += collect_images([p if os.path.isabs(p) else os.path.join(base, p)
                                   for p in listed])
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise UsageError(f"{item}: no such image, folder or list file")
    if not out:
        raise UsageError("predict: expected at least one image, folder or list file")
    return out


def format_rows(rows: list, fmt: str) -> str:
    """``rows`` of :meth:`Classifier.predict` as CSV (``path,rank,class,score``) or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "rank", "class", "score"])
    for r in rows:
        for rank, (name, score) in enumerate(zip(r["classes"], r["scores"]), 1):
            w.writerow([r["path"], rank, name, f"{score:.6f}"])
    return buf.getvalue()


# --- command line: `heba-train predict` ----------------------------------------------------------

def add_predict_parser(subparsers):
    """Add ``predict`` to ``heba-train``'s sub-commands; returns its parser."""
    p = subparsers.add_parser(
        "predict", help="classify images with a trained run (top-k classes, CSV or JSON)",
        description="Classify images with a trained run folder: top-k classes and scores.")
    p.add_argument("images", nargs="+",
                   help="image files, folders (searched recursively) or list files (.txt: "
                        "one image path per line)")
    p.add_argument("--run", required=True, help="the run folder (or its adapters.safetensors)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--format", choices=("csv", "json"), default=None,
                   help="output format (default: from --out's extension, else csv)")
    p.add_argument("--out", "-o", default="-", help="output file (default: standard output)")
    p.add_argument("--classes", default=None,
                   help="class names to choose from: a,b,c or a file with one per line "
                        "(default: the classes the run was tested on)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="where the model runs (default auto: CUDA when visible)")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda"),
                   help="the adapters' backend (default auto)")
    p.add_argument("--allow-download", action="store_true",
                   help="let open_clip download the backbone's weights")
    return p


def run_predict(args) -> list:
    """``heba-train predict``: classify ``args.images`` and write the rows; returns them."""
    names = None
    if args.classes:
        if os.path.isfile(args.classes):
            with open(args.classes) as f:
                names = [ln.strip() for ln in f if ln.strip()]
        else:
            names = [c.strip() for c in args.classes.split(",") if c.strip()]
    fmt = args.format or ("json" if args.out.lower().endswith(".json") else "csv")
    if args.top_k < 1 or args.batch_size < 1:
        from heba.train.config import UsageError
        raise UsageError(f"--top-k and --batch-size must be >= 1 (got {args.top_k}, "
                         f"{args.batch_size})")
    paths = collect_images(args.images)            # bad input fails before the model loads
    clf = load_classifier(args.run, names, args.device, args.backend, args.allow_download)
    rows = clf.predict(paths, args.top_k, args.batch_size)
    text = format_rows(rows, fmt)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    return rows
