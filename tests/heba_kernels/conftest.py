"""Shared by the kernel tests: every fresh buffer a fused op allocates starts as NaN."""

import pytest


@pytest.fixture(autouse=True)
def nan_filled_fresh_buffers(monkeypatch):
    """``HEBA_DEBUG_NAN_FILL=1`` (heba_kernels.runtime.new_buffer, read at each call): a kernel
    that skips a tile of its output leaves NaN there and fails loudly."""
    monkeypatch.setenv("HEBA_DEBUG_NAN_FILL", "1")
