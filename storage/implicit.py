"""Store of per-image-optimised features (FeatUp's implicit upsampler, one network per image).

Layout, one directory per shard, written by the ``implicit/<backbone>@<res>`` job::

    STORE/implicit/<backbone>@<res>/shard=000123/compact.parquet
    STORE/implicit/<backbone>@<res>/shard=000123/{features,image_ids}   (only with --dense)

``compact.parquet`` (zstd) has one row per image:

- ``image_id`` int64;
- ``blob`` binary: a safetensors file holding the image's network (``network.*``: Fourier
  phases, two LayerNorms and three 1x1 convolutions, ~74k float32 values for a 128-d output)
  and its PCA un-projector (``unprojector.mean`` (C,), ``unprojector.components`` (k, C)),
  with metadata ``format`` = ``loftup-implicit/1``, ``config`` (the resolved recipe as JSON),
  ``in_dim`` = C and ``out_dim`` = k. ``loftup.training.implicit.from_compact`` rebuilds the
  modules and ``render`` the (C, H, W) map; any safetensors reader opens the tensors;
- ``seconds``, ``featurize_seconds``, ``optimise_seconds`` float64: this image's wall time;
- ``views``, ``steps`` int32; ``loss_first``, ``loss_last`` float64 (total loss, first/last step).

With ``--dense`` the rendered maps are also kept as a Zarr v3 array ``(n, C, H, W)`` float16,
chunk = one image (the :class:`~loftup.storage.features.FeatureStore` layout), so analysts
read them like any other feature set.

The dense group is written first (its writer replaces the shard directory in one rename), then
the compact table; the job's marker comes last, so a shard without one is not done.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loftup.storage.commit import atomic_write, parse_shard_name, shard_name, write_path
from loftup.storage.errors import StoreError
from loftup.storage.features import FeatureStore
from loftup.storage.layout import feature_set, job_key

COMPACT = "compact.parquet"
COMPACT_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("blob", pa.binary()),
        ("seconds", pa.float64()),
        ("featurize_seconds", pa.float64()),
        ("optimise_seconds", pa.float64()),
        ("views", pa.int32()),
        ("steps", pa.int32()),
        ("loss_first", pa.float64()),
        ("loss_last", pa.float64()),
    ]
)


class ImplicitStore:
    """Per-image networks (compact) and optional dense maps of one backbone at one resolution."""

    def __init__(self, store, backbone: str, res: int):
        self.store = store
        self.fs = store.fs
        self.backbone, self.res = backbone, int(res)
        self.name = feature_set(backbone, self.res)
        self.job = job_key("implicit", backbone, res)
        self.path = store.path("implicit", self.name)
        self.dense = FeatureStore(store.fs, store.root, backbone, self.res, kind="implicit")

    def __repr__(self) -> str:
        return f"ImplicitStore({self.job!r}, shards={self.shards()})"

    def shard_dir(self, shard: int) -> str:
        return f"{self.path}/{shard_name(shard)}"

    def compact_path(self, shard: int) -> str:
        return f"{self.shard_dir(shard)}/{COMPACT}"

    # -- writing ---------------------------------------------------------------------------------
    def write_shard(
        self, shard: int, rows: list[dict], dense: np.ndarray | None = None, info: dict | None = None
    ) -> dict:
        """Write one shard: ``rows`` (dicts with the COMPACT_SCHEMA fields) and, when given, the
        dense maps ``(n, C, H, W)`` in the rows' order. Returns the bytes on disk of each part."""
        rows = sorted(rows, key=lambda r: int(r["image_id"]))
        ids = np.asarray([int(r["image_id"]) for r in rows], np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"shard {shard}: image ids repeat")
        dense_bytes = 0
        if dense is not None:
            if dense.shape[0] != len(rows):
                raise ValueError(f"shard {shard}: {dense.shape[0]} dense maps for {len(rows)} rows")
            dense_bytes = self.dense.write_shard(shard, dense, ids, info=info)
        table = pa.Table.from_pylist([{k: r.get(k) for k in COMPACT_SCHEMA.names} for r in rows], schema=COMPACT_SCHEMA)
        buf = io.BytesIO()
        # Row groups of 64 images: a reader of one image decodes ~35 MB at most, not a whole tar's.
        pq.write_table(table, buf, compression="zstd", row_group_size=64)
        compact_bytes = atomic_write(self.fs, write_path(self.fs, self.compact_path(shard)), buf.getvalue())
        return {"compact_bytes": int(compact_bytes), "dense_bytes": int(dense_bytes)}

    # -- reading ---------------------------------------------------------------------------------
    def shards(self) -> list[int]:
        """Shards with a compact table, ascending."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for p in entries:
            s = parse_shard_name(p.rstrip("/").rsplit("/", 1)[-1])
            if s is not None and self.fs.exists(f"{p.rstrip('/')}/{COMPACT}"):
                out.append(s)
        return sorted(out)

    def table(self, shard: int, columns=None) -> pa.Table:
        try:
            with self.fs.open(self.compact_path(shard), "rb") as f:
                return pq.read_table(f, columns=columns)
        except FileNotFoundError:
            raise StoreError(f"no shard {shard} in {self.job}") from None

    def image_ids(self, shards=None) -> np.ndarray:
        parts = [
            self.table(s, ["image_id"]).column(0).to_numpy() for s in (self.shards() if shards is None else shards)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def blobs(self, image_ids) -> list[bytes]:
        """The compact blobs of ``image_ids``, in the order given (KeyError if one is absent)."""
        want = [int(i) for i in image_ids]
        found: dict[int, bytes] = {}
        for s in self.shards():
            t = self.table(s, ["image_id"])
            ids = t.column(0).to_numpy()
            hit = np.isin(ids, want)
            if hit.any():
                full = self.table(s, ["image_id", "blob"]).filter(pa.array(hit))
                for i, b in zip(full.column(0).to_pylist(), full.column(1).to_pylist()):
                    found[int(i)] = b
            if len(found) == len(set(want)):
                break
        missing = [i for i in want if i not in found]
        if missing:
            raise KeyError(f"image {missing[0]} has no per-image-optimised network in {self.job}")
        return [found[i] for i in want]

    def has_dense(self, shard: int) -> bool:
        return self.fs.exists(f"{self.shard_dir(shard)}/features/zarr.json")

    # -- sizes from the files --------------------------------------------------------------------
    def compact_bytes(self, shard: int) -> int:
        return int(self.fs.size(self.compact_path(shard)))

    def dense_bytes(self, shard: int) -> int:
        """Bytes on disk of the shard's dense maps (0 when stored compact only)."""
        if not self.has_dense(shard):
            return 0
        d = self.shard_dir(shard)
        return int(self.fs.du(f"{d}/features", total=True)) + int(self.fs.du(f"{d}/image_ids", total=True))

    def dense_shape(self, shard: int) -> tuple[int, ...] | None:
        return tuple(self.dense.array(shard).shape) if self.has_dense(shard) else None

    def verify(self, shard: int, marker: dict) -> list[str]:
        """Problems of one committed shard (empty = consistent with its marker)."""
        out = []
        t = self.table(shard, ["image_id", "blob"])
        if t.num_rows != marker.get("images"):
            out.append(f"{t.num_rows} compact rows, marker says {marker.get('images')}")
        if any(b is None or len(b) < 8 for b in t.column("blob").to_pylist()):
            out.append("empty compact blob")
        if marker.get("dense_bytes"):
            shape = self.dense_shape(shard)
            if shape is None or shape[0] != t.num_rows:
                out.append(f"dense maps {shape}, compact rows {t.num_rows}")
        return out


def implicit_store(store, backbone: str, res: int) -> ImplicitStore:
    return ImplicitStore(store, backbone, res)


def implicit_sets(store) -> list[str]:
    """``backbone@res`` names that have a per-image-optimisation job in the store."""
    from loftup.storage.commit import key_to_job, status_jobs

    out = []
    for key in status_jobs(store.fs, store.root):
        job = key_to_job(key)
        if job.startswith("implicit/") and store.done_shards(job):
            out.append(job.split("/", 1)[1])
    return sorted(out)
