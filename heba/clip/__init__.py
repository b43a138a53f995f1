"""open_clip integration of heba's adapters: wiring, published checkpoints, the fast step.

This package is the application side: it depends on :mod:`heba.nn` and on
open_clip; :mod:`heba.nn` and :mod:`heba_kernels` never import it. The training
engine is :mod:`heba.train`.
"""

from heba.clip.wiring import (  # noqa: F401
    ScalePolicy, adapter_state_dict, attach_adaptertune, attach_heba, count_parameters,
    encode_text, get_adapters, remove_adapters, towers,
)
