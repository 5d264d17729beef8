"""The store object: one root (local path or fsspec URL) holding manifest, tables, features,
status markers and error tables (the layout is in the README's "Store layout" section)."""

from __future__ import annotations

import contextlib
import copy
import os

import fsspec
import numpy as np
import pyarrow as pa

from loftup.storage import commit
from loftup.storage.errors import NotInStore, StoreError
from loftup.storage.features import FeatureStore, feature_set_names
from loftup.storage.images import ImageIndex, image_schema, image_writer, open_jpeg, write_images
from loftup.storage.layout import job_key
from loftup.storage.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    check_geometries,
    new_manifest,
    parse_manifest,
    write_manifest,
)
from loftup.storage.masks import MaskIndex, mask_schema, mask_writer, rle_columns, to_rles, write_masks
from loftup.storage.parquet_shards import ShardFiles

LOCK_FILE = ".manifest.lock"


def open_store(path_or_url, create: bool = False, geometries=(224, 896)) -> "Store":
    """Open the store at a local path or fsspec URL (``memory://``, ``s3://`` ...).

    With ``create=True`` a missing store is created (an existing one is opened as it is: its
    manifest, not ``geometries``, decides its sizes). Anything that is not a store of this
    schema version raises a one-line :class:`StoreError`.
    """
    where = os.fspath(path_or_url) if isinstance(path_or_url, os.PathLike) else str(path_or_url)
    try:
        fs, root = fsspec.core.url_to_fs(where)
    except (ValueError, ImportError) as exc:
        raise StoreError(f"cannot open store {where}: {exc}") from None
    root = root.rstrip("/")
    if commit.is_local(fs):
        # Ray workers and DataLoader processes may run in another working directory.
        where = root
    mpath = f"{root}/{MANIFEST}"
    try:
        raw = fs.cat_file(mpath)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raw = None
    if raw is not None:
        return Store(fs, root, where, parse_manifest(raw, where))
    if not create:
        if not fs.exists(root):
            raise StoreError(f"no store at {where} (path does not exist)")
        raise StoreError(f"{where} is not a loftup store (no {MANIFEST})")
    if fs.exists(root) and not fs.isdir(root):
        raise StoreError(f"cannot create a store at {where}: it is a file")
    if fs.isdir(root):
        visible = [p for p in fs.ls(root, detail=False) if not p.rstrip("/").rsplit("/", 1)[-1].startswith(".")]
        if visible:
            raise StoreError(f"cannot create a store at {where}: directory is not empty and has no {MANIFEST}")
    manifest = new_manifest(check_geometries(geometries))
    fs.makedirs(root, exist_ok=True)
    write_manifest(fs, mpath, manifest)
    return Store(fs, root, where, manifest)


class Store:
    """A loftup store. Every write is one whole file (or Zarr subgroup) renamed into place."""

    def __init__(self, fs, root: str, url: str, manifest: dict):
        self.fs = fs
        self.root = root
        self.url = url
        self._manifest = manifest
        self.geometries: tuple[int, ...] = check_geometries(manifest["geometry"]["sizes"])
        self.mask_schema = mask_schema(self.geometries)
        self.image_schema = image_schema(self.geometries)
        self._mask_files = ShardFiles(fs, root, "masks")
        self._image_files = ShardFiles(fs, root, "images")
        self._mask_index = MaskIndex(self._mask_files)
        self._image_index = ImageIndex(self._image_files)
        self._feature_stores: dict[str, FeatureStore] = {}

    def __repr__(self) -> str:
        from loftup.storage.redact import redact_text

        return f"Store({redact_text(self.url)!r}, geometries={list(self.geometries)})"

    def __reduce__(self):
        # Caches hold locks and open files; a copy in another process reopens from the URL.
        return (open_store, (self.url,))

    def path(self, *parts: str) -> str:
        """Path of ``parts`` under the store root, for the store's fsspec filesystem."""
        return "/".join([self.root, *parts])

    # -- manifest ------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        """The manifest as last read or written by this object (a copy)."""
        return copy.deepcopy(self._manifest)

    @contextlib.contextmanager
    def _manifest_lock(self):
        if not commit.is_local(self.fs):
            # Remote stores have no lock: the pipeline driver is their only manifest writer.
            yield
            return
        import fcntl

        with open(self.path(LOCK_FILE), "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def update_manifest(self, fn) -> dict:
        """Read-modify-write the manifest: ``fn(manifest)`` edits in place or returns a new dict.

        The schema version and geometry of an existing store cannot change.
        """
        mpath = self.path(MANIFEST)
        with self._manifest_lock():
            current = parse_manifest(self.fs.cat_file(mpath), self.url)
            edited = copy.deepcopy(current)
            result = fn(edited)
            new = edited if result is None else result
            if new.get("schema_version") != SCHEMA_VERSION:
                raise StoreError("update_manifest must not change the schema version")
            if new.get("geometry") != current["geometry"]:
                raise StoreError(f"the geometry of store {self.url} cannot change")
            write_manifest(self.fs, mpath, new)
            self._manifest = new
        return self.manifest

    def refresh(self) -> None:
        """Re-read the manifest and forget every cache (to see other processes' writes)."""
        self._manifest = parse_manifest(self.fs.cat_file(self.path(MANIFEST)), self.url)
        self._mask_files.invalidate()
        self._image_files.invalidate()
        self._mask_index.invalidate()
        self._image_index.invalidate()
        for fstore in self._feature_stores.values():
            fstore.invalidate()

    # -- commit protocol -------------------------------------------------------------------------
    def marker(self, job: str, shard: int) -> dict | None:
        """The shard's commit marker, or None if the shard is not done."""
        return commit.read_marker(self.fs, self.root, job, shard)

    def write_marker(self, job: str, shard: int, info: dict) -> None:
        """Commit the shard. Call last, after every output and the errors table are written.

        The marker records the size and sha256 of every file of the shard's outputs, so reruns,
        training and ``verify`` can tell intact shards from damaged ones.
        """
        files = commit.file_digests(self.fs, commit.output_dir(self.root, job, shard))
        commit.write_marker(self.fs, self.root, job, shard, {**info, "files": files})
        self._invalidate_job(job)

    def shard_problems(self, job: str, shard: int, marker: dict | None = None, deep: bool = False) -> list[str]:
        """What is wrong with a committed shard: its marker (invalid, or without file digests) or
        its files against the marker (empty: intact). Cheap unless ``deep``."""
        marker = self.marker(job, shard) if marker is None else marker
        if marker is None:
            return ["not committed"]
        if not commit.usable(marker):
            return [marker["invalid"]]
        return commit.check_files(self.fs, commit.output_dir(self.root, job, shard), marker.get("files"), deep=deep)

    @contextlib.contextmanager
    def build_shard(self, job: str, shard: int):
        """Build a new version of a shard beside the committed one: ``with store.build_shard(job,
        s) as b: <write outputs and errors as usual>; b.commit(info)``. Until ``commit`` the
        committed version stays in place and readable; without it nothing changes."""
        build = commit.ShardBuild(self.fs, self.root, job, shard)
        try:
            with build:
                yield build
        finally:
            self._invalidate_job(job)

    def recover(self, job: str) -> dict[int, bool]:
        """Finish swaps a killed run of ``job`` left half done (see :func:`commit.recover`)."""
        try:
            return commit.recover(self.fs, self.root, job)
        finally:
            self._invalidate_job(job)

    def lease(self, job: str) -> commit.Lease:
        """The per-job lease (a context manager): one run of ``job`` on this store at a time."""
        return commit.Lease(self.fs, self.root, job)

    def done_shards(self, job: str) -> dict[int, dict]:
        """shard -> marker for every committed shard of ``job``."""
        return commit.done_shards(self.fs, self.root, job)

    def reset_shard(self, job: str, shard: int) -> None:
        """Forget a shard before redoing it: marker first, then outputs, errors, stale temps."""
        commit.reset_shard(self.fs, self.root, job, shard)
        self._invalidate_job(job)

    def _invalidate_job(self, job: str) -> None:
        if job == "masks":
            self._mask_files.invalidate()
            self._mask_index.invalidate()
        elif job == "images":
            self._image_files.invalidate()
            self._image_index.invalidate()
        elif job in self._feature_stores:
            self._feature_stores[job].invalidate()

    def write_errors(self, job: str, shard: int, rows) -> int:
        """Replace the shard's error rows (dicts: image_id, member, stage, reason)."""
        return commit.write_errors(self.fs, self.root, job, shard, rows)

    def jobs(self) -> list[str]:
        """Every job that has run on this store (committed a shard or recorded an error)."""
        keys = set(commit.status_jobs(self.fs, self.root))
        return sorted({commit.key_to_job(k) for k in keys} | set(commit.error_shards(self.fs, self.root)))

    def errors(self, job: str | None = None) -> pa.Table:
        """All error rows (of one job or every job) with ``job`` and ``shard`` columns."""
        return commit.read_errors(self.fs, self.root, job)

    def record_failed_shard(self, job: str, shard: int, reason: str) -> int:
        """Record a shard that failed as a whole, so ``status`` and ``errors`` show it; a shard
        whose committed version survived keeps it and its error table (returns 0, else bytes)."""
        return commit.record_failed_shard(self.fs, self.root, job, shard, reason)

    def failed_shards(self, job: str) -> list[int]:
        """Shards of ``job`` that failed as a whole in the last run that tried them (no marker)."""
        done = self.done_shards(job)  # a failed redo of a committed shard keeps it committed
        return [s for s in commit.error_shards(self.fs, self.root).get(job, []) if s not in done]

    def summary(self) -> dict[str, dict]:
        """Per job: shards done (committed and intact), damaged shards (committed, but the marker
        is invalid or a file is missing, has changed size or its Parquet footer changed since: the
        cheap check; ``verify --deep`` re-hashes), failed shards, and the images, per-image
        failures, bytes, seconds (and masks) of the intact shards."""
        out = {}
        failed_by_job = commit.error_shards(self.fs, self.root)
        keys = set(commit.status_jobs(self.fs, self.root)) | {commit.job_key(j) for j in failed_by_job}
        for key in sorted(keys):
            job = commit.key_to_job(key)
            try:
                markers = self.done_shards(job)
            except StoreError:
                continue
            failed = [s for s in failed_by_job.get(job, []) if s not in markers]
            if not markers and not failed:
                continue
            damaged = [s for s, m in markers.items() if self.shard_problems(job, s, m)]
            # Counts of intact shards only: a damaged shard's marker no longer describes its data.
            values = [m for s, m in markers.items() if s not in damaged]
            row = {
                "shards": len(values),
                "damaged_shards": len(damaged),
                "failed_shards": len(failed),
                "images": int(sum(m.get("images", 0) or 0 for m in values)),
                "failures": int(sum(m.get("errors", 0) or 0 for m in values)),
                "bytes": int(sum(m.get("bytes", 0) or 0 for m in values)),
                "seconds": round(float(sum(m.get("seconds", 0) or 0 for m in values)), 3),
            }
            if any("masks" in m for m in values):
                row["masks"] = int(sum(m.get("masks", 0) or 0 for m in values))
            out[job] = row
        return out

    # -- masks -----------------------------------------------------------------------------------
    def write_masks(self, shard: int, table: pa.Table) -> int:
        """Write the shard's mask table (sorted by image_id, order; zstd; 20k-row groups)."""
        try:
            return write_masks(self._mask_files, shard, table, self.mask_schema)
        finally:
            self._mask_index.invalidate()

    @contextlib.contextmanager
    def mask_writer(self, shard: int, **limits):
        """Stream the shard's mask table: ``with store.mask_writer(s) as w: w.add(table)``.

        One row group at a time, sorted by (image_id, order); in place on clean exit only.
        """
        try:
            with mask_writer(self._mask_files, shard, self.mask_schema, **limits) as w:
                yield w
        finally:
            self._mask_index.invalidate()

    def committed_files(self, table: str) -> list[str]:
        """The Parquet files of the committed shards of ``table`` (``"masks"`` or ``"images"``),
        for readers that take file lists (DuckDB, Polars, pandas): a glob over the store's
        folders would also read files of shards whose commit has not happened (a run killed
        between the rename and the marker, or a shard being redone)."""
        files = {"masks": self._mask_files, "images": self._image_files}.get(table)
        if files is None:
            raise StoreError(f"unknown table {table!r}; the store's Parquet tables are masks and images")
        paths = list(files.files().values())
        return paths if commit.is_local(self.fs) else [self.fs.unstrip_protocol(p) for p in paths]

    def masks_dataset(self):
        """pyarrow dataset of every mask, ``shard`` (int32) as hive partition column."""
        return self._mask_files.dataset(self.mask_schema)

    def masks_dask(self, columns=None):
        """dask.dataframe of the masks (one partition per shard file)."""
        return self._mask_files.dask(self.mask_schema, columns)

    def masks_table(self, shard: int, columns=None) -> pa.Table:
        """One shard's mask table."""
        return self._mask_files.read(shard, columns)

    def mask_batches(self, shard: int, columns=None, batch_rows: int = 20_000):
        """One shard's mask table as record batches of ``batch_rows`` rows (bounded memory)."""
        return self._mask_files.iter_batches(shard, columns, batch_rows)

    def masks_for(self, image_id: int, size: int | None = 224) -> list[dict]:
        """The image's RLEs in mask order at training size ``size`` (None: original RLE).

        ``[]`` for an image whose masks shard is committed and holds no mask of it; an id that
        no committed masks or images shard holds raises :class:`NotInStore`."""
        return self.masks_for_many([image_id], size)[0]

    def masks_for_many(self, image_ids, size: int | None = 224) -> list[list[dict]]:
        """``masks_for`` of several images, in the order given."""
        cols = rle_columns(size, self.geometries)
        ids = [int(i) for i in image_ids]
        found = self._mask_index.lookup_many(ids, cols)
        for image_id, values in zip(ids, found):
            if not values[0]:
                self._check_maskless(image_id)
        return [to_rles(v, size) for v in found]

    def _check_maskless(self, image_id: int) -> None:
        # The mask table has rows only for masks, so an image without any is told apart from an
        # unknown id by the image table (the features job reads it, so every trainable id is there).
        try:
            shard, _ = self._image_index.locate(image_id)
        except NotInStore:
            raise NotInStore(
                f"image {image_id} is not in the store: no committed masks or images shard holds it"
            ) from None
        if shard not in self._mask_files.files():
            raise NotInStore(
                f"image {image_id} is in images shard {shard}, whose masks are not committed "
                f"(`loftup-pipeline masks` on shard {shard} writes them)"
            )

    # -- images ----------------------------------------------------------------------------------
    def write_images(self, shard: int, table: pa.Table) -> int:
        """Write the shard's image table (sorted by image_id); returns bytes written."""
        try:
            return write_images(self._image_files, shard, table, self.image_schema)
        finally:
            self._image_index.invalidate()

    @contextlib.contextmanager
    def image_writer(self, shard: int, **limits):
        """Stream the shard's image table (sorted by image_id); in place on clean exit only."""
        try:
            with image_writer(self._image_files, shard, self.image_schema, **limits) as w:
                yield w
        finally:
            self._image_index.invalidate()

    def image_count(self, shard: int) -> int:
        """Images stored for one shard (from the file footer)."""
        return self._image_files.num_rows(shard)

    def image_batches(self, shard: int, columns=None, batch_rows: int = 64):
        """One shard's image table as record batches of ``batch_rows`` rows (bounded memory)."""
        return self._image_files.iter_batches(shard, columns, batch_rows)

    def images_dataset(self):
        """pyarrow dataset of the image tables, ``shard`` (int32) as partition column."""
        return self._image_files.dataset(self.image_schema)

    def images_table(self, shard: int, columns=None) -> pa.Table:
        """One shard's image table."""
        return self._image_files.read(shard, columns)

    def image_ids(self, shard: int) -> np.ndarray:
        """Image ids of one shard, ascending."""
        return self.images_table(shard, ["image_id"]).column(0).to_numpy()

    def image_bytes(self, image_id: int, size: int = 224) -> bytes:
        """The stored JPEG of an image at training size ``size``."""
        if int(size) not in self.geometries:
            raise StoreError(f"no images at size {size} in this store; its geometries are {list(self.geometries)}")
        data = self._image_index.value(int(image_id), f"jpeg_{int(size)}")
        if data is None:
            raise NotInStore(f"image {image_id} was stored without a {size} px JPEG")
        return data

    def image(self, image_id: int, size: int = 224):
        """The stored image at training size ``size`` as an RGB PIL image."""
        return open_jpeg(self.image_bytes(image_id, size))

    # -- features --------------------------------------------------------------------------------
    def features(self, backbone: str, res: int) -> FeatureStore:
        """Feature store of ``backbone`` at input resolution ``res`` (group made on first write)."""
        return self._feature_like("features", backbone, res)

    def pseudogt(self, backbone: str, res: int) -> FeatureStore:
        """Materialised pseudo-GT of ``backbone@res`` (same layout as features)."""
        return self._feature_like("pseudogt", backbone, res)

    def _feature_like(self, kind: str, backbone: str, res: int) -> FeatureStore:
        key = job_key(kind, backbone, res)
        fstore = self._feature_stores.get(key)
        if fstore is None:
            fstore = self._feature_stores[key] = FeatureStore(self.fs, self.root, backbone, res, kind=kind)
        return fstore

    def feature_sets(self, kind: str = "features") -> list[str]:
        """Names (``backbone@res``) of the feature groups in the store."""
        return feature_set_names(self.fs, self.root, kind)
