"""Data sets for heba-train: readers by layout family, sampling as pure functions.

- ``heba.data.sampling``: items ``(path, label, classname)``, Dassl's few-shot
  rule and CoOp's base/new class split, without images or I/O.
- ``heba.data.coop``: the 15 data sets of CoOp's DATASETS.md (split files,
  class lists, ImageNet and its four test-only variants), giving the published
  splits for a seed.
- ``heba.data.vision``: torchvision data sets read from local roots with the
  AdapterTune protocol's seeded validation split and transforms.
- ``heba.data.synthetic`` / ``heba.data.demo``: the built-in generated shapes.
- ``heba.data.pipeline``: the training samples as uint8 (published draws,
  decoded once or PIL per sample), normalised on the device.
- ``heba.data.testcrops``: the deterministic test crops, prepared once.
- ``heba.data.check``: is every image whole (header + end marker, or decode).

README.md beside this file: the pipelines, their defaults and measurements.

This package imports nothing on its own; import the module you need.
"""
