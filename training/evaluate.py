"""Compatibility shim (to be removed): the evaluation now lives in ``loftup.training.evaluation``.

Held-out quality of upsampled features against instance masks.

Nearest-prototype segmentation: for each held-out image, the mean (L2-normalised) feature of
every ground-truth region is its prototype; each pixel takes the label of the most similar
prototype; the score is the mean IoU over regions. Blurry features smear regions across
boundaries and lose IoU, so the metric rewards exactly what an upsampler should add. It needs no
class labels, so it works with class-agnostic instance masks.
"""

from __future__ import annotations

import numpy as np
import torch

from loftup.training.evaluation.masks import label_map, prototype_miou


@torch.no_grad()
def evaluate_store(store, image_ids, backbone: str, res: int, upsamplers: dict, size: int = 224, projection=None,
                   geometry: int = 224, max_masks: int = 150, device="cpu") -> dict:
    """Mean prototype mIoU per upsampler over ``image_ids``.

    ``upsamplers`` maps a name to a callable (lr_feats, image_normalised, output_size) -> feats.
    Features are compared in the space LoftUp is trained in (per-pixel layer-normalised).
    """
    import io

    from PIL import Image

    from loftup.storage import rle
    from loftup.training.data import _subsample_index, normalise

    fs = store.features(backbone, res)
    scores: dict[str, list[float]] = {name: [] for name in upsamplers}
    for image_id in image_ids:
        img = Image.open(io.BytesIO(store.image_bytes(int(image_id), geometry))).convert("RGB")
        rles = store.masks_for(int(image_id), size=geometry)[:max_masks]
        if not rles:
            continue
        if size != geometry:
            img = img.resize((size, size), Image.BICUBIC)
            idx = _subsample_index(geometry, size)
            rles = [rle.resample(r, idx, idx) for r in rles]
        labels = label_map(rle.decode_many(rles))
        image = normalise(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].to(device))
        feats = torch.from_numpy(np.asarray(fs.get(int(image_id)))).float()[None].to(device)
        if projection is not None:
            feats = projection(feats)
        for name, up in upsamplers.items():
            out = up(feats, image, (size, size))[0]
            scores[name].append(prototype_miou(out.cpu(), labels))
    return {name: float(np.nanmean(v)) if v else float("nan") for name, v in scores.items()}


def standard_upsamplers(model=None) -> dict:
    """bilinear and bicubic baselines in LoftUp's target space, plus the model when given."""
    from loftup.training.baselines import create_upsampler
    from loftup.training.target_space import layer_norm_target

    def interp(mode):
        up = create_upsampler(mode)
        return lambda f, img, size: up(layer_norm_target(f), img, output_size=size)

    ups = {"bilinear": interp("bilinear"), "bicubic": interp("bicubic")}
    if model is not None:
        model.eval()
        ups["loftup"] = lambda f, img, size: model(f, img, output_size=size)
    return ups
