"""Moved: the trainer's step machinery lives in :mod:`heba.train.graph` (and the masked loss in
:mod:`heba.train.step`). These names resolve there on first use, so importing
:mod:`heba.clip` never imports the trainer."""

_MOVED = {"prepare_frozen": "heba.train.graph", "GraphedStep": "heba.train.graph",
          "policy_graphs_reason": "heba.train.graph", "CheckpointedBlock": "heba.train.graph",
          "checkpoint_frozen_blocks": "heba.train.graph",
          "uncheckpoint_frozen_blocks": "heba.train.graph", "find_max_batch": "heba.train.graph",
          "masked_cross_entropy": "heba.train.step"}


def __getattr__(name):
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
