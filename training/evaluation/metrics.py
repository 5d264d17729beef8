"""Scores of the paper's probes.

Semantic segmentation: one confusion matrix over the whole split (ignored pixels excluded),
IoU per class, mIoU as the mean over the classes that occur in the labels or the predictions
(a class absent from both has no IoU), pixel accuracy = correct / labelled pixels.

Video object segmentation, as the official DAVIS 2017 toolkit scores the semi-supervised task:
J is the region IoU of each object's mask (1 when both are empty), F the boundary F-measure
with a match tolerance of ``ceil(0.008 x image diagonal)`` pixels (a disk); both per object
and frame over every frame but the first (given) and the last, averaged per object, then over
the objects of all sequences.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "confusion_matrix",
    "seg_scores",
    "region_iou",
    "boundary_map",
    "boundary_f",
    "davis_object_scores",
    "davis_summary",
]


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) int64 counts, rows = label, columns = prediction. Labels outside
    ``[0, n_classes)`` (e.g. -1 = ignore) are left out."""
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long().to(label.device)
    keep = (label >= 0) & (label < n_classes)
    idx = label[keep] * n_classes + pred[keep].clamp(0, n_classes - 1)
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes).cpu()


def seg_scores(cm: torch.Tensor | np.ndarray, class_names: list[str]) -> dict:
    """mIoU, pixel accuracy and per-class IoU (classes seen in labels or predictions) of a
    confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    seen = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=seen)
    total = cm.sum()
    return {
        "miou": float(iou[seen].mean()) if seen.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "per_class_iou": {class_names[k]: float(iou[k]) for k in np.flatnonzero(seen)},
        "classes_scored": int(seen.sum()),
        "pixels": int(total),
    }


def region_iou(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """J of two binary masks; pixels under ``void`` do not count; 1.0 when both are empty."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    valid = np.ones_like(gt) if void is None else ~void.astype(bool)
    union = np.count_nonzero((gt | pred) & valid)
    if union == 0:
        return 1.0
    return np.count_nonzero(gt & pred & valid) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundaries of a binary mask: a pixel is on the boundary when it differs from its
    right, lower or lower-right neighbour (the last row and column compare along the edge only),
    the convention of the DAVIS / BSDS tools, so boundaries sit half a pixel towards the origin."""
    m = mask.astype(bool)
    right = np.zeros_like(m)
    down = np.zeros_like(m)
    diag = np.zeros_like(m)
    right[:, :-1] = m[:, 1:]
    down[:-1, :] = m[1:, :]
    diag[:-1, :-1] = m[1:, 1:]
    b = (m != right) | (m != down) | (m != diag)
    b[-1, :] = m[-1, :] != right[-1, :]
    b[:, -1] = m[:, -1] != down[:, -1]
    b[-1, -1] = False
    return b


def _near(points: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within Euclidean ``radius`` of any True pixel of ``points`` (dilation by a disk)."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~points) <= radius


def boundary_f(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, tolerance: float = 0.008) -> float:
    """F of two binary masks' boundaries. ``tolerance`` < 1 is a fraction of the image diagonal
    (rounded up to whole pixels), >= 1 a pixel count."""
    keep = None if void is None else ~void.astype(bool)
    g = gt.astype(bool) if keep is None else gt.astype(bool) & keep
    p = pred.astype(bool) if keep is None else pred.astype(bool) & keep
    radius = tolerance if tolerance >= 1 else math.ceil(tolerance * math.hypot(*gt.shape))
    gb, pb = boundary_map(g), boundary_map(p)
    n_g, n_p = int(gb.sum()), int(pb.sum())
    if n_g == 0 and n_p == 0:
        return 1.0
    if n_g == 0 or n_p == 0:
        return 0.0  # precision or recall is 0 and the other 1
    precision = np.count_nonzero(pb & _near(gb, radius)) / n_p
    recall = np.count_nonzero(gb & _near(pb, radius)) / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_object_scores(
    gt: np.ndarray, pred: np.ndarray, n_objects: int, void: np.ndarray | None = None, tolerance: float = 0.008
) -> dict:
    """Per object id 1..n: mean J and mean F over the frames of ``gt``/``pred`` ((T, H, W) label
    maps of the frames to score, i.e. without the first and last)."""
    out = {}
    for k in range(1, n_objects + 1):
        js, fs = [], []
        for t in range(len(gt)):
            v = None if void is None else void[t]
            js.append(region_iou(gt[t] == k, pred[t] == k, v))
            fs.append(boundary_f(gt[t] == k, pred[t] == k, v, tolerance))
        out[k] = {"J": float(np.mean(js)) if js else float("nan"), "F": float(np.mean(fs)) if fs else float("nan")}
    return out


def davis_summary(per_sequence_objects: dict[str, dict[int, dict]]) -> dict:
    """The toolkit's means: J and F averaged over all objects of all sequences; J&F their mean.
    Per sequence: the mean over its objects."""
    js = [o["J"] for objs in per_sequence_objects.values() for o in objs.values()]
    fs = [o["F"] for objs in per_sequence_objects.values() for o in objs.values()]
    j, f = float(np.nanmean(js)) if js else float("nan"), float(np.nanmean(fs)) if fs else float("nan")
    per_seq = {
        seq: {
            "J_mean": float(np.nanmean([o["J"] for o in objs.values()])),
            "F_mean": float(np.nanmean([o["F"] for o in objs.values()])),
            "objects": len(objs),
        }
        for seq, objs in per_sequence_objects.items()
        if objs
    }
    return {"J_mean": j, "F_mean": f, "JF_mean": (j + f) / 2, "objects": len(js), "per_sequence": per_seq}
