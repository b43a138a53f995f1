"""Test-session switches read from the environment.

``HEBA_HIDE_OPEN_CLIP=1`` makes ``import open_clip`` (and its submodules) fail
as on a machine without it, so the tests that need it can be seen to skip with
the reason on any machine. The GPU check's pytest plugin
(``tools/gpu_check/plugin.py``) uses the same switch for the benchmark suites.
Under pytest-xdist, a worker's own ``PYTEST_XDIST_*`` names leave its environment
(:func:`pytest_configure`), so a test's child pytest is a plain one.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

HIDDEN = "open_clip"


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


def pytest_configure(config):
    # A pytest-xdist worker's environment names it (PYTEST_XDIST_WORKER, ...). Tests that
    # start a pytest of their own (the benchmarks' and the GPU check's dry runs) must start
    # a plain one, not one that believes it is a worker (pytest-benchmark then disables
    # itself), so the names leave the worker's environment once it is configured: xdist
    # reads a worker's id from its config, not from the environment.
    if hasattr(config, "workerinput"):
        for name in [k for k in os.environ if k.startswith("PYTEST_XDIST_")]:
            del os.environ[name]
