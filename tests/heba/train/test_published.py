"""A second reading of the published HeBA pipeline, point by point, against heba.

Each expectation is written from the published code, not from heba's:

* VLM-HeBA ``trainers/heba.py`` (prompts, candidate set, slow-fast scale, test
  scales), ``configs/trainers/HeBA/base2new.yaml`` (PIXEL_MEAN / PIXEL_STD,
  bicubic), ``parse_test_res.py`` (mean and ``np.std`` over seeds);
* CoOp ``datasets/oxford_pets.py`` (``subsample_classes`` after the few-shot draw);
* Dassl ``dassl/data/transforms/transforms.py`` (``build_transform``),
  ``dassl/engine/trainer.py`` (``test()`` without autocast; ``save_model``),
  ``dassl/utils/torchtools.py`` (``save_checkpoint``: ``model.pth.tar-<epoch>``
  and a ``checkpoint`` file naming the last one).
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch

from heba.data import coop
from heba.train.prompts import PromptBank, class_prompts
from heba.train.step import candidate_mask, draw_step
from tests.clip_utils import one_thread  # noqa: F401
from tests.coop_fixtures import make_split_dataset

pytest.importorskip("open_clip", reason="needs open_clip (pip install open_clip_torch)")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)     # base2new.yaml INPUT.PIXEL_MEAN
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)     # base2new.yaml INPUT.PIXEL_STD


def fake_tokenizer(texts, length=12):
    """Distinct token rows per distinct text: sot, one id per text, eot (the largest id)."""
    ids = {}
    rows = [[98, 1 + ids.setdefault(t, len(ids)) % 90, 99] + [0] * (length - 3) for t in texts]
    return torch.tensor(rows)


# --- 1. the split: few-shot over all classes, then the halves; class names ------------------

def test_fewshot_is_drawn_over_all_classes_before_the_halves(tmp_path):
    """CoOp's readers draw the shots (train, then val, from one seeded stream) over every
    class and only then keep the base or new half, relabelled: a base / new split is the
    all-classes split filtered, for every seed."""
    counts = [(9, 5, 3), (3, 2, 2), (7, 4, 3), (8, 6, 2), (6, 1, 4)]   # 5 classes: 3 base
    make_split_dataset(tmp_path, "dtd", counts, order_seed=4)
    m = math.ceil(len(counts) / 2)
    for seed in (1, 2, 3):
        full = coop.build_split("dtd", str(tmp_path), 4, seed, "all")
        base = coop.build_split("dtd", str(tmp_path), 4, seed, "base")
        new = coop.build_split("dtd", str(tmp_path), 4, seed, "new")
        for part in ("train", "val", "test"):
            items = [(it.path, it.label, it.classname) for it in getattr(full, part)]
            assert [(it.path, it.label, it.classname) for it in getattr(base, part)] == \
                [(p, y, c) for p, y, c in items if y < m]
            assert [(it.path, it.label, it.classname) for it in getattr(new, part)] == \
                [(p, y - m, c) for p, y, c in items if y >= m]
        assert base.classnames + new.classnames == full.classnames
    # seeds draw different shots (so the stream really is the seed's)
    assert coop.build_split("dtd", str(tmp_path), 4, 1, "all").train != \
        coop.build_split("dtd", str(tmp_path), 4, 2, "all").train


def test_fewshot_draw_is_the_one_dassl_made_on_its_python():
    """The literal draw of generate_fewshot_dataset (3 train shots, then 2 val, after
    random.seed(1)) on this pool, as Python 3.6, 3.8 and 3.13 make it (the published code
    ran on 3.8): the split does not depend on the Python heba runs on."""
    from heba.data.sampling import Item, fewshot
    labels = [(i * 7) % 5 for i in range(60)]
    train = [Item(f"t{i}", y, str(y)) for i, y in enumerate(labels)]
    val = [Item(f"v{i}", y, str(y)) for i, y in enumerate(labels[:30])]
    rng = random.Random(1)
    assert [it.path for it in fewshot(train, 3, rng)] == [
        "t10", "t45", "t5", "t21", "t6", "t36", "t37", "t57", "t32", "t18", "t8", "t38", "t4",
        "t34", "t54"]
    assert [it.path for it in fewshot(val, 2, rng)] == [
        "v20", "v0", "v26", "v16", "v12", "v7", "v23", "v3", "v14", "v4"]


def published_prompts(classnames, descriptions, ctx_init="a photo of a"):
    """AdapterLearner._build_text_prompts's strings, restated: keys lower-cased with "_" as
    " "; class names with "_" as " " (case kept in the prompt); no descriptions ->
    ["a photo of a <c>."], which is then prefixed like any description; "{}" -> the name."""
    table = {}
    for key, value in descriptions.items():
        table[key.lower().replace("_", " ")] = value
    result = []
    for name in classnames:
        name = name.replace("_", " ")
        found = table.get(name.lower(), []) or ["a photo of a " + name + "."]
        result.append([ctx_init + " " + name + ", " + (d.format(name) if "{}" in d else d)
                       for d in found])
    return result


def test_class_prompts_are_the_published_strings():
    names = ["Golden_Retriever", "tabby cat", "Sea_Lion", "unknown_thing", "Face"]
    desc = {"golden retriever": ["a big dog."], "Tabby_Cat": ["a striped {}", "a cat"],
            "sea lion": [], "FACE": ["a {} seen from the front"]}
    got = class_prompts(names, desc)
    assert got == published_prompts(names, desc)
    assert got[0] == ["a photo of a Golden Retriever, a big dog."]
    assert got[1] == ["a photo of a tabby cat, a striped tabby cat", "a photo of a tabby cat, a cat"]
    assert got[2] == ["a photo of a Sea Lion, a photo of a Sea Lion."]         # empty list
    assert got[3] == ["a photo of a unknown thing, a photo of a unknown thing."]
    assert class_prompts(names, None) == published_prompts(names, {})


# --- 2. / 3. the candidate set and the prompt drawn per class --------------------------------

def test_candidate_negatives_are_a_uniform_subset():
    """The published negatives: randperm over the classes not in the batch, the first
    min(#others, 5 x #unique): each other class equally likely, with probability
    n_neg / #others. Every class when the data set has no more classes than the batch."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 4])                     # 2 unique -> 10 of the 28 others
    freq = torch.zeros(30)
    n = 2000
    for _ in range(n):
        m = candidate_mask(labels, 30, 5, g)
        assert m[0] and m[4] and int(m.sum()) == 2 + 10
        freq += m.float()
    others = freq[[c for c in range(30) if c not in (0, 4)]] / n
    assert (others - 10 / 28).abs().max() < 0.05
    six = torch.zeros(6, dtype=torch.long)
    assert candidate_mask(six, 6, 1, g).all()                   # classes == batch: every class
    assert int(candidate_mask(six, 7, 1, g).sum()) == 2         # classes > batch: 1 + 1 negative


def test_prompt_slots_padded_with_the_first_and_drawn_uniformly():
    """tk_prompts pads a class's prompts by repeating its first; training draws one slot per
    class uniformly over all padded slots (torch.randint(0, n_temp, (1, n_cls)))."""
    bank = PromptBank([["a", "b", "c"], ["d"], ["e", "f"]], fake_tokenizer)
    assert bank.tokens.shape[:2] == (3, 3)
    assert torch.equal(bank.tokens[1, 1], bank.tokens[1, 0])
    assert torch.equal(bank.tokens[1, 2], bank.tokens[1, 0])
    assert torch.equal(bank.tokens[2, 2], bank.tokens[2, 0])
    assert not torch.equal(bank.tokens[2, 1], bank.tokens[2, 0])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 3)
    n = 3000
    for _ in range(n):
        _, pick = draw_step(torch.tensor([0, 1]), bank, 5, "batch", g)
        counts[torch.arange(3), pick] += 1
    assert ((counts / n) - 1 / 3).abs().max() < 0.04


def test_long_prompts_are_truncated_as_clip_tokenize_truncate():
    """clip.tokenize(p, truncate=True): sot + BPE + eot, cut to 77 tokens with the last one
    set to eot (so the text feature is read at the last position)."""
    import open_clip
    tok = open_clip.get_tokenizer("ViT-B-16")
    long = "a photo of a tabby cat, " + "a very " * 60 + "striped cat."
    short = "a photo of a tabby cat, a cat."
    bank = PromptBank([[long], [short]], tok)
    rows = bank.tokens[:, 0]
    for text, row in zip((long, short), rows):
        ids = [tok.sot_token_id] + tok.encode(text) + [tok.eot_token_id]
        if len(ids) > 77:
            ids = ids[:77]
            ids[-1] = tok.eot_token_id
        assert row.tolist() == ids + [0] * (77 - len(ids))
    assert rows.argmax(-1).tolist()[0] == 76


# --- 4. transforms and the test-time precision ------------------------------------------------

def test_dassl_transforms_of_vit_b16_openai(monkeypatch):
    """build_transform with random_resized_crop, random_flip, normalize at 224, bicubic, the
    yaml's OpenAI mean / std; test: resize the shorter side to 224, centre crop 224."""
    import open_clip
    from torchvision import transforms as T
    from heba.train.backbones import openclip
    from heba.train.config import make_config

    pre = open_clip.get_pretrained_cfg("ViT-B-16", "openai")    # what the weights set

    def fake(name, pretrained=None, force_quick_gelu=False, **kw):       # no weights here
        model = torch.nn.Module()
        model.visual = torch.nn.Module()
        model.visual.image_size = (224, 224)
        model.visual.image_mean, model.visual.image_std = pre["mean"], pre["std"]
        return model, None, None

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake)
    bb = openclip.load(make_config("heba", model="ViT-B-16", pretrained="openai"))
    train, test = bb.train_transform.transforms, bb.eval_transform.transforms
    assert [type(t).__name__ for t in train] == ["RandomResizedCrop", "RandomHorizontalFlip",
                                                 "ToTensor", "Normalize"]
    rrc = train[0]
    assert tuple(rrc.size) == (224, 224) and rrc.scale == (0.08, 1.0)
    assert rrc.ratio == pytest.approx((3 / 4, 4 / 3))
    assert rrc.interpolation == T.InterpolationMode.BICUBIC and train[1].p == 0.5
    assert [type(t).__name__ for t in test] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert test[0].size in (224, [224], (224,)) and test[0].interpolation == rrc.interpolation
    assert tuple(test[1].size) == (224, 224)
    for norm in (train[3], test[3]):
        assert tuple(norm.mean) == pytest.approx(PIXEL_MEAN)
        assert tuple(norm.std) == pytest.approx(PIXEL_STD)


def test_eval_precision_fp32_is_dassl_test(tmp_path, monkeypatch):
    """Dassl's test() calls the model outside autocast (HeBA autocasts forward_backward only):
    --eval-precision fp32 evaluates in fp32 (and keeps the backbone fp32); the default
    evaluates at the run's precision. Same for a published checkpoint."""
    from heba.train import evaluate as E
    from heba.train import recipe as R
    from heba.train.config import make_config
    from tests.test_clip_checkpoints import published_heba
    seen = []
    monkeypatch.setattr(R, "evaluate", lambda *a, **k: seen.append(a[4]) or {"all": 0.0})
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: seen.append(a[4]) or {"all": 0.0})
    for eval_precision, want in (("fp32", "fp32"), (None, "bf16")):
        cfg = make_config("heba", model="tiny", pretrained="none", source="demo", shots=1,
                          test_per_class=1, precision="bf16", eval_precision=eval_precision)
        rec = R.TrainRecipe(cfg, R.RunOptions(output=str(tmp_path / "r"), threads=1,
                                              device="cpu", quiet=True), log=lambda *a: None)
        rec.setup()
        rec.evaluate()
        assert seen.pop() == want
        frozen = rec.model.visual.transformer.resblocks[0].attn.in_proj_weight.dtype
        assert frozen == (torch.float32 if want == "fp32" else torch.bfloat16)
        assert any("--eval-precision fp32" in n for n in rec.fast_notes) == (want == "fp32")
    from heba.clip import tiny
    layers = tiny.CONFIG["vision_cfg"]["layers"]
    published_heba(layers, 1, layers, out=str(tmp_path / "pub"),
                   vis_d=tiny.CONFIG["vision_cfg"]["width"], txt_d=tiny.CONFIG["text_cfg"]["width"])
    E.evaluate_checkpoint(str(tmp_path / "pub"), dict(model="tiny", pretrained="none",
                                                      test_per_class=1, precision="bf16",
                                                      eval_precision="fp32"),
                          R.RunOptions(threads=1, device="cpu"), log=lambda *a: None)
    assert seen == ["fp32"]


# --- 5. the slow-fast scale and the test scales ------------------------------------------------

def test_slow_fast_probability_and_test_scales():
    """return_*_adapter: `torch.rand(1) > SLOW_FAST_RATIO and training` -> base x 2.25, so the
    boosted scale has probability 0.2 per block draw; a block's two adapters share it; at
    test time the scale is ADAPTER_SCALE_BASE and nothing is drawn."""
    from heba.clip.wiring import ScalePolicy
    p = ScalePolicy(0.025, 0.010, 2.25, 0.8, seed=0, per_block=True)
    p.bind("visual", 1)                       # one block; each att call starts a forward
    draws = []
    for _ in range(5000):
        att, mlp = float(p.scale(True, "visual", 0, 0)), float(p.scale(True, "visual", 0, 1))
        assert att == mlp
        draws.append(att)
    assert set(draws) == {float(torch.tensor(0.025)), float(torch.tensor(0.025 * 2.25))}
    assert abs(sum(d > 0.03 for d in draws) / len(draws) - 0.2) < 0.02
    state = p.state_dict()
    assert {p.scale(False, "visual", 0) for _ in range(10)} == {0.025}
    assert p.state_dict() == state                            # no draw at test time


@pytest.mark.parametrize("novel_eval,want", [("base", 0.025), ("novel", 0.010)])
def test_novel_classes_are_tested_at_the_base_scale_as_published(novel_eval, want, monkeypatch):
    """use_novel_scale is never set in the published code, so novel classes are tested at
    ADAPTER_SCALE_BASE (0.025): heba's default; --novel-eval novel uses the declared 0.010."""
    from torch.utils.data import TensorDataset
    from heba.clip.wiring import ScalePolicy, attach_heba
    from heba.nn import HeBAAdapter
    from heba.train.evaluate import evaluate
    from tests.clip_utils import images, tiny_clip
    seen = []
    orig = HeBAAdapter.forward
    monkeypatch.setattr(HeBAAdapter, "forward",
                        lambda self, x, scale=1.0: seen.append(scale) or orig(self, x, scale=scale))
    model = tiny_clip()
    attach_heba(model, policy=ScalePolicy(0.025, 0.010, 2.25, 0.8, seed=0, per_block=True))
    ds = TensorDataset(images(n=2), torch.tensor([0, 1]))
    bank = PromptBank([["a"], ["b"]], lambda t: fake_tokenizer(t, length=16))
    for split, scale in (("base", 0.025), ("novel", want)):
        seen.clear()
        evaluate(model, {split: (["x", "y"], ds)}, {split: bank}, torch.device("cpu"), "fp32",
                 novel_eval=novel_eval)
        assert seen and set(seen) == {scale}, (split, set(seen))


# --- 6. a run folder as Dassl writes it ---------------------------------------------------------

def test_dassl_run_folder_picks_the_last_epoch(tmp_path):
    """save_checkpoint writes model.pth.tar-<epoch> (the dict has state_dict, epoch,
    optimizer, scheduler, val_result) and a 'checkpoint' file naming it; a run with
    CHECKPOINT_FREQ saves several epochs: the largest epoch is the trained model (by number:
    '5' > '30' as text)."""
    from heba.clip.checkpoints import find_checkpoint, read_published
    from tests.test_clip_checkpoints import published_heba
    ck = published_heba(3, 1, 3, out=str(tmp_path))
    learner = tmp_path / "adapter_learner"
    assert set(ck) == {"state_dict", "epoch", "optimizer", "scheduler", "val_result"}
    torch.save(dict(ck, epoch=5), learner / "model.pth.tar-5")
    torch.save(dict(ck, val_result=71.5), learner / "model-best.pth.tar")
    (learner / "checkpoint").write_text("model.pth.tar-30\n")
    for where in (tmp_path, learner):
        kind, path = find_checkpoint(str(where))
        assert kind == "published" and os.path.basename(path) == "model.pth.tar-30"
    state = read_published(path)
    assert "tk_prompts" not in state and len(state) == len(ck["state_dict"]) - 1


# --- 7. the reported numbers ----------------------------------------------------------------------

def test_seed_summary_is_mean_and_population_std():
    """parse_test_res.py prints np.mean and np.std (ddof 0) over the seeds' accuracies; the
    harmonic mean is 2 b n / (b + n)."""
    from heba.train.evaluate import harmonic_mean
    from heba.train.protocols import mean_std
    rng = random.Random(0)
    for k in (1, 2, 3):
        vals = [rng.uniform(50, 90) for _ in range(k)]
        mean, std = mean_std(vals)
        assert mean == pytest.approx(float(np.mean(vals)))
        assert std == pytest.approx(float(np.std(vals)))
    assert harmonic_mean(84.0, 78.0) == pytest.approx(2 * 84.0 * 78.0 / (84.0 + 78.0))
