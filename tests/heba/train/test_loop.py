"""The training loop checked from outside: numbers written here, docs/semantics.md's equations, a
single process against DistributedDataParallel, a DDP-saved published checkpoint.

* The harmonic mean of base and novel accuracy (CoOp / HeBA's "HM"), hand computed.
* Evaluation (:func:`heba.train.evaluate.evaluate`): the published classifier (the
  normalised mean of each class's normalised prompt features, VLM-HeBA
  ``CustomCLIP.forward`` at test time), computed here with docs/semantics.md's equations on a
  pristine model; the scale of each split: base classes at ADAPTER_SCALE_BASE (0.025),
  novel classes at 0.025 too by default, as the published code runs (its
  ``use_novel_scale`` flag is never switched on, so ADAPTER_SCALE_NOVEL is never used),
  and at 0.010 with ``novel_eval="novel"``.
* A run on one process equals a two-rank DDP run (gloo, CPU) fed the same global
  batches: the recipe's model, prompt bank, DDP-wrapped step and optimizer.
* A published checkpoint saved from a ``DataParallel`` / DDP model (``module.`` keys) loads.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from heba.clip.checkpoints import load_published_checkpoint
from heba.clip.wiring import attach_heba
from heba.nn import HeBAAdapter
from heba.train.evaluate import evaluate, harmonic_mean
from heba.train.prompts import PromptBank
from tests.clip_utils import (BASE_SCALE, NOVEL_SCALE, heba_weights, load_heba,
                              per_layer, spec_encode_image, spec_encode_text, spec_tower)

# The built-in tiny CLIP (heba/clip/tiny.py): 32x32 images, 8x8 patches, width 96, 4 layers.
TINY_D, TINY_LAYERS, TINY_GRID = 96, 4, (4, 4)


def test_harmonic_mean_by_hand():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(68.571428571428571, abs=1e-12)   # 9600/140
    assert harmonic_mean(75.0, 50.0) == pytest.approx(60.0, abs=1e-12)                  # 7500/125
    assert harmonic_mean(90.0, 30.0) == pytest.approx(45.0, abs=1e-12)                  # 5400/120
    assert harmonic_mean(100.0, 100.0) == 100.0
    assert harmonic_mean(0.0, 0.0) == 0.0


def tiny_model():
    """(pristine, adapted, tokenizer): the built-in tiny CLIP, random weights, published-name
    HeBA weights drawn here."""
    from heba.clip import tiny
    torch.manual_seed(0)
    pristine, tok = tiny.load_tiny_clip(pretrained=False)
    model = copy.deepcopy(pristine)
    attach_heba(model)
    sd = heba_weights(TINY_D, TINY_D, TINY_LAYERS, seed=4)
    load_heba(model, sd)
    return pristine, model, tok, sd


def spec_classify(pristine, sd, images, bank, scale):
    """Published evaluation with docs/semantics.md's equations: argmax of cosine to the normalised mean
    of each class's normalised prompt features."""
    vis, txt = per_layer(sd, "visual"), per_layer(sd, "text")
    img = spec_encode_image(pristine, images,
                            lambda b, x: spec_tower(b, x, vis, scale, True, TINY_GRID))
    C, T, L = bank.tokens.shape
    t = spec_encode_text(pristine, bank.tokens.reshape(C * T, L),
                         lambda b, x, m: spec_tower(b, x, txt, scale, False, attn_mask=m))
    cls = F.normalize(F.normalize(t, dim=-1).reshape(C, T, -1).mean(1), dim=-1)
    return (F.normalize(img, dim=-1) @ cls.T).argmax(1)


def record_scales(monkeypatch):
    seen = []
    orig = HeBAAdapter.forward

    def spy(self, x, scale=1.0):
        seen.append(float(scale))
        return orig(self, x, scale)

    monkeypatch.setattr(HeBAAdapter, "forward", spy)
    return seen


@pytest.mark.parametrize("novel_eval,novel_scale", [("base", BASE_SCALE), ("novel", NOVEL_SCALE)])
def test_evaluate_scales_accuracies_and_hm(novel_eval, novel_scale, monkeypatch):
    """Labels are set from docs/semantics.md's predictions so that base is 75% (3 of 4) and novel 50%
    (1 of 2) right: HM 60 (hand computed). The adapters see each split's scale."""
    pristine, model, tok, sd = tiny_model()
    g = torch.Generator().manual_seed(5)
    banks = {"base": PromptBank([["a photo of a red circle.", "a red circle."],
                                 ["a blue square."], ["a photo of a green triangle."]], tok),
             "novel": PromptBank([["a yellow cross."], ["a photo of a red square.",
                                                        "a red square shape."]], tok)}
    scales = {"base": BASE_SCALE, "novel": novel_scale}
    right = {"base": [True, True, False, True], "novel": [False, True]}
    evals = {}
    with torch.no_grad():
        for split, bank in banks.items():
            imgs = torch.randn(len(right[split]), 3, 32, 32, generator=g)
            pred = spec_classify(pristine, sd, imgs, bank, scales[split])
            labels = torch.where(torch.tensor(right[split]), pred, (pred + 1) % bank.n_classes)
            evals[split] = (None, list(zip(imgs, labels.tolist())))
    seen = record_scales(monkeypatch)
    for split in banks:                 # one split at a time: the scales it ran at
        seen.clear()
        acc = evaluate(model, {split: evals[split]}, banks, torch.device("cpu"), "fp32",
                       batch_size=3, novel_eval=novel_eval)
        assert acc == {split: {"base": 75.0, "novel": 50.0}[split]}
        assert seen and set(seen) == {scales[split]}, (split, sorted(set(seen)))
    acc = evaluate(model, evals, banks, torch.device("cpu"), "fp32", novel_eval=novel_eval)
    assert acc["base"] == 75.0 and acc["novel"] == 50.0
    assert acc["hm"] == pytest.approx(60.0, abs=1e-9)          # 2 * 75 * 50 / 125
    assert model.heba_policy.mode == "base" and not model.training


def test_published_default_evaluates_novel_at_base_scale():
    from heba.train.config import make_config
    cfg = make_config("heba")
    assert (cfg.novel_eval, cfg.base_scale, cfg.novel_scale) == ("base", BASE_SCALE, NOVEL_SCALE)


def test_module_prefixed_published_checkpoint_loads(tmp_path):
    """A Dassl checkpoint of a DataParallel / DDP adapter learner: ``module.`` before every key."""
    pristine, model, tok, sd = tiny_model()
    path = tmp_path / "run" / "adapter_learner" / "model.pth.tar-2"
    path.parent.mkdir(parents=True)
    state = {"module." + k: v for k, v in sd.items()}
    state["module.tk_prompts"] = torch.zeros(2, 1, 10, dtype=torch.long)
    torch.save({"state_dict": state, "epoch": 2, "optimizer": None, "scheduler": None}, path)
    other = copy.deepcopy(pristine)
    attach_heba(other)
    load_published_checkpoint(other, str(path))
    for k, v in sd.items():
        assert torch.equal(other.heba_adapters.get_parameter(k), v), k


# --- one process = two DDP ranks on the same global batches ----------------------------------

GLOBAL_BATCH, STEPS = 4, 2            # 2 epochs of 2 steps


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, world, out, result):
    """The recipe's whole loop (``TrainRecipe.train``: DDP-wrapped step, loss scaling,
    optimizer, schedule) on fixed global batches, this rank taking its slice of each.
    One prompt per class and every class a candidate, so no draw differs between ranks.
    Saves the adapters' initial and final weights to ``result``."""
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from heba.train.config import make_config
    from heba.train.recipe import RunOptions, TrainRecipe
    cfg = make_config("heba", model="tiny", pretrained="none", source="demo", split="all",
                      shots=1, epochs=2, batch_size=GLOBAL_BATCH // world, slow_fast_ratio=1.0,
                      precision="fp32", candidates="all", test_per_class=1,
                      templates=["a photo of a {}."])
    recipe = TrainRecipe(cfg, RunOptions(output=out, device="cpu", threads=1, quiet=True,
                                         eval_before=False, cuda_graphs=False),
                         log=lambda *a, **k: None)
    recipe.setup()
    assert recipe.world == world and recipe.train_bank.n_prompts == 1
    g = torch.Generator().manual_seed(11)
    C, n = recipe.train_bank.n_classes, GLOBAL_BATCH // world
    batches = []
    for _ in range(STEPS):
        images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
        labels = torch.randint(0, C, (GLOBAL_BATCH,), generator=g)
        batches.append((images[rank * n:(rank + 1) * n], labels[rank * n:(rank + 1) * n]))
    recipe.tr.loader = lambda epoch: batches         # the loop's data seam: fixed batches
    init = {"init." + k: v.detach().clone() for k, v in
            recipe.model.heba_adapters.state_dict().items()}
    recipe.train()
    state = {k: v.detach().contiguous() for k, v in recipe.model.heba_adapters.state_dict().items()}
    save_file({**state, **init}, result)
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()


def _worker(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    _run(rank, world, os.path.join(out, f"rank{rank}"),
         os.path.join(result_dir, f"rank{rank}.safetensors"))


def test_single_process_equals_two_rank_ddp(tmp_path):
    from safetensors.torch import load_file
    # forked where the platform can: a spawned rank spends most of its time importing
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(tmp_path)),
                       nprocs=2, join=True, start_method=start)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert k not in os.environ
    _run(0, 1, str(tmp_path / "single"), str(tmp_path / "single.safetensors"))
    one = load_file(str(tmp_path / "single.safetensors"))
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    keys = [k for k in one if not k.startswith("init.")]
    for k in keys:
        assert torch.equal(r0["init." + k], one["init." + k]), k     # the same start
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
        # and they trained (but the last visual MLP adapter: it changes only patch tokens,
        # which no later block mixes into the pooled class token, so its gradient is zero)
        if not k.startswith(f"visual_adapter.{TINY_LAYERS}.mlp_conv."):
            assert not torch.equal(one[k], one["init." + k]), k


def test_loader_order_changes_per_epoch():
    """loader-same-order-every-epoch, pipeline-ddp-epoch-not-set: a new shuffle every epoch
    (Dassl's RandomSampler draws from the advancing global generator; DistributedSampler
    after set_epoch), the same one for the same (seed, epoch)."""
    from heba.train import data as run_data
    from heba.train.config import make_config
    ds = torch.utils.data.TensorDataset(torch.arange(40), torch.zeros(40, dtype=torch.long))
    for world in (1, 2):                    # 2: the DistributedSampler of rank 0 (set_epoch)
        loader = run_data.train_loader(ds, make_config("heba", batch_size=4, seed=1), "cpu",
                                       world=world, rank=0, workers=0)

        def order(epoch):
            return torch.cat([b[0] for b in loader.epoch(epoch)]).tolist()

        assert len(set(order(0))) == 40 // world and order(0) == order(0)
        assert order(0) != order(1) and order(1) != order(2)


# --- a diverged run; what --resume re-checks ----------------------------------------------------

def test_divergence_names_epoch_step_and_last_saved_epoch(tmp_path):
    """nan-guard: a non-finite loss at a step, or a non-finite adapter value, stops the run
    naming the epoch, the step and the last good saved set; save_epoch refuses NaN."""
    from types import SimpleNamespace
    from heba.train import loop
    from heba.train import run_folder as rf
    out = str(tmp_path)
    rf.write_set(out, 1, {"a.bin": lambda p: open(p, "wb").write(b"ok")})
    p = torch.nn.Parameter(torch.randn(3))
    run = SimpleNamespace(world=1, opts=SimpleNamespace(output=out, workers=0))
    tr = SimpleNamespace(params=[p])
    loop.check_finite(run, tr, 2, torch.tensor(0))                  # all finite: goes on
    with pytest.raises(loop.Diverged, match=r"at epoch 2 step 3: the loss is not finite; .*"
                                            r"last good saved epoch is 1 \(.*epoch_1\)"):
        loop.check_finite(run, tr, 2, torch.tensor(3))
    with torch.no_grad():
        p[1] = float("nan")
    with pytest.raises(loop.Diverged, match=r"at epoch 2: an adapter value is not finite"):
        loop.check_finite(run, tr, 2, torch.tensor(0))
    with pytest.raises(loop.Diverged, match="nothing is saved"):
        loop.save_epoch(run, tr, None, 2, {})
    assert rf.set_epochs(out) == [1]


def test_first_bad_step_is_kept_on_the_device():
    from heba.train.loop import _first_bad
    bad = torch.zeros((), dtype=torch.long)
    for step, loss in enumerate([1.0, 2.0, float("inf"), float("nan")], 1):
        bad = _first_bad(bad, torch.tensor(loss), step)
    assert bad.item() == 3


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tests.clip_utils import image_folder
    return image_folder(tmp_path_factory.mktemp("ds") / "ds", per_class=3)


RUN = ["--model", "tiny", "--pretrained", "none", "--shots", "1", "--epochs", "1",
       "--batch-size", "2", "--split", "all", "--towers", "visual", "--start", "4",
       "--no-eval-before", "--quiet", "--threads", "1"]


def _one_line(capsys, *patterns):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("heba-train: error: "), err
    for p in patterns:
        assert p in err[0], (p, err[0])


def test_resume_refuses_changed_data_or_options(images, tmp_path, capsys):
    """resume-rechecks: the data under the run changed (an image gone: split_all.json no
    longer matches the draw), an option saved with the run changed (--momentum, not in the
    older list of checked fields): one line each, nothing written. (--workers:
    tests/heba/train/test_preflight.py::test_resume_keeps_the_worker_count_the_result_depends_on.)"""
    import shutil
    from heba import cli
    data = str(tmp_path / "ds")
    shutil.copytree(images, data)
    out = str(tmp_path / "run")
    assert cli.main([data, *RUN, "-o", out]) == 0
    capsys.readouterr()
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    assert cli.main([data, *RUN, "-o", out, "--resume", "--momentum", "0.5"]) == 2
    _one_line(capsys, "momentum: checkpoint 0.9 vs now 0.5")
    cls = sorted(os.listdir(data))[0]
    os.remove(os.path.join(data, cls, sorted(os.listdir(os.path.join(data, cls)))[0]))
    assert cli.main([data, *RUN, "-o", out, "--resume"]) == 2
    _one_line(capsys, "the data changed since the run started", "split_all.json")
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before
