"""heba.train.preflight: every value a run can fail on, checked before anything is written."""

from __future__ import annotations

import pytest


def test_momentum_one_is_refused():
    """preflight-momentum-one: momentum must be < 1 (1 never decays a gradient)."""
    from heba.train.config import UsageError, make_config
    from heba.train.preflight import check_config
    check_config(make_config("heba", momentum=0.9))
    with pytest.raises(UsageError, match=r"--momentum must be in \[0, 1\), got 1.0"):
        check_config(make_config("heba", momentum=1.0))
