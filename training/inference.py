"""Upsample one image's backbone features with a LoftUp checkpoint and picture the result."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loftup.storage.errors import LoftupError

__all__ = ["upsample_image", "load_upsampler"]

FORMATS = ("safetensors", "npy")


def load_upsampler(checkpoint=None, official=None, device="cpu"):
    """(model, projection or None, trained-on backbone or None) from exactly one source."""
    if checkpoint is None and official is None:
        raise LoftupError("no upsampler weights: pass a checkpoint of ours (--checkpoint stage1.safetensors / "
                          "stage2.safetensors from `loftup-train`) or a released LoftUp file (--official X.pth)")
    if checkpoint is not None and official is not None:
        raise LoftupError("pass either a checkpoint of ours or an official one, not both")
    if official is not None:
        from loftup.training.checkpoint import load_official

        return load_official(official, device=device), None, None
    from loftup.training.checkpoint import load_model

    model, meta = load_model(checkpoint, device=device, with_meta=True)
    return model, meta.get("projection_module"), (meta.get("extra") or {}).get("backbone")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def _write_features(feats: torch.Tensor, path: Path, fmt: str, meta: dict) -> None:
    from fsspec.implementations.local import LocalFileSystem

    from loftup.storage.commit import atomic_writer

    with atomic_writer(LocalFileSystem(), str(path)) as fh:
        if fmt == "npy":
            np.save(fh, feats.numpy())
        else:
            from safetensors.torch import save

            fh.write(save({"features": feats.contiguous()}, metadata={k: str(v) for k, v in meta.items()}))


def upsample_image(image_path, checkpoint=None, official=None, backbone="dinov2_vits14", weights=None,
                   random_init: bool = False, size: int = 448, backbone_res: int = 224,
                   out_dir="upsampled", fmt: str = "safetensors", device="cpu") -> dict:
    """Upsample the features of one image and write them plus a PCA picture.

    The image is resized (short side) and centre-cropped to ``size`` x ``size`` (the same
    geometry as the training stores); the backbone sees the crop at ``backbone_res``
    (rounded down to its patch size) and LoftUp upsamples its features to ``size``.
    ``checkpoint`` is one of our safetensors checkpoints, ``official`` a released LoftUp file
    (exactly one). ``backbone`` is a registered name or a ready ``Backbone`` module (with
    ``patch``); ``weights``/``random_init`` go to ``create_backbone``.

    Writes ``<stem>_loftup<size>.<fmt>`` holding the (C, size, size) float32 features (key
    ``features`` for safetensors) and ``<stem>_loftup<size>.png``: input | low-res PCA |
    LoftUp PCA | bilinear PCA. Returns a dict with both paths, shapes and timings.
    """
    if fmt not in FORMATS:
        raise LoftupError(f"unknown feature format {fmt!r}; choose from {', '.join(FORMATS)}")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise LoftupError(f"image {image_path} not found")
    model, projection, trained_on = load_upsampler(checkpoint, official, device)

    if isinstance(backbone, str):
        if trained_on and trained_on != backbone:
            raise LoftupError(f"checkpoint {checkpoint} was trained on backbone {trained_on!r}, not {backbone!r}")
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
            raise LoftupError(f"the upsampler takes {model.dim}-d features but {backbone_name} gives "
                              f"{feats.shape[1]}: use the backbone it was trained for")
        guide = normalise_float(_to_tensor(hr_img).to(device))
        t0 = time.perf_counter()
        hr = model(feats, guide)
        timings["loftup_s"] = time.perf_counter() - t0
        bilinear = F.interpolate(feats, size=(size, size), mode="bilinear", align_corners=False)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{image_path.stem}_loftup{size}"
    feat_path = out_dir / f"{stem}.{fmt}"
    hr_cpu = hr[0].to("cpu")
    _write_features(hr_cpu, feat_path, fmt, {"image": image_path.name, "backbone": backbone_name,
                                             "backbone_res": res, "size": size})

    # LoftUp's outputs are per-pixel layer-normalised; normalising the low-res map the same way
    # puts all three panels in one space, so one PCA gives comparable colours.
    from loftup.training.target_space import layer_norm_target

    lr_n = layer_norm_target(feats)[0].cpu()
    bil_n = layer_norm_target(bilinear)[0].cpu()
    lr_rgb, hr_rgb, bil_rgb = pca_rgb([lr_n, hr_cpu, bil_n], fit_on=2)
    h, w = feats.shape[-2:]
    png = save_panels([hr_img, lr_rgb, hr_rgb, bil_rgb],
                      ["input", f"low-res {h}x{w}", f"LoftUp {size}", f"bilinear {size}"],
                      out_dir / f"{stem}.png")
    return {"features": feat_path, "picture": png, "shape": tuple(hr_cpu.shape), "lr_grid": (int(h), int(w)),
            "backbone": backbone_name, "backbone_res": res, **{k: round(v, 3) for k, v in timings.items()}}
