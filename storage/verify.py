"""Integrity check of a store: every committed shard's files exist and agree with its marker."""

from __future__ import annotations

import numpy as np


def verify_store(store, deep: bool = True) -> list[str]:
    """Problems found, one line each (empty list = consistent).

    ``deep`` reads every feature chunk, so a corrupt or truncated Zarr shard is caught too.
    """
    problems: list[str] = []
    for job in sorted(store.summary()):
        for shard, marker in sorted(store.done_shards(job).items()):
            where = f"{job} shard {shard:06d}"
            try:
                problems.extend(f"{where}: {p}" for p in _check(store, job, shard, marker, deep))
            except Exception as exc:  # unreadable file: report, keep checking the rest
                problems.append(f"{where}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return problems


def _check(store, job: str, shard: int, marker: dict, deep: bool) -> list[str]:
    out = []
    if job == "masks":
        t = store.masks_table(shard, columns=["image_id", "order"])
        if t.num_rows != marker.get("masks"):
            out.append(f"{t.num_rows} mask rows, marker says {marker.get('masks')}")
        n_img = len(np.unique(t.column("image_id").to_numpy())) if t.num_rows else 0
        if n_img > marker.get("images", 0):
            out.append(f"masks of {n_img} images, marker says {marker.get('images')}")
    elif job == "images":
        t = store.images_table(shard, columns=["image_id"])
        if t.num_rows != marker.get("images"):
            out.append(f"{t.num_rows} image rows, marker says {marker.get('images')}")
        ids = t.column("image_id").to_numpy()
        if len(np.unique(ids)) != len(ids):
            out.append("duplicate image ids")
    elif "/" in job:
        kind, key = job.split("/", 1)
        backbone, res = key.rsplit("@", 1)
        if kind == "implicit":
            from loftup.storage.implicit import implicit_store

            ist = implicit_store(store, backbone, int(res))
            out.extend(ist.verify(shard, marker))
            if not marker.get("dense_bytes"):
                return out
            fs = ist.dense
        else:
            fs = store.features(backbone, int(res)) if kind == "features" else store.pseudogt(backbone, int(res))
        arr = fs.array(shard)
        ids = fs.shard_image_ids(shard)
        if arr.shape[0] != len(ids) or arr.shape[0] != marker.get("images"):
            out.append(f"{arr.shape[0]} rows, {len(ids)} ids, marker says {marker.get('images')}")
        if deep:
            for i in range(arr.shape[0]):
                block = np.asarray(arr[i])
                if not np.isfinite(block).all():
                    out.append(f"row {i} (image {int(ids[i])}) has non-finite values")
                    break
    return out
