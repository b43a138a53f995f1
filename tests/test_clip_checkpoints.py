"""The published-checkpoint fixture's old import path (tests/heba/adapters/test_published.py)."""

from tests.heba.adapters.test_published import published_heba  # noqa: F401
