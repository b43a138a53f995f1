"""Fixtures of the data tests."""

from __future__ import annotations

import pytest

from tests.heba.data.images import image_items_in


@pytest.fixture
def image_items(tmp_path):
    """Five :class:`Item` images of odd sizes (:func:`tests.heba.data.images.image_items_in`)."""
    return image_items_in(tmp_path)
