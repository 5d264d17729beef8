"""Mask-refined bicubic pseudo ground truth (LoftUp Eq. 1, as in the released code).

The pseudo-GT is a *target*: every function here runs without autograd and returns a
fresh tensor in the dtype of its input (the arithmetic itself is float32, because the
sequential refinement of up to 150 masks drifts visibly in half precision).

Eq. 1, applied sequentially and in place, mask by mask in annotation order::

    for m in masks:                       # later masks see earlier updates
        f[m] <- (1 - alpha) * f[m] + alpha * mean(f[m])

so overlapping or nested masks compound.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "bicubic_upsample",
    "mask_refine",
    "mask_refine_reference",
    "pseudo_gt",
    "masks_from_rles",
]


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def bicubic_upsample(lr_feats: torch.Tensor, size) -> torch.Tensor:
    """Bicubic upsampling (align_corners=False) of (B,C,h,w) features to `size` (int or (H,W))."""
    return F.interpolate(lr_feats, size=_pair(size), mode="bicubic", align_corners=False)


def _check_inputs(features, masks, valid):
    if features.dim() != 4:
        raise ValueError(f"features must be (B,C,H,W), got {tuple(features.shape)}")
    b, _, h, w = features.shape
    if masks.dim() != 4 or masks.shape[0] != b or tuple(masks.shape[2:]) != (h, w):
        raise ValueError(f"masks must be (B,M,H,W) = ({b},M,{h},{w}) matching the features, got {tuple(masks.shape)}")
    n_masks = masks.shape[1]
    if valid is None:
        valid = torch.ones(b, n_masks, dtype=torch.bool, device=masks.device)
    if tuple(valid.shape) != (b, n_masks):
        raise ValueError(f"valid must be (B,M) = ({b},{n_masks}), got {tuple(valid.shape)}")
    return masks.to(torch.bool), valid.to(device=masks.device, dtype=torch.bool)


@torch.no_grad()
def mask_refine_reference(
    features: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """Plain per-image, per-mask loop of Eq. 1: the oracle `mask_refine` is tested against."""
    masks, valid = _check_inputs(features, masks, valid)
    out = []
    for b in range(features.shape[0]):
        f = features[b].to(torch.float32).clone()
        for m in range(masks.shape[1]):
            if not bool(valid[b, m]):
                continue
            inside = masks[b, m]
            if not bool(inside.any()):
                continue
            region = f[:, inside]
            mean = region.mean(dim=1, keepdim=True)
            f[:, inside] = (1.0 - alpha) * region + alpha * mean
        out.append(f)
    return torch.stack(out).to(features.dtype)


def _refine_gather(f_rows: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, alpha: float):
    """Sparse path. `f_rows` is (B*N, C) float32 and is updated in place.

    Work per mask is proportional to the mask's area (summed over the batch), not to the
    frame: SA-1B masks are mostly small, so this is far cheaper than touching every pixel
    150 times. A pixel's flat index b*N + p doubles as its row, and b = row // N names the
    image whose mean the pixel belongs to.
    """
    batch, n_masks = valid.shape
    n_pix = f_rows.shape[0] // batch
    for m in range(n_masks):
        active = valid[:, m]
        if not bool(active.any()):
            continue
        inside = masks[:, m].reshape(batch, n_pix) & active[:, None]
        rows = torch.nonzero(inside.reshape(-1), as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        owner = torch.div(rows, n_pix, rounding_mode="floor")
        region = f_rows.index_select(0, rows)
        sums = torch.zeros(batch, f_rows.shape[1], dtype=f_rows.dtype, device=f_rows.device)
        sums.index_add_(0, owner, region)
        counts = torch.bincount(owner, minlength=batch).clamp_min_(1).to(f_rows.dtype)
        means = sums / counts[:, None]
        region.mul_(1.0 - alpha).add_(means.index_select(0, owner), alpha=alpha)
        f_rows.index_copy_(0, rows, region)


def _region_ids(masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Label every pixel of the batch by (image, set of active masks containing it).

    Returns (B*N,) int64 ids in [0, R), image-major. Membership bits are appended to the
    running id a chunk of masks at a time and re-compressed with `unique`, so the code
    never overflows int64 however many masks there are.
    """
    batch, n_masks = valid.shape
    n_pix = masks.shape[2] * masks.shape[3]
    flat_masks = masks.reshape(batch, n_masks, n_pix)
    all_valid = valid.all(dim=0)
    ids = torch.arange(batch, device=masks.device).repeat_interleave(n_pix)
    m = 0
    while m < n_masks:
        id_bits = max(int(ids.max()).bit_length(), 1)
        chunk = min(62 - id_bits, n_masks - m)
        code = ids.view(batch, n_pix).clone()
        for k in range(m, m + chunk):
            inside = flat_masks[:, k]
            if not bool(all_valid[k]):
                inside = inside & valid[:, k, None]
            code.mul_(2).add_(inside)
        ids = torch.unique(code.reshape(-1), return_inverse=True)[1]
        m += chunk
    return ids


def _refine_regions(features: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exact Eq. 1 through the regions of the mask arrangement.

    Pixels of one region (same image, same set of masks) receive the same affine updates:
    after all masks, f_p = d_r * f0_p + (F_r - d_r * mean0_r) with d_r = (1 - alpha)^n_r,
    n_r the number of the region's masks, and F_r what Eq. 1 makes of the region's mean
    when regions are treated as points weighted by their size. So the sequential part runs
    on R region means (thousands for SA-1B masks, not B*H*W) and each image's frame is read
    twice and written once, in its native (C, N) layout.
    """
    batch, chans, h, w = features.shape
    n_masks = valid.shape[1]
    n_pix = h * w
    ids = _region_ids(masks, valid)
    n_regions = int(ids.max()) + 1
    ids_img = ids.view(batch, n_pix)
    size = torch.bincount(ids, minlength=n_regions).to(torch.float32)

    sums_cr = torch.zeros(chans, n_regions, dtype=torch.float32, device=features.device)
    for b in range(batch):
        sums_cr.index_add_(1, ids_img[b], features[b].reshape(chans, n_pix).to(torch.float32))
    means0 = sums_cr.t().contiguous().div_(size[:, None])
    del sums_cr

    # Any pixel stands for its region when reading mask membership.
    rep = torch.empty(n_regions, dtype=torch.int64, device=ids.device)
    rep.scatter_(0, ids, torch.arange(ids.numel(), device=ids.device))
    owner = torch.div(rep, n_pix, rounding_mode="floor")
    pix = rep - owner * n_pix
    flat_masks = masks.reshape(batch, n_masks, n_pix)
    depth = torch.zeros(n_regions, dtype=torch.int64, device=ids.device)
    values = means0.clone()
    for m in range(n_masks):
        if not bool(valid[:, m].any()):
            continue
        inside = flat_masks[owner, m, pix] & valid[owner, m]
        sel = torch.nonzero(inside, as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        depth[sel] += 1
        who = owner[sel]
        region = values.index_select(0, sel)
        weight = size[sel]
        sums = torch.zeros(batch, chans, dtype=values.dtype, device=values.device)
        sums.index_add_(0, who, region * weight[:, None])
        totals = torch.zeros(batch, dtype=values.dtype, device=values.device)
        totals.index_add_(0, who, weight)
        mu = sums / totals.clamp_min(1.0)[:, None]
        region.mul_(1.0 - alpha).add_(mu.index_select(0, who), alpha=alpha)
        values.index_copy_(0, sel, region)

    decay = torch.pow(torch.full_like(size, 1.0 - alpha), depth.to(size.dtype))
    # Regions under no active mask have decay (1-alpha)^0 = 1 and offset
    # means0 - means0 = 0 exactly, so those pixels come out bit-identical, as in the loop
    # that never touches them.
    offset = values - decay[:, None] * means0
    offset_cr = offset.t().contiguous()
    out = torch.empty_like(features, memory_format=torch.contiguous_format)
    direct = out.dtype == torch.float32
    buffer = None if direct else torch.empty(chans, n_pix, dtype=torch.float32, device=out.device)
    for b in range(batch):
        idx = ids_img[b]
        # float32 output is written in place: the frame is large and memory-bound.
        refined = out[b].view(chans, n_pix) if direct else buffer
        torch.index_select(offset_cr, 1, idx, out=refined)
        refined.addcmul_(features[b].reshape(chans, n_pix).to(torch.float32), decay[idx])
        if not direct:
            out[b].view(chans, n_pix).copy_(refined)
    return out


@torch.no_grad()
def mask_refine(
    features: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor | None,
    alpha: float,
    impl: str = "regions",
) -> torch.Tensor:
    """Sequential in-place mask refinement (Eq. 1), batched over the images.

    features: (B,C,H,W) any float dtype (computed in float32, returned in the input dtype).
    masks: (B,M,H,W) bool, annotation order. valid: (B,M) bool (None = all valid); masks
    that are invalid (padding) or empty are skipped exactly. The input is never modified.

    impl: "regions" (default: the sequential part runs on the regions of the mask
    arrangement, the frame is touched a constant number of times) or "gather" (a direct
    per-mask gather/scatter over the mask's pixels, work proportional to the summed mask
    area; kept as an independent second implementation). Both loop over M only and are
    batched over B; both synchronise with the host once per mask on a GPU.
    """
    masks, valid = _check_inputs(features, masks, valid)
    if impl not in ("regions", "gather"):
        raise ValueError(f"impl must be 'regions' or 'gather', got {impl!r}")
    batch, chans, h, w = features.shape
    if masks.shape[1] == 0 or features.numel() == 0:
        return features.clone(memory_format=torch.contiguous_format)
    if impl == "regions":
        return _refine_regions(features, masks, valid, float(alpha))
    # Pixel-major rows make every gather/scatter a contiguous C-vector copy; the float32
    # copy is also what keeps the caller's tensor untouched.
    rows = features.permute(0, 2, 3, 1).to(torch.float32, copy=True).contiguous()
    rows = rows.reshape(batch * h * w, chans)
    _refine_gather(rows, masks, valid, float(alpha))
    out = rows.reshape(batch, h, w, chans).permute(0, 3, 1, 2)
    return out.to(features.dtype).contiguous()


@torch.no_grad()
def pseudo_gt(
    lr_feats: torch.Tensor,
    masks: torch.Tensor,
    valid: torch.Tensor | None,
    size,
    alpha: float = 0.8,
) -> torch.Tensor:
    """Bicubic upsampling of (B,C,h,w) features to `size`, then `mask_refine` with `alpha`."""
    return mask_refine(bicubic_upsample(lr_feats, size), masks, valid, alpha)


def _decoder():
    try:
        from loftup.storage.rle import decode_many
    except ImportError:
        decode_many = None
    if decode_many is not None:
        return lambda rles: np.asarray(decode_many(rles), dtype=bool)

    from pycocotools import mask as mask_utils

    def decode(rles):
        # pycocotools returns (H, W, n) Fortran-ordered uint8.
        return np.moveaxis(mask_utils.decode(list(rles)), -1, 0).astype(bool)

    return decode


def masks_from_rles(rles: Sequence[Sequence[dict]], size, max_masks: int = 150) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode per-image lists of COCO RLEs into padded (B,M,H,W) bool masks and (B,M) valid.

    Annotation order is kept and at most `max_masks` masks per image are used; M is the
    largest count in the batch (after the cap). Every RLE must already be at `size`
    (the stores hold masks resampled to each training geometry).
    """
    height, width = _pair(size)
    kept = [list(image_rles)[:max_masks] for image_rles in rles]
    n_masks = max((len(k) for k in kept), default=0)
    masks = torch.zeros(len(kept), n_masks, height, width, dtype=torch.bool)
    valid = torch.zeros(len(kept), n_masks, dtype=torch.bool)
    decode = _decoder()
    for b, image_rles in enumerate(kept):
        if not image_rles:
            continue
        for rle in image_rles:
            if tuple(int(v) for v in rle["size"]) != (height, width):
                raise ValueError(f"RLE of size {list(rle['size'])} given where masks of {height}x{width} are expected")
        decoded = decode(image_rles)
        masks[b, : len(image_rles)] = torch.from_numpy(np.ascontiguousarray(decoded))
        valid[b, : len(image_rles)] = True
    return masks, valid
