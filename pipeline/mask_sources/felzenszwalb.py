"""``felzenszwalb``: scikit-image graph segmentation on the CPU, for demos and tests without weights."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from loftup.pipeline.mask_sources.base import MaskSource, cap_masks, mask_row, register_mask_source, require_image
from loftup.pipeline.mask_sources.geometry import downscale, sam_bbox
from loftup.storage.geometry import nearest_index


def _label_runs(labels: np.ndarray):
    """Column-major runs of a label map: (starts, lengths, run labels)."""
    flat = labels.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    return starts, lengths, flat[starts]


def segments_to_masks(labels: np.ndarray) -> list[dict]:
    """One mask per label of an ``h x w`` label map, straight from its column-major runs
    (no per-segment full-image pass). Returns dicts ``{label, counts, area, bbox, point}``,
    sorted by area descending (ties: lower label first)."""
    h, w = labels.shape
    total = h * w
    starts, lengths, run_labels = _label_runs(labels)
    by_label = np.argsort(run_labels, kind="stable")
    uniq, first = np.unique(run_labels[by_label], return_index=True)
    bounds = np.append(first, len(by_label))
    out = []
    for i, lab in enumerate(uniq):
        idx = by_label[bounds[i] : bounds[i + 1]]
        s, n = starts[idx], lengths[idx]
        e = s + n
        counts = np.empty(2 * len(s) + 1, dtype=np.int64)
        counts[0] = s[0]
        counts[2:-1:2] = s[1:] - e[:-1]
        counts[1::2] = n
        counts[-1] = total - e[-1]
        if counts[-1] == 0:  # pycocotools' own encoder never ends on an empty run
            counts = counts[:-1]
        coco = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
        x0, y0 = np.divmod(s, h)
        x1, y1 = np.divmod(e - 1, h)
        one_col = x1 == x0
        # A run that wraps into the next column covers the bottom of one and the top of the next.
        bbox = sam_bbox(x0.min(), np.where(one_col, y0, 0).min(), x1.max(), np.where(one_col, y1, h - 1).max(), False)
        longest = int(np.argmax(n))
        px, py = divmod(int(s[longest] + n[longest] // 2), h)
        out.append(
            {
                "label": int(lab),
                "counts": coco["counts"].decode("ascii"),
                "area": int(n.sum()),
                "bbox": bbox,
                "point": [px + 0.5, py + 0.5],
            }
        )
    out.sort(key=lambda m: (-m["area"], m["label"]))
    return out


@register_mask_source("felzenszwalb")
class FelzenszwalbSource(MaskSource):
    """``skimage.segmentation.felzenszwalb`` segments as masks (demos and tests; not SAM).

    The image is shrunk to ``max_side`` (default 512; None = original size) for speed and the
    label map is scaled back to the original size nearest-exact, so the masks partition the
    image exactly. ``scale``/``sigma``/``min_size`` are skimage's (``min_size`` in pixels of
    the shrunk image); the defaults give ~40-120 segments on 1500 px photos. Order: area
    descending. ``predicted_iou`` and ``stability_score`` are NaN (no model, no score);
    ``crop_box`` is the full image; ``point`` is the centre pixel of the segment's longest
    column-major run (always inside the mask).
    """

    def __init__(
        self,
        scale: float = 300.0,
        sigma: float = 0.8,
        min_size: int = 150,
        max_side: int | None = 512,
        max_masks: int | None = None,
    ):
        self.scale, self.sigma, self.min_size = float(scale), float(sigma), int(min_size)
        self.max_side = None if max_side is None else int(max_side)
        self.max_masks = None if max_masks is None else int(max_masks)

    def options(self) -> dict:
        return {
            "scale": self.scale,
            "sigma": self.sigma,
            "min_size": self.min_size,
            "max_side": self.max_side,
            "max_masks": self.max_masks,
        }

    def label_map(self, image) -> np.ndarray:
        """int32 ``H x W`` segment labels at the image's original size."""
        from skimage.segmentation import felzenszwalb

        image = require_image(image, self.name)
        small = np.asarray(downscale(image, self.max_side))
        labels = felzenszwalb(small, scale=self.scale, sigma=self.sigma, min_size=self.min_size, channel_axis=-1)
        labels = labels.astype(np.int32, copy=False)
        if labels.shape != (image.height, image.width):
            rows = nearest_index(labels.shape[0], image.height)
            cols = nearest_index(labels.shape[1], image.width)
            labels = labels[rows[:, None], cols[None, :]]
        return labels

    def masks_for(self, image, ann: dict | None, image_id: int) -> list[dict]:
        labels = self.label_map(image)
        h, w = labels.shape
        segs = cap_masks(segments_to_masks(labels), image_id, self.name, self.max_masks)
        full = [0.0, 0.0, float(w), float(h)]
        return [
            mask_row(
                image_id,
                None,
                k,
                h,
                w,
                m["counts"],
                m["area"],
                m["bbox"],
                None,
                None,
                full,
                m["point"],
                self.name,
            )
            for k, m in enumerate(segs)
        ]
