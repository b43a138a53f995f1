"""heba-train under DistributedDataParallel: two CPU processes (gloo) end with the same adapters.

The two ranks are forked where the platform can (they start with torch, open_clip and heba
already imported: a spawned rank spends most of its time importing them), spawned elsewhere.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from tests.clip_utils import image_folder
import pytest
pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

from heba import cli  # noqa: E402  (imported before the ranks fork)
from heba.train import step as S  # noqa: E402
from heba.train.recipe import TrainRecipe  # noqa: E402


START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, folder, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    args = cli.parse_args([folder, "--model", "tiny", "--pretrained", "none", "--shots", "4",
                           "--epochs", "2", "--batch-size", "2", "--quiet", "--threads", "1",
                           "--no-eval-before", "--split", "all", "--device", "cpu", "-o", out])
    seen = []
    orig = S.AdapterStep.forward

    def spy(self, images, labels, mask, pick):
        seen.append(images.sum().item())
        return orig(self, images, labels, mask, pick)

    S.AdapterStep.forward = spy
    recipe = TrainRecipe(cli.make_train_config(args), cli.run_options(args, demo=False),
                         log=lambda *a, **k: None)
    recipe.run()
    model = recipe.model
    state = {k: v.detach().contiguous() for k, v in model.heba_adapters.state_dict().items()}
    state["_seen"] = torch.tensor(seen)
    save_file(state, os.path.join(result_dir, f"rank{rank}.safetensors"))
    cli._cleanup_distributed()


def test_two_ranks_identical_adapters(tmp_path):
    from safetensors.torch import load_file
    folder = image_folder(tmp_path / "ds", per_class=5)
    out = str(tmp_path / "out")
    mp.start_processes(_worker, args=(2, _free_port(), folder, out, str(tmp_path)), nprocs=2,
                       join=True, start_method=START)
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    seen0, seen1 = r0.pop("_seen"), r1.pop("_seen")
    # 16 images, 2 ranks, batch 2: 4 steps per epoch on each rank, on different images
    assert len(seen0) == len(seen1) == 8
    assert not torch.allclose(seen0, seen1)
    torch.manual_seed(1)                    # the CLI's --seed: the adapters' initial weights
    from heba.clip import tiny
    from heba.clip.wiring import attach_heba
    m, _ = tiny.load_tiny_clip(pretrained=False)
    torch.manual_seed(1)
    init = attach_heba(m).state_dict()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert any(not torch.equal(r0[k], init[k]) for k in r0)    # and they did train
    # rank 0 wrote the checkpoint, and it holds those weights
    saved = load_file(os.path.join(out, "adapters.safetensors"))
    assert all(torch.equal(saved[k], r0[k]) for k in r0)
