"""``sa1b``: the annotations shipped with SA-1B."""

from __future__ import annotations

from loftup.pipeline.mask_sources.base import MaskSource, mask_row, register_mask_source
from loftup.storage.errors import LoftupError


@register_mask_source("sa1b")
class Sa1bSource(MaskSource):
    """Masks from the SA-1B JSON, in annotation order; ``max_masks`` keeps the first ones
    (LoftUp used at most 150 per image, in annotation order). The image is not needed."""

    def __init__(self, max_masks: int | None = None):
        if max_masks is not None and int(max_masks) < 0:
            raise LoftupError(f"max_masks must be >= 0, got {max_masks}")
        self.max_masks = None if max_masks is None else int(max_masks)

    def options(self) -> dict:
        return {"max_masks": self.max_masks}

    def masks_for(self, image, ann: dict | None, image_id: int) -> list[dict]:
        from loftup.pipeline.sa1b import normalise_annotation

        if ann is None:
            raise ValueError("no annotation JSON for the sa1b mask source")
        items = ann.get("annotations")
        if not isinstance(items, list):
            raise ValueError("annotation JSON has no 'annotations' list")
        if self.max_masks is not None:
            items = items[: self.max_masks]
        anns = normalise_annotation({"image": ann.get("image", {}), "annotations": items})
        rows = []
        for order, a in enumerate(anns):
            h, w = a["segmentation"]["size"]
            points = a["point_coords"]
            rows.append(
                mask_row(
                    image_id,
                    a["id"],
                    order,
                    h,
                    w,
                    a["segmentation"]["counts"],
                    a["area"],
                    a["bbox"],
                    a["predicted_iou"],
                    a["stability_score"],
                    a["crop_box"],
                    points[0] if points else None,
                    self.name,
                )
            )
        return rows
