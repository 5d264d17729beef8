"""Parquet image store: per shard, the training-geometry JPEGs of every image and its original size."""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow as pa

from loftup.storage.errors import NotInStore
from loftup.storage.parquet_shards import ShardFiles, ShardTableWriter

# JPEGs do not compress further, and small row groups keep a random read to a few MB
# (32 images at 896 px are ~5-8 MB of JPEG) instead of a whole shard's column chunk.
IMAGE_ROW_GROUP = 32


def image_schema(sizes) -> pa.Schema:
    """Image table schema with one ``jpeg_<size>`` column per training geometry."""
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("file_name", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            *[(f"jpeg_{int(s)}", pa.binary()) for s in sorted(sizes)],
        ]
    )


IMAGE_SCHEMA = image_schema((224, 896))


# Rows an image writer may hold while spilling out-of-order input (~80 MB of 224 + 896 JPEGs).
IMAGE_LIMIT_ROWS = 512


def image_writer(
    files: ShardFiles, shard: int, schema: pa.Schema, row_group: int | None = None, limit_rows: int | None = None
) -> ShardTableWriter:
    """Streaming writer of one shard's image file, rows sorted by image_id (repeats refused)."""
    codecs = {n: ("none" if n.startswith("jpeg_") else "zstd") for n in schema.names}
    return files.writer(
        shard,
        schema,
        ("image_id",),
        row_group or IMAGE_ROW_GROUP,
        limit_rows or max(IMAGE_LIMIT_ROWS, row_group or IMAGE_ROW_GROUP),
        what="image",
        unique="image_id",
        compression=codecs,
        use_dictionary=False,
        write_statistics=["image_id"],
    )


def write_images(files: ShardFiles, shard: int, table: pa.Table, schema: pa.Schema) -> int:
    """Sort by image_id and write the shard's image file in one call; returns bytes written."""
    with image_writer(files, shard, schema) as w:
        w.add(table)
    return w.nbytes


class ImageIndex:
    """image_id -> (shard, row), built lazily from the image_id columns (8 bytes per image)."""

    def __init__(self, files: ShardFiles):
        self.files = files
        self._lock = threading.RLock()
        self.invalidate()

    def invalidate(self) -> None:
        with self._lock:
            self._index = None

    def _build(self):
        ids, shards, rows, paths = [], [], [], {}
        for shard, path in self.files.files().items():
            col = self.files.parquet_file(path).read(columns=["image_id"]).column(0).to_numpy()
            ids.append(col)
            shards.append(np.full(len(col), shard, np.int64))
            rows.append(np.arange(len(col), dtype=np.int64))
            md = self.files.metadata(path)
            starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
            paths[shard] = (path, starts)
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), paths
        ids, shards, rows = np.concatenate(ids), np.concatenate(shards), np.concatenate(rows)
        order = np.argsort(ids, kind="stable")
        return ids[order], shards[order], rows[order], paths

    def locate(self, image_id: int) -> tuple[int, int]:
        """(shard, row) of an image; KeyError if the store has no such image."""
        with self._lock:
            if self._index is None:
                self._index = self._build()
            ids, shards, rows, _ = self._index
        k = int(np.searchsorted(ids, image_id))
        if k >= len(ids) or ids[k] != image_id:
            raise NotInStore(f"image {image_id} is not in the image store")
        return int(shards[k]), int(rows[k])

    def value(self, image_id: int, column: str):
        """One cell of the image's row, reading a single row group's column chunk."""
        shard, row = self.locate(int(image_id))
        path, starts = self._index[3][shard]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        chunk = self.files.parquet_file(path).read_row_group(group, columns=[column]).column(0)
        return chunk[row - int(starts[group])].as_py()


def open_jpeg(data: bytes):
    """Decode stored JPEG bytes to an RGB PIL image (fully loaded, file closed)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img
