"""heba-train on timm ViTs: the published AdapterTune protocol end to end, on tiny random ViTs.

The expectations are the published code written out here (salimkhazem/adaptertune):
``src/train/trainer.py`` (``loss = CrossEntropyLoss(label_smoothing)(model(x), y)``,
backward, ``clip_grad_norm_(model.parameters(), grad_clip)``, ``optimizer.step()``,
``scheduler.step()`` per step; top-k as ``src/eval/metrics.py``; the test split
evaluated once after the last epoch), ``src/train/optim.py`` (AdamW over the
``requires_grad`` parameters), ``src/train/sched.py`` (warm-up + cosine LambdaLR),
``src/datasets/torchvision_datasets.py`` (eval transform Resize(256), CenterCrop,
ImageNet normalisation), ``src/models/vit_adapter.py`` (``x = block(x); x = x +
up(gelu(down(x)))``) and ``configs/base.yaml`` (the defaults). Data: CIFAR-10's
real pickle layout (tests/heba/data/test_vision.py's writer) and ImageFolder trees.
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm", reason="heba[timm] extra not installed")
pytest.importorskip("torchvision", reason="torchvision not installed")
from PIL import Image  # noqa: E402

from heba import cli  # noqa: E402
from heba.train.graph import GraphedStep  # noqa: E402
from heba.train.classify import ClassifyRecipe, topk_correct  # noqa: E402
from heba.train.config import make_config  # noqa: E402
from heba.train.optim import cosine_factor  # noqa: E402
from heba.train.context import RunOptions  # noqa: E402
from tests.clip_utils import one_thread  # noqa: E402,F401
from tests.heba.data.test_vision import no_md5, write_cifar10  # noqa: E402,F401

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
TINY = ["--backbone", "timm:vit_tiny_patch16_224", "--pretrained", "none", "--model-kwargs",
        json.dumps(KW), "--threads", "1"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    names, arrays = write_cifar10(str(root), per_batch=6, n_test=8)
    return str(root), names, arrays


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def lines(path):
    return [json.loads(line) for line in open(path)]


# --- the schedule and the metrics, rule by rule ------------------------------------------------

def published_lambda(epochs, steps_per_epoch, warmup_epochs):
    """src/train/sched.py's lr_lambda, written out."""
    total, warm = max(1, epochs * steps_per_epoch), warmup_epochs * steps_per_epoch

    def f(step):
        if step < warm:
            return float(step + 1) / float(max(1, warm))
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / float(max(1, total - warm))))
    return f


@pytest.mark.parametrize("epochs,spe,warm", [(50, 7, 5), (3, 4, 1), (10, 3, 0)])
def test_schedule_is_the_published_warmup_cosine(epochs, spe, warm):
    ours, theirs = cosine_factor(epochs, spe, warm), published_lambda(epochs, spe, warm)
    for s in range(epochs * spe):
        assert ours(s) == pytest.approx(theirs(s), abs=1e-15), s


def test_topk_is_the_published_accuracy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 10, generator=g), torch.randint(0, 10, (50,), generator=g)
    _, pred = logits.topk(5, 1, True, True)                 # src/eval/metrics.py accuracy
    correct = pred.t().eq(labels.view(1, -1).expand_as(pred.t()))
    exp = [correct[:k].reshape(-1).float().sum(0).item() for k in (1, 5)]
    assert topk_correct(logits, labels, (1, 5)).tolist() == exp
    assert 0 < exp[0] < exp[1] < 50


def test_recipe_is_configs_base_yaml():
    cfg = make_config("adaptertune")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.epochs, cfg.batch_size) == \
        ("adamw", 1e-3, 0.05, 50, 128)
    assert (cfg.schedule, cfg.warmup_epochs, cfg.grad_clip, cfg.precision) == \
        ("step", 5, 1.0, "fp32")
    assert (cfg.rank, cfg.every, cfg.alpha, cfg.label_smoothing, cfg.seed, cfg.val_split,
            cfg.drop_last) == (16, 1, 1.0, 0.0, 42, 0.1, False)


# --- one run on CIFAR-10, checked against the published model and transforms ------------------

@pytest.fixture(scope="module")
def c10_run(cifar, tmp_path_factory):
    root = cifar[0]
    out = str(tmp_path_factory.mktemp("runs") / "c10")
    mp = pytest.MonkeyPatch()
    import torchvision.datasets.cifar as tv_cifar
    mp.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    try:
        rc = cli.main(["--dataset", "cifar10", "--root", root, *TINY, "--quiet", "--epochs", "3",
                       "--batch-size", "8", "--warmup-epochs", "1", "--rank", "4", "-o", out])
    finally:
        mp.undo()
    assert rc == 0
    return out


def published_model(state: dict, num_classes=10, seed=42):
    """timm.create_model after set_seed(seed), the published AdapterBlock wiring, a state."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                              **KW).eval()
    adapters = {}
    for i in range(len(model.blocks)):
        adapters[i] = {k.split(".", 3)[3]: state[k] for k in state
                       if k.startswith(f"blocks.{i}.adapter.")}
    with torch.no_grad():
        model.head.weight.copy_(state["head.weight"])
        model.head.bias.copy_(state["head.bias"])

    def forward(x):
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for i, blk in enumerate(model.blocks):
            x = blk(x)
            a = adapters[i]
            x = x + F.gelu(x @ a["down.weight"].t() + a["down.bias"]) @ a["up.weight"].t() \
                + a["up.bias"]
        return model.forward_head(model.norm(x))
    return forward


def published_test_images(arrays):
    """The test batch through Resize(256), CenterCrop(32), ToTensor, Normalize(ImageNet)."""
    from torchvision import transforms as T
    tf = T.Compose([T.Resize(256), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])
    data, labels = arrays["test_batch"]
    imgs = [tf(Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0))) for row in data]
    return torch.stack(imgs), torch.tensor(labels)


def test_cifar10_run_files_metrics_and_the_published_test_accuracy(cifar, c10_run):
    from safetensors.torch import load_file
    _, names, arrays = cifar
    recs = lines(os.path.join(c10_run, "metrics.jsonl"))
    train = [r for r in recs if r["event"] == "train"]
    val = [r for r in recs if r.get("split") == "val"]
    test = [r for r in recs if r.get("split") == "test"]
    assert [r["epoch"] for r in train] == [1, 2, 3] == [r["epoch"] for r in val]
    assert [r["epoch"] for r in test] == [3]                  # once, after the last epoch
    assert all({"top1", "top5", "loss"} <= set(r) for r in train + val + test)
    # 30 images - 3 val = 27 train: 4 batches of 8 (the last, of 3, kept) per epoch
    assert [r["step"] for r in train] == [4, 8, 12]
    f = published_lambda(3, 4, 1)
    assert [r["lr"] for r in train] == pytest.approx([1e-3 * f(s) for s in (4, 8, 12)])
    state = load_file(os.path.join(c10_run, "adapters.safetensors"))
    assert set(state) == {f"blocks.{i}.adapter.{p}.{w}" for i in (0, 1) for p in ("down", "up")
                          for w in ("weight", "bias")} | {"head.weight", "head.bias"}
    assert state["blocks.0.adapter.up.weight"].abs().sum() > 0        # trained from zero init
    # the test accuracy of the last epoch's model, recomputed the published way
    images, labels = published_test_images(arrays)
    with torch.no_grad():
        logits = published_model(state)(images)
    hits = topk_correct(logits, labels, (1, 5))
    summary = json.load(open(os.path.join(c10_run, "summary.json")))
    assert summary["test_acc"] == pytest.approx(100 * hits[0].item() / 8)
    assert summary["test_acc5"] == pytest.approx(100 * hits[1].item() / 8)
    assert summary["test_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(),
                                                 rel=1e-5)
    assert test[0]["top1"] == summary["test_acc"]
    assert summary["best_val_acc"] == max(r["top1"] for r in val)
    assert summary["trainable_params"] == sum(v.numel() for v in state.values())
    meta = json.load(open(os.path.join(c10_run, "adapters.json")))
    assert meta["classnames"] == names and meta["epoch"] == 3
    assert meta["optimizer"] == "adamw" and meta["model_kwargs"] == KW
    assert "test top-1" in open(os.path.join(c10_run, "summary.md")).read()
    with open(os.path.join(c10_run, "metrics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"                  # the run's figure


def test_evaluate_loads_the_checkpoint(cifar, c10_run, capsys, no_md5):
    rc, out, err = run(["evaluate", "--checkpoint", c10_run, "--dataset", "cifar10", "--root",
                        cifar[0], "--threads", "1"], capsys)
    assert rc == 0, err
    summary = json.load(open(os.path.join(c10_run, "summary.json")))
    assert f"top-1 {summary['test_acc']:5.1f}%" in out and "top-5" in out
    assert float(out.split("loss ")[1].split()[0]) == pytest.approx(summary["test_loss"],
                                                                    rel=1e-5)


def test_resume_is_the_uninterrupted_run(cifar, c10_run, tmp_path, capsys, no_md5,
                                         monkeypatch):
    from safetensors.torch import load_file
    out = str(tmp_path / "part")
    args = ["--dataset", "cifar10", "--root", cifar[0], *TINY, "--quiet", "--epochs", "3",
            "--batch-size",
            "8", "--warmup-epochs", "1", "--rank", "4", "-o", out]
    real = ClassifyRecipe.save_checkpoint

    def save_then_stop(self, epoch, acc):
        real(self, epoch, acc)
        if epoch == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(ClassifyRecipe, "save_checkpoint", save_then_stop)
    assert run(args, capsys)[0] == 130
    monkeypatch.setattr(ClassifyRecipe, "save_checkpoint", real)
    rc, _, err = run(args + ["--resume"], capsys)
    assert rc == 0, err
    a = load_file(os.path.join(out, "adapters.safetensors"))
    b = load_file(os.path.join(c10_run, "adapters.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [r["epoch"] for r in lines(os.path.join(out, "metrics.jsonl"))
            if r["event"] == "train"] == [1, 2, 3]
    rc, _, err = run(args[:-2] + ["--lr", "0.5", "-o", out, "--resume"], capsys)
    assert rc == 2 and "another configuration" in err


# --- the published training step ---------------------------------------------------------------

def test_steps_are_the_published_steps(tmp_path):
    """Three steps of the recipe = src/train/trainer.py's loop on a copy of the same model."""
    folder = image_folder(tmp_path / "ds")
    cfg = make_config("adaptertune", model="timm:vit_tiny_patch16_224", pretrained="none",
                      model_kwargs=KW, source="vision", dataset="imagefolder", root=folder,
                      epochs=2, batch_size=4, rank=4, grad_clip=0.05)
    recipe = ClassifyRecipe(cfg, RunOptions(output=str(tmp_path / "o"), threads=1, quiet=True))
    recipe.setup()
    ref = copy.deepcopy(recipe.model)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g))
               for _ in range(3)]
    loader_len = len(recipe.tr.loader(0))
    recipe.tr.graphed = GraphedStep(recipe._forward, recipe.tr.params, enabled=False)
    recipe.tr.loader = lambda epoch: batches        # the loop's data seam: fixed batches
    recipe.model.train()
    recipe.train_epoch(0)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, published_lambda(2, loader_len, 5))
    ref.train()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y, label_smoothing=0.0).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        sched.step()
    got = dict(recipe.model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=1e-6, atol=1e-7, msg=name)
    assert recipe.tr.lr() == pytest.approx(sched.get_last_lr()[0])
    assert not torch.equal(got["head.weight"], recipe_initial_head(cfg))


def recipe_initial_head(cfg):
    torch.manual_seed(cfg.seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=3, **KW).head.weight


def image_folder(root, n_train=8, n_test=3, classes=("ant", "bee", "cat")):
    """root/{train,test}/<class>/<i>.png, 20x24 images a colour per class plus noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            d = os.path.join(str(root), split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 80, (20, 24, 3)) + 60 * np.eye(3, dtype=int)[c % 3]
                Image.fromarray(a.astype(np.uint8)).save(os.path.join(d, f"{i}.png"))
    return str(root)


# --- the published baselines and HeBA on an ImageFolder ---------------------------------------

@pytest.mark.parametrize("method", ["head-only", "full", "heba"])
def test_methods_train_what_they_name(method, tmp_path, capsys):
    from safetensors.torch import load_file
    folder = image_folder(tmp_path / "ds")
    out = str(tmp_path / method)
    rc, stdout, err = run([folder, *TINY, "--quiet", "--method", method, "--epochs", "1",
                           "--batch-size", "8", "-o", out], capsys)
    assert rc == 0, err
    state = load_file(os.path.join(out, "adapters.safetensors"))
    torch.manual_seed(42)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=3, **KW).state_dict()
    if method == "head-only":
        assert set(state) == {"head.weight", "head.bias"}
    elif method == "full":
        assert set(state) == set(plain)
        assert not torch.equal(state["blocks.0.attn.qkv.weight"], plain["blocks.0.attn.qkv.weight"])
    else:
        assert {k.split(".")[1] for k in state if k.startswith("visual_adapter.")} == {"1", "2"}
        assert set(k for k in state if not k.startswith("visual_adapter.")) == {"head.weight",
                                                                                "head.bias"}
        assert json.load(open(os.path.join(out, "adapters.json")))["reduction"] == 4
    assert not torch.equal(state["head.weight"], plain["head.weight"])
    recs = lines(os.path.join(out, "metrics.jsonl"))
    assert "top5" not in recs[-1] and "top1" in recs[-1]      # 3 classes: top-1 only
    rc, stdout, err = run(["evaluate", "--checkpoint", out, "--threads", "1"], capsys)
    assert rc == 0, err
    test = [r for r in recs if r.get("split") == "test"][0]
    assert f"top-1 {test['top1']:5.1f}%" in stdout


def test_published_checkpoint_evaluates(tmp_path, capsys):
    """A published best.pt (the wrapped model's state dict) evaluates through the CLI."""
    folder = image_folder(tmp_path / "ds")
    torch.manual_seed(42)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **KW)
    g = torch.Generator().manual_seed(1)
    sd = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        sd[".".join(parts[:2] + ["block"] + parts[2:]) if parts[0] == "blocks" else k] = v
    sd["head.weight"] = torch.randn(3, 32, generator=g)
    for i in (0, 1):
        for name, shape in (("down.weight", (4, 32)), ("down.bias", (4,)),
                            ("up.weight", (32, 4)), ("up.bias", (32,))):
            sd[f"blocks.{i}.adapter.{name}"] = 0.3 * torch.randn(shape, generator=g)
    torch.save({"model": sd, "optimizer": {}, "epoch": 49}, tmp_path / "best.pt")
    rc, out, err = run(["evaluate", "--checkpoint", str(tmp_path / "best.pt"), folder, *TINY],
                       capsys)
    assert rc == 0, err
    from torchvision import transforms as T
    tf = T.Compose([T.Resize(256), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])
    imgs, labels = [], []
    for c, name in enumerate(("ant", "bee", "cat")):
        for i in range(3):
            path = os.path.join(folder, "test", name, f"{i}.png")
            imgs.append(tf(Image.open(path).convert("RGB")))
            labels.append(c)
    with torch.no_grad():
        logits = published_model(sd, num_classes=3)(torch.stack(imgs))
    top1 = 100 * topk_correct(logits, torch.tensor(labels), (1,))[0].item() / 9
    loss = F.cross_entropy(logits, torch.tensor(labels)).item()
    assert f"top-1 {top1:5.1f}%" in out
    assert float(out.split("loss ")[1].split()[0]) == pytest.approx(loss, rel=1e-5)


# --- bad input: one line, exit 2, nothing written ----------------------------------------------

def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    folder = image_folder(tmp_path / "ds", n_train=2, n_test=1)
    out = str(tmp_path / "never")
    cases = [
        (["--backbone", "timm:vit_nonexistent_9", folder], "unknown timm model"),
        (["--backbone", "timm:vit_tiny_patch16_224", "--pretrained", "none", "--dataset",
          "cifar10", "--root", str(tmp_path / "missing")], "does not exist"),
        (["--backbone", "timm:resnet18", "--pretrained", "none", "--method", "heba", folder],
         "--method heba on timm:resnet18"),
        (["--backbone", "timm:resnet18", "--pretrained", "none", folder], "no timm transformer"),
        ([*TINY, "--dataset", "eurosat", "--root", folder], "a timm backbone trains on"),
        ([*TINY[:4], "--model-kwargs", "{depth: 2}", folder], "not JSON"),
        ([*TINY, "--pretrained", "nosuchtag", folder], "neither a file nor a timm tag"),
        (["cross-dataset", "--root", folder, *TINY], "a timm backbone trains on"),
        (["--model", "tiny", "--method", "full", folder], "timm classification baseline"),
        (["--model", "tiny", "--model-kwargs", "{}", folder], "is for timm"),
    ]
    for argv, pattern in cases:
        rc, stdout, err = run(argv + ["-o", out, "--threads", "1"], capsys)
        assert rc == 2, (argv, err)
        assert pattern in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not os.path.exists(out), argv


# --- weights: a local file, the local cache only, several seeds --------------------------------

def test_pretrained_file_loads_the_backbone_and_a_new_head(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    folder = image_folder(tmp_path / "ds", n_train=3, n_test=1)
    torch.manual_seed(7)
    donor = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **KW)   # an in1k head
    weights = {k: v.contiguous() for k, v in donor.state_dict().items()}
    save_file(weights, str(tmp_path / "w.safetensors"))
    out = str(tmp_path / "o")
    rc, _, err = run([folder, *TINY[:2], "--pretrained", str(tmp_path / "w.safetensors"),
                      *TINY[4:], "--model-kwargs", json.dumps(KW), "--method", "full",
                      "--epochs", "1", "--lr", "0", "--quiet", "-o", out], capsys)
    assert rc == 0, err
    got = load_file(os.path.join(out, "adapters.safetensors"))   # full: every tensor, lr 0
    assert got["head.weight"].shape == (3, 32)                    # the file's head dropped
    torch.manual_seed(42)
    assert torch.equal(got["head.weight"],
                       timm.create_model("vit_tiny_patch16_224", num_classes=3, **KW).head.weight)
    assert all(torch.equal(got[k], v) for k, v in weights.items() if not k.startswith("head."))


def test_weights_come_from_the_local_cache_only(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = image_folder(tmp_path / "ds", n_train=2, n_test=1)
    rc, _, err = run([folder, "--backbone", "timm:vit_tiny_patch16_224", "--threads", "1",
                      "-o", str(tmp_path / "o")], capsys)
    assert rc == 2 and "not in the local cache and downloading is off" in err
    assert "vit_tiny_patch16_224.augreg_in21k_ft_in1k" in err     # the published variant rule
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "o")


def test_seeds_write_one_run_each_and_the_table(tmp_path, capsys):
    folder = image_folder(tmp_path / "ds", n_train=4, n_test=2)
    out = str(tmp_path / "seeds")
    rc, _, err = run([folder, *TINY, "--quiet", "--method", "head-only", "--epochs", "1",
                      "--seeds", "0", "1", "-o", out], capsys)
    assert rc == 0, err
    table = json.load(open(os.path.join(out, "classification.json")))
    per = {s: json.load(open(os.path.join(out, f"seed{s}", "summary.json")))["test_acc"]
           for s in (0, 1)}
    assert table["seeds"] == [0, 1]
    assert table["mean"]["top-1"] == pytest.approx((per[0] + per[1]) / 2)
    assert json.load(open(os.path.join(out, "seed1", "config.json")))["seed"] == 1


# --- DistributedDataParallel: two CPU ranks (gloo) end with the same weights -------------------

def _ddp_worker(rank, world, port, folder, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from heba.train import classify
    seen = []
    orig = classify.ClassifyStep.forward

    def spy(self, images, labels):
        seen.append(images.sum().item())
        return orig(self, images, labels)
    classify.ClassifyStep.forward = spy
    args = cli.parse_args([folder, *TINY, "--quiet", "--epochs", "2", "--batch-size", "4",
                           "--rank", "4", "--device", "cpu", "-o", out])
    recipe = ClassifyRecipe(cli.make_train_config(args), cli.run_options(args, demo=False),
                            log=lambda *a, **k: None)
    recipe.run()
    state = {k: v.detach().contiguous()
             for k, v in classify.trainable_state(recipe.model, "adaptertune").items()}
    state["_seen"] = torch.tensor(seen)
    save_file(state, os.path.join(result_dir, f"rank{rank}.safetensors"))
    cli._cleanup_distributed()


def test_two_ranks_train_the_same_weights(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    folder = image_folder(tmp_path / "ds", n_train=6, n_test=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "out")
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"   # forked: no re-imports
    mp.start_processes(_ddp_worker, args=(2, port, folder, out, str(tmp_path)), nprocs=2,
                       join=True, start_method=start)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    seen0, seen1 = r0.pop("_seen"), r1.pop("_seen")
    # 18 images - 1 val = 17: 9 per rank (padded), batch 4: 3 steps per epoch on each rank
    assert len(seen0) == len(seen1) == 6 and not torch.allclose(seen0, seen1)
    assert set(r0) == set(r1) and all(torch.equal(r0[k], r1[k]) for k in r0)
    saved = load_file(os.path.join(out, "adapters.safetensors"))          # rank 0 wrote it
    assert all(torch.equal(saved[k], r0[k]) for k in saved)
    assert r0["blocks.0.adapter.up.weight"].abs().sum() > 0


def test_weights_load_from_the_local_hugging_face_cache(tmp_path, capsys, monkeypatch):
    """The published variant's weights, found offline in an HF cache laid out as the hub does."""
    from huggingface_hub import constants
    from safetensors.torch import load_file, save_file
    cache = tmp_path / "hub"
    repo = cache / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.manual_seed(3)
    donor = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **KW)
    weights = {k: v.contiguous() for k, v in donor.state_dict().items()}
    save_file(weights, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    folder = image_folder(tmp_path / "ds", n_train=3, n_test=1)
    out = str(tmp_path / "o")
    rc, _, err = run([folder, "--backbone", "timm:vit_tiny_patch16_224", "--model-kwargs",
                      json.dumps(KW), "--method", "full", "--lr", "0", "--epochs", "1",
                      "--threads", "1", "--quiet", "-o", out], capsys)
    assert rc == 0, err
    got = load_file(os.path.join(out, "adapters.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in weights.items() if not k.startswith("head."))
    assert json.load(open(os.path.join(out, "config.json")))["pretrained"] == "published"
