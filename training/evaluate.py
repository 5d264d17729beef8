"""Compatibility shim: the evaluation lives in ``loftup.training.evaluation`` (``evaluate`` is its
one entry point). The prototype score's helpers are re-exported for older imports."""

from loftup.training.evaluation.masks import label_map, prototype_miou

__all__ = ["label_map", "prototype_miou"]
