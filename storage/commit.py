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
import hashlib
import io
import json
import os
import re
import socket
import threading
import time
import uuid
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from loftup.storage.errors import LoftupError, StoreError
from loftup.storage.redact import redact

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
        rename_into_place(fs, tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def rename_into_place(fs, tmp: str, path: str) -> None:
    """Make a finished temp file visible under ``path``: durable on local disks (file and
    directory fsynced), a plain move on object stores (whose writes are atomic per object)."""
    if is_local(fs):
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.rstrip("/").rpartition("/")[0])
    else:
        fs.mv(tmp, path)


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


class ShardWriter:
    """Base of the streaming shard writers: nothing shows under the final name before ``commit``.

    As a context manager it commits when the block ends normally and aborts when it raises, so an
    exception never leaves a half-written shard where readers look.
    """

    def commit(self) -> int:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


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


def committed(fs, root: str, job: str) -> set[int]:
    """Shard numbers of ``job`` that have a marker (a listing only; markers are not parsed)."""
    names = _list_names(fs, f"{root}/{STATUS}/{job_key(job)}")
    return {s for n in names if n.endswith(".json") and (s := parse_shard_name(n)) is not None}


# ---------------------------------------------------------------------------------------------
# file digests: what a marker records of its shard's files, checked on rerun, read and verify
def _walk(fs, directory: str) -> dict[str, int]:
    """Relative path -> size of every file under ``directory`` (temps excluded)."""
    try:
        found = fs.find(directory, detail=True)
    except FileNotFoundError:
        return {}
    base = directory.rstrip("/") + "/"
    out = {}
    for path, info in found.items():
        rel = path[len(base) :] if path.startswith(base) else path.rsplit("/", 1)[-1]
        if info.get("type", "file") == "file" and not any(is_temp(part) for part in rel.split("/")):
            out[rel] = int(info.get("size") or 0)
    return out


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_digests(fs, directory: str) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file of a shard's output directory."""
    return {
        rel: {"size": size, "sha256": _sha256(fs, f"{directory}/{rel}")}
        for rel, size in sorted(_walk(fs, directory).items())
    }


def check_files(fs, directory: str, recorded: dict | None, deep: bool = False) -> list[str]:
    """Problems of a shard's files against the digests its marker recorded (empty: intact).

    Cheap by default (presence and sizes, one listing); ``deep`` also re-hashes every file.
    A marker without digests (older stores) has nothing to check against.
    """
    if recorded is None:
        return []
    present = _walk(fs, directory)
    problems = []
    for rel, want in sorted(recorded.items()):
        if rel not in present:
            problems.append(f"missing file {rel}")
        elif present[rel] != want.get("size"):
            problems.append(f"{rel} has {present[rel]} bytes, committed {want.get('size')}")
        elif deep and want.get("sha256") and _sha256(fs, f"{directory}/{rel}") != want["sha256"]:
            problems.append(f"{rel} changed since commit (sha256 differs)")
    return problems


def write_marker(fs, root: str, job: str, shard: int, info: dict) -> int:
    """Commit a shard: write its marker atomically. Call only after every output is in place."""
    info = redact({"job": job, "shard": int(shard), **info})
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
    return write_errors(
        fs, root, job, shard, [{"image_id": None, "member": None, "stage": SHARD_FAILED, "reason": reason}]
    )


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
    keys = (
        [job_key(job)] if job is not None else [n for n in _list_names(fs, f"{root}/{ERRORS}") if not n.startswith(".")]
    )
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


# ---------------------------------------------------------------------------------------------
# per-job lease: one run of a job per store at a time
LEASE = ".lease.json"
LEASE_HEARTBEAT = 10.0  # seconds between heartbeats
LEASE_STALE = 60.0  # a lease whose heartbeat is older than this is reclaimed (its holder died)


def lease_path(root: str, job: str) -> str:
    return f"{root}/{STATUS}/{job_key(job)}/{LEASE}"


def read_lease(fs, root: str, job: str) -> dict | None:
    try:
        return _parse_marker(fs.cat_file(lease_path(root, job)))
    except FileNotFoundError:
        return None


def _holder_gone(holder: str) -> bool:
    """True when the holder ran on this host and its process no longer exists (killed run)."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


class Lease:
    """Held while a job runs on a store: a lease file naming the holder, refreshed by a heartbeat
    thread. A second run refuses while the heartbeat is fresh; a lease whose heartbeat is stale,
    or whose holder process on this host is gone (killed run), is taken over. The file is hidden, so listings of markers never see it."""

    def __init__(self, fs, root: str, job: str, stale: float = LEASE_STALE, heartbeat: float = LEASE_HEARTBEAT):
        self.fs, self.root, self.job = fs, root, job
        self.path = lease_path(root, job)
        self.stale, self.period = stale, heartbeat
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread = None

    def _write(self) -> None:
        info = {"holder": self.holder, "job": self.job, "heartbeat": time.time()}
        atomic_write(self.fs, self.path, json.dumps(info).encode())

    def acquire(self) -> "Lease":
        current = read_lease(self.fs, self.root, self.job)
        if current is not None and current.get("holder") != self.holder:
            age = time.time() - float(current.get("heartbeat", 0) or 0)
            if age < self.stale and not _holder_gone(str(current.get("holder", ""))):
                raise LoftupError(
                    f"job {self.job} is already running on this store ({current.get('holder')}, "
                    f"heartbeat {age:.0f} s ago); wait for it, or remove {self.path} if that run is gone"
                )
        self._write()
        # Two runs that both found the lease stale: the last writer wins, the other one refuses.
        time.sleep(0.05)
        current = read_lease(self.fs, self.root, self.job)
        if current is None or current.get("holder") != self.holder:
            raise LoftupError(f"job {self.job} was just started by another run ({(current or {}).get('holder')})")
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(OSError):
                self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = read_lease(self.fs, self.root, self.job)
        if current is not None and current.get("holder") == self.holder:
            remove(self.fs, self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
