"""Commit protocol: atomic writes, per-shard status markers, per-shard error tables.

A shard's outputs are written under temporary names in their final directory and renamed into
place; its marker ``_status/<job key>/shard=000123.json`` is written last, so a shard without a
marker is incomplete whatever else is on disk. ``reset_shard`` undoes a shard in the reverse
order (marker first), so an interrupted reset still leaves the shard "not done".

Temporary names are hidden (``.<name>.<hex>.tmp``): pyarrow and dask skip names starting with
``.``, so a crashed writer's leftovers never show up in a dataset.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from loftup.storage.errors import StoreError

STATUS = "_status"
ERRORS = "_errors"
TMP_SUFFIX = ".tmp"
_SHARD_RE = re.compile(r"^shard=(\d{6,})(?:\.(json|parquet))?$")
_JOB_RE = re.compile(r"^[A-Za-z0-9][\w.@+-]*(?:/[A-Za-z0-9][\w.@+-]*)*$")

ERROR_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("member", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)
ERRORS_TABLE_SCHEMA = pa.schema([*ERROR_SCHEMA, ("job", pa.string()), ("shard", pa.int32())])


# ---------------------------------------------------------------------------------------------
# names
def shard_name(shard: int) -> str:
    """``shard=000123``: zero-padded so lexical order is numeric order up to a million shards."""
    shard = int(shard)
    if shard < 0:
        raise ValueError(f"shard numbers are non-negative, got {shard}")
    return f"shard={shard:06d}"


def parse_shard_name(name: str) -> int | None:
    """Shard number of ``shard=000123`` / ``shard=000123.json`` / ``.parquet``, else None."""
    m = _SHARD_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def check_job(job: str) -> str:
    """Job names are path-like (``features/dinov2_vits14@224``) but never escape the store."""
    # "__" is reserved: it stands for "/" in the flat status/errors directory names.
    if not isinstance(job, str) or not _JOB_RE.match(job) or ".." in job or "__" in job:
        raise StoreError(f"invalid job name {job!r}")
    return job


def job_key(job: str) -> str:
    """Flat directory name of a job under ``_status`` and ``_errors``."""
    return check_job(job).replace("/", "__")


def key_to_job(key: str) -> str:
    return key.replace("__", "/")


def is_temp(name: str) -> bool:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(TMP_SUFFIX)


def temp_path(path: str) -> str:
    """A unique hidden sibling of ``path`` (same directory, so the rename stays on one device)."""
    parent, _, base = path.rstrip("/").rpartition("/")
    return f"{parent}/.{base}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


# ---------------------------------------------------------------------------------------------
# atomic file and directory writes
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(fs, path: str):
    """Yield a binary file; on clean exit it replaces ``path`` in one rename, else vanishes."""
    tmp = temp_path(path)
    parent = path.rstrip("/").rpartition("/")[0]
    fs.makedirs(parent, exist_ok=True)
    try:
        if is_local(fs):
            with open(tmp, "xb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(parent)
        else:
            with fs.open(tmp, "wb") as f:
                yield f
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


@contextlib.contextmanager
def atomic_path(fs, path: str):
    """Yield a temp path for a writer that wants a path (pyarrow); rename it in on clean exit."""
    tmp = temp_path(path)
    parent = path.rstrip("/").rpartition("/")[0]
    fs.makedirs(parent, exist_ok=True)
    try:
        yield tmp
        if is_local(fs):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(parent)
        else:
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def atomic_write(fs, path: str, data: bytes) -> int:
    """Write ``data`` to ``path`` atomically; returns the number of bytes."""
    with atomic_writer(fs, path) as f:
        f.write(data)
    return len(data)


def replace_dir(fs, src: str, dst: str) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing any previous ``dst``.

    A directory cannot be swapped in one rename when ``dst`` exists, so the old one is first
    renamed to a hidden temp name (cleaned by ``reset_shard`` if we die in between).
    """
    old = None
    if fs.exists(dst):
        old = temp_path(dst)
        _move(fs, dst, old)
    _move(fs, src, dst)
    if old is not None:
        fs.rm(old, recursive=True)


def _move(fs, src: str, dst: str) -> None:
    if is_local(fs):
        os.rename(src, dst)
        _fsync_dir(dst.rstrip("/").rpartition("/")[0])
    else:
        fs.mv(src, dst, recursive=True)


def remove(fs, path: str) -> bool:
    """Remove a file or directory tree if present; True if something was removed."""
    try:
        if not fs.exists(path):
            return False
        fs.rm(path, recursive=fs.isdir(path))
    except FileNotFoundError:
        return False
    return True


def _list_names(fs, directory: str) -> list[str]:
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False)]
    except FileNotFoundError:
        return []


def remove_temps(fs, directory: str, prefix: str = "") -> list[str]:
    """Delete temp files/dirs in ``directory`` whose hidden name starts with ``.<prefix>``."""
    removed = []
    for name in _list_names(fs, directory):
        if is_temp(name) and name.startswith("." + prefix):
            if remove(fs, f"{directory}/{name}"):
                removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------
# markers
def marker_path(root: str, job: str, shard: int) -> str:
    return f"{root}/{STATUS}/{job_key(job)}/{shard_name(shard)}.json"


def output_dir(root: str, job: str, shard: int) -> str:
    """Where a job keeps a shard's outputs: ``<root>/<job>/shard=000123``."""
    return f"{root}/{check_job(job)}/{shard_name(shard)}"


def errors_path(root: str, job: str, shard: int) -> str:
    return f"{root}/{ERRORS}/{job_key(job)}/{shard_name(shard)}.parquet"


def read_marker(fs, root: str, job: str, shard: int) -> dict | None:
    """The shard's marker, or None when the shard is not committed."""
    try:
        raw = fs.cat_file(marker_path(root, job, shard))
    except FileNotFoundError:
        return None
    return _parse_marker(raw)


def _parse_marker(raw: bytes) -> dict | None:
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # an unreadable marker means "not done": the shard gets redone
    return info if isinstance(info, dict) else None


def write_marker(fs, root: str, job: str, shard: int, info: dict) -> int:
    """Commit a shard: write its marker atomically. Call only after every output is in place."""
    info = {"job": job, "shard": int(shard), **info}
    if info["job"] != job or int(info["shard"]) != int(shard):
        raise ValueError(f"marker for {job} shard {shard} names job {info['job']!r} shard {info['shard']!r}")
    blob = (json.dumps(info, indent=1, sort_keys=True, default=str) + "\n").encode()
    return atomic_write(fs, marker_path(root, job, shard), blob)


def done_shards(fs, root: str, job: str) -> dict[int, dict]:
    """All committed shards of ``job``: shard number -> marker."""
    directory = f"{root}/{STATUS}/{job_key(job)}"
    paths = []
    for name in _list_names(fs, directory):
        if name.endswith(".json") and parse_shard_name(name) is not None:
            paths.append(f"{directory}/{name}")
    if not paths:
        return {}
    blobs = fs.cat(paths, on_error="omit")
    out = {}
    for path, raw in blobs.items():
        info = _parse_marker(raw)
        if info is not None:
            out[parse_shard_name(path)] = info
    return dict(sorted(out.items()))


def status_jobs(fs, root: str) -> list[str]:
    """Job keys that have a status directory."""
    return sorted(n for n in _list_names(fs, f"{root}/{STATUS}") if not n.startswith("."))


def reset_shard(fs, root: str, job: str, shard: int) -> None:
    """Undo a shard before redoing it: marker first, then outputs, errors and stale temps."""
    name = shard_name(shard)
    remove(fs, marker_path(root, job, shard))
    out = output_dir(root, job, shard)
    remove(fs, out)
    remove(fs, errors_path(root, job, shard))
    parent = out.rpartition("/")[0]
    for directory in (parent, f"{root}/{ERRORS}/{job_key(job)}", f"{root}/{STATUS}/{job_key(job)}"):
        remove_temps(fs, directory, prefix=name)


# ---------------------------------------------------------------------------------------------
# errors table
def write_errors(fs, root: str, job: str, shard: int, rows) -> int:
    """Replace the shard's error table with ``rows``; no rows leaves no file. Returns bytes."""
    path = errors_path(root, job, shard)
    rows = list(rows)
    if not rows:
        remove(fs, path)
        return 0
    table = pa.Table.from_pylist([{k: r.get(k) for k in ERROR_SCHEMA.names} for r in rows], schema=ERROR_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return atomic_write(fs, path, buf.getvalue())


SHARD_FAILED = "shard"  # the ``stage`` of the one error row recording a shard that failed as a whole


def record_failed_shard(fs, root: str, job: str, shard: int, reason: str) -> int:
    """Record that ``shard`` failed as a whole (no marker): one error row, replaced on redo."""
    return write_errors(fs, root, job, shard, [{"image_id": None, "member": None, "stage": SHARD_FAILED, "reason": reason}])


def error_shards(fs, root: str) -> dict[str, list[int]]:
    """Job -> shards that have an error table (committed or failed)."""
    out = {}
    for key in _list_names(fs, f"{root}/{ERRORS}"):
        if key.startswith("."):
            continue
        shards = [parse_shard_name(n) for n in _list_names(fs, f"{root}/{ERRORS}/{key}") if n.endswith(".parquet")]
        out[key_to_job(key)] = sorted(s for s in shards if s is not None)
    return out


def read_errors(fs, root: str, job: str | None = None) -> pa.Table:
    """Every error row (of one job, or all), with ``job`` and ``shard`` columns added."""
    keys = [job_key(job)] if job is not None else [
        n for n in _list_names(fs, f"{root}/{ERRORS}") if not n.startswith(".")
    ]
    tables = []
    for key in sorted(keys):
        directory = f"{root}/{ERRORS}/{key}"
        for name in sorted(_list_names(fs, directory)):
            shard = parse_shard_name(name)
            if shard is None or not name.endswith(".parquet"):
                continue
            with fs.open(f"{directory}/{name}", "rb") as f:
                t = pq.read_table(f, schema=ERROR_SCHEMA)
            n = t.num_rows
            t = t.append_column("job", pa.array([job if job is not None else key_to_job(key)] * n, pa.string()))
            tables.append(t.append_column("shard", pa.array([shard] * n, pa.int32())))
    if not tables:
        return ERRORS_TABLE_SCHEMA.empty_table()
    return pa.concat_tables(tables)
