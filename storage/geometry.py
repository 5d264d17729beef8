"""The one geometric transform applied to everything stored for training.

Resize the short side to ``size`` and centre-crop ``size x size``. Images are resampled
bicubically; masks by nearest-exact sampling (half-pixel centres) so that a stored mask is
exactly ``full_mask[rows][:, cols]`` for the indices :func:`source_index` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

TRANSFORM = {
    "transform": "resize_short_side+center_crop",
    "image_resample": "bicubic",
    "mask_resample": "nearest-exact",
}


@dataclass(frozen=True)
class Plan:
    nh: int
    nw: int
    top: int
    left: int
    size: int


def plan(h: int, w: int, size: int) -> Plan:
    """Resized dimensions and crop offsets for an ``h x w`` source."""
    if h <= 0 or w <= 0:
        raise ValueError(f"invalid image size {h}x{w}")
    s = size / min(h, w)
    nh = max(size, int(round(h * s)))
    nw = max(size, int(round(w * s)))
    return Plan(nh, nw, (nh - size) // 2, (nw - size) // 2, size)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` output pixels resampling ``n_in`` (nearest-exact: output
    ``i`` reads ``floor((i + 0.5) * n_in / n_out)``, in exact integer arithmetic). The one home of
    nearest-pixel resampling: stored masks, sample data and training-time subsampling use it."""
    return ((2 * np.arange(n_out, dtype=np.int64) + 1) * n_in) // (2 * n_out)


def source_index(h: int, w: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source row and column of every output pixel (nearest-exact)."""
    p = plan(h, w, size)
    return nearest_index(h, p.nh)[p.top : p.top + size], nearest_index(w, p.nw)[p.left : p.left + size]


def resize_image(img: Image.Image, size: int) -> Image.Image:
    """Resize short side (bicubic, antialiased by PIL on downscale) then centre-crop."""
    img = img.convert("RGB")
    p = plan(img.height, img.width, size)
    img = img.resize((p.nw, p.nh), Image.BICUBIC)
    return img.crop((p.left, p.top, p.left + size, p.top + size))
