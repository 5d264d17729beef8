"""Parquet mask store (one file per shard, one row per mask) and its read paths.

``ShardFiles`` is the part shared with the image store: one ``<name>/shard=000123/part-0.parquet``
per shard, written in one atomic call, read through pyarrow datasets, dask, or random access
with cached footers.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from loftup.storage.commit import atomic_path, committed, is_local, parse_shard_name, shard_name
from loftup.storage.errors import StoreError

PART = "part-0.parquet"
MASK_ROW_GROUP = 20_000
SHARD_FIELD = pa.field("shard", pa.int32())
PARTITIONING = ds.partitioning(pa.schema([SHARD_FIELD]), flavor="hive")


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


def conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """``table`` with exactly ``schema``'s columns and types, or a StoreError naming the gap."""
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise StoreError(f"{what} table does not match the store schema: missing {missing}, unexpected {extra}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise StoreError(f"{what} table has columns of the wrong type: {exc}") from None


def arrow_filesystem(fs):
    """pyarrow's native local filesystem when possible (fast, positional reads), else fsspec."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    return LocalFileSystem() if is_local(fs) else PyFileSystem(FSSpecHandler(fs))


def _list_type_mapper(typ):
    import pandas as pd

    # Without this, dask's string conversion turns empty object-dtype list columns into strings.
    return pd.ArrowDtype(typ) if pa.types.is_list(typ) else None


class ShardFiles:
    """The parquet files of one table kind (``masks`` or ``images``), one per shard."""

    def __init__(self, fs, root: str, name: str, max_open: int = 64):
        self.fs = fs
        self.root = root
        self.base = f"{root}/{name}"
        self.name = name
        self._afs = arrow_filesystem(fs)
        self._max_open = max_open
        self._lock = threading.RLock()
        self._clear()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _clear(self) -> None:
        self._pid = os.getpid()
        self._listing: dict[int, str] | None = None
        self._meta: dict[str, pq.FileMetaData] = {}
        self._open: OrderedDict[str, pq.ParquetFile] = OrderedDict()

    def _check_pid(self) -> None:
        # File handles inherited through fork must not be shared with the parent process.
        if self._pid != os.getpid():
            self._clear()

    def invalidate(self) -> None:
        """Forget listings, footers and open files (after writes or resets)."""
        with self._lock:
            self._clear()

    def path(self, shard: int) -> str:
        return f"{self.base}/{shard_name(shard)}/{PART}"

    def files(self) -> dict[int, str]:
        """Shard number -> file path of every committed shard file (sorted by shard).

        A file whose shard has no marker (a run died before committing, or the marker was lost)
        is never served: readers see committed data only.
        """
        with self._lock:
            self._check_pid()
            if self._listing is None:
                found = {}
                done = committed(self.fs, self.root, self.name)
                for path in self.fs.glob(f"{self.base}/shard=*/{PART}"):
                    shard = parse_shard_name(path.rsplit("/", 2)[-2])
                    if shard is not None and shard in done:
                        found[shard] = path
                self._listing = dict(sorted(found.items()))
            return dict(self._listing)

    def metadata(self, path: str) -> pq.FileMetaData:
        with self._lock:
            self._check_pid()
            md = self._meta.get(path)
            if md is None:
                md = self._meta[path] = pq.read_metadata(path, filesystem=self._afs)
            return md

    def parquet_file(self, path: str) -> pq.ParquetFile:
        with self._lock:
            self._check_pid()
            pf = self._open.get(path)
            if pf is not None:
                self._open.move_to_end(path)
                return pf
            source = self._afs.open_input_file(path)
            pf = pq.ParquetFile(source, metadata=self.metadata(path), page_checksum_verification=True)
            self._open[path] = pf
            while len(self._open) > self._max_open:
                _, old = self._open.popitem(last=False)
                old.close()
            return pf

    # -- writing -------------------------------------------------------------------------------
    def write(self, shard: int, table: pa.Table, **options) -> int:
        """Write the whole shard file atomically; returns its size in bytes."""
        path = self.path(shard)
        with atomic_path(self.fs, path) as tmp:
            # Page CRCs: a flipped bit fails the read instead of changing a value.
            pq.write_table(table, tmp, filesystem=self._afs, write_page_checksum=True, **options)
        self.invalidate()
        return int(self.fs.size(path))

    # -- bulk reads ----------------------------------------------------------------------------
    def dataset(self, schema: pa.Schema) -> ds.Dataset:
        """pyarrow dataset over the shard files with ``shard`` (int32) as a partition column."""
        files = list(self.files().values())
        full = schema.append(SHARD_FIELD)
        if not files:
            return ds.dataset(full.empty_table())
        return ds.dataset(
            files,
            schema=full,
            format=ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)),
            filesystem=self._afs,
            partitioning=PARTITIONING,
            partition_base_dir=self.base,
        )

    def dask(self, schema: pa.Schema, columns=None):
        """dask.dataframe of the shard files (dask's read_parquet partitioning), ``shard`` as int32."""
        import dask.dataframe as dd

        files = list(self.files().values())
        want = list(schema.names) + ["shard"] if columns is None else list(columns)
        unknown = [c for c in want if c not in schema.names and c != "shard"]
        if unknown:
            raise StoreError(f"unknown {self.name} columns {unknown}; known: {schema.names + ['shard']}")
        if not files:
            empty = schema.append(SHARD_FIELD).empty_table().select(want)
            return dd.from_pandas(empty.to_pandas(types_mapper=_list_type_mapper), npartitions=1)
        # An explicit list of shard files: dask's own directory discovery takes any hidden
        # directory (".shard=000123.<hex>.tmp") for a hive partition and fails on it.
        urls = [self.fs.unstrip_protocol(f) for f in files]
        data_cols = [c for c in want if c != "shard"]
        df = dd.read_parquet(
            urls,
            columns=data_cols + (["shard"] if "shard" in want else []),
            dataset={"partitioning": "hive"},
            storage_options=getattr(self.fs, "storage_options", None) or None,
        )
        if "shard" in want:
            df = df.astype({"shard": "int32"})
        return df[want]

    def read(self, shard: int, columns=None) -> pa.Table:
        """The whole table of one shard (optionally some columns)."""
        path = self.files().get(int(shard))
        if path is None:
            raise StoreError(f"no {self.name} for shard {shard} in the store")
        return self.parquet_file(path).read(columns=columns)


def write_masks(files: ShardFiles, shard: int, table: pa.Table, schema: pa.Schema) -> int:
    """Sort by (image_id, order) and write the shard's mask file; returns bytes written."""
    table = conform(table, schema, "mask").sort_by([("image_id", "ascending"), ("order", "ascending")])
    return files.write(
        shard,
        table,
        compression="zstd",
        row_group_size=MASK_ROW_GROUP,
        use_dictionary=["source"],
        write_statistics=["image_id", "ann_id", "order"],
        # Small pages let a random read stop decoding soon after the image's rows.
        data_page_size=256 << 10,
    )


class MaskIndex:
    """Random access to images' masks.

    Row-group image_id ranges come from the cached footers; a lookup reads that group's small
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
