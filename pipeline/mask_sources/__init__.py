"""Class-agnostic mask sources behind one registry; every source emits the same rows.

A source has ``.name``, ``.config() -> dict`` (meant for the masks job's config hash;
:func:`mask_source_config` gives the same dict without building the source) and
``masks_for(image, ann, image_id) -> list[dict]``, one dict per mask in the source's order,
with the mask store's columns except the geometry ones (``MASK_FIELDS``)::

    image_id, ann_id, order (0..n-1), height, width, counts (COCO RLE string at the original
    size), area, bbox [x, y, w, h], predicted_iou, stability_score, crop_box [x, y, w, h],
    point [x, y], source

:func:`add_geometry_rles` then adds one ``rle_<size>`` counts string per training geometry and
:func:`rows_to_table` turns rows into a table of the store's mask schema.

Sources (``list_mask_sources()``):

- ``sa1b``: the annotations shipped in the tar (what the LoftUp authors used). Annotation order
  is kept; ``ann_id`` is the annotation's own id; values are those of the JSON with types
  normalised by :func:`loftup.pipeline.sa1b.normalise_annotation`; a missing predicted_iou or
  stability_score becomes NaN, a missing crop_box or point null.
- ``sam``: segment-anything's ``SamAutomaticMaskGenerator`` (see :class:`SamSettings`).
- ``felzenszwalb``: scikit-image graph segmentation on the CPU, for demos and tests without
  weights. It partitions the image into colour-coherent regions; it is NOT a substitute for
  SAM (no objects, no parts hierarchy, no overlaps, no quality scores).

Ids for generated masks (``sam``, ``felzenszwalb``): ``ann_id = image_id * 1000 + order``, so a
source emits at most 1000 masks per image; further masks (the last in order) are dropped with
a warning. Bounding boxes of generated masks follow SAM's generator: ``[xmin, ymin, xmax -
xmin, ymax - ymin]`` with inclusive pixel indices (one less in w and h than
``pycocotools.mask.toBbox``), ``[0, 0, 0, 0]`` for an empty mask. Points are continuous pixel
coordinates (pixel ``(x, y)`` covers ``[x, x + 1) x [y, y + 1)``), as SAM's point prompts are.
"""

from __future__ import annotations

# Importing a source's module registers it, in this order (the order `list_mask_sources` and the
# "known:" of error messages give).
# isort: off
from loftup.pipeline.mask_sources import sa1b, felzenszwalb, sam  # noqa: F401

# isort: on
from loftup.pipeline.mask_sources.base import (
    ANN_ID_STRIDE,
    MASK_FIELDS,
    MaskSource,
    create_mask_source,
    list_mask_sources,
    mask_source_config,
    register_mask_source,
)
from loftup.pipeline.mask_sources.felzenszwalb import FelzenszwalbSource, segments_to_masks
from loftup.pipeline.mask_sources.geometry import add_geometry_rles, rows_to_table
from loftup.pipeline.mask_sources.sa1b import Sa1bSource
from loftup.pipeline.mask_sources.sam import SamSettings, SamSource, sam_records_to_rows

__all__ = [
    "ANN_ID_STRIDE",
    "MASK_FIELDS",
    "FelzenszwalbSource",
    "MaskSource",
    "Sa1bSource",
    "SamSettings",
    "SamSource",
    "add_geometry_rles",
    "create_mask_source",
    "list_mask_sources",
    "mask_source_config",
    "register_mask_source",
    "rows_to_table",
    "sam_records_to_rows",
    "segments_to_masks",
]
