"""Class prompts: the published descriptions, read without executing code, as one token bank.

The published recipe (VLM-HeBA ``trainers/heba.py``, ``AdapterLearner._build_text_prompts``)
prompts class ``c`` with ``"<ctx_init> <c>, <description>"`` for every GPT-3
description of ``c`` (``trainers/gpt3_prompts/<dataset>.py``, one dict literal
``{class name: [sentences]}``; CuPL ships the same as JSON). Keys are matched
lower-cased with ``_`` read as a space; ``{}`` in a description is replaced by
the class name; a class without descriptions gets the description
``"a photo of a <c>."``, prefixed as the others (``"a photo of a <c>, a photo
of a <c>."``). The classes' lists are padded to the longest by repeating their
first prompt, so one token tensor ``[C, T, L]`` holds them all (the published ``tk_prompts``).
Training draws one prompt per class per step (uniform over the ``T`` padded
slots, as published); evaluation uses the normalised mean of all ``T``.

The description files are parsed with :mod:`ast` (``literal_eval`` of the dict),
never imported or executed.

Note on the published code as written: ``trainers/gpt3_prompts.py`` imports the
per-dataset modules by bare name (``from eurosat import ...``) after adding the
repository root to ``sys.path``, where they are not; each failed import is
swallowed, so unless ``trainers/gpt3_prompts`` is on the path every class falls
back to ``"a photo of a <c>, a photo of a <c>."``. heba follows the intent
(descriptions, when ``--descriptions`` names them) and the fallback otherwise.
"""

from __future__ import annotations

import ast
import json
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from heba.clip.wiring import encode_text
from heba.train.config import UsageError

# --descriptions DIR: the published file of each data set (the ImageNet variants use
# ImageNet's, as the published loader's partial name match does).
DESCRIPTION_FILES = {
    "oxford_pets": "oxford_pets", "eurosat": "eurosat", "dtd": "dtd",
    "caltech101": "caltech101", "oxford_flowers": "oxford_flowers",
    "stanford_cars": "stanford_cars", "sun397": "sun397", "ucf101": "ucf101",
    "food101": "food101", "fgvc_aircraft": "fgvc_aircraft", "imagenet": "imagenet",
    "imagenetv2": "imagenet", "imagenet_sketch": "imagenet", "imagenet_a": "imagenet",
    "imagenet_r": "imagenet",
}


def read_descriptions(path: str, dataset: Optional[str] = None) -> dict:
    """``{class name: [description, ...]}`` from a published ``.py``, a CuPL ``.json``, or a folder.

    A folder is the published ``trainers/gpt3_prompts``: the file of ``dataset``
    is picked (``DESCRIPTION_FILES``), ``.py`` or ``.json``. Raises
    :class:`UsageError` (one line) when the file is missing or does not parse.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "pets.py")
        >>> _ = open(p, "w").write('PETS = {"Abyssinian": ["a cat."]}')
        >>> read_descriptions(p)
        {'Abyssinian': ['a cat.']}
    """
    if os.path.isdir(path):
        stem = DESCRIPTION_FILES.get(dataset or "")
        found = [os.path.join(path, stem + ext) for ext in (".py", ".json")] if stem else []
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            raise UsageError(f"--descriptions {path}: no description file for "
                             f"{dataset or 'this data set'} (expected {stem or '<name>'}.py "
                             f"or .json there)")
        path = found[0]
    if not os.path.isfile(path):
        raise UsageError(f"descriptions file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".py"):
        raw = _dict_literal(text, path)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"descriptions file {path} does not parse as JSON: {err}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"descriptions file {path} must hold an object {{class: [texts]}}")
    out = {}
    for k, v in raw.items():
        v = [v] if isinstance(v, str) else v
        if not isinstance(k, str) or not isinstance(v, list) or not all(
                isinstance(t, str) for t in v):
            raise UsageError(f"descriptions file {path}: the entry {k!r} must be a string or "
                             f"a list of strings")
        out[k] = v
    return out


def _dict_literal(text: str, path: str) -> dict:
    """The first top-level ``NAME = {...}`` of a Python file, by ``ast.literal_eval``."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as err:
        raise UsageError(f"descriptions file {path} does not parse: line {err.lineno}: "
                         f"{err.msg}") from None
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            try:
                return ast.literal_eval(node.value)
            except ValueError as err:
                raise UsageError(f"descriptions file {path}: the dict at line {node.lineno} "
                                 f"is not a literal ({err})") from None
    raise UsageError(f"descriptions file {path} assigns no dict literal {{class: [texts]}}")


def class_prompts(classnames: Sequence[str], descriptions: Optional[dict] = None,
                  ctx_init: str = "a photo of a",
                  templates: Optional[Sequence[str]] = None) -> list:
    """``[[prompt, ...] per class]``, by the published rule (module docstring) or ``templates``.

    ``templates`` (``{}`` = the class name) replace the descriptions rule.

    Example::

        >>> class_prompts(["tabby cat"], {"Tabby_Cat": ["striped {}."]})
        [['a photo of a tabby cat, striped tabby cat.']]
    """
    names = [c.replace("_", " ") for c in classnames]
    if templates:
        for t in templates:
            if "{}" not in t:
                raise UsageError(f"template {t!r} has no '{{}}' for the class name")
        return [[t.format(c) for t in templates] for c in names]
    table = {k.lower().replace("_", " "): v for k, v in (descriptions or {}).items()}
    out = []
    for c in names:
        suffix = table.get(c.lower()) or [f"a photo of a {c}."]
        suffix = [p.format(c) if "{}" in p else p for p in suffix]
        out.append([f"{ctx_init} {c}, {p}" for p in suffix])
    return out


class PromptBank:
    """The tokenized prompts of ``C`` classes, padded to ``T`` per class: ``tokens [C, T, L]``.

    Args:
        prompts: ``[[prompt, ...] per class]`` (:func:`class_prompts`).
        tokenizer: open_clip's (texts -> ``[N, L]`` long); truncates at ``L``.
    """

    def __init__(self, prompts: list, tokenizer, device=None):
        if not prompts or not all(prompts):
            raise UsageError("every class needs at least one prompt")
        t = max(len(p) for p in prompts)
        padded = [p + [p[0]] * (t - len(p)) for p in prompts]       # published padding
        flat = [s for p in padded for s in p]
        tokens = tokenizer(flat)
        self.tokens = tokens.view(len(prompts), t, -1).to(device)   # [C, T, L]
        self.n_classes, self.n_prompts = len(prompts), t

    def to(self, device):
        self.tokens = self.tokens.to(device)
        return self

    def sample(self, classes: Optional[torch.Tensor], generator=None) -> torch.Tensor:
        """One prompt per class ``[K, L]`` (uniform over the padded slots), ``classes [K]``."""
        tok = self.tokens if classes is None else self.tokens[classes]
        pick = torch.randint(0, self.n_prompts, (tok.shape[0],), device=tok.device,
                             generator=generator)
        return tok[torch.arange(tok.shape[0], device=tok.device), pick]

    def encode_all(self, model, chunk: int = 1024) -> torch.Tensor:
        """Normalised features of every padded prompt ``[C, T, E]``."""
        flat = self.tokens.flatten(0, 1)
        emb = torch.cat([F.normalize(encode_text(model, flat[i:i + chunk]).float(), dim=-1)
                         for i in range(0, len(flat), chunk)])
        return emb.view(self.n_classes, self.n_prompts, -1)

    def features(self, model, chunk: int = 1024) -> torch.Tensor:
        """The evaluation classifier ``[C, E]``: normalised mean of the prompts' features."""
        return F.normalize(self.encode_all(model, chunk).mean(1), dim=-1)


def make_bank(classnames, cfg, tokenizer, device, dataset: Optional[str] = None) -> PromptBank:
    """The :class:`PromptBank` of ``classnames`` as ``cfg`` prompts them (its descriptions for
    ``dataset``, default ``cfg.dataset``; its ``ctx_init`` and templates)."""
    desc = read_descriptions(cfg.descriptions, dataset or cfg.dataset) if cfg.descriptions \
        else None
    prompts = class_prompts(classnames, desc, cfg.ctx_init, cfg.templates)
    return PromptBank(prompts, tokenizer, device=device)
