"""DAVIS 2017 semi-supervised video object segmentation by label propagation (DINO -> LiFT -> LoftUp).

Frames are resized to size x size (bicubic); the backbone's features are upsampled to size/2
with the frame at size/2 as guidance (``lowres``: the feature grid). The first frame's
annotation, one-hot at feature resolution, is propagated frame by frame: each target pixel
takes the top-k most similar source pixels (cosine affinity / temperature, exponentiated)
among the first frame and the last ``context`` predictions, within ``radius`` cells of its own
position, and averages their soft labels with those weights. The soft prediction is resized to
size x size (bilinear), each channel min-max normalised, arg-maxed and resized (nearest) to
the frame's own size, then scored as the official toolkit does.

The affinity is computed one small tile of target pixels at a time against only the source
pixels within the radius of that tile, in every context frame at once, so memory stays at
O(tile^2 x contexts x (tile + 2 radius)^2), never the N x N matrix of one frame pair, let alone
all of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loftup.training.evaluation.metrics import boundary_f, davis_summary, region_iou
from loftup.training.evaluation.protocols import DavisProtocol

__all__ = ["DavisProtocol", "propagate", "run_davis"]


def propagate(
    target: torch.Tensor,
    sources: list[torch.Tensor],
    segs: list[torch.Tensor],
    temperature: float = 0.1,
    radius: int = 12,
    topk: int = 5,
    tile: int = 16,
) -> torch.Tensor:
    """Soft labels (K, h, w) of ``target`` features (C, h, w) from ``sources`` (each (C, h, w))
    and their soft labels ``segs`` (each (K, h, w)). Features are L2-normalised here.

    Sources further than ``radius`` rows or columns from a target pixel are excluded (radius < 0:
    none are); the top-k over all sources jointly get weights exp(cos / temperature), normalised.
    Targets are processed in ``tile`` x ``tile`` blocks against the sources within the radius of
    the block, so the work is close to the (2 radius + 1)^2 window per pixel.
    """
    c, h, w = target.shape
    k = segs[0].shape[0]
    m = len(sources)
    t = F.normalize(target.float(), dim=0)
    src = torch.stack([F.normalize(s.float(), dim=0) for s in sources])  # (M, C, h, w)
    lab = torch.stack([s.float() for s in segs])  # (M, K, h, w)
    r = max(h, w) if radius < 0 else radius
    dev = t.device
    out = torch.empty(k, h, w, device=dev)
    for r0 in range(0, h, tile):
        r1 = min(h, r0 + tile)
        s0, s1 = max(0, r0 - r), min(h, r1 + r)
        for c0 in range(0, w, tile):
            c1 = min(w, c0 + tile)
            u0, u1 = max(0, c0 - r), min(w, c1 + r)
            q = t[:, r0:r1, c0:c1].reshape(c, -1)  # (C, nt)
            keys = src[:, :, s0:s1, u0:u1].reshape(m, c, -1)  # (M, C, ns)
            cos = torch.einsum("cq,mcs->qms", q, keys)  # (nt, M, ns)
            ty, tx = torch.meshgrid(torch.arange(r0, r1, device=dev), torch.arange(c0, c1, device=dev), indexing="ij")
            sy, sx = torch.meshgrid(torch.arange(s0, s1, device=dev), torch.arange(u0, u1, device=dev), indexing="ij")
            near = ((ty.reshape(-1, 1) - sy.reshape(1, -1)).abs() <= r) & (
                (tx.reshape(-1, 1) - sx.reshape(1, -1)).abs() <= r
            )
            cos = cos.masked_fill(~near[:, None, :], float("-inf")).reshape(q.shape[1], -1)  # (nt, M * ns)
            val, idx = cos.topk(min(topk, cos.shape[1]), dim=1)
            weight = torch.softmax(val / temperature, dim=1)  # exp(cos / T), normalised over the top-k
            labels = lab[:, :, s0:s1, u0:u1].reshape(m, k, -1).permute(1, 0, 2).reshape(k, -1)  # (K, M * ns)
            out[:, r0:r1, c0:c1] = (labels[:, idx] * weight[None]).sum(-1).reshape(k, r1 - r0, c1 - c0)
    return out


def _one_hot(ids: np.ndarray, n: int, size: tuple[int, int]) -> torch.Tensor:
    small = np.asarray(Image.fromarray(ids.astype(np.uint8)).resize((size[1], size[0]), Image.NEAREST)).astype(np.int64)
    return F.one_hot(torch.from_numpy(small).clamp(0, n - 1), n).permute(2, 0, 1).float()


def _min_max(seg: torch.Tensor) -> torch.Tensor:
    lo = seg.amin(dim=(1, 2), keepdim=True)
    hi = (seg - lo).amax(dim=(1, 2), keepdim=True)
    normed = (seg - lo) / hi.clamp_min(1e-12)
    return torch.where(seg.amax(dim=(1, 2), keepdim=True) > 0, normed, seg)


def _read_frame(path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    hw = (rgb.height, rgb.width)
    x = np.asarray(rgb.resize((size, size), Image.BICUBIC), np.float32) / 255.0
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous(), hw


def _save_indexed(ids: np.ndarray, path: Path) -> None:
    from loftup.training.evaluation.datasets import _save_palette_png

    _save_palette_png(ids, path)


@torch.no_grad()
def run_davis(
    sequences,
    backbone,
    upsamplers,
    protocol: DavisProtocol,
    device="cpu",
    progress: bool = True,
    picture_frames: int = 3,
    save_masks: Path | None = None,
) -> tuple[dict, dict]:
    """Propagate every sequence's first annotation with each upsampler's features and score it.

    Returns ``(results, examples)``: per upsampler the toolkit's J/F means and per-sequence
    means; per sequence, a few frames (image, ground truth, {name: prediction}) for pictures.
    ``save_masks``: also write every prediction as DAVIS-layout palette PNGs under
    ``save_masks/<upsampler>/<sequence>/`` for the official toolkit.
    """
    from loftup.training.data import normalise_float
    from loftup.training.evaluation.datasets import read_davis_annotation
    from loftup.training.evaluation.probe import resize_square
    from loftup.training.evaluation.progress import EvalProgress

    device = torch.device(device)
    size = protocol.size
    res = protocol.backbone_res or size
    half = size // 2
    if res % backbone.patch:
        raise ValueError(f"backbone input {res} is not a multiple of {backbone.name}'s patch size {backbone.patch}")
    for u in upsamplers:
        u.to(device).freeze()
    per_object = {u.name: {} for u in upsamplers}
    examples = {}
    bar = EvalProgress("label propagation", sum(len(s.frames) for s in sequences), unit="frame", enabled=progress)
    for seq in sequences:
        first_ids = read_davis_annotation(seq.annotations[0])
        n_obj = int(first_ids.max())
        n = n_obj + 1
        last = len(seq.frames) - 1
        show = sorted({int(round(i)) for i in np.linspace(1, max(1, last - 1), picture_frames)}) if last >= 2 else []
        state = {u.name: None for u in upsamplers}  # (first feats, first seg, [(feats, seg)] queue)
        scores = {u.name: {o: ([], []) for o in range(1, n_obj + 1)} for u in upsamplers}
        shown = []
        for t, frame in enumerate(seq.frames):
            x, hw = _read_frame(frame, max(size, res))
            x = x.to(device)
            lr_feats = backbone(resize_square(x, res))
            guide = normalise_float(
                F.interpolate(resize_square(x, size), size=(half, half), mode="bilinear", align_corners=False)
            )
            gt = read_davis_annotation(seq.annotations[t]) if 0 < t < last or t in show else None
            preds = {}
            for u in upsamplers:
                f = u.features(lr_feats, guide, (half, half))[0].float()
                if t == 0:
                    seg0 = _one_hot(first_ids, n, f.shape[-2:]).to(device)
                    state[u.name] = (f, seg0, [])
                    continue
                f0, seg0, queue = state[u.name]
                ctx = [(f0, seg0)] + queue
                soft = propagate(
                    f, [c[0] for c in ctx], [c[1] for c in ctx], protocol.temperature, protocol.radius, protocol.topk
                )
                queue.append((f, soft))
                if len(queue) > protocol.context:
                    queue.pop(0)
                up = F.interpolate(soft[None], size=(size, size), mode="bilinear", align_corners=False)[0]
                small = _min_max(up).argmax(0).to(torch.uint8).cpu().numpy()
                pred = np.asarray(Image.fromarray(small).resize((hw[1], hw[0]), Image.NEAREST)).astype(np.int64)
                if save_masks is not None:
                    _save_indexed(pred, Path(save_masks) / u.name / seq.name / f"{Path(frame).stem}.png")
                if 0 < t < last:
                    for o in range(1, n_obj + 1):
                        scores[u.name][o][0].append(region_iou(gt == o, pred == o))
                        scores[u.name][o][1].append(
                            boundary_f(gt == o, pred == o, tolerance=protocol.boundary_tolerance)
                        )
                if t in show:
                    preds[u.name] = pred
            if t in show:
                with Image.open(frame) as im:
                    shown.append((np.asarray(im.convert("RGB")), gt, preds))
            bar.advance()
        for u in upsamplers:
            per_object[u.name][seq.name] = {
                o: {"J": float(np.mean(j)) if j else float("nan"), "F": float(np.mean(f)) if f else float("nan")}
                for o, (j, f) in scores[u.name].items()
            }
        examples[seq.name] = shown
    bar.close()
    return {name: davis_summary(objs) for name, objs in per_object.items()}, examples
