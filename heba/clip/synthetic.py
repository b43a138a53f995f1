"""Moved to :mod:`heba.data.synthetic` (the demo's generated images); kept importable here."""

from heba.data.synthetic import (COLORS, MEAN, SHAPES, SIZE_WORDS, STD,  # noqa: F401
                                 all_classes, balanced_ids, render, save_png_folder)
