"""heba.nn: input validation of the adapter modules."""

from __future__ import annotations

import pytest


def test_grid_with_fewer_cells_than_tokens_and_infinite_scale_are_errors():
    """ops-grid-product-loose, ops-inf-scale-accepted: grid=(2, 5) for 11 patch tokens
    (fewer cells, not only more) and scale=+-inf fail in one line naming the argument."""
    import heba.nn
    from tests.helpers import tokens
    a = heba.nn.HeBAAdapter(16, modality="visual", grid=(2, 5), backend="reference")
    with pytest.raises(ValueError, match=r"num_prefix_tokens \+ H\*W"):
        a(tokens(2, 1 + 11, 16))
    b = heba.nn.HeBAAdapter(16, modality="text", backend="reference")
    for bad in (float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            b(tokens(2, 3, 16), scale=bad)
