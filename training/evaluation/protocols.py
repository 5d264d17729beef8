"""What each evaluation task takes, declared once as fields with their help (``loftup.fields``):
the protocol (the paper's settings, recorded with every result), the data and the backbone it
reads, and which upsamplers are compared. ``loftup-train evaluate`` is generated from these
fields; the Python API (:func:`loftup.training.evaluation.evaluate`) takes the same protocol
objects. No dependencies, so that ``--help`` needs no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from loftup.fields import REQUIRED, option

__all__ = [
    "DavisInputs",
    "DavisProtocol",
    "EvalOptions",
    "LiveBackbone",
    "MasksEvalOptions",
    "MasksInputs",
    "MasksProtocol",
    "SegInputs",
    "SegProtocol",
]

_RES_HELP = "Backbone input size (default: --size)."


class _Recorded:
    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SegProtocol(_Recorded):
    size: int = option(224, "Resize + centre-crop size of images, labels, guidance and output.")
    backbone_res: int | None = option(None, _RES_HELP, flag="--res")
    epochs: int = option(10, "Probe epochs.")
    lr: float = option(1e-4, "Probe NAdam learning rate.")
    batch_size: int = option(8, "Probe batch size.")
    seed: int = option(0, "Probe init and data order seed.")
    optimizer: str = option("NAdam", cli=False)
    probe: str = option("Conv1x1(C, K), cross-entropy over labelled pixels", cli=False)
    miou: str = option("mean IoU over the classes present in the split's labels or predictions", cli=False)
    bn: str = option("upsampler BatchNorm in eval mode", cli=False)


@dataclass
class DavisProtocol(_Recorded):
    size: int = option(224, "Frames resized to SIZE x SIZE; features upsampled to SIZE/2.")
    backbone_res: int | None = option(None, _RES_HELP, flag="--res")
    context: int = option(7, "Previous predictions used besides the first frame.")
    temperature: float = option(0.1, "Affinity temperature.")
    radius: int = option(12, "Spatial radius in feature cells.")
    topk: int = option(5, "Neighbours averaged per pixel.")
    boundary_tolerance: float = option(0.008, "F's match tolerance, a fraction of the image diagonal.")
    scored_frames: str = option("all but the first and the last (DAVIS toolkit, semi-supervised)", cli=False)


@dataclass
class MasksProtocol(_Recorded):
    size: int = option(224, "Evaluation resolution.")
    res: int = option(224, "Backbone input size of the stored features (default: the store's).")
    geometry: int = option(224, "Stored image/mask geometry to read.")
    max_masks: int = option(150, "Masks per image, in annotation order.")
    min_pixels: int = option(16, "Regions smaller than this are not scored.", cli=False)
    score: str = option(
        "mean over images of the nearest-prototype mIoU over regions (larger masks first, smaller on top)", cli=False
    )


_UPSAMPLER_HELP = "Baselines to run (repeatable): bilinear, bicubic, nearest, lowres."


@dataclass(frozen=True)
class EvalOptions:
    """Which upsamplers are compared, where, and where the results go."""

    upsampler: list[str] = option(factory=lambda: ["bilinear"], help=_UPSAMPLER_HELP)
    checkpoint: list[Path] = option(
        factory=list,
        help="A LoftUp checkpoint (repeatable): ours (.safetensors), a released .pth/.bin, or official:NAME "
        "(dinov2s, dinov2s_reg, dinov2b, dinov2b_reg, clip, siglip, siglip2; from the local HF cache).",
    )
    match_projection: bool = option(
        True, "Also run each baseline in every checkpoint's own PCA projection (named BASELINE@CHECKPOINT)."
    )
    target_space: str = option("layer_norm", "Space of the baselines' features: layer_norm (LoftUp's) or raw.")
    device: str = option("auto", "auto, cpu or cuda.")
    out: Path | None = option(None, "Write results.json, results.md and pictures here.")


@dataclass(frozen=True)
class MasksEvalOptions(EvalOptions):
    upsampler: list[str] = option(factory=lambda: ["bilinear", "bicubic"], help=_UPSAMPLER_HELP)
    out: Path | None = option(None, "Write results.json and results.md here.")


@dataclass(frozen=True)
class LiveBackbone:
    """The backbone run live on the images (seg, davis)."""

    backbone: str | None = option(
        None, "Backbone run live on the images (default: the checkpoints', else dinov2_vits14)."
    )
    weights: str | None = option(None, "Backbone weights file.")
    random_init: bool = option(False, "Random backbone weights (tests).")


@dataclass(frozen=True)
class SegInputs:
    dataset: str = option(REQUIRED, "Layout: cocostuff27, cityscapes, voc or folder.")
    root: Path = option(REQUIRED, "Dataset folder in that layout.")
    train_split: str = option("train", "Split the probes train on.")
    split: str = option("val", "Split scored.")
    workers: int = option(2, "DataLoader workers.")


@dataclass(frozen=True)
class DavisInputs:
    root: Path = option(REQUIRED, "DAVIS 2017 folder (JPEGImages/480p, Annotations/480p, ImageSets/2017).")
    split: str = option("val", "ImageSets/2017/SPLIT.txt.")
    save_masks: bool = option(False, "Also write every prediction as DAVIS palette PNGs under OUT/masks.")


@dataclass(frozen=True)
class MasksInputs:
    store: str = option(REQUIRED, "Store with images, masks and features.")
    shards: str = option(REQUIRED, "Held-out shards to evaluate on, e.g. 8-9.")
    backbone: str | None = option(None, "Backbone of the stored features (default: the store's, or the checkpoints').")
    limit: int | None = option(None, "At most this many images.")
