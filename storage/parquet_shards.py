"""The Parquet shard layer of the image and mask stores: one ``<name>/shard=000123/part-0.parquet``
per shard, streamed through a :class:`ShardTableWriter` one row group at a time under a hidden
temp name and renamed into place, read through pyarrow datasets, dask, or random access with
cached footers.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from loftup.storage.commit import (
    ShardWriter,
    done_shards,
    footer_digest,
    is_local,
    parse_shard_name,
    remove,
    rename_into_place,
    shard_name,
    temp_path,
    usable,
    write_path,
)
from loftup.storage.errors import StoreError

PART = "part-0.parquet"
SHARD_FIELD = pa.field("shard", pa.int32())
PARTITIONING = ds.partitioning(pa.schema([SHARD_FIELD]), flavor="hive")


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


def _read_frame(fs, want: list[str], item: tuple[int, str]):
    """One shard file as a pandas frame of the columns ``want`` (``shard`` added), checksums verified."""
    shard, path = item
    with fs.open(path, "rb") as fh:
        table = pq.ParquetFile(fh, page_checksum_verification=True).read(columns=[c for c in want if c != "shard"])
    if "shard" in want:
        table = table.append_column(SHARD_FIELD, pa.array([shard] * table.num_rows, pa.int32()))
    return table.select(want).to_pandas(types_mapper=_list_type_mapper)


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
        self._footers: dict[str, tuple[int, str | None]] = {}  # path -> (shard, committed footer digest)
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

        A file whose shard has no valid marker (a run died before committing, the marker was
        lost or damaged) is never served: readers see committed data only.
        """
        with self._lock:
            self._check_pid()
            if self._listing is None:
                found = {}
                done = {s: m for s, m in done_shards(self.fs, self.root, self.name).items() if usable(m)}
                for path in self.fs.glob(f"{self.base}/shard=*/{PART}"):
                    shard = parse_shard_name(path.rsplit("/", 2)[-2])
                    if shard is not None and shard in done:
                        found[shard] = path
                        self._footers[path] = (shard, done[shard]["files"].get(PART, {}).get("footer_sha256"))
                self._listing = dict(sorted(found.items()))
            return dict(self._listing)

    def metadata(self, path: str) -> pq.FileMetaData:
        """The footer of a served file, checked first: no checksum covers a Parquet footer, and
        its row counts and min/max statistics decide what indexes and filters read."""
        with self._lock:
            self._check_pid()
            md = self._meta.get(path)
            if md is None:
                md = pq.read_metadata(path, filesystem=self._afs)
                self._check_footer(path, md)
                self._meta[path] = md
            return md

    def _check_footer(self, path: str, md: pq.FileMetaData) -> None:
        if path not in self._footers:
            self.files()
        shard, digest = self._footers.get(path, (parse_shard_name(path.rsplit("/", 2)[-2]), None))
        if digest is not None:
            ok = footer_digest(self.fs, path) == digest
        else:  # a marker from before footer digests: check the statistics against the data
            ok = _stats_match_data(self._afs, path, md)
        if not ok:
            raise StoreError(
                f"{self.name} shard {shard} is damaged: the Parquet footer of {PART} changed since commit, so its "
                f"statistics cannot be trusted; `loftup-store verify` lists the damage, a rerun of "
                f"`loftup-pipeline {self.name}` redoes the shard"
            )

    def check_footers(self) -> None:
        """Check the footer of every served file (cheap, cached): before a reader that relies on
        footer statistics it does not check itself (pyarrow dataset filters, dask)."""
        for path in self.files().values():
            self.metadata(path)

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
    def writer(
        self, shard: int, schema: pa.Schema, sort_keys, row_group: int, limit_rows: int, **kw
    ) -> "ShardTableWriter":
        """A streaming writer of one shard file (see :class:`ShardTableWriter`)."""
        return ShardTableWriter(self, shard, schema, sort_keys, row_group, limit_rows, **kw)

    # -- streaming reads -----------------------------------------------------------------------
    def num_rows(self, shard: int) -> int:
        """Rows of one shard file, from its (cached) footer."""
        path = self.files().get(int(shard))
        if path is None:
            raise StoreError(f"no {self.name} for shard {shard} in the store")
        return int(self.metadata(path).num_rows)

    def iter_batches(self, shard: int, columns=None, batch_rows: int = 64):
        """Record batches of one shard file, in stored order, ``batch_rows`` rows at a time."""
        path = self.files().get(int(shard))
        if path is None:
            raise StoreError(f"no {self.name} for shard {shard} in the store")
        # A file object of our own: batches may be consumed from another thread.
        with self._afs.open_input_file(path) as source:
            pf = pq.ParquetFile(source, metadata=self.metadata(path), page_checksum_verification=True)
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)

    # -- bulk reads ----------------------------------------------------------------------------
    def dataset(self, schema: pa.Schema) -> ds.Dataset:
        """pyarrow dataset over the shard files with ``shard`` (int32) as a partition column.

        Its filters skip row groups by their footer statistics, so every footer is checked first."""
        self.check_footers()
        files = list(self.files().values())
        full = schema.append(SHARD_FIELD)
        if not files:
            return ds.dataset(full.empty_table())
        return ds.dataset(
            files,
            schema=full,
            format=ds.ParquetFileFormat(
                default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
            ),
            filesystem=self._afs,
            partitioning=PARTITIONING,
            partition_base_dir=self.base,
        )

    def dask(self, schema: pa.Schema, columns=None):
        """dask.dataframe of the shard files, one partition per shard, ``shard`` as int32.

        Each partition is read through pyarrow with page checksums verified, as every other
        read of ours is: dask's own read_parquet opens files without that option, so a flipped
        bit would reach the dataframe silently.
        """
        import dask.dataframe as dd

        self.check_footers()
        files = self.files()
        want = list(schema.names) + ["shard"] if columns is None else list(columns)
        unknown = [c for c in want if c not in schema.names and c != "shard"]
        if unknown:
            raise StoreError(f"unknown {self.name} columns {unknown}; known: {schema.names + ['shard']}")
        meta = schema.append(SHARD_FIELD).empty_table().select(want).to_pandas(types_mapper=_list_type_mapper)
        if not files:
            return dd.from_pandas(meta, npartitions=1)
        read = functools.partial(_read_frame, self.fs, want)
        return dd.from_map(read, list(files.items()), meta=meta, label=f"read-{self.name}", enforce_metadata=False)

    def read(self, shard: int, columns=None) -> pa.Table:
        """The whole table of one shard (optionally some columns)."""
        path = self.files().get(int(shard))
        if path is None:
            raise StoreError(f"no {self.name} for shard {shard} in the store")
        return self.parquet_file(path).read(columns=columns)


class ShardTableWriter(ShardWriter):
    """Streams one shard's Parquet file, one row group at a time; a context manager.

    Rows come in tables of any size (``add``); the file holds them sorted by ``sort_keys``
    (integer columns), exactly as a stable sort of everything followed by one ``write_table``
    with ``row_group`` rows per group would. While the input arrives in key order (SA-1B tars
    list their images by id) rows go straight to the file and at most ``row_group - 1`` rows
    wait in memory between calls. Input out of order switches to an external merge: sorted runs
    of at most ``limit_rows`` rows are spilled to hidden temp files beside the shard file and
    merged into it on commit, so memory stays bounded by ``limit_rows`` either way.

    Nothing is visible under the final name before :meth:`commit` renames the temp file.
    """

    def __init__(
        self,
        files: ShardFiles,
        shard: int,
        schema: pa.Schema,
        sort_keys,
        row_group: int,
        limit_rows: int,
        what: str = "table",
        unique: str | None = None,
        **options,
    ):
        if row_group < 1 or limit_rows < row_group:
            raise ValueError(f"need 1 <= row_group <= limit_rows, got {row_group}, {limit_rows}")
        self.files, self.shard, self.schema, self.what = files, int(shard), schema, what
        self.keys = tuple(sort_keys)
        self.row_group, self.limit_rows = int(row_group), int(limit_rows)
        # Page CRCs: a flipped bit fails the read instead of changing a value.
        self.options = options = {"write_page_checksum": True, **options}
        self.unique = unique
        self.path = write_path(files.fs, files.path(shard))
        self._seen: set[int] = set()
        self._last: tuple | None = None  # last key sent to the file (in-order mode)
        self._pending: list[pa.Table] = []  # rows waiting for a full row group / run
        self._pending_rows = 0
        self._runs: list[str] | None = None  # spilled run files once the input went out of order
        self._tmp = temp_path(self.path)
        files.fs.makedirs(self.path.rpartition("/")[0], exist_ok=True)
        self._writer = pq.ParquetWriter(self._tmp, schema, filesystem=files._afs, **options)
        self.rows = 0
        self.row_groups = 0
        self.peak_rows = 0  # most rows ever held in memory between calls
        self.spilled_runs = 0
        self.nbytes = 0

    # -- input -----------------------------------------------------------------------------------
    def add(self, table: pa.Table) -> None:
        """Add rows (columns as the store schema); they are sorted into place."""
        table = conform(table, self.schema, self.what)
        if table.num_rows == 0:
            return
        if self.unique is not None:
            ids = table.column(self.unique).to_pylist()
            if len(set(ids)) != len(ids) or not self._seen.isdisjoint(ids):
                raise StoreError(f"{self.what} table for shard {self.shard} repeats image ids")
            self._seen.update(ids)
        table = table.sort_by([(k, "ascending") for k in self.keys])
        self.rows += table.num_rows
        if self._runs is None and self._last is not None and _key(table, 0, self.keys) < self._last:
            self._go_out_of_order()
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._runs is None:
            self._last = _key(table, table.num_rows - 1, self.keys)
            self._write_groups(final=False)
        elif self._pending_rows >= self.limit_rows:
            self._spill()
        self.peak_rows = max(self.peak_rows, self._pending_rows)

    @property
    def buffered_rows(self) -> int:
        return self._pending_rows

    # -- in-order path ---------------------------------------------------------------------------
    def _write_groups(self, final: bool) -> None:
        if self._pending_rows < self.row_group and not (final and self._pending_rows):
            return
        rows = pa.concat_tables(self._pending)
        full = rows.num_rows if final else rows.num_rows - rows.num_rows % self.row_group
        for start in range(0, full, self.row_group):
            self._writer.write_table(
                rows.slice(start, min(self.row_group, full - start)), row_group_size=self.row_group
            )
            self.row_groups += 1
        rest = rows.slice(full)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    # -- out-of-order path: sorted runs, merged on commit ----------------------------------------
    def _go_out_of_order(self) -> None:
        # Rows already in the file are sorted: the file becomes the first run.
        self._write_groups(final=True)
        self._writer.close()
        self._runs = [self._tmp]
        self._tmp = temp_path(self.path)

    def _spill(self) -> None:
        if not self._pending_rows:
            return
        run = pa.concat_tables(self._pending).sort_by([(k, "ascending") for k in self.keys])
        self._pending, self._pending_rows = [], 0
        path = temp_path(self.path)
        self._runs.append(path)
        self.spilled_runs += 1
        pq.write_table(run, path, filesystem=self.files._afs, compression="zstd", row_group_size=self.row_group)

    def _merge(self) -> None:
        self._spill()
        self._writer = pq.ParquetWriter(self._tmp, self.schema, filesystem=self.files._afs, **self.options)
        sources = [self.files._afs.open_input_file(p) for p in self._runs]
        try:
            # Rows up to the smallest last key of the runs' current batches are final; each round
            # empties at least one batch, so memory holds one batch per run.
            batch = max(1, min(self.row_group, self.limit_rows // max(len(self._runs), 1)))
            its = [pq.ParquetFile(s).iter_batches(batch_size=batch, use_threads=False) for s in sources]
            heads: list[pa.Table | None] = [pa.Table.from_batches([], schema=self.schema)] * len(its)
            while True:
                for i, it in enumerate(its):
                    if heads[i] is not None and heads[i].num_rows == 0:
                        nxt = next(it, None)
                        heads[i] = None if nxt is None else pa.Table.from_batches([nxt]).cast(self.schema)
                live = [i for i, h in enumerate(heads) if h is not None]
                if not live:
                    break
                bound = min(_key(heads[i], heads[i].num_rows - 1, self.keys) for i in live)
                parts = []
                for i in live:
                    k = _prefix_le(heads[i], self.keys, bound)
                    parts.append(heads[i].slice(0, k))
                    heads[i] = heads[i].slice(k)
                self._pending.append(pa.concat_tables(parts).sort_by([(k, "ascending") for k in self.keys]))
                self._pending_rows += self._pending[-1].num_rows
                self._write_groups(final=False)
            self._write_groups(final=True)
        finally:
            for s in sources:
                s.close()
            for p in self._runs:
                remove(self.files.fs, p)
            self._runs = []

    # -- commit ----------------------------------------------------------------------------------
    def commit(self) -> int:
        """Finish the file and rename it into place; returns its size in bytes."""
        try:
            if self._runs is None:
                self._write_groups(final=True)
            else:
                self._merge()
            self._writer.close()
            rename_into_place(self.files.fs, self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            self.files.invalidate()
        self.nbytes = int(self.files.fs.size(self.path))
        return self.nbytes

    def abort(self) -> None:
        """Drop everything written so far (the final name is never touched)."""
        try:
            self._writer.close()
        except Exception:
            pass
        for p in [self._tmp, *(self._runs or [])]:
            remove(self.files.fs, p)
        self._pending, self._pending_rows = [], 0


def _stats_match_data(afs, path: str, md: pq.FileMetaData) -> bool:
    """Whether each row group's row count and ``image_id`` min/max in the footer are those of the
    (page-checksummed) data: the check for files whose marker has no footer digest."""
    col = md.schema.to_arrow_schema().get_field_index("image_id")
    if col < 0:
        return True
    with afs.open_input_file(path) as source:
        pf = pq.ParquetFile(source, metadata=md, page_checksum_verification=True)
        for rg in range(md.num_row_groups):
            ids = pf.read_row_group(rg, columns=["image_id"]).column(0)
            if len(ids) != md.row_group(rg).num_rows:
                return False
            stats = md.row_group(rg).column(col).statistics
            if len(ids) and stats is not None and stats.has_min_max:
                if (stats.min, stats.max) != (pc.min(ids).as_py(), pc.max(ids).as_py()):
                    return False
    return True


def _key(table: pa.Table, row: int, keys) -> tuple:
    return tuple(table.column(k)[row].as_py() for k in keys)


def _prefix_le(table: pa.Table, keys, bound: tuple) -> int:
    """Number of leading rows of a table sorted by ``keys`` whose key is <= ``bound``."""
    lo, hi = 0, table.num_rows
    for k, b in zip(keys, bound):
        col = table.column(k).slice(lo, hi - lo).to_numpy()
        lo, hi = lo + int(np.searchsorted(col, b, "left")), lo + int(np.searchsorted(col, b, "right"))
        if lo == hi:
            return lo
    return hi
