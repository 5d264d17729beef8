"""What each pipeline job of ``loftup-pipeline`` takes, declared once as fields with their help
(the command line is generated from them); how a job runs is :class:`RunOptions`. No
dependencies, so that ``--help`` needs neither Ray nor torch. ``flag`` in a field's metadata
names its option(s) when they differ from ``--field-name`` (and ``--no-field-name`` for a bool)."""

from __future__ import annotations

from dataclasses import dataclass

from loftup.fields import option as _opt

GEOMETRY_SIZES = (224, 896)
GEOMETRIES = ",".join(map(str, GEOMETRY_SIZES))
DEVICE_HELP = "'auto' (the task's GPU if any), 'cpu' or 'cuda'."
# --sizes was the name of --geometries (--size now means an output size only): accepted, not shown.
_OLD_SIZES = {"flag": "--sizes", "hidden": True}


@dataclass(frozen=True)
class MasksOptions:
    source: str = _opt(
        "sa1b", "Mask source: sa1b (the tar's annotations), sam (SAM automatic generation), felzenszwalb (CPU demo)."
    )
    geometries: str = _opt(GEOMETRIES, "Training geometries the masks are re-encoded into (short side + centre crop).")
    sizes: str | None = _opt(None, "", **_OLD_SIZES)
    sam_checkpoint: str | None = _opt(None, "SAM checkpoint file (sam_vit_h_4b8939.pth, ...) for --source sam.")
    sam_model: str = _opt("auto", "SAM model type: vit_h, vit_l, vit_b, or auto (read from the checkpoint).")
    sam_random_init: bool = _opt(False, "SAM with random weights (tests and demos only).")
    points_per_side: int | None = _opt(None, "SAM: point grid per side (default 32, as SA-1B).")
    crop_n_layers: int | None = _opt(None, "SAM: multi-crop layers (default 2, as SA-1B; 0 is 3x cheaper).")
    pred_iou_thresh: float | None = _opt(None, "SAM: predicted-IoU threshold (default 0.88).")
    stability_score_thresh: float | None = _opt(None, "SAM: stability-score threshold (default 0.95).")
    max_side: int | None = _opt(None, "sam/felzenszwalb: downscale the image to this long side first.")
    max_masks: int | None = _opt(None, "Keep at most this many masks per image (in order).")

    def source_options(self) -> dict:
        """The options of the mask source: only those given, and only those it takes."""
        opts: dict = {} if self.max_masks is None else {"max_masks": self.max_masks}
        if self.max_side is not None and self.source != "sa1b":
            opts["max_side"] = self.max_side
        if self.source == "sam":
            opts.update(checkpoint=self.sam_checkpoint, random_init=self.sam_random_init, model_type=self.sam_model)
            for key in ("points_per_side", "crop_n_layers", "pred_iou_thresh", "stability_score_thresh"):
                if getattr(self, key) is not None:
                    opts[key] = getattr(self, key)
        return opts


@dataclass(frozen=True)
class ImagesOptions:
    geometries: str = _opt(GEOMETRIES, "Training geometries (short side + centre crop), JPEG-encoded.")
    sizes: str | None = _opt(None, "", **_OLD_SIZES)
    quality: int = _opt(95, "JPEG quality of the stored images.")


@dataclass(frozen=True)
class LiveBackboneOptions:
    """The backbone a job runs on the stored images (features, implicit)."""

    backbone: str = _opt("dinov2_vits14", "Backbone from the registry (loftup-pipeline backbones lists them).")
    res: int = _opt(224, "Input resolution of the backbone (a multiple of its patch size).")
    weights: str | None = _opt(None, "Local weights file of the backbone.")
    random_init: bool = _opt(False, "Random weights (tests and demos only).")


@dataclass(frozen=True)
class FeaturesOptions(LiveBackboneOptions):
    batch_size: int = _opt(32, "Images per forward pass.")
    device: str = _opt("auto", DEVICE_HELP)


@dataclass(frozen=True)
class PseudoGTOptions:
    backbone: str | None = _opt(None, "Backbone of the stored features (default: the store's feature set).")
    res: int | None = _opt(None, "Backbone input size of the stored features (default: the store's).")
    geometry: int = _opt(224, "Stored mask geometry = pseudo-GT size.")
    alpha: float = _opt(0.8, "Mask refinement strength (Eq. 1).")
    max_masks: int = _opt(150, "Masks per image, in annotation order.")
    limit: int | None = _opt(
        None, "At most this many images per shard (pseudo-GT is ~38 MB/image at 224x224x384 fp16)."
    )
    png_dir: str | None = _opt(None, "Where to write PNGs (default: inside a local store).")
    png: bool = _opt(True, "Write PNGs of bicubic vs refined pseudo-GT.")
    device: str = _opt("auto", "'auto', 'cpu' or 'cuda'.")


@dataclass(frozen=True)
class ImplicitOptions(LiveBackboneOptions):
    """The backbone runs on every jittered view; ``res`` is also the size of the optimised map."""

    images_per_shard: int | None = _opt(
        None, "Optimise only the first N images of each shard (~1 min each on an A100)."
    )
    steps: int | None = _opt(None, "Optimisation steps per image (FeatUp: 1200).")
    views: int | None = _opt(None, "Jittered views per image (FeatUp: 3000).")
    dense: bool = _opt(False, "Also store the full-resolution map (fp16 Zarr, one chunk per image).", flag="--dense")
    device: str = _opt("auto", DEVICE_HELP)
