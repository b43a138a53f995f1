"""A pytest plugin for the GPU check's pytest stages (``-p tools.gpu_check.plugin``).

Two switches, both read from the environment:

* ``HEBA_HIDE_OPEN_CLIP=1``: ``import open_clip`` raises ``ModuleNotFoundError``
  as on a machine without it, so the tests and benchmarks that need it can be
  seen to skip with the reason (the switch of ``tests/conftest.py``, applied
  here to the benchmark suites too).
* ``HEBA_PYTEST_DEADLINE=<unix time>``: every test that would start after that
  moment is skipped with the reason "cut: ... time budget". A stage cut this way
  still ends normally, so its junit XML and benchmark JSON are written.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import hide_open_clip_if_asked

CUT_REASON = "cut: the GPU check's time budget for this stage was spent before this test"

hide_open_clip_if_asked()


def pytest_runtest_setup(item):
    deadline = os.environ.get("HEBA_PYTEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(CUT_REASON)
