"""Moved to tests/heba/data/test_vision.py; its writers stay importable from here."""

from tests.heba.data.test_vision import no_md5, write_cifar10  # noqa: F401
