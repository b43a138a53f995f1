"""The backbone-agnostic adapter core: everything HeBA and AdapterTune need from a model,
whatever library built it.

=====================  ===========================================================
``policy``             :class:`ScalePolicy` (base / novel / slow-fast scale, drawn
                       on the device), the slow-fast hash
``modules``            the published containers (:class:`HeBAAdapters`,
                       :class:`LowRankAdapters`), :class:`AdaptedOutput`, and the
                       delegating :class:`Wrapper` base
``attach``             :class:`Sites` (where a library's blocks keep their attention
                       and MLP inputs), :func:`attach_heba`,
                       :func:`attach_adaptertune`, :func:`remove_adapters`, freezing
                       and counting
``published``          the published HeBA / AdapterTune checkpoint formats
=====================  ===========================================================

Each model library is one short module naming its blocks' sites: ``heba.clip.wiring``
(open_clip), ``heba.timm``, ``heba.hf`` (Hugging Face CLIP). This package imports
nothing from the training stack.
"""

from heba.adapters.attach import (  # noqa: F401
    Sites, attach_adaptertune, attach_heba, check_unattached, count_parameters, freeze,
    get_adapters, layer_range, param_like, remove_adapters, which_towers,
)
from heba.adapters.modules import (  # noqa: F401
    AdaptedOutput, HeBAAdapters, HeBALayer, LowRankAdapters, LowRankHolder, Wrapper,
)
from heba.adapters.policy import TOWERS, ScalePolicy, slow_fast_bits, slow_fast_key  # noqa: F401
from heba.adapters.published import (  # noqa: F401
    IGNORED, CheckpointError, adapter_state_dict, check_frozen_state, extract_state_dict,
    load_adapter_state, load_published_checkpoint, method_of, published_layout,
    published_model_state, read_checkpoint, read_published,
)
