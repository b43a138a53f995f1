"""``heba-train``: few-shot HeBA / AdapterTune training and evaluation on open_clip models.

    heba-train                                   # built-in demo: tiny CLIP, generated shapes
    heba-train /data/eurosat --model ViT-B-16 --pretrained openai --shots 16
    heba-train train /data/eurosat --method adaptertune --rank 16 --every 1
    heba-train evaluate --checkpoint runs/heba/adapters.safetensors /data/eurosat
    torchrun --nproc_per_node=4 -m heba.cli /data/imagenet ...   # DistributedDataParallel

Bad input (a missing dataset, too few images for the shots, an unknown model, a
checkpoint from another configuration) is reported in one line with exit
status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = "Run `heba-train train -h` / `heba-train evaluate -h` for each command's options."


def _common(p):
    p.add_argument("dataset", nargs="?", default=None,
                   help="ImageFolder root (root/<class>/<image>, or root/train + root/test); "
                        "none: the built-in generated data set")
    p.add_argument("--model", default=None,
                   help="open_clip model name (default ViT-B-16; 'tiny' = the built-in demo "
                        "model, the default without a dataset)")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag (default openai), a local weights file, or 'none'; "
                        "for --model tiny: 'builtin' (default), 'none' or a file")
    p.add_argument("--allow-download", action="store_true",
                   help="let open_clip download weights (never without this flag)")
    p.add_argument("--split", choices=("base2novel", "all"), default=None,
                   help="train on the base half of the classes and test base and novel "
                        "(default), or train and test on all classes")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="cap on test images per class")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast precision (auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cuda"), default="auto",
                   help="heba kernel backend of the adapters")
    p.add_argument("--workers", type=int, default=0, help="data loader workers")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores other processes leave idle)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="heba-train", description="Few-shot HeBA / AdapterTune adapters on a frozen CLIP.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train adapters (the default command)")
    _common(t)
    t.add_argument("--method", choices=("heba", "adaptertune"), default="heba")
    t.add_argument("--towers", choices=("both", "visual", "text"), default=None,
                   help="towers to adapt (default: both for heba, visual for adaptertune)")
    t.add_argument("--start", type=int, default=1, help="heba: first adapted layer (1-based)")
    t.add_argument("--end", type=int, default=None, help="heba: last adapted layer (default: all)")
    t.add_argument("--reduction", type=int, default=4, help="heba: bottleneck reduction")
    t.add_argument("--rank", type=int, default=16, help="adaptertune: low-rank width")
    t.add_argument("--every", type=int, default=1, help="adaptertune: adapt every k-th block")
    t.add_argument("--alpha", type=float, default=1.0, help="adaptertune: residual scale")
    t.add_argument("--shots", type=int, default=16, help="training images per class")
    t.add_argument("--seed", type=int, default=1, help="seed of the shots, init and order")
    t.add_argument("--template", action="append", default=None,
                   help="prompt template with {} for the class name (repeatable; default: "
                        "a small built-in ensemble)")
    t.add_argument("--descriptions", default=None,
                   help="JSON file {class: [description, ...]} used as the class prompts")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=0.0075)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--neg-classes", type=int, default=5,
                   help="negative classes sampled per image (0: all classes)")
    t.add_argument("--base-scale", type=float, default=0.025)
    t.add_argument("--novel-scale", type=float, default=0.010)
    t.add_argument("--scale-factor", type=float, default=2.25, help="slow-fast factor")
    t.add_argument("--slow-fast-ratio", type=float, default=0.8,
                   help="probability of the base scale per adapter call while training")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (0: end)")
    t.add_argument("--no-eval-before", action="store_true",
                   help="skip the evaluation before training")
    t.add_argument("--output", "-o", default=None,
                   help="output directory (default: runs/heba; the built-in demo: runs/demo, "
                        "which it overwrites)")
    t.add_argument("--resume", action="store_true", help="continue the checkpoint in --output")
    t.add_argument("--overwrite", action="store_true",
                   help="start over even if --output holds a checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    f = t.add_argument_group("speed and memory (results are the same up to rounding)")
    f.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every step eagerly (graphs are used on a GPU when the step's "
                        "shapes and values are static; the log says whether and why not)")
    f.add_argument("--no-cast-once", action="store_true",
                   help="keep the frozen backbone in fp32 and let autocast cast it every step")
    f.add_argument("--checkpoint-blocks", type=int, default=0, metavar="K",
                   help="recompute every K-th frozen block's activations in backward "
                        "(1: all; 0: none, the default) to fit larger batches")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint")
    _common(e)
    e.add_argument("--checkpoint", required=True,
                   help="adapters.safetensors written by `heba-train train` (or its directory)")
    e.add_argument("--output", "-o", default=None, help="append the result to metrics.jsonl here")
    return parser


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate", "-h", "--help"):
        argv = ["train"] + argv
    args = build_parser().parse_args(argv)
    if args.command == "train":
        args.split = args.split or "base2novel"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from heba.clip.checkpoints import CheckpointError
    from heba.clip.data import UsageError
    from heba.clip import train
    try:
        if args.command == "evaluate":
            train.run_evaluate(args)
        else:
            train.run_train(args)
    except (UsageError, CheckpointError) as err:
        print(f"heba-train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("heba-train: interrupted", file=sys.stderr)
        return 130
    finally:
        _cleanup_distributed()
    return 0


def _cleanup_distributed():
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
