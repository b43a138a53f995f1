"""Test-session switches read from the environment.

``HEBA_HIDE_OPEN_CLIP=1`` makes ``import open_clip`` (and its submodules) fail
as on a machine without it, so the tests that need it can be seen to skip with
the reason on any machine. The GPU check's pytest plugin
(``tools/gpu_check/plugin.py``) uses the same switch for the benchmark suites.
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
