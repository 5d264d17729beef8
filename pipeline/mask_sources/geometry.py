"""The geometry the mask sources share: SAM-style boxes, shrinking the image a source runs
on and growing its masks back, and the per-geometry RLE columns and table of the mask store."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from loftup.storage.geometry import nearest_index


def sam_bbox(x_min: int, y_min: int, x_max: int, y_max: int, empty: bool) -> list[float]:
    if empty:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(x_min), float(y_min), float(x_max - x_min), float(y_max - y_min)]


def downscale(image, max_side: int | None):
    """``image`` shrunk so its long side is at most ``max_side`` (PIL bilinear, antialiased)."""
    from PIL import Image

    w, h = image.size
    if not max_side or max(w, h) <= max_side:
        return image
    s = max_side / max(w, h)
    return image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)


def upscale_rle(counts: str, src: tuple[int, int], dst: tuple[int, int]) -> tuple[str, int, list[float]]:
    sh, sw = src
    h, w = dst
    mask = mask_utils.decode({"size": [sh, sw], "counts": counts.encode("ascii")}).astype(bool)
    big = mask[nearest_index(sh, h)[:, None], nearest_index(sw, w)[None, :]]
    coco = mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))
    ys = np.flatnonzero(big.any(axis=1))
    xs = np.flatnonzero(big.any(axis=0))
    empty = len(xs) == 0
    bbox = sam_bbox(
        xs[0] if not empty else 0,
        ys[0] if not empty else 0,
        xs[-1] if not empty else 0,
        ys[-1] if not empty else 0,
        empty,
    )
    return coco["counts"].decode("ascii"), int(big.sum()), bbox


def add_geometry_rles(rows: list[dict], sizes=(224, 896)) -> list[dict]:
    """Add ``rle_<size>`` (counts string, ``size x size``) to every row, in place; returns rows.

    Each is :func:`loftup.storage.rle.to_geometry` of the original-size mask: resize the short
    side to ``size`` and centre-crop, sampled nearest-exact.
    """
    from loftup.storage.rle import to_geometry

    for row in rows:
        rle = {"size": [row["height"], row["width"]], "counts": row["counts"]}
        for size in sizes:
            row[f"rle_{int(size)}"] = to_geometry(rle, int(size))["counts"]
    return rows


def rows_to_table(rows: list[dict], sizes=(224, 896)):
    """A ``pyarrow.Table`` of the store's mask schema for ``sizes`` (rows need ``rle_<size>``)."""
    import pyarrow as pa

    from loftup.storage import mask_schema

    schema = mask_schema(sizes)
    if not rows:
        return schema.empty_table()
    missing = [n for n in schema.names if n not in rows[0]]
    if missing:
        raise ValueError(f"mask rows lack {missing}; call add_geometry_rles(rows, {tuple(sizes)}) first")
    columns = {n: [r[n] for r in rows] for n in schema.names}
    return pa.table(columns, schema=schema)
