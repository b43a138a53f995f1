"""Data sets for heba-train: readers by layout family, sampling as pure functions.

- ``heba.data.sampling``: items ``(path, label, classname)``, Dassl's few-shot
  rule and CoOp's base/new class split, without images or I/O.
- ``heba.data.coop``: the 15 data sets of CoOp's DATASETS.md (split files,
  class lists, ImageNet and its four test-only variants), giving the published
  splits for a seed.
- ``heba.data.vision``: torchvision data sets read from local roots with the
  AdapterTune protocol's seeded validation split and transforms.

This package imports nothing on its own; import the module you need.
"""
