"""Streaming reader for SA-1B tars: pairs ``sa_<id>.jpg`` with ``sa_<id>.json`` in one pass.

Nothing is extracted to disk and the tar is read front to back once (``tarfile`` mode
``"r|*"``), so it works on pipes and remote files. Memory holds only members whose partner
has not arrived yet (in SA-1B that is at most one member).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from loftup.storage import rle
from loftup.storage.errors import ShardError

_ID_FROM_NAME = re.compile(r"^sa_(\d+)$")

# tarfile's private header exceptions: they tell a proper end-of-archive (two zero blocks)
# from a file that simply stops at a member boundary, which tarfile itself treats as the end.
_HEADER_ERRORS = tuple(
    getattr(tarfile, n)
    for n in ("EOFHeaderError", "EmptyHeaderError", "TruncatedHeaderError", "InvalidHeaderError")
    if hasattr(tarfile, n)
)
_CLEAN_END = getattr(tarfile, "EOFHeaderError", None)


@dataclass
class Sample:
    """One image of a tar: its id, jpg member name (no ``./``), JPEG bytes and parsed JSON."""

    image_id: int
    file_name: str
    jpeg: bytes = field(repr=False)
    ann: dict | None = field(default=None, repr=False)


@dataclass
class SampleError:
    """A sample that cannot be used; the rest of the tar goes on.

    ``stage`` is ``"json"`` (unparsable or incomplete JSON) or ``"pairing"`` (a jpg without
    its json or the reverse); ``member`` is the offending member's name.
    """

    image_id: int | None
    member: str
    stage: str
    reason: str

    def as_row(self) -> dict:
        """The row layout of the store's errors table."""
        return {"image_id": self.image_id, "member": self.member, "stage": self.stage, "reason": self.reason}


class _WatchedTarInfo(tarfile.TarInfo):
    """Records on the TarFile how its last header read ended, so silent truncation shows."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            info = super().fromtarfile(tf)
        except _HEADER_ERRORS as exc:
            tf._loftup_stop = exc
            raise
        tf._loftup_stop = None
        return info


def _normalise_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _id_from_stem(stem: str) -> int | None:
    match = _ID_FROM_NAME.match(os.path.basename(stem))
    return int(match.group(1)) if match else None


def _open_binary(tar_path):
    path = os.fspath(tar_path)
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _parse_json(data: bytes, stem: str, member: str) -> tuple[dict | None, SampleError | None, int | None]:
    """Parse a SA-1B JSON; returns (ann, error, image_id)."""
    name_id = _id_from_stem(stem)
    try:
        ann = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, SampleError(name_id, member, "json", f"invalid JSON: {exc}"), name_id
    if not isinstance(ann, dict):
        return None, SampleError(name_id, member, "json", "JSON is not an object"), name_id
    missing = [k for k in ("image", "annotations") if k not in ann]
    if missing:
        return (
            None,
            SampleError(name_id, member, "json", f"JSON lacks {' and '.join(repr(k) for k in missing)}"),
            name_id,
        )
    if not isinstance(ann["image"], dict) or not isinstance(ann["annotations"], list):
        return (
            None,
            SampleError(name_id, member, "json", "JSON 'image' must be an object and 'annotations' a list"),
            name_id,
        )
    image_id = ann["image"].get("image_id", name_id)
    try:
        image_id = int(image_id) if image_id is not None else None
    except (TypeError, ValueError):
        return None, SampleError(name_id, member, "json", f"image_id {image_id!r} is not an integer"), name_id
    if image_id is None:
        return None, SampleError(None, member, "json", "no image_id in the JSON nor in the file name"), None
    return ann, None, image_id


def iter_samples(tar_path) -> Iterator[Sample | SampleError]:
    """Yield the samples of one SA-1B tar (local path or fsspec URL) in a single streaming pass.

    Pairs ``<stem>.jpg`` with ``<stem>.json`` whatever their order and ``./`` prefixes;
    directories and other members are ignored. Bad samples come out as :class:`SampleError`.
    A truncated or unreadable tar raises :class:`ShardError` naming the tar (after the samples
    read before the damage have been yielded).
    """
    label = os.path.basename(os.fspath(tar_path).rstrip("/"))
    # stem -> ("jpg" | "json", member name, payload) for members still waiting for a partner.
    pending: dict[str, tuple[str, str, object]] = {}

    def fail(kind: str, exc: BaseException) -> ShardError:
        detail = str(exc) or type(exc).__name__
        return ShardError(f"{label}: {kind} tar ({detail})")

    try:
        raw = _open_binary(tar_path)
    except OSError as exc:
        raise fail("unreadable", exc) from None
    with raw:
        try:
            tf = tarfile.open(fileobj=raw, mode="r|*", tarinfo=_WatchedTarInfo)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise fail("unreadable", exc) from None
        try:
            while True:
                try:
                    member = tf.next()
                except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                    raise fail("truncated", exc) from None
                if member is None:
                    break
                # TarFile keeps every header it has read; a 10 GB shard has ~22k of them.
                tf.members.clear()
                if not member.isfile():
                    continue
                name = _normalise_name(member.name)
                stem, ext = os.path.splitext(name)
                ext = ext.lower()
                if ext not in (".jpg", ".jpeg", ".json"):
                    continue
                try:
                    data = tf.extractfile(member).read()
                except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                    raise fail("truncated", exc) from None
                if len(data) != member.size:
                    raise fail("truncated", EOFError(f"{name}: {len(data)} of {member.size} bytes"))
                kind = "json" if ext == ".json" else "jpg"
                other = pending.pop(stem, None)
                if other is None:
                    pending[stem] = (kind, name, data)
                    continue
                if other[0] == kind:
                    # Two members for the same slot: report the first, keep waiting with the second.
                    yield SampleError(_id_from_stem(stem), other[1], "pairing", f"duplicate {kind} member")
                    pending[stem] = (kind, name, data)
                    continue
                jpg, js = ((name, data), other[1:]) if kind == "jpg" else (other[1:], (name, data))
                yield _pair(stem, jpg, js)
        finally:
            stop = getattr(tf, "_loftup_stop", None)
            tf.close()
        if stop is not None and not (_CLEAN_END is not None and isinstance(stop, _CLEAN_END)):
            raise fail("truncated", EOFError(f"archive ends without its end marker: {stop}"))
    for stem, (kind, name, _) in pending.items():
        missing = "json" if kind == "jpg" else "jpg"
        yield SampleError(_id_from_stem(stem), name, "pairing", f"missing {missing}")


def _pair(stem: str, jpg: tuple[str, bytes], js: tuple[str, bytes]) -> Sample | SampleError:
    ann, err, image_id = _parse_json(js[1], stem, js[0])
    if err is not None:
        return err
    return Sample(image_id=image_id, file_name=jpg[0], jpeg=jpg[1], ann=ann)


def count_members(tar_path) -> int:
    """Number of ``.jpg`` members (images) in a local tar, reading headers only."""
    n = 0
    try:
        with tarfile.open(os.fspath(tar_path), "r:*") as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg")):
                    n += 1
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ShardError(f"{os.path.basename(os.fspath(tar_path))}: unreadable tar ({exc})") from None
    return n


# ---------------------------------------------------------------------------------------------
def decode_jpeg(data: bytes):
    """Decode JPEG bytes into a fully loaded RGB ``PIL.Image``; ValueError on corrupt data.

    Relies on Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``: with it set to
    True, truncated files load silently.
    """
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, DecompressionBombError...
        raise ValueError(f"corrupt JPEG: {exc}") from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _floats(values, what: str, n: int | None = None) -> list[float]:
    out = [float(v) for v in values]
    if n is not None and len(out) != n:
        raise ValueError(f"{what} must have {n} values, got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} has non-finite values")
    return out


def _opt_float(value) -> float | None:
    return None if value is None else float(value)


def _compressed_rle(seg: dict, what: str) -> dict:
    size = [int(v) for v in seg["size"]]
    counts = seg["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    elif isinstance(counts, list):
        from pycocotools import mask as mask_utils

        counts = mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, *size)["counts"].decode(
            "ascii"
        )
    elif not isinstance(counts, str):
        raise ValueError(f"{what}: segmentation counts of type {type(counts).__name__}")
    return {"size": size, "counts": counts}


# How far a recorded area/bbox may be from the mask's own before the annotation is refused.
AREA_TOLERANCE = 0.01  # relative (and at least 2 px)
BBOX_TOLERANCE = 2.0  # px per coordinate


def _consistent(area: float, bbox: list[float], true_area: int, true_bbox: list[float]) -> None:
    if abs(area - true_area) > max(2.0, AREA_TOLERANCE * true_area):
        raise ValueError(f"area {area:g} but the mask has {true_area} px")
    if true_area and max(abs(a - b) for a, b in zip(bbox, true_bbox)) > BBOX_TOLERANCE:
        raise ValueError(f"bbox {bbox} but the mask spans {true_bbox}")


def normalise_annotation(ann) -> list[dict]:
    """Normalise the annotations of one SA-1B JSON (the whole dict, or its annotations list).

    Returns them in their original order, each as ``{"id": int, "segmentation": {"size": [h, w],
    "counts": str}, "area": int, "bbox": [4 floats], "predicted_iou": float|None,
    "stability_score": float|None, "crop_box": [4 floats]|None, "point_coords": [[x, y], ...]}``.
    Missing area/bbox are computed from the RLE. Raises ValueError on a malformed annotation, a
    mask whose size is not the image's, an RLE whose counts do not add up to its size, and an
    area or bbox that disagrees with the mask (beyond ``AREA_TOLERANCE``/``BBOX_TOLERANCE``).
    """
    image = ann.get("image", {}) if isinstance(ann, dict) else {}
    items = ann["annotations"] if isinstance(ann, dict) else ann
    want = None
    if image.get("height") is not None and image.get("width") is not None:
        want = [int(image["height"]), int(image["width"])]
    out = []
    for k, a in enumerate(items):
        what = f"annotation {a.get('id', k)!r}" if isinstance(a, dict) else f"annotation #{k}"
        try:
            seg = _compressed_rle(a["segmentation"], what)
            if want is not None and seg["size"] != want:
                raise ValueError(f"mask size {seg['size']} differs from the image size {want}")
            true_area, true_bbox = rle.check(seg)
            area = a.get("area")
            bbox = a.get("bbox")
            area = true_area if area is None else area
            bbox = true_bbox if bbox is None else bbox
            _consistent(float(area), _floats(bbox, "bbox", 4), true_area, true_bbox)
            crop = a.get("crop_box")
            points = a.get("point_coords") or []
            out.append(
                {
                    "id": int(a["id"]) if a.get("id") is not None else k,
                    "segmentation": seg,
                    "area": int(round(float(area))),
                    "bbox": _floats(bbox, "bbox", 4),
                    "predicted_iou": _opt_float(a.get("predicted_iou")),
                    "stability_score": _opt_float(a.get("stability_score")),
                    "crop_box": None if crop is None else _floats(crop, "crop_box", 4),
                    "point_coords": [_floats(p, "point", 2) for p in points],
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"{what}: {detail}") from None
    return out
