"""Parquet mask store (one file per shard, one row per mask, through the shard layer of
:mod:`loftup.storage.parquet_shards`) and its random-access read path."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loftup.storage.errors import StoreError
from loftup.storage.parquet_shards import ShardFiles, ShardTableWriter

MASK_ROW_GROUP = 20_000
# Rows a mask writer may hold while spilling out-of-order input (~150 MB of SA-1B mask rows).
MASK_LIMIT_ROWS = 60_000


def mask_schema(sizes) -> pa.Schema:
    """Mask table schema with one ``rle_<size>`` column per training geometry."""
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("ann_id", pa.int64()),
            ("order", pa.int32()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("counts", pa.string()),
            *[(f"rle_{int(s)}", pa.string()) for s in sorted(sizes)],
            ("area", pa.int64()),
            ("bbox", pa.list_(pa.float64())),
            ("predicted_iou", pa.float32()),
            ("stability_score", pa.float32()),
            ("crop_box", pa.list_(pa.float64())),
            ("point", pa.list_(pa.float64())),
            ("source", pa.string()),
        ]
    )


MASK_SCHEMA = mask_schema((224, 896))


def mask_writer(
    files: ShardFiles, shard: int, schema: pa.Schema, row_group: int | None = None, limit_rows: int | None = None
) -> "ShardTableWriter":
    """Streaming writer of one shard's mask file, rows sorted by (image_id, order)."""
    return files.writer(
        shard,
        schema,
        ("image_id", "order"),
        row_group or MASK_ROW_GROUP,
        limit_rows or max(MASK_LIMIT_ROWS, row_group or MASK_ROW_GROUP),
        what="mask",
        compression="zstd",
        use_dictionary=["source"],
        write_statistics=["image_id", "ann_id", "order"],
        # Small pages let a random read stop decoding soon after the image's rows.
        data_page_size=256 << 10,
    )


def write_masks(files: ShardFiles, shard: int, table: pa.Table, schema: pa.Schema) -> int:
    """Sort by (image_id, order) and write the shard's mask file in one call; returns bytes written."""
    with mask_writer(files, shard, schema) as w:
        w.add(table)
    return w.nbytes


class MaskIndex:
    """Random access to images' masks.

    Row-group image_id ranges come from the cached footers (checked against the marker's footer
    digest before use, see :meth:`ShardFiles.metadata`); a lookup reads that group's small
    image_id column, then streams the wanted column(s) only up to the image's last row:
    pyarrow cannot seek inside a column chunk, but it decodes pages lazily.
    """

    def __init__(self, files: ShardFiles, cache_groups: int = 64, batch_rows: int = 1024):
        self.files = files
        self._cache_groups = cache_groups
        self._batch_rows = batch_rows
        self._lock = threading.RLock()
        self.invalidate()

    def invalidate(self) -> None:
        with self._lock:
            self._index = None
            self._ids: OrderedDict[int, np.ndarray] = OrderedDict()

    def _build(self):
        paths, mins, maxs, group = [], [], [], []
        for _, path in self.files.files().items():
            md = self.files.metadata(path)
            col = md.schema.to_arrow_schema().get_field_index("image_id")
            for rg in range(md.num_row_groups):
                if md.row_group(rg).num_rows == 0:
                    continue
                stats = md.row_group(rg).column(col).statistics
                if stats is None or not stats.has_min_max:
                    ids = self.files.parquet_file(path).read_row_group(rg, columns=["image_id"]).column(0)
                    lo, hi = pc.min(ids).as_py(), pc.max(ids).as_py()
                else:
                    lo, hi = stats.min, stats.max
                paths.append(path)
                mins.append(lo)
                maxs.append(hi)
                group.append(rg)
        return paths, np.asarray(mins, np.int64), np.asarray(maxs, np.int64), np.asarray(group, np.int64)

    def _index_arrays(self):
        with self._lock:
            if self._index is None:
                self._index = self._build()
            return self._index

    def _group_ids(self, g: int) -> np.ndarray:
        paths, _, _, groups = self._index_arrays()
        with self._lock:
            hit = self._ids.get(g)
            if hit is not None:
                self._ids.move_to_end(g)
                return hit
        pf = self.files.parquet_file(paths[g])
        hit = pf.read_row_group(int(groups[g]), columns=["image_id"]).column(0).to_numpy()
        with self._lock:
            self._ids[g] = hit
            while len(self._ids) > self._cache_groups:
                self._ids.popitem(last=False)
        return hit

    def _read_rows(self, g: int, lo: int, hi: int, columns: tuple[str, ...]) -> list[list]:
        paths, _, _, groups = self._index_arrays()
        pf = self.files.parquet_file(paths[g])
        out: list[list] = [[] for _ in columns]
        seen = 0
        batches = pf.iter_batches(
            batch_size=self._batch_rows, row_groups=[int(groups[g])], columns=list(columns), use_threads=False
        )
        for batch in batches:
            a, b = max(lo - seen, 0), min(hi - seen, batch.num_rows)
            if b > a:
                for acc, col in zip(out, batch.columns):
                    acc.extend(col.slice(a, b - a).to_pylist())
            seen += batch.num_rows
            if seen >= hi:
                break
        return out

    def lookup_many(self, image_ids, columns: tuple[str, ...]) -> list[list[list]]:
        """For each image id: one list per column of its rows' values, in stored order.

        Ids sharing a row group are served by one read of the span they cover.
        """
        ids = [int(i) for i in image_ids]
        out = [[[] for _ in columns] for _ in ids]
        _, mins, maxs, _ = self._index_arrays()
        wanted: dict[int, list[int]] = {}
        for k, image_id in enumerate(ids):
            for g in np.flatnonzero((mins <= image_id) & (maxs >= image_id)):
                wanted.setdefault(int(g), []).append(k)
        for g in sorted(wanted):
            gids = self._group_ids(g)
            spans = {}
            for k in wanted[g]:
                a = int(np.searchsorted(gids, ids[k], side="left"))
                b = int(np.searchsorted(gids, ids[k], side="right"))
                if b > a:
                    spans[k] = (a, b)
            if not spans:
                continue
            lo = min(a for a, _ in spans.values())
            hi = max(b for _, b in spans.values())
            values = self._read_rows(g, lo, hi, columns)
            for k, (a, b) in spans.items():
                for acc, col in zip(out[k], values):
                    acc.extend(col[a - lo : b - lo])
        return out

    def lookup(self, image_id: int, columns: tuple[str, ...]) -> list[list]:
        """One list per column of the image's rows, in stored order (empty if none)."""
        return self.lookup_many([image_id], columns)[0]


def rle_columns(size: int | None, sizes) -> tuple[str, ...]:
    if size is None:
        return ("counts", "height", "width")
    if int(size) not in sizes:
        raise StoreError(f"no masks at size {size} in this store; its geometries are {list(sizes)}")
    return (f"rle_{int(size)}",)


def to_rles(values: list[list], size: int | None) -> list[dict]:
    if size is None:
        counts, heights, widths = values
        return [{"size": [h, w], "counts": c} for c, h, w in zip(counts, heights, widths)]
    return [{"size": [int(size), int(size)], "counts": c} for c in values[0]]
