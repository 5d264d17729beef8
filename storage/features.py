"""Zarr v3 feature store: ``features/<backbone>@<res>/shard=000123/{features,image_ids}``.

Each tar shard is its own subgroup: one ``(n, C, h, w)`` float16 array, chunk = one image, in
Zarr shards of at most 1,024 images / 192 MiB (:func:`zarr_shard_images`), streamed in as batches arrive under a
hidden temp name and renamed into place, so no two writers ever touch one Zarr shard
(zarr-python has no locking). Stores written with one Zarr shard per tar read the same way.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import WrapperStore

from loftup.storage.commit import (
    ShardWriter,
    check_job,
    committed,
    is_local,
    parse_shard_name,
    remove,
    replace_dir,
    shard_name,
    temp_path,
    write_path,
)
from loftup.storage.errors import NotInStore, StoreError, error_line
from loftup.storage.layout import feature_set, job_key

# Measured on fp16 maps (zstd level 3, bytes / raw): dense DINOv2-like tokens shuffle 0.919 vs
# bitshuffle 0.939; sparse ReLU conv5 maps (HED VGG16, real weights) shuffle 0.373 vs 0.488.
SHUFFLE = "shuffle"
# Images per Zarr shard: at most ZARR_SHARD_IMAGES, and at most ZARR_SHARD_BYTES of raw fp16 maps
# (1,024 DINOv2-S maps at 224, 256 at 448). This bounds a writer's memory (zarr holds the raw
# block, its encoded chunks and the assembled shard: ~3x the block) and the shard index a random
# read decodes (16 B per image), whatever the tar's size.
ZARR_SHARD_IMAGES = 1024
ZARR_SHARD_BYTES = 192 << 20


def zarr_shard_images(dim: int, grid) -> int:
    """Default images per Zarr shard for maps of ``dim`` x ``grid``."""
    map_bytes = 2 * int(dim) * int(grid[0]) * int(grid[1])
    return max(1, min(ZARR_SHARD_IMAGES, ZARR_SHARD_BYTES // max(map_bytes, 1)))


def _codec() -> tuple:
    """The bytes-to-bytes chain of every chunk: compression, then a CRC32C of the compressed
    bytes, so a flipped bit fails the read instead of changing a value."""
    return (BloscCodec(cname="zstd", clevel=3, shuffle=SHUFFLE), Crc32cCodec())


def zarr_store(fs, path: str, read_only: bool = False):
    """A zarr store rooted at ``path`` on the fsspec filesystem ``fs``."""
    from zarr.storage import FsspecStore, LocalStore

    if is_local(fs):
        return LocalStore(path, read_only=read_only)
    if fs.async_impl:
        opts = dict(getattr(fs, "storage_options", {}) or {})
        return FsspecStore.from_url(fs.unstrip_protocol(path), storage_options=opts, read_only=read_only)
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    return FsspecStore(AsyncFileSystemWrapper(fs, asynchronous=True), path=path, read_only=read_only)


class IndexCacheStore(WrapperStore):
    """Read-only store wrapper that keeps Zarr shard indexes (suffix reads) of one open array.

    zarr-python fetches and decodes a shard's index on every partial read; at 1,024 images per
    Zarr shard that is 16 KiB per lookup. Shard files never change once in place (a rewrite
    renames a new subgroup in and invalidates the FeatureStore), so caching them is safe.
    """

    def __init__(self, store, max_entries: int = 256):
        super().__init__(store)
        self._index_cache: OrderedDict = OrderedDict()
        self._max_entries = max_entries
        self.hits = self.misses = 0

    def _with_store(self, store):
        return type(self)(store, self._max_entries)

    async def get(self, key, prototype, byte_range=None):
        if not isinstance(byte_range, SuffixByteRequest):
            return await self._store.get(key, prototype, byte_range)
        ck = (key, byte_range.suffix)
        hit = self._index_cache.get(ck)
        if hit is not None:
            self._index_cache.move_to_end(ck)
            self.hits += 1
            return hit
        self.misses += 1
        value = await self._store.get(key, prototype, byte_range)
        if value is not None:
            self._index_cache[ck] = value
            while len(self._index_cache) > self._max_entries:
                self._index_cache.popitem(last=False)
        return value


class FeatureStore:
    """Per-image feature maps of one backbone at one input resolution.

    Reads keep a lazy global ``image_id -> (shard, row)`` index and open arrays; call
    :meth:`invalidate` to see shards written by other processes since the first read.
    """

    def __init__(self, fs, root: str, backbone: str, res: int, kind: str = "features"):
        if not backbone or "/" in backbone or "@" in backbone:
            raise StoreError(f"invalid backbone name {backbone!r}")
        self.fs = fs
        self.root = root
        self.kind = kind
        self.backbone = backbone
        self.res = int(res)
        self.name = feature_set(backbone, self.res)
        self.job = check_job(job_key(kind, backbone, self.res))
        self.path = f"{root}/{kind}/{self.name}"
        self._lock = threading.RLock()
        self.invalidate()

    def __repr__(self) -> str:
        return f"FeatureStore({self.job!r}, shards={len(self.shards())})"

    def __reduce__(self):
        # Cached arrays and the lock stay behind; the copy re-reads lazily.
        return (FeatureStore, (self.fs, self.root, self.backbone, self.res, self.kind))

    def invalidate(self) -> None:
        """Drop cached listings, arrays and the id index."""
        with self._lock:
            self._shards: list[int] | None = None
            self._arrays: dict[int, tuple[zarr.Array, np.ndarray]] = {}
            self._index = None

    # -- group and attributes --------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(f"{self.path}/zarr.json")

    @property
    def info(self) -> dict:
        """Backbone info recorded with the features (dim, patch, res, grid, ...)."""
        if not self.exists():
            return {}
        return dict(zarr.open_group(store=zarr_store(self.fs, self.path, read_only=True), mode="r").attrs)

    @property
    def dim(self) -> int:
        """Feature channels C, from the stored arrays (NotInStore if no shard is committed)."""
        return self._feature_shape()[0]

    @property
    def grid(self) -> tuple[int, int]:
        """Feature map size (h, w)."""
        return self._feature_shape()[1:]

    def _writable_group(self):
        import time

        from zarr.errors import ContainsGroupError

        store = zarr_store(self.fs, self.path)
        for _ in range(100):
            try:
                return zarr.open_group(store=store, mode="r+", zarr_format=3)
            except FileNotFoundError:
                pass
            try:
                return zarr.open_group(store=store, mode="w-", zarr_format=3)
            except (ContainsGroupError, FileExistsError):
                # Another shard's writer is creating the group right now; its zarr.json lands
                # in one rename, so retry opening it.
                time.sleep(0.02)
        raise StoreError(f"{self.path} exists but is not a zarr group")

    def set_info(self, info: dict) -> None:
        """Record backbone info in the group attributes (idempotent; conflicting dims refused).

        Writers of different shards all record the same info, so their concurrent attribute
        writes (each an atomic file replace) converge on the same content.
        """
        group = self._writable_group()
        current = dict(group.attrs)
        for key in ("dim", "patch", "grid"):
            if key in current and key in info and current[key] != _jsonable(info[key]):
                raise StoreError(f"{self.job} holds {key}={current[key]}, new features have {key}={info[key]}")
        merged = {**current, **_jsonable(info)}
        if merged != current:
            group.attrs.update(merged)

    # -- writing ---------------------------------------------------------------------------------
    def writer(
        self, shard: int, n: int, dim: int, grid, info: dict | None = None, shard_images: int | None = None
    ) -> "FeatureShardWriter":
        """A streaming writer of one shard's ``n`` feature maps (see :class:`FeatureShardWriter`)."""
        return FeatureShardWriter(self, shard, n, dim, grid, info, shard_images or zarr_shard_images(dim, grid))

    def write_shard(
        self,
        shard: int,
        feats: np.ndarray,
        image_ids: np.ndarray,
        info: dict | None = None,
        shard_images: int | None = None,
    ) -> int:
        """Write one shard's ``(n, C, h, w)`` features and their image ids in one call; returns bytes on disk."""
        feats = np.asarray(feats)
        if feats.ndim != 4 or not np.issubdtype(feats.dtype, np.floating):
            raise ValueError(f"features must be a floating (n, C, h, w) array, got {feats.dtype} {feats.shape}")
        ids = np.asarray(image_ids)
        if ids.shape != (feats.shape[0],) or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"image_ids must be ({feats.shape[0]},) integers, got {ids.dtype} {ids.shape}")
        n, c, h, w = feats.shape
        with self.writer(shard, n, c, (h, w), info=info, shard_images=shard_images) as wr:
            wr.add(feats, ids)
        return wr.nbytes

    # -- reading ---------------------------------------------------------------------------------
    def shards(self) -> list[int]:
        """Committed shard numbers in place, ascending."""
        with self._lock:
            if self._shards is None:
                try:
                    entries = self.fs.ls(self.path, detail=False)
                except FileNotFoundError:
                    entries = []
                found = []
                done = committed(self.fs, self.root, self.job)  # uncommitted shards are never served
                for p in entries:
                    s = parse_shard_name(p.rstrip("/").rsplit("/", 1)[-1])
                    if s is not None and s in done and self.fs.exists(f"{p.rstrip('/')}/features/zarr.json"):
                        found.append(s)
                self._shards = sorted(found)
            return list(self._shards)

    def array(self, shard: int) -> zarr.Array:
        """The zarr array ``(n, C, h, w)`` of one shard."""
        return self._shard(shard)[0]

    def _shard(self, shard: int) -> tuple[zarr.Array, np.ndarray]:
        with self._lock:
            hit = self._arrays.get(int(shard))
            if hit is None:
                if int(shard) not in self.shards():
                    raise NotInStore(f"no committed shard {shard} in {self.job}")
                path = f"{self.path}/{shard_name(shard)}"
                try:
                    store = IndexCacheStore(zarr_store(self.fs, path, read_only=True))
                    group = zarr.open_group(store=store, mode="r", zarr_format=3)
                except FileNotFoundError:
                    raise NotInStore(f"no shard {shard} in {self.job}") from None
                hit = (group["features"], group["image_ids"][...])
                self._arrays[int(shard)] = hit
            return hit

    def shard_image_ids(self, shard: int) -> np.ndarray:
        return self._shard(shard)[1].copy()

    def absent(self) -> NotInStore:
        """The one error for reading a feature set that has no committed shard: it names the
        sets the store does have, since a wrong backbone or resolution is the usual cause."""
        if self.fs.exists(self.path):
            return NotInStore(
                f"{self.job} has no committed shard yet (`loftup-store status` shows its job; "
                f"a run that has not finished a shard leaves nothing to read)"
            )
        others = [n for n in feature_set_names(self.fs, self.root, self.kind) if n != self.name]
        have = f"it has {', '.join(others)}" if others else f"it has no {self.kind} at all"
        return NotInStore(
            f"the store has no {self.kind} of {self.name} ({have}; `loftup-pipeline {self.kind}` with "
            f"--backbone {self.backbone} --res {self.res} writes them)"
        )

    def _committed_shards(self) -> list[int]:
        shards = self.shards()
        if not shards:
            raise self.absent()
        return shards

    def image_ids(self) -> np.ndarray:
        """Every image id, in the row order of :meth:`dask` (shards ascending)."""
        return np.concatenate([self._shard(s)[1] for s in self._committed_shards()])

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._index is None:
                all_ids, shard_of, row_of = [], [], []
                for s in self.shards():
                    sid = self._shard(s)[1]
                    all_ids.append(sid)
                    shard_of.append(np.full(len(sid), s, np.int64))
                    row_of.append(np.arange(len(sid), dtype=np.int64))
                if all_ids:
                    a, b, r = np.concatenate(all_ids), np.concatenate(shard_of), np.concatenate(row_of)
                else:
                    a = b = r = np.zeros(0, np.int64)
                order = np.argsort(a, kind="stable")
                self._index = (a[order], b[order], r[order])
            sorted_ids, shard_of, row_of = self._index
        if len(sorted_ids) == 0:
            bad = np.ones(len(ids), bool)
            k = np.zeros(len(ids), np.int64)
        else:
            k = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
            bad = sorted_ids[k] != ids
        if np.any(bad):
            if len(sorted_ids) == 0:
                raise self.absent()
            raise NotInStore(f"image {int(np.asarray(ids)[bad][0])} has no features in {self.job}")
        return shard_of[k], row_of[k]

    def get(self, image_id: int) -> np.ndarray:
        """Features ``(C, h, w)`` float16 of one image (KeyError if absent)."""
        shards, rows = self._locate(np.asarray([int(image_id)], np.int64))
        return self._row(int(shards[0]), int(rows[0]), int(image_id))

    def _row(self, shard: int, row: int, image_id: int) -> np.ndarray:
        try:
            return self._shard(shard)[0][row]
        except (StoreError, KeyError):
            raise
        except Exception as exc:  # a chunk failing its CRC32C, a cut shard file
            raise StoreError(
                f"cannot read image {image_id} from shard {shard} of {self.job}: damaged ({error_line(exc, 160)})"
            ) from None

    def get_many(self, image_ids) -> np.ndarray:
        """Features ``(k, C, h, w)`` float16 of several images, in the order given."""
        ids = np.asarray(list(image_ids), np.int64)
        shards, rows = self._locate(ids)
        out = None
        for k, (s, r) in enumerate(zip(shards.tolist(), rows.tolist())):
            # One chunk read per image: zarr's orthogonal selection on a sharded array decodes
            # the whole shard (measured ~160 ms for 16 of 250 rows vs ~17 ms row by row).
            row = self._row(s, r, int(ids[k]))
            if out is None:
                out = np.empty((len(ids), *row.shape), dtype=row.dtype)
            out[k] = row
        if out is None:
            c, h, w = self._feature_shape()
            out = np.zeros((0, c, h, w), np.float16)
        return out

    def _feature_shape(self) -> tuple[int, int, int]:
        return tuple(self.array(self._committed_shards()[0]).shape[1:])

    def dask(self, chunks: str | int = "shard"):
        """dask array ``(N, C, h, w)`` over all shards, rows in :meth:`image_ids` order.

        ``chunks``: ``"shard"`` (one dask chunk per Zarr shard: 1,024 images, 192 MiB at
        16x16x384), ``"image"``, or an int number of images per chunk.
        """
        import dask.array as da

        if not (chunks in ("shard", "image") or (isinstance(chunks, int) and chunks > 0)):
            raise ValueError(f"chunks must be 'shard', 'image' or a positive int, got {chunks!r}")
        parts = []
        for s in self._committed_shards():
            arr = self.array(s)
            if arr.shape[0] == 0:
                continue
            if chunks == "shard":
                block = arr.shards or arr.chunks
            elif chunks == "image":
                block = arr.chunks
            else:
                block = (chunks, *arr.shape[1:])
            parts.append(da.from_zarr(arr, chunks=block))
        if not parts:  # committed shards that hold no image
            return da.zeros((0, *self._feature_shape()), dtype=np.float16)
        return da.concatenate(parts, axis=0)


def feature_set_names(fs, root: str, kind: str = "features") -> list[str]:
    """Names (``backbone@res``) of the ``kind`` groups under a store root."""
    try:
        entries = fs.ls(f"{root}/{kind}", detail=False)
    except FileNotFoundError:
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in entries]
    return sorted(n for n in names if "@" in n and not n.startswith("."))


class FeatureShardWriter(ShardWriter):
    """Streams one shard's features into a Zarr array of Zarr shards of ``shard_images`` images.

    Batches of any size are appended in order (``add``); a Zarr shard is encoded and written as
    soon as its images are all in, always whole (zarr never reads back a partial shard), so at
    most ``shard_images`` feature maps wait in memory. Chunks hold one image, as before. The
    subgroup is built under a hidden temp name and renamed into place by :meth:`commit`.
    """

    def __init__(self, fstore: FeatureStore, shard: int, n: int, dim: int, grid, info: dict | None, shard_images: int):
        if n < 0 or shard_images < 1:
            raise ValueError(f"need n >= 0 and shard_images >= 1, got {n}, {shard_images}")
        h, w = (int(g) for g in grid)
        info = dict(info or {})
        if info.get("dim", dim) != dim:
            raise ValueError(f"info says dim {info['dim']} but the features have {dim} channels")
        fstore.set_info({**info, "dim": int(dim), "grid": [h, w]})
        self.fstore, self.shard, self.n = fstore, int(shard), int(n)
        self.shape = (self.n, int(dim), h, w)
        self.block = min(int(shard_images), max(self.n, 1))
        self.final = write_path(fstore.fs, f"{fstore.path}/{shard_name(shard)}")
        self.tmp = temp_path(self.final)
        self.done = 0  # images written to disk
        self.peak_images = 0  # most feature maps ever held in memory between calls
        self.nbytes = 0
        # Pages of the preallocated buffer are only touched as images arrive.
        self._buf = np.empty((self.block if self.n else 0, *self.shape[1:]), np.float16)
        self._fill = 0
        self._ids: list[np.ndarray] = []
        try:
            self._group = zarr.open_group(store=zarr_store(fstore.fs, self.tmp), mode="w", zarr_format=3)
            self._group.attrs.update({"shard": self.shard, "images": self.n})
            self._arr = self._group.create_array(
                "features",
                shape=self.shape,
                dtype="float16",
                chunks=(1, *self.shape[1:]),
                shards=(self.block, *self.shape[1:]) if self.n else None,
                compressors=_codec(),
                fill_value=0.0,
                dimension_names=("image", "channel", "y", "x"),
            )
        except BaseException:
            remove(fstore.fs, self.tmp)
            raise

    @property
    def buffered_images(self) -> int:
        return self._fill

    def add(self, feats: np.ndarray, image_ids) -> None:
        """Append a batch ``(b, C, h, w)`` (cast to float16) and its ``b`` image ids."""
        feats = np.asarray(feats)
        if feats.ndim != 4 or feats.shape[1:] != self.shape[1:] or not np.issubdtype(feats.dtype, np.floating):
            raise ValueError(
                f"features must be floating (b, {', '.join(map(str, self.shape[1:]))}), got {feats.dtype} {feats.shape}"
            )
        ids = np.asarray(image_ids)
        if ids.shape != (len(feats),) or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"image_ids must be ({len(feats)},) integers, got {ids.dtype} {ids.shape}")
        if self.done + self._fill + len(feats) > self.n:
            raise ValueError(f"shard {self.shard}: more than the {self.n} images declared")
        self._ids.append(ids.astype(np.int64))
        at = 0
        while at < len(feats):
            # Fill the current Zarr shard; write it out the moment it is complete.
            size = min(self.block, self.n - self.done)
            take = min(size - self._fill, len(feats) - at)
            self._buf[self._fill : self._fill + take] = feats[at : at + take]
            self._fill += take
            at += take
            if self._fill == size:
                self._arr[self.done : self.done + size] = self._buf[:size]
                self.done += size
                self._fill = 0
        self.peak_images = max(self.peak_images, self._fill)

    def commit(self) -> int:
        """Write the image ids, rename the subgroup into place; returns bytes on disk."""
        fs = self.fstore.fs
        try:
            ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
            if self.done != self.n or len(ids) != self.n:
                raise ValueError(f"shard {self.shard}: {self.done + self._fill} images added, {self.n} declared")
            if len(np.unique(ids)) != len(ids):
                raise ValueError(f"shard {self.shard}: image_ids repeat")
            id_arr = self._group.create_array(
                "image_ids",
                shape=(self.n,),
                dtype="int64",
                chunks=(max(self.n, 1),),
                compressors=_codec(),
                fill_value=0,
                dimension_names=("image",),
            )
            if self.n:
                id_arr[...] = ids
            replace_dir(fs, self.tmp, self.final)
        except BaseException:
            remove(fs, self.tmp)
            raise
        finally:
            self.fstore.invalidate()
        self.nbytes = int(fs.du(self.final, total=True))
        return self.nbytes

    def abort(self) -> None:
        remove(self.fstore.fs, self.tmp)
        self._fill = 0


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
