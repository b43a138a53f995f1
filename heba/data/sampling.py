"""Few-shot sampling and base/new class splits as pure functions of items.

The rules are those of the published protocol (CoOp / CoCoOp and HeBA on top of
Dassl), so that the same seed gives the same images:

- ``fewshot``: Dassl's ``DatasetBase.generate_fewshot_dataset``
  (``dassl/data/datasets/base_dataset.py``). Items are grouped by label in the
  order labels first appear; from each group ``shots`` items are drawn with
  ``random.sample``; a group with fewer items is kept whole, in its order, and
  draws nothing from the generator.
- ``subsample_classes``: CoOp's ``OxfordPets.subsample_classes``
  (``datasets/oxford_pets.py``). The labels of the *first* split are sorted, the
  first ``ceil(n / 2)`` are the base classes, the rest the new ones; every split
  keeps the items of the chosen classes, relabelled ``0..m-1`` in label order.

Nothing here opens a file or an image.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SUBSAMPLES = ("all", "base", "new")


@dataclass(frozen=True)
class Item:
    """One image: its path, its integer label and its class name."""

    path: str
    label: int
    classname: str


def fewshot(items: list[Item], shots: int, rng: random.Random) -> list[Item]:
    """``shots`` items per label, drawn with ``rng`` by Dassl's rule.

    Args:
        items: the pool, in the published order (the order labels first appear
            decides which label draws first).
        shots: items per label, >= 1.
        rng: the generator; ``random.Random(seed)`` draws what Dassl draws after
            ``random.seed(seed)``. It is advanced, so a second call (the val
            split) continues where the first stopped, as in the published code.

    Returns:
        The sampled items, label group after label group.

    Example:
        >>> rng = random.Random(1)
        >>> pool = [Item(f"{i}.jpg", i % 2, "ab"[i % 2]) for i in range(10)]
        >>> [it.label for it in fewshot(pool, 2, rng)]
        [0, 0, 1, 1]
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    out: list[Item] = []
    for group in groups.values():
        out.extend(rng.sample(group, shots) if len(group) >= shots else group)
    return out


def subsample_classes(*splits: list[Item], subsample: str = "all") -> tuple[list[Item], ...]:
    """Keep the base or new half of the classes in every split, relabelled.

    Args:
        splits: e.g. ``train, val, test``; the classes are those of ``splits[0]``.
        subsample: ``"all"`` (unchanged), ``"base"`` (the first ``ceil(n / 2)``
            sorted labels) or ``"new"`` (the others).

    Returns:
        One list per split; kept labels become ``0..m-1`` in their sorted order.

    Example:
        >>> tr = [Item("a", 0, "a"), Item("b", 1, "b"), Item("c", 2, "c")]
        >>> [(i.path, i.label) for i in subsample_classes(tr, subsample="new")[0]]
        [('c', 0)]
    """
    if subsample not in SUBSAMPLES:
        raise ValueError(f"subsample must be one of {', '.join(SUBSAMPLES)}, got {subsample!r}")
    if subsample == "all" or not splits:
        return tuple(list(s) for s in splits)
    labels = sorted({item.label for item in splits[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(selected)}
    return tuple([Item(it.path, relabel[it.label], it.classname) for it in split
                  if it.label in relabel] for split in splits)


def class_names(*splits: list[Item]) -> list[str]:
    """``names[label]`` for labels ``0..n-1`` seen in the splits.

    Raises ValueError when a label carries two names or labels leave a gap
    (Dassl would then pair names with the wrong labels silently).

    Example:
        >>> class_names([Item("a", 1, "cat"), Item("b", 0, "dog")])
        ['dog', 'cat']
    """
    names: dict[int, str] = {}
    for split in splits:
        for item in split:
            seen = names.setdefault(item.label, item.classname)
            if seen != item.classname:
                raise ValueError(f"label {item.label} has two class names: "
                                 f"{seen!r} and {item.classname!r}")
    missing = sorted(set(range(len(names))) - set(names))
    if missing or (names and min(names) < 0):
        bad = missing[0] if missing else min(names)
        raise ValueError(f"labels are not 0..{len(names) - 1}: label {bad} "
                         f"{'has no image' if missing else 'is negative'}")
    return [names[y] for y in range(len(names))]
