"""Pictures of feature maps and masks: PCA colours, side-by-side panels, mask overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["pca_rgb", "save_panels", "overlay_masks", "palette"]

_FIT_PIXELS = 20000
_BLOCK_ELEMENTS = 1 << 22  # ~32 MB of float64 per projected block


def _as_chw(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu")
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"feature maps must be (C, H, W), got shape {x.shape}")
    return x


def _fit(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C,) and top-3 principal axes (3, C) of ``sample`` (N, C), signs fixed."""
    mean = sample.mean(0)
    centred = sample - mean
    # Eigenvectors of the C x C covariance: the same axes as an SVD of the N x C sample,
    # ~15x cheaper for N = 20k pixels.
    _, vecs = np.linalg.eigh(centred.T @ centred)
    axes = vecs[:, ::-1].T[:3]
    if axes.shape[0] < 3:
        axes = np.concatenate([axes, np.zeros((3 - axes.shape[0], sample.shape[1]))], 0)
    # SVD signs are arbitrary; pinning them keeps colours stable between runs.
    flip = np.sign(axes[np.arange(3), np.abs(axes).argmax(1)])
    axes = axes * np.where(flip == 0, 1, flip)[:, None]
    return mean, axes


def _project(fmap: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """(H, W, 3) projection, a block of rows at a time so big float16 maps are never
    converted whole."""
    c, h, w = fmap.shape
    out = np.empty((h, w, 3), np.float64)
    offset = axes @ mean
    rows = max(1, _BLOCK_ELEMENTS // (c * w))
    for r0 in range(0, h, rows):
        block = fmap[:, r0 : r0 + rows].astype(np.float64).reshape(c, -1)
        out[r0 : r0 + rows] = ((axes @ block).T - offset).reshape(-1, w, 3)
    return out


def pca_rgb(feature_maps: Sequence, fit_on: int = 0, seed: int = 0) -> list[np.ndarray]:
    """Colour feature maps by one 3-component PCA so their colours are comparable.

    ``feature_maps``: (C, H, W) tensors or arrays with the same C. The PCA (and the colour
    range, 1st-99th percentile per component) is fitted on up to 20k random pixels of
    ``feature_maps[fit_on]``. Returns one HxWx3 uint8 image per map, all at the largest
    H and W among the maps (smaller maps are nearest-upsampled for display).
    """
    maps = [_as_chw(m) for m in feature_maps]
    if not maps:
        return []
    channels = {m.shape[0] for m in maps}
    if len(channels) != 1:
        raise ValueError(f"all maps need the same number of channels, got {sorted(channels)}")
    ref = maps[fit_on]
    c, h, w = ref.shape
    rng = np.random.default_rng(seed)
    idx = rng.choice(h * w, size=min(h * w, _FIT_PIXELS), replace=False)
    sample = ref.reshape(c, -1)[:, np.sort(idx)].T.astype(np.float64)
    mean, axes = _fit(sample)
    proj_sample = (sample - mean) @ axes.T
    lo = np.percentile(proj_sample, 1, axis=0)
    hi = np.percentile(proj_sample, 99, axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    out_h = max(m.shape[1] for m in maps)
    out_w = max(m.shape[2] for m in maps)
    images = []
    for m in maps:
        rgb = np.clip((_project(m, mean, axes) - lo) / span, 0, 1)
        rgb = (rgb * 255 + 0.5).astype(np.uint8)
        if rgb.shape[:2] != (out_h, out_w):
            rows = np.minimum((np.arange(out_h) * rgb.shape[0]) // out_h, rgb.shape[0] - 1)
            cols = np.minimum((np.arange(out_w) * rgb.shape[1]) // out_w, rgb.shape[1] - 1)
            rgb = rgb[rows][:, cols]
        images.append(np.ascontiguousarray(rgb))
    return images


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def save_panels(
    panels: Sequence,
    titles: Sequence[str] | None,
    path,
    height: int | None = None,
    gap: int = 6,
    min_height: int = 224,
) -> Path:
    """Write ``panels`` (HxWx3 uint8 arrays or PIL images) side by side with a title above
    each to one PNG at ``path``. Panels are scaled (nearest) to a common ``height``
    (default: the tallest panel, at least ``min_height``, so that a 56-px output is still
    visible, each of its pixels a block). Returns the path."""
    images = [
        p.convert("RGB") if isinstance(p, Image.Image) else Image.fromarray(np.asarray(p, np.uint8)) for p in panels
    ]
    if not images:
        raise ValueError("no panels to save")
    titles = list(titles) if titles is not None else [""] * len(images)
    if len(titles) != len(images):
        raise ValueError(f"{len(images)} panels but {len(titles)} titles")
    target = height or max(min_height, *(im.height for im in images))
    images = [
        im if im.height == target else im.resize((max(1, round(im.width * target / im.height)), target), Image.NEAREST)
        for im in images
    ]
    font_size = max(12, min(32, target // 16))
    font = _font(font_size)
    bar = font_size + 2 * gap if any(titles) else 0
    width = sum(im.width for im in images) + gap * (len(images) + 1)
    canvas = Image.new("RGB", (width, target + bar + gap * 2), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for im, title in zip(images, titles):
        if title:
            draw.text((x, gap), str(title), fill="black", font=font)
        canvas.paste(im, (x, gap + bar))
        x += im.width + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def palette(n: int) -> np.ndarray:
    """``n`` well-separated RGB colours (uint8), golden-ratio hues."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    sat, val = 0.75, 0.95
    i = np.floor(hues * 6).astype(int) % 6
    f = hues * 6 - np.floor(hues * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    table = np.stack(
        [
            np.select([i == 0, i == 1, i == 2, i == 3, i == 4, i == 5], [val, q, p, p, t, val]),
            np.select([i == 0, i == 1, i == 2, i == 3, i == 4, i == 5], [t, val, val, q, p, p]),
            np.select([i == 0, i == 1, i == 2, i == 3, i == 4, i == 5], [p, p, t, val, val, q]),
        ],
        1,
    )
    return (table * 255 + 0.5).astype(np.uint8)


def overlay_masks(image, masks, alpha: float = 0.5, colors: np.ndarray | None = None) -> np.ndarray:
    """``image`` (HxWx3 uint8) with each of ``masks`` (M, H, W) bool blended in its own
    colour (later masks on top) and a 1-px darker outline. Returns HxWx3 uint8."""
    base = np.asarray(image)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    out = base[..., :3].astype(np.float32)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[1:] != out.shape[:2]:
        raise ValueError(f"masks {masks.shape[1:]} do not match image {out.shape[:2]}")
    colors = palette(len(masks)) if colors is None else np.asarray(colors, np.uint8)
    for mask, color in zip(masks, colors):
        if not mask.any():
            continue
        out[mask] = (1 - alpha) * out[mask] + alpha * color.astype(np.float32)
        edge = mask.copy()
        edge[1:-1, 1:-1] = mask[1:-1, 1:-1] & ~(mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:])
        out[edge] = 0.6 * color.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
