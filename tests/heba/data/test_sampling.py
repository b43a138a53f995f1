"""heba.data.sampling: the few-shot draw is Dassl's."""

from __future__ import annotations

import random

from heba.data import sampling
from heba.data.sampling import Item


def test_fewshot_group_of_exactly_shots_is_drawn():
    """fewshot-equal-size-group: Dassl's ``if len(items) >= num_shots: random.sample``;
    a class with exactly ``shots`` images is drawn too (reordered, generator advanced)."""
    exact = [Item(f"/e/{i}", 0, "e") for i in range(4)]
    more = [Item(f"/m/{i}", 1, "m") for i in range(9)]
    for seed in (1, 2, 3):
        random.seed(seed)
        expected = random.sample(exact, 4) + random.sample(more, 4)
        assert sampling.fewshot(exact + more, 4, random.Random(seed)) == expected
