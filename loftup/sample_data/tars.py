"""SA-1B-format tar writing: annotations with the quirks of real SA-1B files, faults, and
byte-identical deterministic tars."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loftup.sample_data.augment import augment, target_size, upscaled_rles
from loftup.sample_data.photos import load_photo, photo_names
from loftup.storage.errors import LoftupError

FAULTS = ("corrupt_jpeg", "missing_json", "broken_json", "truncated_tar")

# A fixed member timestamp keeps the tar bytes identical across runs.
_MTIME = 1_680_000_000
_JPEG_QUALITY = 90
_ID_STRIDE = 1_000_000  # image ids of shard s lie in (s * stride, (s + 1) * stride)
_ANN_STRIDE = 1_000_000_000


def _crop_grid(width: int, height: int) -> list[list[int]]:
    """Sub-crops of SAM-style multi-crop generation (2x2 and 4x4 with overlap), as xywh."""
    boxes = []
    for per_side in (2, 4):
        overlap = int(512 / 1500 * min(width, height) * 2 / per_side)
        cw = -(-(width + overlap * (per_side - 1)) // per_side)
        ch = -(-(height + overlap * (per_side - 1)) // per_side)
        for i in range(per_side):
            for j in range(per_side):
                x0, y0 = i * (cw - overlap), j * (ch - overlap)
                boxes.append([x0, y0, min(cw, width - x0), min(ch, height - y0)])
    return boxes


def _mixed_number(v: float, as_int: bool):
    return int(round(v)) if as_int else float(v)


def _annotations(rles, H: int, W: int, rng: np.random.Generator, next_ann_id) -> list[dict]:
    from pycocotools import mask as mask_utils

    kept = [r for r in rles if r is not None]
    if not kept:
        return []
    bboxes = mask_utils.toBbox([{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in kept])
    grid = _crop_grid(W, H)
    full = [0, 0, W, H]
    anns = []
    for k, (rle, box) in enumerate(zip(kept, bboxes.tolist())):
        counts, starts = rle.pop("_runs")
        ones = counts[1::2]
        area = int(ones.sum())
        # A point inside the mask: a uniformly drawn foreground pixel, sub-pixel offset added.
        u = int(rng.integers(area))
        cum = np.cumsum(ones)
        run = int(np.searchsorted(cum, u, side="right"))
        flat = int(starts[2 * run] + (u - (cum[run] - ones[run])))
        px, py = flat // H, flat % H
        point = [px + int(rng.integers(1000)) / 1000, py + int(rng.integers(1000)) / 1000]
        crop = full
        if rng.random() < 0.35:
            inside = [
                c
                for c in grid
                if c[0] <= box[0]
                and c[1] <= box[1]
                and box[0] + box[2] <= c[0] + c[2]
                and box[1] + box[3] <= c[1] + c[3]
            ]
            if inside:
                crop = inside[int(rng.integers(len(inside)))]
        iou = rng.uniform(1.0005, 1.035) if rng.random() < 0.04 else rng.uniform(0.87, 0.995)
        anns.append(
            {
                "id": next_ann_id(),
                "segmentation": rle,
                "area": area,
                "bbox": [_mixed_number(v, bool(rng.random() < 0.5)) for v in box],
                "predicted_iou": float(np.float32(iou)),
                "stability_score": float(np.float32(rng.uniform(0.92, 0.995))),
                "crop_box": list(crop),
                "point_coords": [point],
            }
        )
    # Real files always show the quirks; make sure each file has them even with few masks.
    first = anns[0]["bbox"]
    first[0], first[2] = int(round(first[0])), float(first[2])
    if not any(a["predicted_iou"] > 1.0 for a in anns):
        anns[int(rng.integers(len(anns)))]["predicted_iou"] = float(np.float32(rng.uniform(1.0005, 1.035)))
    if not any(a["crop_box"] != full for a in anns):
        smallest = int(np.argmin([b[2] * b[3] for b in bboxes.tolist()]))
        box = bboxes[smallest].tolist()
        for c in grid:
            if c[0] <= box[0] and c[1] <= box[1] and box[0] + box[2] <= c[0] + c[2] and box[1] + box[3] <= c[1] + c[3]:
                anns[smallest]["crop_box"] = list(c)
                break
    return anns


def _render(
    name: str, augment_rng, short_side: int, photos_dir: str | None = None, packages: bool = False
) -> tuple[bytes, int, int, list[dict]]:
    """JPEG bytes, size and RLEs (counts str) of one image; augmented when a rng is given."""
    from PIL import Image

    photo = load_photo(name, photos_dir, packages)
    if augment_rng is None:
        rgb, labels = photo.rgb, photo.labels
    else:
        rgb, labels, _ = augment(photo, augment_rng)
    H, W = target_size(*labels.shape, short_side)
    img = Image.fromarray(rgb).resize((W, H), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    rles = upscaled_rles(labels, photo.groups, H, W)
    return buf.getvalue(), H, W, rles


def _corrupt(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """Garble and cut the entropy-coded data half-way; the headers stay, so only load() fails.

    Garbage is never 0xFF (no fake markers) and the data then simply stops: appending bytes
    instead could let the decoder finish a small image from noise.
    """
    sos = jpeg.find(b"\xff\xda")
    start = sos + 4 if sos >= 0 else len(jpeg) // 4
    cut = start + max(1, (len(jpeg) - start) // 2)
    n_garbage = min(256, (cut - start) // 2)
    garbage = rng.integers(0, 255, size=n_garbage, dtype=np.uint8).tobytes()
    return jpeg[: cut - n_garbage] + garbage


class _TarWriter:
    """Deterministic tar members (fixed owner, mode and time); remembers where data starts."""

    def __init__(self, path: Path, prefix: str):
        import tarfile

        self._tarfile = tarfile
        self.prefix = prefix
        self.tf = tarfile.open(path, "w", format=tarfile.GNU_FORMAT)
        self.data_spans: dict[str, tuple[int, int]] = {}
        if prefix:
            info = self._info(".")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            self.tf.addfile(info)

    def _info(self, name: str):
        info = self._tarfile.TarInfo(name)
        info.mtime = _MTIME
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def add(self, name: str, data: bytes) -> None:
        info = self._info(self.prefix + name)
        info.size = len(data)
        self.tf.addfile(info, io.BytesIO(data))
        end = self.tf.offset
        padded = -(-len(data) // 512) * 512
        self.data_spans[name] = (end - padded, len(data))

    def close(self) -> None:
        self.tf.close()


def _image_ids(seed: int, shard: int, n: int) -> list[int]:
    rng = np.random.default_rng([seed, shard, 7])
    gap_max = max(2, min(50, _ID_STRIDE // (n + 1)))
    gaps = rng.integers(1, gap_max + 1, size=n)
    return (shard * _ID_STRIDE + np.cumsum(gaps)).tolist()


def _check_args(tars, images_per_tar, short_side, first_shard, faults) -> tuple[str, ...]:
    if tars < 1 or images_per_tar < 1:
        raise LoftupError("sample data needs at least one tar and one image per tar")
    if short_side < 16:
        raise LoftupError(f"short side {short_side} is too small (at least 16)")
    if first_shard < 0 or first_shard + tars - 1 > 999_999:
        raise LoftupError("shard numbers must lie in 0..999999")
    faults = tuple(faults or ())
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise LoftupError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return faults


def _check_photos(photos, photos_dir: str | None = None, packages: bool = False) -> tuple[str, ...]:
    available = photo_names(photos_dir, packages)
    if photos is None:
        return available
    names = tuple(photos)
    if not names:
        raise LoftupError("no photos chosen: every photo was excluded")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise LoftupError(f"unknown or unavailable photo(s) {', '.join(unknown)}; available: {', '.join(available)}")
    return names


def write_sample_shards(
    out_dir,
    tars: int = 2,
    images_per_tar: int = 8,
    short_side: int = 1500,
    seed: int = 0,
    first_shard: int = 0,
    faults=(),
    photos: Sequence[str] | None = None,
    photos_dir=None,
    package_photos: bool = False,
) -> list[Path]:
    """Write ``sa_<first_shard:06d>.tar`` ... in SA-1B format and return their paths.

    Photos are used in a fixed order (see :func:`photo_names`); image ``i`` of shard ``s`` is
    photo ``(s * images_per_tar + i) % n_photos``, augmented (crop, flip, colour jitter) from
    the seed once every photo has been used. ``photos`` restricts the photos to those names
    (in that order), so two calls with disjoint lists give photo-disjoint train/held-out tars.
    ``photos_dir``: use the JPEG/PNG files of that folder (searched recursively; named by their
    relative path) or of that list file (:func:`read_photo_list`) instead of the package photos,
    with Felzenszwalb segments as masks; ``package_photos`` uses the package photos too (first).
    Quirks of real SA-1B files: ``./`` member prefixes on even shards, global non-contiguous image and annotation ids, bbox values mixing ints and
    floats, predicted_iou above 1, multi-crop crop boxes, and in the first tar of the call some
    JSON members before their JPEG. ``faults`` (see :data:`FAULTS`) hit the last tar. Output is
    byte-identical for the same arguments.
    """
    faults = _check_args(tars, images_per_tar, short_side, first_shard, faults)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos_dir = None if photos_dir is None else str(Path(photos_dir).resolve())
    packages = bool(package_photos and photos_dir is not None)
    names = _check_photos(photos, photos_dir, packages)
    n_photos = len(names)
    paths = []
    for t in range(tars):
        shard = first_shard + t
        last = t == tars - 1
        path = out / f"sa_{shard:06d}.tar"
        tmp = out / f".sa_{shard:06d}.tar.{os.getpid()}.tmp"
        ids = _image_ids(seed, shard, images_per_tar)
        ann_rng = np.random.default_rng([seed, shard, 11])
        ann_state = {"next": shard * _ANN_STRIDE}

        def next_ann_id():
            ann_state["next"] += int(ann_rng.integers(1, 8))
            return ann_state["next"]

        hit = {}
        if last:
            for k, fault in enumerate(f for f in FAULTS if f != "truncated_tar"):
                if fault in faults:
                    hit.setdefault(k % images_per_tar, set()).add(fault)
        writer = _TarWriter(tmp, "./" if shard % 2 == 0 else "")
        truncate_member = None
        try:
            for i in range(images_per_tar):
                k = shard * images_per_tar + i
                aug = np.random.default_rng([seed, shard, i, 1]) if k >= n_photos else None
                jpeg, H, W, rles = _render(names[k % n_photos], aug, short_side, photos_dir, packages)
                image_id = ids[i]
                anns = _annotations(rles, H, W, np.random.default_rng([seed, shard, i, 2]), next_ann_id)
                stem = f"sa_{image_id}"
                doc = {
                    "image": {"image_id": image_id, "width": W, "height": H, "file_name": f"{stem}.jpg"},
                    "annotations": anns,
                }
                text = json.dumps(doc).encode("utf-8")
                here = hit.get(i, set())
                if "corrupt_jpeg" in here:
                    jpeg = _corrupt(jpeg, np.random.default_rng([seed, shard, i, 3]))
                if "broken_json" in here:
                    text = text[: len(text) // 2]
                members = [(f"{stem}.jpg", jpeg)]
                if "missing_json" not in here:
                    members.append((f"{stem}.json", text))
                if t == 0 and i % 3 == 0:
                    members.reverse()
                for name, data in members:
                    writer.add(name, data)
                if last and "truncated_tar" in faults and i == images_per_tar // 2:
                    truncate_member = members[0][0]
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
        writer.close()
        if truncate_member is not None:
            start, size = writer.data_spans[truncate_member]
            os.truncate(tmp, start + max(1, size // 2))
        os.replace(tmp, path)
        paths.append(path)
    return paths
