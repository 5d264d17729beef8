"""What ``loftup upsample`` (:func:`loftup.training.inference.upsample_image`) takes, declared once
as fields with their help (``loftup.fields``); the command line is generated from them. No
dependencies, so that ``--help`` needs no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loftup.fields import option

__all__ = ["UpsampleOptions"]


@dataclass(frozen=True)
class UpsampleOptions:
    checkpoint: Path | None = option(None, "Our checkpoint (stage1/stage2 .safetensors).")
    official: str | None = option(
        None,
        "A released LoftUp: dinov2s, dinov2s_reg, dinov2b, dinov2b_reg, clip, siglip, siglip2 (local HF cache) "
        "or its .bin path.",
    )
    backbone: str | None = option(
        None, "Backbone for the low-res features (default: the one the upsampler was trained for, else dinov2_vits14)."
    )
    weights: str | None = option(None, "Backbone weights file.")
    random_init: bool = option(False, "Random backbone weights (demos).")
    backbone_res: int = option(224, "Backbone input size.", flag="--res")
    size: int = option(448, "Output feature resolution.")
    out_dir: Path = option(Path("upsampled"), "Output directory.", flag="--out")
    fmt: str = option("safetensors", "Feature file format: safetensors or npy.")
