"""Held-out quality of upsampled features against instance masks (the store proxy).

Nearest-prototype segmentation: for each held-out image, the mean (L2-normalised) feature of
every ground-truth region is its prototype; each pixel takes the label of the most similar
prototype; the score is the mean IoU over regions. Blurry features smear regions across
boundaries and lose IoU, so the metric rewards exactly what an upsampler should add. It needs no
class labels, so it works with the class-agnostic masks of a training store.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from loftup.training.evaluation.protocols import MasksProtocol

__all__ = ["MasksProtocol", "label_map", "prototype_miou", "run_masks"]


def label_map(masks: np.ndarray) -> np.ndarray:
    """Disjoint labels from possibly overlapping masks: larger masks first, smaller on top,
    so nested parts keep their own region. Unlabelled pixels are -1 (ignored)."""
    labels = np.full(masks.shape[1:], -1, dtype=np.int64)
    areas = masks.reshape(len(masks), -1).sum(1)
    for k in np.argsort(-areas, kind="stable"):
        labels[masks[k]] = k
    return labels


def prototype_miou(feats: torch.Tensor, labels: np.ndarray, min_pixels: int = 16) -> float:
    """mIoU of nearest-prototype segmentation of ``feats`` (C,H,W) against ``labels`` (H,W)."""
    c = feats.shape[0]
    f = F.normalize(feats.float().reshape(c, -1), dim=0)
    lab = torch.from_numpy(labels.reshape(-1))
    keep = lab >= 0
    ids = [int(i) for i in torch.unique(lab[keep]) if int((lab == i).sum()) >= min_pixels]
    if len(ids) < 2:
        return float("nan")
    protos = torch.stack([f[:, lab == i].mean(1) for i in ids])
    protos = F.normalize(protos, dim=1)
    pred_idx = (protos @ f).argmax(0)
    pred = torch.tensor(ids)[pred_idx]
    region = torch.isin(lab, torch.tensor(ids))
    ious = []
    for i in ids:
        p, g = (pred == i) & region, lab == i
        union = (p | g).sum().item()
        ious.append((p & g).sum().item() / union if union else 0.0)
    return float(np.mean(ious))


@torch.no_grad()
def run_masks(
    store, image_ids, backbone: str, upsamplers, protocol: MasksProtocol, device="cpu", progress: bool = False
) -> tuple[dict, list]:
    """Mean prototype mIoU per upsampler over ``image_ids`` of ``store`` (stored features, images
    and masks; no backbone is run). Returns ``(results, examples)``."""
    import io

    from PIL import Image

    from loftup.storage import rle
    from loftup.training.data import _subsample_index, normalise
    from loftup.training.evaluation.progress import EvalProgress

    size, geometry = protocol.size, protocol.geometry
    fs = store.features(backbone, protocol.res)
    for u in upsamplers:
        u.to(device).freeze()
    scores: dict[str, list[float]] = {u.name: [] for u in upsamplers}
    examples = []
    bar = EvalProgress("prototype mIoU", len(image_ids), enabled=progress)
    for image_id in image_ids:
        bar.advance()
        img = Image.open(io.BytesIO(store.image_bytes(int(image_id), geometry))).convert("RGB")
        rles = store.masks_for(int(image_id), size=geometry)[: protocol.max_masks]
        if not rles:
            continue
        if size != geometry:
            img = img.resize((size, size), Image.BICUBIC)
            idx = _subsample_index(geometry, size)
            rles = [rle.resample(r, idx, idx) for r in rles]
        labels = label_map(rle.decode_many(rles))
        image = normalise(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].to(device))
        feats = torch.from_numpy(np.asarray(fs.get(int(image_id)))).float()[None].to(device)
        for u in upsamplers:
            out = u.features(feats, image, (size, size))[0]
            if out.shape[-2:] != (size, size):  # lowres: score the grid's features nearest-resized
                out = F.interpolate(out[None], size=(size, size), mode="nearest")[0]
            scores[u.name].append(prototype_miou(out.cpu(), labels, protocol.min_pixels))
    bar.close()
    results = {
        name: {"prototype_miou": float(np.nanmean(v)) if v else float("nan"), "images": len(v)}
        for name, v in scores.items()
    }
    return results, examples
