"""The planted-bug list (tests/planted_bugs.py) follows the code: every entry still applies.

The planted-bug run itself (``python -m tests.plant_bugs``) is on demand; this
check is cheap and runs in CI, so that a refactor that moves the text a bug
edits, or renames the test meant to catch it, fails here instead of silently
turning the entry into a no-op.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.plant_bugs import ROOT, Bug
from tests.planted_bugs import AREAS, BUGS


def _test_targets(bug: Bug):
    """The file / node-id arguments of ``bug.tests`` (options such as ``-k EXPR`` skipped)."""
    args, skip = [], False
    for a in bug.tests:
        if skip:
            skip = False
        elif a in ("-k", "-m"):
            skip = True
        elif not a.startswith("-"):
            args.append(a)
    return args


def test_list_is_large_and_well_formed():
    names = [b.name for b in BUGS]
    assert len(BUGS) >= 30
    assert len(set(names)) == len(names), "duplicate bug names"
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9-]*", n) for n in names), names
    assert {b.area for b in BUGS} <= set(AREAS)
    assert {"kernels", "reference", "wiring", "loop", "checkpoints", "data"} <= {
        b.area for b in BUGS}


@pytest.mark.parametrize("bug", BUGS, ids=lambda b: b.name)
def test_bug_applies_once_and_its_tests_exist(bug):
    path = os.path.join(ROOT, bug.path)
    assert os.path.isfile(path), f"{bug.name}: {bug.path} does not exist"
    with open(path) as f:
        text = f.read()
    n = text.count(bug.old)
    assert n == 1, f"{bug.name}: the text to edit occurs {n} times in {bug.path}"
    assert bug.new != bug.old and bug.why, bug.name
    targets = _test_targets(bug)
    assert targets, f"{bug.name}: no tests to run"
    for t in targets:
        file, _, node = t.partition("::")
        assert os.path.isfile(os.path.join(ROOT, file)), f"{bug.name}: no test file {file}"
        if node:
            with open(os.path.join(ROOT, file)) as f:
                src = f.read()
            for part in node.split("::"):
                name = part.split("[")[0]
                assert re.search(rf"^\s*(def|class) {re.escape(name)}\b", src, re.M), (
                    f"{bug.name}: {file} has no test {name}")
