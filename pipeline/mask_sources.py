"""Class-agnostic mask sources behind one registry; every source emits the same rows.

A source has ``.name``, ``.config() -> dict`` (meant for the masks job's config hash;
:func:`mask_source_config` gives the same dict without building the source) and
``masks_for(image, ann, image_id) -> list[dict]``, one dict per mask in the source's order,
with the mask store's columns except the geometry ones (``MASK_FIELDS``)::

    image_id, ann_id, order (0..n-1), height, width, counts (COCO RLE string at the original
    size), area, bbox [x, y, w, h], predicted_iou, stability_score, crop_box [x, y, w, h],
    point [x, y], source

:func:`add_geometry_rles` then adds one ``rle_<size>`` counts string per training geometry and
:func:`rows_to_table` turns rows into a table of the store's mask schema.

Sources (``list_mask_sources()``):

- ``sa1b``: the annotations shipped in the tar (what the LoftUp authors used). Annotation order
  is kept; ``ann_id`` is the annotation's own id; values are those of the JSON with types
  normalised by :func:`loftup.pipeline.sa1b.normalise_annotation`; a missing predicted_iou or
  stability_score becomes NaN, a missing crop_box or point null.
- ``sam``: segment-anything's ``SamAutomaticMaskGenerator`` (see :class:`SamSettings`).
- ``felzenszwalb``: scikit-image graph segmentation on the CPU, for demos and tests without
  weights. It partitions the image into colour-coherent regions; it is NOT a substitute for
  SAM (no objects, no parts hierarchy, no overlaps, no quality scores).

Ids for generated masks (``sam``, ``felzenszwalb``): ``ann_id = image_id * 1000 + order``, so a
source emits at most 1000 masks per image; further masks (the last in order) are dropped with
a warning. Bounding boxes of generated masks follow SAM's generator: ``[xmin, ymin, xmax -
xmin, ymax - ymin]`` with inclusive pixel indices (one less in w and h than
``pycocotools.mask.toBbox``), ``[0, 0, 0, 0]`` for an empty mask. Points are continuous pixel
coordinates (pixel ``(x, y)`` covers ``[x, x + 1) x [y, y + 1)``), as SAM's point prompts are.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from loftup.storage.errors import LoftupError, WeightsError

__all__ = [
    "ANN_ID_STRIDE",
    "MASK_FIELDS",
    "FelzenszwalbSource",
    "MaskSource",
    "Sa1bSource",
    "SamSettings",
    "SamSource",
    "add_geometry_rles",
    "create_mask_source",
    "list_mask_sources",
    "mask_source_config",
    "register_mask_source",
    "rows_to_table",
    "sam_records_to_rows",
    "segments_to_masks",
]

log = logging.getLogger(__name__)

MASK_FIELDS = (
    "image_id",
    "ann_id",
    "order",
    "height",
    "width",
    "counts",
    "area",
    "bbox",
    "predicted_iou",
    "stability_score",
    "crop_box",
    "point",
    "source",
)
ANN_ID_STRIDE = 1000


# ---------------------------------------------------------------------------------------------
# Registry

_SOURCES: dict[str, type] = {}


def register_mask_source(name: str):
    """Class decorator registering a mask source under ``name``."""

    def decorate(cls):
        if name in _SOURCES:
            raise ValueError(f"mask source {name!r} is registered twice")
        cls.name = name
        _SOURCES[name] = cls
        return cls

    return decorate


def list_mask_sources() -> list[str]:
    """Registered mask source names."""
    return list(_SOURCES)


def create_mask_source(name: str, **opts) -> "MaskSource":
    """Build a mask source; unknown names or options are a LoftupError naming the known ones."""
    try:
        cls = _SOURCES[name]
    except KeyError:
        raise LoftupError(f"unknown mask source {name!r}; known: {', '.join(list_mask_sources())}") from None
    _check_options(cls, opts)
    return cls(**opts)


def mask_source_config(name: str, **opts) -> dict:
    """The ``config()`` a source built with these options would report, without building it
    (no SAM model is loaded): for job config hashes computed on the driver."""
    cls = _SOURCES.get(name)
    if cls is None:
        raise LoftupError(f"unknown mask source {name!r}; known: {', '.join(list_mask_sources())}")
    _check_options(cls, opts)
    return cls.describe(**opts)


def _check_options(cls, opts: dict) -> None:
    known = cls.option_names()
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise LoftupError(
            f"mask source {cls.name!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )


class MaskSource:
    """Base class: subclasses set their options in ``__init__`` and implement ``masks_for``."""

    name = ""
    version = 1  # bump when a source's output changes for the same options

    @classmethod
    def option_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def options(self) -> dict:
        return {}

    def config(self) -> dict:
        """JSON-ready description that decides whether stored masks are stale."""
        return {"source": self.name, "version": self.version, **self.options()}

    @classmethod
    def describe(cls, **opts) -> dict:
        """``config()`` of a source built with ``opts`` (cheap sources simply build one)."""
        return cls(**opts).config()

    def masks_for(self, image, ann: dict | None, image_id: int) -> list[dict]:
        raise NotImplementedError


def _row(image_id, ann_id, order, h, w, counts, area, bbox, piou, stab, crop_box, point, source) -> dict:
    return {
        "image_id": int(image_id),
        "ann_id": int(ann_id),
        "order": int(order),
        "height": int(h),
        "width": int(w),
        "counts": counts,
        "area": int(area),
        "bbox": None if bbox is None else [float(v) for v in bbox],
        "predicted_iou": float("nan") if piou is None else float(piou),
        "stability_score": float("nan") if stab is None else float(stab),
        "crop_box": None if crop_box is None else [float(v) for v in crop_box],
        "point": None if point is None else [float(v) for v in point],
        "source": source,
    }


def _cap(items: list, image_id: int, source: str, max_masks: int | None) -> list:
    if max_masks is not None:
        items = items[: int(max_masks)]
    if len(items) > ANN_ID_STRIDE:
        log.warning(
            "%s: image %s has %d masks; keeping the first %d (ann_id = image_id * %d + order)",
            source,
            image_id,
            len(items),
            ANN_ID_STRIDE,
            ANN_ID_STRIDE,
        )
        items = items[:ANN_ID_STRIDE]
    return items


def _sam_bbox(x_min: int, y_min: int, x_max: int, y_max: int, empty: bool) -> list[float]:
    if empty:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(x_min), float(y_min), float(x_max - x_min), float(y_max - y_min)]


def _nearest_index(n_out: int, n_src: int) -> np.ndarray:
    """Source index of each output pixel for a nearest-exact resize (half-pixel centres)."""
    return np.minimum(n_src - 1, np.floor((np.arange(n_out) + 0.5) * n_src / n_out).astype(np.int64))


def _downscale(image, max_side: int | None):
    """``image`` shrunk so its long side is at most ``max_side`` (PIL bilinear, antialiased)."""
    from PIL import Image

    w, h = image.size
    if not max_side or max(w, h) <= max_side:
        return image
    s = max_side / max(w, h)
    return image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)


def _require_image(image, source: str):
    if image is None:
        raise ValueError(f"the {source} mask source needs the decoded image")
    return image.convert("RGB") if image.mode != "RGB" else image


# ---------------------------------------------------------------------------------------------
# Geometry columns and tables


def add_geometry_rles(rows: list[dict], sizes=(224, 896)) -> list[dict]:
    """Add ``rle_<size>`` (counts string, ``size x size``) to every row, in place; returns rows.

    Each is :func:`loftup.storage.rle.to_geometry` of the original-size mask: resize the short
    side to ``size`` and centre-crop, sampled nearest-exact.
    """
    from loftup.storage.rle import to_geometry

    for row in rows:
        rle = {"size": [row["height"], row["width"]], "counts": row["counts"]}
        for size in sizes:
            row[f"rle_{int(size)}"] = to_geometry(rle, int(size))["counts"]
    return rows


def rows_to_table(rows: list[dict], sizes=(224, 896)):
    """A ``pyarrow.Table`` of the store's mask schema for ``sizes`` (rows need ``rle_<size>``)."""
    import pyarrow as pa

    from loftup.storage import mask_schema

    schema = mask_schema(sizes)
    if not rows:
        return schema.empty_table()
    missing = [n for n in schema.names if n not in rows[0]]
    if missing:
        raise ValueError(f"mask rows lack {missing}; call add_geometry_rles(rows, {tuple(sizes)}) first")
    columns = {n: [r[n] for r in rows] for n in schema.names}
    return pa.table(columns, schema=schema)


# ---------------------------------------------------------------------------------------------
# sa1b: the annotations shipped with SA-1B


@register_mask_source("sa1b")
class Sa1bSource(MaskSource):
    """Masks from the SA-1B JSON, in annotation order; ``max_masks`` keeps the first ones
    (LoftUp used at most 150 per image, in annotation order). The image is not needed."""

    def __init__(self, max_masks: int | None = None):
        if max_masks is not None and int(max_masks) < 0:
            raise LoftupError(f"max_masks must be >= 0, got {max_masks}")
        self.max_masks = None if max_masks is None else int(max_masks)

    def options(self) -> dict:
        return {"max_masks": self.max_masks}

    def masks_for(self, image, ann: dict | None, image_id: int) -> list[dict]:
        from loftup.pipeline.sa1b import normalise_annotation

        if ann is None:
            raise ValueError("no annotation JSON for the sa1b mask source")
        items = ann.get("annotations")
        if not isinstance(items, list):
            raise ValueError("annotation JSON has no 'annotations' list")
        if self.max_masks is not None:
            items = items[: self.max_masks]
        anns = normalise_annotation({"image": ann.get("image", {}), "annotations": items})
        rows = []
        for order, a in enumerate(anns):
            h, w = a["segmentation"]["size"]
            points = a["point_coords"]
            rows.append(
                _row(
                    image_id,
                    a["id"],
                    order,
                    h,
                    w,
                    a["segmentation"]["counts"],
                    a["area"],
                    a["bbox"],
                    a["predicted_iou"],
                    a["stability_score"],
                    a["crop_box"],
                    points[0] if points else None,
                    self.name,
                )
            )
        return rows


# ---------------------------------------------------------------------------------------------
# felzenszwalb: graph segmentation, CPU only


def _label_runs(labels: np.ndarray):
    """Column-major runs of a label map: (starts, lengths, run labels)."""
    flat = labels.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change)).astype(np.int64)
    lengths = np.diff(np.concatenate((starts, [flat.size])))
    return starts, lengths, flat[starts]


def segments_to_masks(labels: np.ndarray) -> list[dict]:
    """One mask per label of an ``h x w`` label map, straight from its column-major runs
    (no per-segment full-image pass). Returns dicts ``{label, counts, area, bbox, point}``,
    sorted by area descending (ties: lower label first)."""
    h, w = labels.shape
    total = h * w
    starts, lengths, run_labels = _label_runs(labels)
    by_label = np.argsort(run_labels, kind="stable")
    uniq, first = np.unique(run_labels[by_label], return_index=True)
    bounds = np.append(first, len(by_label))
    out = []
    for i, lab in enumerate(uniq):
        idx = by_label[bounds[i] : bounds[i + 1]]
        s, n = starts[idx], lengths[idx]
        e = s + n
        counts = np.empty(2 * len(s) + 1, dtype=np.int64)
        counts[0] = s[0]
        counts[2:-1:2] = s[1:] - e[:-1]
        counts[1::2] = n
        counts[-1] = total - e[-1]
        if counts[-1] == 0:  # pycocotools' own encoder never ends on an empty run
            counts = counts[:-1]
        coco = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
        x0, y0 = np.divmod(s, h)
        x1, y1 = np.divmod(e - 1, h)
        one_col = x1 == x0
        # A run that wraps into the next column covers the bottom of one and the top of the next.
        bbox = _sam_bbox(x0.min(), np.where(one_col, y0, 0).min(), x1.max(), np.where(one_col, y1, h - 1).max(), False)
        longest = int(np.argmax(n))
        px, py = divmod(int(s[longest] + n[longest] // 2), h)
        out.append(
            {
                "label": int(lab),
                "counts": coco["counts"].decode("ascii"),
                "area": int(n.sum()),
                "bbox": bbox,
                "point": [px + 0.5, py + 0.5],
            }
        )
    out.sort(key=lambda m: (-m["area"], m["label"]))
    return out


@register_mask_source("felzenszwalb")
class FelzenszwalbSource(MaskSource):
    """``skimage.segmentation.felzenszwalb`` segments as masks (demos and tests; not SAM).

    The image is shrunk to ``max_side`` (default 512; None = original size) for speed and the
    label map is scaled back to the original size nearest-exact, so the masks partition the
    image exactly. ``scale``/``sigma``/``min_size`` are skimage's (``min_size`` in pixels of
    the shrunk image); the defaults give ~40-120 segments on 1500 px photos. Order: area
    descending. ``predicted_iou`` and ``stability_score`` are NaN (no model, no score);
    ``crop_box`` is the full image; ``point`` is the centre pixel of the segment's longest
    column-major run (always inside the mask).
    """

    def __init__(
        self,
        scale: float = 300.0,
        sigma: float = 0.8,
        min_size: int = 150,
        max_side: int | None = 512,
        max_masks: int | None = None,
    ):
        self.scale, self.sigma, self.min_size = float(scale), float(sigma), int(min_size)
        self.max_side = None if max_side is None else int(max_side)
        self.max_masks = None if max_masks is None else int(max_masks)

    def options(self) -> dict:
        return {
            "scale": self.scale,
            "sigma": self.sigma,
            "min_size": self.min_size,
            "max_side": self.max_side,
            "max_masks": self.max_masks,
        }

    def label_map(self, image) -> np.ndarray:
        """int32 ``H x W`` segment labels at the image's original size."""
        from skimage.segmentation import felzenszwalb

        image = _require_image(image, self.name)
        small = np.asarray(_downscale(image, self.max_side))
        labels = felzenszwalb(small, scale=self.scale, sigma=self.sigma, min_size=self.min_size, channel_axis=-1)
        labels = labels.astype(np.int32, copy=False)
        if labels.shape != (image.height, image.width):
            rows = _nearest_index(image.height, labels.shape[0])
            cols = _nearest_index(image.width, labels.shape[1])
            labels = labels[rows[:, None], cols[None, :]]
        return labels

    def masks_for(self, image, ann: dict | None, image_id: int) -> list[dict]:
        labels = self.label_map(image)
        h, w = labels.shape
        segs = _cap(segments_to_masks(labels), image_id, self.name, self.max_masks)
        full = [0.0, 0.0, float(w), float(h)]
        return [
            _row(
                image_id,
                image_id * ANN_ID_STRIDE + k,
                k,
                h,
                w,
                m["counts"],
                m["area"],
                m["bbox"],
                None,
                None,
                full,
                m["point"],
                self.name,
            )
            for k, m in enumerate(segs)
        ]


# ---------------------------------------------------------------------------------------------
# sam: segment-anything automatic mask generation

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
        image = _require_image(image, self.name)
        small = _downscale(image, self.max_side)
        records = _cap(self.generate(small), image_id, self.name, self.max_masks)
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
            counts, area, bbox = _upscale_rle(counts, (sh, sw), (h, w))
            fx, fy = w / sw, h / sh
            point = None if point is None else [point[0] * fx, point[1] * fy]
            crop_box = (
                None if crop_box is None else [crop_box[0] * fx, crop_box[1] * fy, crop_box[2] * fx, crop_box[3] * fy]
            )
        rows.append(
            _row(
                image_id,
                image_id * ANN_ID_STRIDE + order,
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


def _upscale_rle(counts: str, src: tuple[int, int], dst: tuple[int, int]) -> tuple[str, int, list[float]]:
    sh, sw = src
    h, w = dst
    mask = mask_utils.decode({"size": [sh, sw], "counts": counts.encode("ascii")}).astype(bool)
    big = mask[_nearest_index(h, sh)[:, None], _nearest_index(w, sw)[None, :]]
    coco = mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))
    ys = np.flatnonzero(big.any(axis=1))
    xs = np.flatnonzero(big.any(axis=0))
    empty = len(xs) == 0
    bbox = _sam_bbox(
        xs[0] if not empty else 0,
        ys[0] if not empty else 0,
        xs[-1] if not empty else 0,
        ys[-1] if not empty else 0,
        empty,
    )
    return coco["counts"].decode("ascii"), int(big.sum()), bbox
