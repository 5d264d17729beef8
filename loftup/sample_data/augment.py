"""Augmentation of a photo and its masks, and the geometry and RLE of nearest-upscaled masks."""

from __future__ import annotations

import numpy as np

from loftup.sample_data.photos import Photo
from loftup.storage.geometry import nearest_index


def target_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the short side exactly ``short_side`` and the aspect ratio kept."""
    s = short_side / min(h, w)
    nh, nw = max(short_side, round(h * s)), max(short_side, round(w * s))
    return (short_side, nw) if h <= w else (nh, short_side)


def _change_points(labels: np.ndarray, out_h: int, out_w: int):
    """Where the column-major scan of the upscaled label map changes label.

    Returns (pos, before, after): flat positions in the (out_h, out_w) Fortran-order scan and
    the labels (shifted by +1; 0 = "before the image") on either side.
    """
    h, w = labels.shape
    rows = nearest_index(h, out_h)
    cols = nearest_index(w, out_w)
    src_rows, first_out_row = np.unique(rows, return_index=True)
    lab = labels[src_rows].astype(np.int64) + 1
    hs = lab.shape[0]

    # Changes inside each source column, gathered per output column in CSR fashion.
    diff_t = (lab[1:] != lab[:-1]).T  # (w, hs-1): column-major order of the changes
    col_idx, row_idx = np.nonzero(diff_t)
    per_col = np.bincount(col_idx, minlength=w)
    col_ptr = np.concatenate([[0], np.cumsum(per_col)[:-1]])
    n_out = per_col[cols]
    total = int(n_out.sum())
    out_col = np.repeat(np.arange(out_w, dtype=np.int64), n_out)
    first = np.repeat(np.cumsum(n_out) - n_out, n_out)
    src = np.repeat(col_ptr[cols], n_out) + (np.arange(total, dtype=np.int64) - first)
    r = row_idx[src] + 1
    src_col = cols[out_col]
    pos_in = out_col * out_h + first_out_row[r]
    before_in = lab[r - 1, src_col]
    after_in = lab[r, src_col]

    # Changes across the boundary between consecutive output columns.
    tops = lab[0, cols]
    bottoms = np.concatenate([[0], lab[hs - 1, cols[:-1]]])
    edge = tops != bottoms
    pos_edge = np.nonzero(edge)[0].astype(np.int64) * out_h
    # pos_in is sorted (column, then row) and every edge sits before its column's interior
    # changes, so a searchsorted merge replaces a full sort.
    at = np.searchsorted(pos_in, pos_edge)
    return (
        np.insert(pos_in, at, pos_edge),
        np.insert(before_in, at, bottoms[edge]),
        np.insert(after_in, at, tops[edge]),
    )


def upscaled_rles(labels: np.ndarray, groups, out_h: int, out_w: int) -> list[dict | None]:
    """COCO RLEs (counts as str) of ``isin(labels, g)`` upscaled nearest to (out_h, out_w).

    ``None`` for a group that is empty in ``labels``.
    """
    from pycocotools import mask as mask_utils

    pos, before, after = _change_points(labels, out_h, out_w)
    n_lab = int(labels.max()) + 2
    total = out_h * out_w
    uncompressed, slots = [], []
    for k, g in enumerate(groups):
        lut = np.zeros(n_lab, bool)
        lut[np.asarray(g, np.int64)[np.asarray(g) < n_lab - 1] + 1] = True
        p = pos[lut[before] != lut[after]]
        if len(p) == 0:
            slots.append(None)
            continue
        counts = np.diff(np.concatenate([[0], p, [total]]))
        uncompressed.append({"size": [out_h, out_w], "counts": counts.tolist()})
        slots.append((len(uncompressed) - 1, counts, p))
    compressed = mask_utils.frPyObjects(uncompressed, out_h, out_w) if uncompressed else []
    out = []
    for slot in slots:
        if slot is None:
            out.append(None)
            continue
        idx, counts, p = slot
        rle = compressed[idx]
        out.append({"size": [out_h, out_w], "counts": rle["counts"].decode("ascii"), "_runs": (counts, p)})
    return out


# ---------------------------------------------------------------------------------------------
def augment(photo: Photo, rng: np.random.Generator):
    """Random crop (70-100 % of the area), horizontal flip and colour jitter, same for masks.

    Returns (rgb, labels, (y0, x0, height, width, flipped)).
    """
    h, w = photo.labels.shape
    area = rng.uniform(0.7, 1.0)
    aspect = np.exp(rng.uniform(np.log(0.85), np.log(1.18)))
    ch = int(min(h, max(16, round(h * np.sqrt(area * aspect)))))
    cw = int(min(w, max(16, round(w * np.sqrt(area / aspect)))))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    rgb = photo.rgb[y0 : y0 + ch, x0 : x0 + cw]
    labels = photo.labels[y0 : y0 + ch, x0 : x0 + cw]
    flipped = bool(rng.random() < 0.5)
    if flipped:
        rgb, labels = rgb[:, ::-1], labels[:, ::-1]
    bright, contrast, sat = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2), rng.uniform(0.7, 1.3)
    f = rgb.astype(np.float32)
    gray = f @ np.array([0.299, 0.587, 0.114], np.float32)
    f = gray[..., None] + np.float32(sat) * (f - gray[..., None])
    mean = np.float32(gray.mean())
    f = (mean + np.float32(contrast) * (f - mean)) * np.float32(bright)
    rgb = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb), np.ascontiguousarray(labels), (y0, x0, ch, cw, flipped)
