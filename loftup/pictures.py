"""Pictures of feature maps and masks: PCA colours, side-by-side panels, mask overlays.

The public pair, ``loftup.pca_picture(features)`` and ``loftup.show_masks(image, masks)``, return
PIL images; the array-level helpers below them serve the CLI, the gallery and the evaluation.
numpy and Pillow only, so a store-reading install draws pictures too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "pca_picture",
    "show_masks",
    "thin_masks",
    "pca_rgb",
    "save_panels",
    "overlay_masks",
    "overlay_labels",
    "palette",
]

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


def _top_axes(centred: np.ndarray, k: int, tol: float = 1e-10, max_iters: int = 50) -> np.ndarray:
    """The top-``k`` principal axes (k, C) of a centred (N, C) sample, by subspace iteration
    with 5 spare vectors from a fixed start, until the leading Ritz values settle.

    A full ``eigh`` of the C x C covariance computes the whole spectrum in many small BLAS
    calls: 0.7-1.1 s for C = 512 with OpenBLAS's threads on a shared 2-core machine. This takes
    a few products with the (N, C) sample and agrees with it to 1e-8 on real feature maps."""
    n, c = centred.shape
    m = min(c, k + 5)
    q = np.random.default_rng(0).standard_normal((c, m))
    previous = None
    for _ in range(max_iters):
        q, _ = np.linalg.qr(centred.T @ (centred @ q))
        projected = centred @ q
        values, vecs = np.linalg.eigh(projected.T @ projected)  # m x m: the Rayleigh-Ritz step
        top = values[::-1][:k]
        if previous is not None and np.all(np.abs(top - previous) <= tol * max(abs(top[0]), 1e-30)):
            break
        previous = top
    return (q @ vecs[:, ::-1]).T[:k]


def _fit(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C,) and top-3 principal axes (3, C) of ``sample`` (N, C), signs fixed."""
    mean = sample.mean(0)
    centred = sample - mean
    axes = _top_axes(centred, 3)
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
    colour (where masks overlap, the later one shows) and a 1-px darker outline where the shown
    mask changes. Returns HxWx3 uint8."""
    base = np.asarray(image)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    base = base[..., :3]
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[1:] != base.shape[:2]:
        raise ValueError(f"masks {masks.shape[1:]} do not match image {base.shape[:2]}")
    colors = palette(len(masks)) if colors is None else np.asarray(colors, np.uint8)
    # One label map, then one blend: blending mask by mask costs a full-image float pass per
    # mask (1.2 s for 167 masks at 896 px), this costs one boolean write per mask.
    label = np.full(base.shape[:2], -1, np.int32)
    for i, mask in enumerate(masks):
        label[mask] = i
    return overlay_labels(base, label, colors, alpha)


def overlay_labels(image, label: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` (HxWx3 uint8) with every pixel of ``label`` >= 0 blended with ``colors[label]``
    and a 1-px darker outline where the label changes. Returns HxWx3 uint8."""
    base = np.asarray(image)[..., :3]
    if label.shape != base.shape[:2]:
        raise ValueError(f"label map {label.shape} does not match image {base.shape[:2]}")
    colors = np.asarray(colors, np.uint8)
    shown = label >= 0
    out = base.astype(np.float32)
    out[shown] = (1 - alpha) * out[shown] + alpha * colors[label[shown]].astype(np.float32)
    edge = np.zeros_like(shown)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    step = label[1:] != label[:-1]
    edge[1:] |= step
    edge[:-1] |= step
    step = label[:, 1:] != label[:, :-1]
    edge[:, 1:] |= step
    edge[:, :-1] |= step
    edge &= shown
    out[edge] = 0.6 * colors[label[edge]].astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _as_rgb(image) -> np.ndarray:
    """HxWx3 uint8 from a PIL image, a path, or an array (uint8, or float in [0, 1], HWC or CHW)."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as src:
            return np.asarray(src.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = image.detach().to("cpu").numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image must be HxWx3 (or 3xHxW), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(arr[..., :3], (*arr.shape[:2], 3)))


def _mask_areas(masks) -> np.ndarray:
    if isinstance(masks, np.ndarray):
        return masks.reshape(len(masks), -1).sum(1)
    from loftup.storage import rle

    return np.asarray([rle.area(m) for m in masks], np.int64)


def thin_masks(masks, top: int | None = 30, min_area: int = 0, ids: Sequence[int] | None = None) -> list[int]:
    """Which of ``masks`` to draw, in drawing order: the masks numbered ``ids`` if given (in that
    order), else the ``top`` largest (None: all) of those covering at least ``min_area`` pixels,
    largest first so that small masks stay visible on top of the large ones they sit in.

    ``masks``: an (M, H, W) bool array or a list of COCO RLEs (thinned before any decoding)."""
    n = len(masks)
    if ids is not None:
        chosen = [int(i) for i in ids]
        bad = [i for i in chosen if not -n <= i < n]
        if bad:
            raise ValueError(f"mask ids {bad} out of range: there are {n} masks")
        return [i % n for i in chosen]
    if n == 0:
        return []
    areas = _mask_areas(masks)
    keep = np.flatnonzero(areas >= min_area)
    keep = keep[np.argsort(-areas[keep], kind="stable")]
    return keep[:top].tolist() if top is not None else keep.tolist()


def show_masks(
    image,
    masks,
    top: int | None = 30,
    min_area: int = 0,
    ids: Sequence[int] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """``image`` with a readable selection of ``masks`` overlaid, as a PIL image.

    ``image``: PIL image, path, or array; ``masks``: (M, H, W) bool array or a list of COCO RLEs
    of the image's size (``store.masks_for(image_id, size)``). SA-1B images carry 100-200 masks,
    which overlaid together are a mosaic, so by default the 30 largest are drawn; ``top=None``
    draws all, ``min_area`` drops small ones, ``ids`` picks masks by their index in ``masks``."""
    rgb = _as_rgb(image)
    chosen = thin_masks(masks, top=top, min_area=min_area, ids=ids)
    colors = palette(max(len(masks), 1))  # by index in ``masks``: thinning keeps each mask's colour
    if isinstance(masks, np.ndarray):
        return Image.fromarray(overlay_masks(rgb, masks[chosen], alpha=alpha, colors=colors[chosen]))
    from loftup.storage import rle

    label = rle.paint([masks[i] for i in chosen], labels=chosen, size=rgb.shape[:2])
    return Image.fromarray(overlay_labels(rgb, label, colors, alpha=alpha))


def pca_picture(features, size: int | tuple[int, int] | None = None, fit_on: int = 0, seed: int = 0):
    """Feature maps coloured by their first three principal components, as PIL images.

    ``features``: one (C, H, W) map (tensor or array) -> one image; a list of maps with the same
    C -> a list of images coloured by one PCA fitted on ``features[fit_on]``, so equal colours
    mean similar features across the maps (a low-res map beside its upsampling). ``size``
    (side or (height, width)) scales the pictures for display, nearest-neighbour so that each
    low-res cell stays a visible block; default: the largest map's size."""
    single = hasattr(features, "shape") and len(features.shape) == 3
    maps = [features] if single else list(features)
    pictures = [Image.fromarray(a) for a in pca_rgb(maps, fit_on=fit_on, seed=seed)]
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        pictures = [p.resize((int(w), int(h)), Image.NEAREST) for p in pictures]
    return pictures[0] if single else pictures
