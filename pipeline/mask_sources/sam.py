"""``sam``: segment-anything's automatic mask generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from loftup.pipeline.mask_sources.base import MaskSource, cap_masks, mask_row, register_mask_source, require_image
from loftup.pipeline.mask_sources.geometry import downscale, upscale_rle
from loftup.storage.errors import LoftupError, WeightsError

_SAM_WIDTH_TO_TYPE = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
_SAM_FILES = "sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth"


@dataclass
class SamSettings:
    """Every knob of ``SamAutomaticMaskGenerator`` (``output_mode`` is always "coco_rle").

    Defaults follow the SA-1B recipe as the SAM paper (Kirillov et al. 2023, appendix on the
    fully automatic stage) describes it: a 32 x 32 point grid on the full image plus 20
    zoomed-in crops (2 x 2 and 4 x 4 overlapping windows with 16 x 16 and 8 x 8 grids, i.e.
    ``crop_n_layers=2`` with ``crop_n_points_downscale_factor=2``), keeping masks with predicted
    IoU >= 0.88 and stability >= 0.95, and box NMS at 0.7 within and across crops (the
    generator ranks across crops from the most zoomed-in crop, as the paper does). Where the
    paper is silent the library defaults stay (``crop_overlap_ratio``, ``points_per_batch``,
    ``stability_score_offset``). The paper's clean-up of small components and holes
    (``min_mask_region_area``, e.g. 100) needs OpenCV, which is not a dependency: default 0.
    The library's own defaults (``crop_n_layers=0``, no crops) are 3x cheaper:
    :meth:`library_defaults`. ``model_type="auto"`` reads vit_b/l/h from the checkpoint.
    """

    model_type: str = "auto"
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 2
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 2
    min_mask_region_area: int = 0

    @classmethod
    def library_defaults(cls, **overrides) -> "SamSettings":
        """segment-anything's own defaults: no crops, one 32 x 32 grid."""
        return cls(**{"crop_n_layers": 0, "crop_n_points_downscale_factor": 1, **overrides})

    def generator_kwargs(self) -> dict:
        out = asdict(self)
        out.pop("model_type")
        return out


def _build_sam(model_type: str, checkpoint: str | None, random_init: bool):
    from segment_anything import sam_model_registry

    from loftup.pipeline.backbones import load_state_dict_strict, read_state_dict

    if model_type not in ("auto", *sam_model_registry):
        raise LoftupError(f"unknown SAM model_type {model_type!r}; known: auto, vit_h, vit_l, vit_b")
    if random_init:
        kind = "vit_b" if model_type in ("auto", "default") else model_type
        return sam_model_registry[kind](checkpoint=None), kind
    if checkpoint is None:
        raise WeightsError(
            f"no SAM checkpoint: pass --sam-checkpoint PATH ({_SAM_FILES} from the segment-anything "
            "release) or random_init=True for tests"
        )
    state = read_state_dict(checkpoint)
    width = state.get("image_encoder.patch_embed.proj.weight")
    detected = None if width is None else _SAM_WIDTH_TO_TYPE.get(int(width.shape[0]))
    if model_type == "auto":
        if detected is None:
            raise WeightsError(
                f"{checkpoint} is not a SAM checkpoint (no image_encoder.patch_embed.proj.weight of a known width)"
            )
        kind = detected
    else:
        kind = "vit_h" if model_type == "default" else model_type
    model = sam_model_registry[kind](checkpoint=None)
    load_state_dict_strict(
        model,
        state,
        checkpoint,
        f"SAM {kind}" + (f" (file looks like {detected})" if detected and detected != kind else ""),
    )
    return model, kind


@register_mask_source("sam")
class SamSource(MaskSource):
    """segment-anything automatic masks, ordered and numbered like SA-1B annotations.

    Order: the generator's output order (after its NMS passes), kept as ``order`` 0..n-1;
    SA-1B's own annotation order is not documented, so it is not imitated further. The model
    loads when the source is built (a missing or wrong checkpoint fails the job up front, not
    every image). ``device="auto"`` uses the GPU assigned to the worker when there is one.

    ``max_side``: None runs the generator on the original image (SAM resizes to 1024 px
    internally, but crops are cut from the full image and masks are predicted at full size).
    A number shrinks the image first (long side, bilinear) and scales the masks back
    nearest-exact; area and bbox are recomputed from the scaled masks, points and crop boxes
    are scaled. Faster post-processing and less memory, coarser mask edges.

    Options: ``checkpoint``, ``random_init`` (builds a randomly initialised model; vit_b unless
    ``model_type`` says otherwise), ``device``, ``max_side``, ``max_masks``, ``settings`` (a
    :class:`SamSettings` or dict) and any :class:`SamSettings` field as a keyword.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        random_init: bool = False,
        device: str = "auto",
        max_side: int | None = None,
        max_masks: int | None = None,
        settings: SamSettings | dict | None = None,
        **knobs,
    ):
        from segment_anything import SamAutomaticMaskGenerator

        from loftup.pipeline.devices import pick_device

        self._opts = dict(
            checkpoint=checkpoint,
            random_init=random_init,
            max_side=max_side,
            max_masks=max_masks,
            settings=settings,
            **knobs,
        )
        self.settings = self._settings(settings, knobs)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.random_init = bool(random_init)
        self.max_side = None if max_side is None else int(max_side)
        self.max_masks = None if max_masks is None else int(max_masks)
        self.device = pick_device(device)
        model, self.model_type = _build_sam(self.settings.model_type, self.checkpoint, self.random_init)
        self.model = model.to(self.device).eval()
        self.generator = SamAutomaticMaskGenerator(
            self.model, output_mode="coco_rle", **self.settings.generator_kwargs()
        )

    @staticmethod
    def _settings(settings, knobs: dict) -> SamSettings:
        base = settings if isinstance(settings, SamSettings) else SamSettings(**(settings or {}))
        known = {f.name for f in fields(SamSettings)}
        unknown = sorted(set(knobs) - known)
        if unknown:
            raise LoftupError(
                f"mask source 'sam': unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        out = SamSettings(**{**asdict(base), **knobs})
        if out.min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise LoftupError(
                    "sam: min_mask_region_area > 0 needs OpenCV (pip install opencv-python-headless)"
                ) from None
        return out

    @classmethod
    def option_names(cls) -> list[str]:
        return [*super().option_names(), *(f.name for f in fields(SamSettings))]

    @classmethod
    def describe(
        cls, checkpoint=None, random_init=False, device="auto", max_side=None, max_masks=None, settings=None, **knobs
    ) -> dict:
        # The device is left out: it changes the masks by float noise at most. The checkpoint
        # is identified by path and size (hashing a 2.5 GB vit_h file per run is too slow).
        path = None if checkpoint is None else Path(checkpoint)
        size = path.stat().st_size if path is not None and path.is_file() else None
        return {
            "source": cls.name,
            "version": cls.version,
            "checkpoint": None if path is None else str(path),
            "checkpoint_bytes": size,
            "random_init": bool(random_init),
            "max_side": None if max_side is None else int(max_side),
            "max_masks": None if max_masks is None else int(max_masks),
            **asdict(cls._settings(settings, knobs)),
        }

    def config(self) -> dict:
        return self.describe(**self._opts)

    def generate(self, image) -> list[dict]:
        """Raw generator records for an RGB PIL image (coco_rle segmentations)."""
        return self.generator.generate(np.asarray(image))

    def masks_for(self, image, ann: dict | None, image_id: int) -> list[dict]:
        image = require_image(image, self.name)
        small = downscale(image, self.max_side)
        records = cap_masks(self.generate(small), image_id, self.name, self.max_masks)
        return sam_records_to_rows(records, image_id, (image.height, image.width), self.name)


def sam_records_to_rows(records: list[dict], image_id: int, size: tuple[int, int], source: str = "sam") -> list[dict]:
    """Mask rows from ``SamAutomaticMaskGenerator`` records (``output_mode="coco_rle"``),
    in record order. Records made on a shrunk copy of an ``size = (H, W)`` image are scaled
    back to it nearest-exact (area and bbox recomputed, points and crop boxes scaled)."""
    h, w = size
    rows = []
    for order, r in enumerate(records):
        seg = r["segmentation"]
        counts = seg["counts"].decode("ascii") if isinstance(seg["counts"], bytes) else seg["counts"]
        sh, sw = (int(v) for v in seg["size"])
        points = r.get("point_coords") or []
        point, crop_box, area, bbox = (points[0] if points else None), r.get("crop_box"), r["area"], r["bbox"]
        if (sh, sw) != (h, w):
            counts, area, bbox = upscale_rle(counts, (sh, sw), (h, w))
            fx, fy = w / sw, h / sh
            point = None if point is None else [point[0] * fx, point[1] * fy]
            crop_box = (
                None if crop_box is None else [crop_box[0] * fx, crop_box[1] * fy, crop_box[2] * fx, crop_box[3] * fy]
            )
        rows.append(
            mask_row(
                image_id,
                None,
                order,
                h,
                w,
                counts,
                area,
                bbox,
                r.get("predicted_iou"),
                r.get("stability_score"),
                crop_box,
                point,
                source,
            )
        )
    return rows
