"""Integrity check of a store: every committed shard's files are those it committed, its tables and
arrays read back and agree with its marker, and no data lies around without a marker.

Cheap by default (listings, sizes, Parquet footers, array shapes). ``deep`` re-hashes every file
against the sha256 its marker recorded and reads every Parquet page (page CRCs) and every Zarr
chunk (CRC32C codec), so a flipped bit anywhere is reported.
"""

from __future__ import annotations

import numpy as np

from loftup.storage import commit
from loftup.storage.errors import error_line


def data_jobs(store) -> list[str]:
    """Jobs that have a status directory or output data in the store."""
    jobs = {commit.key_to_job(k) for k in commit.status_jobs(store.fs, store.root)}
    for name in ("masks", "images"):
        if store.fs.exists(store.path(name)):
            jobs.add(name)
    for kind in ("features", "pseudogt"):
        jobs.update(f"{kind}/{name}" for name in store.feature_sets(kind))
    return sorted(jobs)


def verify_store(store, deep: bool = False) -> list[str]:
    """Problems found, one line each (empty list = consistent)."""
    problems: list[str] = []
    for job in data_jobs(store):
        markers = store.done_shards(job)
        for shard, marker in sorted(markers.items()):
            where = f"{job} shard {shard:06d}"
            try:
                found = store.shard_problems(job, shard, marker, deep=deep)
                if not found:  # reading a file that is missing or cut would only repeat that
                    found = _check(store, job, shard, marker, deep)
                problems.extend(f"{where}: {p}" for p in found)
            except Exception as exc:  # unreadable file: report, keep checking the rest
                problems.append(f"{where}: unreadable ({error_line(exc, 200)})")
        base = store.path(job)
        for name in commit._list_names(store.fs, base):
            shard = commit.parse_shard_name(name)
            if shard is not None and shard not in markers and commit._walk(store.fs, f"{base}/{name}"):
                problems.append(
                    f"{job} shard {shard:06d}: data without a marker (not committed, never served; "
                    f"a rerun of the job redoes it)"
                )
        for shard in commit.pending_swaps(store.fs, store.root, job):
            problems.append(
                f"{job} shard {shard:06d}: a killed run left its commit half done (the next run of the job finishes it)"
            )
        if not commit.job_running(store.fs, store.root, job):  # a running job's temps are work in progress
            temps = commit.leftover_temps(store.fs, store.root, job)
            if temps:
                shown = ", ".join(temps[:3]) + (f" ... ({len(temps)} in all)" if len(temps) > 3 else "")
                problems.append(
                    f"{job}: leftover temp files of an interrupted run: {shown} (the next run of the job removes them)"
                )
    return problems


def _check(store, job: str, shard: int, marker: dict, deep: bool) -> list[str]:
    out = []
    if job in ("masks", "images"):
        files = store._mask_files if job == "masks" else store._image_files
        pf = files.parquet_file(files.path(shard))
        rows = pf.metadata.num_rows
        want = marker.get("masks") if job == "masks" else marker.get("images")
        if want is not None and rows != want:
            out.append(f"{rows} {job} rows, marker says {want}")
        if deep:
            table = pf.read()  # every page, CRC-checked
            ids = table.column("image_id").to_numpy()
            if job == "images" and len(np.unique(ids)) != len(ids):
                out.append("duplicate image ids")
            if job == "masks" and rows and len(np.unique(ids)) > marker.get("images", 0):
                out.append(f"masks of {len(np.unique(ids))} images, marker says {marker.get('images')}")
    elif "/" in job:
        kind, key = job.split("/", 1)
        backbone, res = key.rsplit("@", 1)
        if kind == "implicit":
            from loftup.storage.implicit import implicit_store

            ist = implicit_store(store, backbone, int(res))
            out.extend(ist.verify(shard, marker))
            if not marker.get("dense_bytes"):
                return out
            fstore = ist.dense
        else:
            fstore = store.features(backbone, int(res)) if kind == "features" else store.pseudogt(backbone, int(res))
        arr = fstore.array(shard)
        ids = fstore.shard_image_ids(shard)
        if arr.shape[0] != len(ids) or arr.shape[0] != marker.get("images", arr.shape[0]):
            out.append(f"{arr.shape[0]} rows, {len(ids)} ids, marker says {marker.get('images')}")
        if deep:
            for i in range(arr.shape[0]):
                block = np.asarray(arr[i])  # CRC32C-checked chunk
                if not np.isfinite(block).all():
                    out.append(f"row {i} (image {int(ids[i])}) has non-finite values")
                    break
    return out
