"""A pytest plugin for the GPU check's pytest stages (``-p benchmarks.gpu_check_plugin``).

Two switches, both read from the environment:

* ``HEBA_HIDE_OPEN_CLIP=1``: ``import open_clip`` raises ``ModuleNotFoundError``
  as on a machine without it (the GPU machine has none), so the tests that need
  it can be seen to skip with the reason. ``tests/conftest.py`` calls
  :func:`hide_open_clip_if_asked` too, so a plain ``pytest tests`` honours it.
* ``HEBA_PYTEST_DEADLINE=<unix time>``: every test that would start after that
  moment is skipped with the reason "cut: ... time budget". A stage cut this way
  still ends normally, so its junit XML and benchmark JSON are written.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import time

import pytest

HIDDEN = "open_clip"
CUT_REASON = "cut: the GPU check's time budget for this stage was spent before this test"


class _HideModule(importlib.abc.MetaPathFinder):
    """A meta-path finder that makes ``import <name>`` (and its submodules) fail."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by "
                                      f"HEBA_HIDE_OPEN_CLIP=1)", name=fullname)
        return None


def hide_open_clip_if_asked() -> bool:
    """Hide open_clip from imports when ``HEBA_HIDE_OPEN_CLIP`` is set; True if hidden."""
    if os.environ.get("HEBA_HIDE_OPEN_CLIP", "0") in ("", "0"):
        return False
    if not any(isinstance(f, _HideModule) for f in sys.meta_path):
        sys.meta_path.insert(0, _HideModule(HIDDEN))
    for mod in [m for m in sys.modules if m == HIDDEN or m.startswith(HIDDEN + ".")]:
        del sys.modules[mod]
    return True


hide_open_clip_if_asked()


def pytest_runtest_setup(item):
    deadline = os.environ.get("HEBA_PYTEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(CUT_REASON)
