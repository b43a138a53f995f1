"""heba.clip.checkpoints: the published trainer's checkpoints found and read."""

from __future__ import annotations

from heba.clip import checkpoints as ckpt


def test_find_checkpoint_takes_the_largest_epoch_numerically(tmp_path):
    """ckpt-latest-lexicographic: the Dassl trainer's ``model.pth.tar-<N>``, N as a number."""
    folder = tmp_path / "adapter_learner"
    folder.mkdir()
    for n in (2, 5, 10):
        (folder / f"model.pth.tar-{n}").write_bytes(b"x")
    (folder / "model-best.pth.tar").write_bytes(b"x")
    assert ckpt.find_checkpoint(str(tmp_path)) == ("published",
                                                   str(folder / "model.pth.tar-10"))


def test_published_layout_reads_first_and_last_layer():
    """ckpt-layout-end: a checkpoint adapting layers 3..12 (1-based) of both towers."""
    keys = {f"{t}_adapter.{i}.{m}.norm.bias": None for t in ("visual", "text")
            for i in range(3, 13) for m in ("att_conv", "mlp_conv")}
    assert ckpt.published_layout(keys) == dict(towers="both", start=3, end=12)
    assert ckpt.published_layout({"text_adapter.7.att_conv.up.weight": None}) == dict(
        towers="text", start=7, end=7)
