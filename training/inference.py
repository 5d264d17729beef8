"""Upsample an image's backbone features with a LoftUp (or a plain interpolation): in memory
(:func:`upsample`, ``loftup.upsample``) or to files with a PCA picture (:func:`upsample_image`,
``loftup-train upsample``), both through one forward (:func:`_forward`)."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loftup.storage.errors import LoftupError
from loftup.training.inference_options import UpsampleOptions

__all__ = ["upsample", "upsample_image", "load_upsampler", "load_image", "retention", "BASELINES"]

FORMATS = ("safetensors", "npy")
BASELINES = ("bilinear", "bicubic", "nearest")
DEFAULT_BACKBONE = "dinov2_vits14"


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


def load_image(image) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, or an array/tensor (HxWx3 or 3xHxW; uint8, or
    float in [0, 1]). Images go through the store geometry as 8-bit RGB, as training saw them."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise LoftupError(f"image {path} not found")
        try:
            with Image.open(path) as src:
                return src.convert("RGB")
        except OSError as exc:
            raise LoftupError(f"cannot read image {path}: {exc}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    from loftup.pictures import _as_rgb

    try:
        return Image.fromarray(_as_rgb(image))
    except ValueError as exc:
        raise LoftupError(str(exc)) from None


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


@dataclass
class _Prepared:
    model: torch.nn.Module | None  # None: a plain interpolation (``mode``)
    projection: torch.nn.Module | None
    net: torch.nn.Module
    backbone: str
    mode: str | None = None
    device: str | torch.device = "cpu"


def _prepare(resolved, label, backbone, weights, random_init, device, mode=None) -> _Prepared:
    """Pick and build the backbone for ``resolved`` = (model, projection, trained-on backbone)."""
    model, projection, trained_on = resolved
    if backbone is None:
        backbone = trained_on or DEFAULT_BACKBONE
    if isinstance(backbone, str):
        if trained_on and trained_on != backbone:
            raise LoftupError(f"{label} was trained on backbone {trained_on!r}, not {backbone!r}")
        from loftup.pipeline.backbones import create_backbone

        net = create_backbone(backbone, weights=weights, random_init=random_init, device=device)
        name = backbone
    else:
        net = backbone.to(device).eval()
        name = getattr(net, "name", type(net).__name__)
    if model is not None:
        model = model.to(device).eval()
    if projection is not None:
        projection = projection.to(device).eval()
    return _Prepared(model, projection, net, name, mode, device)


def _resolve(upsampler, device):
    """(model or None, projection, trained-on backbone, interpolation mode or None) of any spec
    ``upsample`` takes."""
    if isinstance(upsampler, str) and upsampler in BASELINES:
        return None, None, None, upsampler
    if isinstance(upsampler, torch.nn.Module):
        return upsampler, None, None, None
    if isinstance(upsampler, tuple) and len(upsampler) == 3:
        return (*upsampler, None)
    if upsampler is None:
        raise LoftupError(
            "no upsampler: pass a LoftUp spec (official:NAME, a release name, a checkpoint path), "
            f"a LoftUp module, or one of {', '.join(BASELINES)}"
        )
    return (*load_upsampler(checkpoint=upsampler, device=device), None)


@torch.no_grad()
def _forward(prep: _Prepared, source: Image.Image, size: int, res: int) -> dict:
    """The one forward both entry points run: the store geometry (short side resized, centre
    crop), the backbone on the crop at ``res`` (rounded down to its patch), the projection, and
    the upsampling to ``size`` guided by the crop at ``size``."""
    patch = int(prep.net.patch)
    lr_res = int(res) // patch * patch
    if lr_res < patch:
        raise LoftupError(f"the backbone input size {res} is smaller than its patch size {patch}")
    if int(size) < 1:
        raise LoftupError(f"the output size must be positive, got {size}")
    from loftup.storage.geometry import resize_image
    from loftup.training.data import normalise_float

    hr_img = resize_image(source, int(size))
    lr_img = resize_image(source, lr_res)
    timings = {}
    t0 = time.perf_counter()
    feats = prep.net(_to_tensor(lr_img).to(prep.device)).float()
    timings["backbone_s"] = time.perf_counter() - t0
    if prep.projection is not None:
        feats = prep.projection(feats)
    t0 = time.perf_counter()
    if prep.model is None:
        align = None if prep.mode == "nearest" else False
        hr = F.interpolate(feats, size=(int(size), int(size)), mode=prep.mode, align_corners=align)
    else:
        if feats.shape[1] != prep.model.dim:
            raise LoftupError(
                f"the upsampler takes {prep.model.dim}-d features but {prep.backbone} gives "
                f"{feats.shape[1]}: use the backbone it was trained for"
            )
        hr = prep.model(feats, normalise_float(_to_tensor(hr_img).to(prep.device)))
    timings["upsample_s"] = time.perf_counter() - t0
    return {"hr": hr, "lowres": feats, "hr_img": hr_img, "res": lr_res, "timings": timings}


def upsample(
    image,
    upsampler,
    backbone=None,
    size: int = 448,
    res: int = 224,
    *,
    weights=None,
    random_init: bool = False,
    device="cpu",
) -> torch.Tensor:
    """High-resolution features of one image, in memory: a ``(C, size, size)`` float32 tensor.

    ``image``: a PIL image, a path, or an HxWx3 / 3xHxW array or tensor (uint8, or float in
    [0, 1]); it is resized (short side) and centre-cropped to ``size``, the store geometry.
    ``upsampler``: any LoftUp spec (``official:NAME``, a release name such as ``dinov2s``, one of
    our ``.safetensors`` checkpoints, a released-layout file), a ``LoftUp`` module, the
    ``(model, projection, backbone)`` that :func:`load_upsampler` returns (load once, upsample
    many images), or ``"bilinear"``/``"bicubic"``/``"nearest"`` for the backbone's own features
    interpolated. ``backbone``: a registered name or a module with ``patch``; default the one the
    checkpoint records, else dinov2_vits14; ``weights``/``random_init`` go to
    ``create_backbone``. The backbone sees the crop at ``res`` (rounded down to its patch).

    LoftUp's output ends with a per-pixel LayerNorm, so its values are layer-normalised
    features; the interpolations return the backbone's features as they are (projected when the
    upsampler carries a projection, which only our checkpoints do).
    """
    model, projection, trained_on, mode = _resolve(upsampler, device)
    label = mode or (upsampler if isinstance(upsampler, (str, os.PathLike)) else "the upsampler")
    prep = _prepare((model, projection, trained_on), label, backbone, weights, random_init, device, mode)
    return _forward(prep, load_image(image), size, res)["hr"][0].contiguous()


def upsample_image(image_path, options: UpsampleOptions | None = None, *, device="cpu", **fields) -> dict:
    """Upsample the features of one image and write them plus a PCA picture. ``options`` (or the
    same ``fields`` as keywords, training/inference_options.py) say how; the defaults are there.

    The image is resized (short side) and centre-cropped to ``size`` x ``size`` (the same
    geometry as the training stores); the backbone sees the crop at ``backbone_res``
    (rounded down to its patch size) and LoftUp upsamples its features to ``size``.
    ``checkpoint`` is one of our safetensors checkpoints (either head), ``official`` a released LoftUp file
    (exactly one). ``backbone`` is a registered name or a ready ``Backbone`` module (with
    ``patch``; default: the one the checkpoint or release was trained for, else dinov2_vits14);
    ``weights``/``random_init`` go to ``create_backbone``. The forward is :func:`upsample`'s.

    Writes ``<stem>_loftup<size>.<fmt>`` holding the (C, size, size) float32 features (key
    ``features``), the backbone's features projected as the checkpoint projects them and
    mapped into the upsampler's output space (``lowres``, (C, h, w)) and their bilinear
    upsampling in that space (``bilinear``, (C, size, size)); and ``<stem>_loftup<size>.png``:
    input | low-res PCA | LoftUp PCA | bilinear PCA. Returns a dict with both paths, shapes,
    timings and the retention (`retention`) of LoftUp and of bilinear.
    """
    o = dataclasses.replace(options or UpsampleOptions(), **fields)
    checkpoint, official, backbone, size, fmt = o.checkpoint, o.official, o.backbone, o.size, o.fmt
    if fmt not in FORMATS:
        raise LoftupError(f"unknown feature format {fmt!r}; choose from {', '.join(FORMATS)}")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise LoftupError(f"image {image_path} not found")
    resolved = load_upsampler(checkpoint, official, device)
    prep = _prepare(resolved, checkpoint or official, backbone, o.weights, o.random_init, device)
    source = load_image(image_path)
    run = _forward(prep, source, size, o.backbone_res)
    feats, hr, hr_img, res = run["lowres"], run["hr"], run["hr_img"], run["res"]
    timings = {"backbone_s": run["timings"]["backbone_s"], "loftup_s": run["timings"]["upsample_s"]}
    with torch.no_grad():
        # The low-res map and the bilinear baseline go into the upsampler's output space (per-pixel
        # layer-normalised for the released head, the raw features for the convex head), so one PCA
        # gives comparable colours and retention compares like with like.
        from loftup.training.heads import output_space
        from loftup.training.target_space import to_target_space

        lowres = to_target_space(feats, output_space(prep.model))
        bilinear = F.interpolate(lowres, size=(size, size), mode="bilinear", align_corners=False)
    from loftup.pictures import pca_rgb, save_panels

    backbone_name = prep.backbone

    out_dir = Path(o.out_dir)
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
