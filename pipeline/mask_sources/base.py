"""What every mask source shares: the row fields, the registry, the base class and the row
helpers (see the package docstring for the rows' meaning)."""

from __future__ import annotations

import inspect
import logging

from loftup.storage.errors import LoftupError

log = logging.getLogger("loftup.pipeline.mask_sources")

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


def mask_row(image_id, ann_id, order, h, w, counts, area, bbox, piou, stab, crop_box, point, source) -> dict:
    """One row of ``MASK_FIELDS``; ``ann_id`` None numbers a generated mask ``image_id * ANN_ID_STRIDE + order``."""
    return {
        "image_id": int(image_id),
        "ann_id": int(image_id) * ANN_ID_STRIDE + int(order) if ann_id is None else int(ann_id),
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


def cap_masks(items: list, image_id: int, source: str, max_masks: int | None) -> list:
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


def require_image(image, source: str):
    if image is None:
        raise ValueError(f"the {source} mask source needs the decoded image")
    return image.convert("RGB") if image.mode != "RGB" else image
