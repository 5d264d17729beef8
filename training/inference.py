"""Upsample one image's backbone features with a LoftUp checkpoint and picture the result."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loftup.storage.errors import LoftupError

__all__ = ["upsample_image", "load_upsampler", "retention"]

FORMATS = ("safetensors", "npy")


def load_upsampler(checkpoint=None, official=None, device="cpu"):
    """(model, projection or None, trained-on backbone or None) from exactly one source.

    ``official`` is a release name (``dinov2s``, ``haiwen/loftup-dinov2s``, found in the local
    HF cache) or a released-layout file; ``checkpoint`` any spec ``resolve_upsampler`` takes."""
    if checkpoint is None and official is None:
        raise LoftupError(
            "no upsampler weights: pass a checkpoint of ours (--checkpoint stage1.safetensors / "
            "stage2.safetensors from `loftup-train`) or a released LoftUp (--official dinov2s or X.pth)"
        )
    if checkpoint is not None and official is not None:
        raise LoftupError("pass either a checkpoint of ours or an official one, not both")
    from loftup.training.checkpoint import load_official, resolve_upsampler
    from loftup.training.releases import find_release

    if official is not None and find_release(str(official)) is None and Path(str(official)).exists():
        return load_official(official, device=device), None, None
    return resolve_upsampler(official if official is not None else checkpoint, device=device)


def retention(upsampled: torch.Tensor, lowres: torch.Tensor) -> float:
    """How much of what the backbone saw an upsampled map keeps: average-pool (C,H,W) or
    (B,C,H,W) ``upsampled`` onto the low-res grid of ``lowres`` (same space) and take the mean
    cosine similarity per cell. Bilinear upsampling scores about 0.95."""
    up = upsampled if upsampled.dim() == 4 else upsampled[None]
    low = lowres if lowres.dim() == 4 else lowres[None]
    pooled = F.adaptive_avg_pool2d(up.float(), low.shape[-2:])
    return float(F.cosine_similarity(pooled, low.float(), dim=1).mean())


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def _write_features(tensors: dict, path: Path, fmt: str, meta: dict) -> None:
    """safetensors: one file with every tensor; npy: ``features`` in ``path``, the others beside it
    as ``<stem>_<name>.npy``."""
    from fsspec.implementations.local import LocalFileSystem

    from loftup.storage.commit import atomic_writer

    local = LocalFileSystem()
    if fmt == "npy":
        for name, t in tensors.items():
            dest = path if name == "features" else path.with_name(f"{path.stem}_{name}.npy")
            with atomic_writer(local, str(dest)) as fh:
                np.save(fh, t.numpy())
        return
    from safetensors.torch import save

    with atomic_writer(local, str(path)) as fh:
        fh.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata={k: str(v) for k, v in meta.items()}))


def upsample_image(
    image_path,
    checkpoint=None,
    official=None,
    backbone=None,
    weights=None,
    random_init: bool = False,
    size: int = 448,
    backbone_res: int = 224,
    out_dir="upsampled",
    fmt: str = "safetensors",
    device="cpu",
) -> dict:
    """Upsample the features of one image and write them plus a PCA picture.

    The image is resized (short side) and centre-cropped to ``size`` x ``size`` (the same
    geometry as the training stores); the backbone sees the crop at ``backbone_res``
    (rounded down to its patch size) and LoftUp upsamples its features to ``size``.
    ``checkpoint`` is one of our safetensors checkpoints (either head), ``official`` a released LoftUp file
    (exactly one). ``backbone`` is a registered name or a ready ``Backbone`` module (with
    ``patch``; default: the one the checkpoint or release was trained for, else dinov2_vits14);
    ``weights``/``random_init`` go to ``create_backbone``.

    Writes ``<stem>_loftup<size>.<fmt>`` holding the (C, size, size) float32 features (key
    ``features``), the backbone's features projected as the checkpoint projects them and
    mapped into the upsampler's output space (``lowres``, (C, h, w)) and their bilinear
    upsampling in that space (``bilinear``, (C, size, size)); and ``<stem>_loftup<size>.png``:
    input | low-res PCA | LoftUp PCA | bilinear PCA. Returns a dict with both paths, shapes,
    timings and the retention (`retention`) of LoftUp and of bilinear.
    """
    if fmt not in FORMATS:
        raise LoftupError(f"unknown feature format {fmt!r}; choose from {', '.join(FORMATS)}")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise LoftupError(f"image {image_path} not found")
    model, projection, trained_on = load_upsampler(checkpoint, official, device)

    if backbone is None:
        backbone = trained_on or "dinov2_vits14"
    if isinstance(backbone, str):
        if trained_on and trained_on != backbone:
            raise LoftupError(f"{checkpoint or official} was trained on backbone {trained_on!r}, not {backbone!r}")
        from loftup.pipeline.backbones import create_backbone

        net = create_backbone(backbone, weights=weights, random_init=random_init, device=device)
        backbone_name = backbone
    else:
        net = backbone.to(device).eval()
        backbone_name = getattr(net, "name", type(net).__name__)
    patch = int(net.patch)
    res = backbone_res // patch * patch
    if res < patch:
        raise LoftupError(f"--backbone-res {backbone_res} is smaller than the patch size {patch}")

    from loftup.storage.geometry import resize_image
    from loftup.training.data import normalise_float
    from loftup.training.visualize import pca_rgb, save_panels

    try:
        with Image.open(image_path) as src:
            source = src.convert("RGB")
    except OSError as exc:
        raise LoftupError(f"cannot read image {image_path}: {exc}") from None
    hr_img = resize_image(source, size)
    lr_img = resize_image(source, res)

    timings = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        feats = net(_to_tensor(lr_img).to(device)).float()
        timings["backbone_s"] = time.perf_counter() - t0
        if projection is not None:
            feats = projection(feats)
        if feats.shape[1] != model.dim:
            raise LoftupError(
                f"the upsampler takes {model.dim}-d features but {backbone_name} gives "
                f"{feats.shape[1]}: use the backbone it was trained for"
            )
        guide = normalise_float(_to_tensor(hr_img).to(device))
        t0 = time.perf_counter()
        hr = model(feats, guide)
        timings["loftup_s"] = time.perf_counter() - t0
        # The low-res map and the bilinear baseline go into the upsampler's output space (per-pixel
        # layer-normalised for the released head, the raw features for the convex head), so one PCA
        # gives comparable colours and retention compares like with like.
        from loftup.training.heads import output_space
        from loftup.training.target_space import to_target_space

        lowres = to_target_space(feats, output_space(model))
        bilinear = F.interpolate(lowres, size=(size, size), mode="bilinear", align_corners=False)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{image_path.stem}_loftup{size}"
    feat_path = out_dir / f"{stem}.{fmt}"
    hr_cpu, lr_n, bil_n = hr[0].to("cpu"), lowres[0].cpu(), bilinear[0].cpu()
    _write_features(
        {"features": hr_cpu, "lowres": lr_n, "bilinear": bil_n},
        feat_path,
        fmt,
        {"image": image_path.name, "backbone": backbone_name, "backbone_res": res, "size": size},
    )
    kept = {
        "retention_loftup": round(retention(hr_cpu, lr_n), 4),
        "retention_bilinear": round(retention(bil_n, lr_n), 4),
    }
    lr_rgb, hr_rgb, bil_rgb = pca_rgb([lr_n, hr_cpu, bil_n], fit_on=0)
    h, w = feats.shape[-2:]
    png = save_panels(
        [hr_img, lr_rgb, hr_rgb, bil_rgb],
        ["input", f"low-res {h}x{w}", f"LoftUp {size}", f"bilinear {size}"],
        out_dir / f"{stem}.png",
    )
    return {
        "features": feat_path,
        "picture": png,
        "shape": tuple(hr_cpu.shape),
        "lr_grid": (int(h), int(w)),
        "backbone": backbone_name,
        "backbone_res": res,
        **kept,
        **{k: round(v, 3) for k, v in timings.items()},
    }
