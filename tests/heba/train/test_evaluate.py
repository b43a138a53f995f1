"""heba.train.evaluate: an evaluation is the published evaluation, every time, and nothing else.

For every recipe (the CLIP few-shot ``evaluate``: HeBA and AdapterTune adapters;
the classifier's ``evaluate_split``: HeBA, AdapterTune, head-only) and every
backbone library (open_clip's tiny CLIP, a tiny random Hugging Face CLIP, a tiny
random timm ViT), the model is left in training mode, as the trainer leaves it,
and evaluated twice. The expectations come from outside the code under test:

* the published definition, written out here on a copy of the model in eval mode:
  CLIP logits ``logit_scale.exp() * normalise(image features) @ normalise(class
  features).T``, a class's features the normalised mean of its prompts' normalised
  features (VLM-HeBA ``CustomCLIP.forward`` at test time), the prediction their
  argmax; a classifier's logits ``model(images)``, its loss the (label-smoothed)
  cross-entropy and its top-k the label among the k largest logits;
* invariants: the two evaluations give the same logits bit for bit; autograd saves
  no tensor, no output carries a graph and no parameter gets a gradient; the slow-fast draw
  is off (the result does not depend on the policy's seed or counters, and the
  counters do not move); the model comes back in training mode.

The slow-fast draw is made to matter (scale 0.5, factor 4, ratio 0.5, adapters with
random weights) and the timm ViT carries dropout, so a training-mode leak changes
the logits well beyond the tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from heba.train import backbones
from heba.train.config import make_config
from heba.train.evaluate import evaluate, evaluate_split
from heba.train.prompts import PromptBank
from tests.clip_utils import one_thread, randomize_adapters  # noqa: F401

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

CLASSES = ["red circle", "blue square", "green triangle", "yellow cross", "black star"]
PROMPTS = [[f"a photo of a {c}.", f"a drawing of a {c}.", f"the {c}."][: 1 + i % 3]
           for i, c in enumerate(CLASSES)]            # 1, 2 or 3 prompts: padding matters
SLOW_FAST = dict(base_scale=0.5, novel_scale=0.2, scale_factor=4.0, slow_fast_ratio=0.5,
                 seed=0)


def image_set(n=10, classes=len(CLASSES), size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g),
                                          torch.randint(0, classes, (n,), generator=g))


# --- the CLIP recipe ---------------------------------------------------------------------------

def hf_clip(cfg):
    """A tiny random ``transformers.CLIPModel`` behind heba's Hugging Face wrapper, and a
    tokenizer laid out as CLIP's (start, words, end, padding) over its 100-token vocabulary."""
    transformers = pytest.importorskip("transformers", reason="heba[hf] extra not installed")
    from heba.train.backbones import hf
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    clip_cfg = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=100, max_position_embeddings=16, bos_token_id=98,
                         eos_token_id=99, pad_token_id=0),
        vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(clip_cfg).float()
    with torch.no_grad():                      # HF leaves unit norms and zero biases: draw all
        for p in clip.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def tokenize(texts):
        out = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [98] + [1 + sum(map(ord, w)) % 97 for w in t.split()][:14] + [99]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    return hf.attach(hf.HFCLIP(clip).eval(), cfg, "reference"), tokenize


def clip_model(library, method):
    """``(model, tokenizer)``: the backbone with ``method``'s adapters (random weights)."""
    recipe = "heba" if method == "heba" else "adaptertune"
    extra = dict(SLOW_FAST, start=1, end=2) if method == "heba" else dict(rank=4)
    if library == "hf":
        cfg = make_config(recipe, model="hf:unused", **extra)
        model, tok = hf_clip(cfg)
    else:
        cfg = make_config(recipe, model="tiny", pretrained="none", **extra)
        bb = backbones.load(cfg)
        model, tok = backbones.attach(bb.model, cfg, "reference"), bb.tokenizer
    randomize_adapters(model, std=0.3)
    return model.train(), tok


def reference_clip_logits(model, bank_tokens, ds, mode="base"):
    """The published test-time logits, written out on a copy of ``model`` in eval mode."""
    ref = copy.deepcopy(model).eval()
    if getattr(ref, "heba_policy", None) is not None:
        ref.heba_policy.set_mode(mode)
    images = torch.stack([x for x, _ in ds])
    with torch.no_grad():
        per_prompt = F.normalize(ref.encode_text(bank_tokens.flatten(0, 1)).float(), dim=-1)
        txt = F.normalize(per_prompt.view(*bank_tokens.shape[:2], -1).mean(1), dim=-1)
        img = F.normalize(ref.encode_image(images).float(), dim=-1)
        return ref.logit_scale.exp().float() * img @ txt.T                # [N, C]


class Recorder:
    """Records what an evaluation computes: the image features ``model.encode_image`` returns
    and the class features of each bank (instance attributes: the classes stay untouched)."""

    def __init__(self, model, banks):
        self.images, self.texts = [], []
        encode = model.encode_image

        def encode_image(*args, **kwargs):
            out = encode(*args, **kwargs)
            self.images.append(out)
            return out

        model.encode_image = encode_image
        for bank in banks.values():
            features = bank.features

            def bank_features(*args, _f=features, **kwargs):
                out = _f(*args, **kwargs)
                self.texts.append(out)
                return out

            bank.features = bank_features

    def logits(self, model, splits):
        """``[N, C]`` per split, in evaluation order, as the published test computes them
        from the recorded features."""
        img = iter(self.images)
        out = []
        for txt, (_, ds) in zip(self.texts, splits.values()):
            n = len(ds)
            feats = []
            while sum(len(f) for f in feats) < n:
                feats.append(next(img))
            f = F.normalize(torch.cat(feats).float(), dim=-1)
            out.append(model.logit_scale.exp().float() * f @ txt.float().T)
        return out

    def tensors(self):
        return self.images + self.texts


class SavedTensors:
    """Counts the tensors autograd saves for a backward pass inside the ``with``: none when
    no graph is built, whatever happens to the outputs afterwards."""

    def __enter__(self):
        self.count = 0

        def pack(t):
            self.count += 1
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def run_clip_eval(model, tok, splits, novel_eval="base"):
    banks = {s: PromptBank(PROMPTS, tok) for s in splits}
    rec = Recorder(model, banks)
    with SavedTensors() as saved:
        acc = evaluate(model, splits, banks, torch.device("cpu"), "fp32", batch_size=4,
                       novel_eval=novel_eval)
    del model.encode_image
    assert saved.count == 0, f"evaluation saved {saved.count} tensors for a backward pass"
    return acc, rec, banks


def assert_no_graph(tensors, model):
    for i, t in enumerate(tensors):
        assert t.grad_fn is None and not t.requires_grad, (
            f"evaluation output {i} {tuple(t.shape)} carries an autograd graph "
            f"(grad_fn={t.grad_fn}, requires_grad={t.requires_grad})")
    got = [n for n, p in model.named_parameters() if p.grad is not None]
    assert not got, f"evaluation set .grad of {got[:3]}"


def accuracy_of(logits, labels):
    return 100.0 * logits.argmax(1).eq(labels).sum().item() / len(labels)


CLIP_CASES = [("openclip", "heba"), ("openclip", "adaptertune"), ("hf", "heba"),
              ("hf", "adaptertune")]


@pytest.mark.parametrize("library,method", CLIP_CASES, ids=[f"{a}-{b}" for a, b in CLIP_CASES])
def test_clip_evaluation_is_the_published_evaluation(library, method):
    model, tok = clip_model(library, method)
    splits = {"base": (CLASSES, image_set(seed=1)), "novel": (CLASSES, image_set(seed=2))}
    acc, rec, banks = run_clip_eval(model, tok, splits)
    assert model.training, "evaluation did not give the model back in training mode"
    assert_no_graph(rec.tensors(), model)
    got = rec.logits(model, splits)
    for (split, (_, ds)), logits in zip(splits.items(), got):
        exp = reference_clip_logits(model, banks[split].tokens, ds)
        torch.testing.assert_close(logits, exp, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{split} logits vs the published test: {m}")
        labels = torch.stack([y for _, y in ds])
        assert acc[split] == accuracy_of(exp, labels), (split, acc[split])
    assert acc["hm"] == pytest.approx(2 * acc["base"] * acc["novel"] /
                                      max(acc["base"] + acc["novel"], 1e-12))


@pytest.mark.parametrize("library,method", CLIP_CASES, ids=[f"{a}-{b}" for a, b in CLIP_CASES])
def test_clip_evaluation_is_deterministic_and_draws_nothing(library, method):
    model, tok = clip_model(library, method)
    splits = {"base": (CLASSES, image_set(seed=1))}
    policy = getattr(model, "heba_policy", None)
    first, rec1, _ = run_clip_eval(model, tok, splits)
    if policy is not None:
        assert policy.random, "the test needs slow-fast on"
        assert policy.state_dict() == {"seed": 0, "counters": [0, 0]}, (
            "evaluation advanced the slow-fast counters")
        policy.load_state_dict({"seed": 12345, "counters": [7, 9]})   # another stream
    second, rec2, _ = run_clip_eval(model, tok, splits)
    if policy is not None:
        assert policy.state_dict() == {"seed": 12345, "counters": [7, 9]}
        assert policy.mode == "base"
    assert first == second
    for i, (a, b) in enumerate(zip(rec1.tensors(), rec2.tensors())):
        assert torch.equal(a, b), f"evaluation output {i} differs between two evaluations"


def test_novel_scale_evaluation_is_the_published_novel_test():
    """``novel_eval="novel"``: the novel split at the policy's novel scale, base at base."""
    model, tok = clip_model("openclip", "heba")
    splits = {"base": (CLASSES, image_set(seed=1)), "novel": (CLASSES, image_set(seed=2))}
    _, rec, banks = run_clip_eval(model, tok, splits, novel_eval="novel")
    for (split, (_, ds)), logits in zip(splits.items(), rec.logits(model, splits)):
        exp = reference_clip_logits(model, banks[split].tokens, ds, mode=split)
        torch.testing.assert_close(logits, exp, rtol=1e-4, atol=1e-4)
    assert model.heba_policy.mode == "base"


# --- the classifier recipe (timm) ---------------------------------------------------------------

KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, drop_rate=0.3)
N_CLASSES = 7


def timm_classifier(method):
    pytest.importorskip("timm", reason="heba[timm] extra not installed")
    extra = dict(SLOW_FAST, start=1, end=2, reduction=4) if method == "heba" else dict(rank=4)
    cfg = make_config("adaptertune", model="timm:vit_tiny_patch16_224", pretrained="none",
                      model_kwargs=KW, method=method, **extra)
    torch.manual_seed(0)
    lib = backbones.library(cfg.model)
    model = lib.attach(lib.load(cfg, num_classes=N_CLASSES).model, cfg, "reference")
    if method != "head-only":
        randomize_adapters(model, std=0.3)
    return model.train()


def run_split_eval(model, ds, smoothing=0.1):
    seen = []
    hook = model.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with SavedTensors() as saved:
            out = evaluate_split(model, ds, torch.device("cpu"), "fp32", (1, 5), batch_size=4,
                                 label_smoothing=smoothing)
    finally:
        hook.remove()
    assert saved.count == 0, f"evaluation saved {saved.count} tensors for a backward pass"
    return out, seen


CLASSIFY = ["heba", "adaptertune", "head-only"]


@pytest.mark.parametrize("method", CLASSIFY)
def test_classifier_evaluation_is_the_published_evaluation(method):
    model = timm_classifier(method)
    ds = image_set(n=10, classes=N_CLASSES, seed=3)
    out, seen = run_split_eval(model, ds)
    assert model.training, "evaluation did not give the model back in training mode"
    assert_no_graph(seen, model)
    ref = copy.deepcopy(model).eval()
    images, labels = (torch.stack(t) for t in zip(*ds))
    with torch.no_grad():
        exp = ref(images).float()                                          # [N, C]
    torch.testing.assert_close(torch.cat(seen).float(), exp, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"logits vs the model in eval mode: {m}")
    loss = F.cross_entropy(exp, labels, label_smoothing=0.1).item()
    top5 = 100.0 * sum(int(y in row) for y, row in zip(labels.tolist(),
                                                       exp.topk(5, 1).indices.tolist())) / 10
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["top1"] == accuracy_of(exp, labels) and out["top5"] == top5, out


@pytest.mark.parametrize("method", CLASSIFY)
def test_classifier_evaluation_is_deterministic_and_draws_nothing(method):
    model = timm_classifier(method)
    ds = image_set(n=6, classes=N_CLASSES, seed=4)
    policy = getattr(model, "heba_policy", None)
    first, seen1 = run_split_eval(model, ds)
    if policy is not None:
        assert policy.random and policy.state_dict()["counters"] == [0, 0], (
            "evaluation advanced the slow-fast counters")
        policy.load_state_dict({"seed": 999, "counters": [3, 0]})
    second, seen2 = run_split_eval(model, ds)
    if policy is not None:
        assert policy.state_dict() == {"seed": 999, "counters": [3, 0]}
    assert first == second
    for i, (a, b) in enumerate(zip(seen1, seen2)):
        assert torch.equal(a, b), f"batch {i}'s logits differ between two evaluations"


# --- a classifier checkpoint is read strictly ----------------------------------------------------

def class_folder(root, classes=("ant", "bee", "cat"), per_split=2):
    """``root/{train,test}/<class>/<i>.png``: random 16x16 images."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_split):
                a = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(a.numpy()).save(root / split / name / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("change", [None, "unexpected-key", "missing-key", "wrong-shape"])
def test_classifier_checkpoint_is_loaded_strictly(tmp_path, change):
    """heba's classifier file (a run's final adapters or a resume set's: the trained tensors
    and the head) evaluates as saved; one tensor too many, too few or misshapen is refused
    in one line naming it and the file."""
    pytest.importorskip("timm", reason="heba[timm] extra not installed")
    from safetensors.torch import load_file, save_file
    from heba.clip.checkpoints import CheckpointError
    from heba.train.context import RunOptions
    from heba.train.evaluate import evaluate_checkpoint
    from heba.train.trainable import save_trainable
    cfg = make_config("adaptertune", model="timm:vit_tiny_patch16_224", pretrained="none",
                      model_kwargs=dict(KW, img_size=16, patch_size=8), source="vision",
                      dataset="imagefolder", root=class_folder(tmp_path / "ds"), method="heba",
                      towers="visual", start=1, end=2, reduction=4)
    lib = backbones.library(cfg.model)
    model = lib.attach(lib.load(cfg, num_classes=3).model, cfg, "reference")
    path = str(tmp_path / "run" / "adapters.safetensors")
    save_trainable(path, randomize_adapters(model), "heba",
                   dict(cfg.to_dict(), classnames=["ant", "bee", "cat"]))
    state = load_file(path)
    key = {"unexpected-key": "visual_adapter.3.att_conv.down.weight", "missing-key": "head.bias",
           "wrong-shape": "visual_adapter.2.mlp_conv.up.weight"}.get(change)
    if change == "unexpected-key":
        state[key] = torch.randn(8, 32, 1, 1)
    elif change == "missing-key":
        del state[key]
    elif change == "wrong-shape":
        state[key] = torch.randn(128, 31, 1, 1)
    save_file(state, path)
    opts = RunOptions(threads=1, backend="reference")
    if change is None:
        acc = evaluate_checkpoint(path, {}, opts, log=lambda *a: None)
        assert set(acc) == {"top-1"} and 0.0 <= acc["top-1"] <= 100.0
        return
    with pytest.raises(CheckpointError) as err:
        evaluate_checkpoint(path, {}, opts, log=lambda *a: None)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and path in msg, msg
