"""Commit protocol: atomic writes, per-shard status markers, per-shard error tables.

A shard's marker ``_status/<job key>/shard=000123.json`` is written last, after every output,
so a shard without a marker is incomplete whatever else is on disk. A job builds a shard
through :class:`ShardBuild`: its writers (each asks :func:`write_path` where to write) put the
new outputs and errors table in a hidden staging directory beside the committed shard, which
stays committed and readable, byte for byte, until the build succeeds. ``ShardBuild.commit``
then records the swap in a journal, swaps the new outputs in and writes the new marker; a run
that dies half-way through the swap is finished by the next run of the job (:func:`recover`),
so a shard is always either its old committed version or its new one. A build that fails
leaves the committed shard untouched.

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

from loftup.storage.errors import LoftupError, StoreError, error_line, os_error_in
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
def atomic_path(fs, path: str):
    """Yield a temp path for a writer that wants a path (pyarrow); rename it in on clean exit."""
    tmp = temp_path(path)
    fs.makedirs(path.rstrip("/").rpartition("/")[0], exist_ok=True)
    try:
        yield tmp
        rename_into_place(fs, tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


@contextlib.contextmanager
def atomic_writer(fs, path: str):
    """Yield a binary file; on clean exit it replaces ``path`` in one rename, else vanishes."""
    try:
        with atomic_path(fs, path) as tmp, open(tmp, "xb") if is_local(fs) else fs.open(tmp, "wb") as f:
            yield f
    except BaseException as exc:
        cause = os_error_in(exc) if isinstance(exc, Exception) else None
        if cause is not None and (cause is not exc or cause.filename is None):
            # e.g. torch.save's RuntimeError over a full disk: the OSError, naming the file
            raise type(cause)(cause.errno, cause.strerror, path) from exc
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
    """Delete temp files/dirs in ``directory`` whose hidden name starts with ``.<prefix>`` (or
    ``..<prefix>``: the temp of a writer whose own target was a temp name)."""
    removed = []
    for name in _list_names(fs, directory):
        if is_temp(name) and name.lstrip(".").startswith(prefix):
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
    """The shard's marker, or None when the shard is not committed.

    A marker that parses but fails :func:`marker_problems` comes back as ``{"job", "shard",
    "invalid": reason}``: the shard is damaged (never served, redone by the next run)."""
    try:
        raw = fs.cat_file(marker_path(root, job, shard))
    except FileNotFoundError:
        return None
    return _checked_marker(_parse_marker(raw), job, shard)


def _parse_marker(raw: bytes) -> dict | None:
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # an unreadable marker means "not done": the shard gets redone
    return info if isinstance(info, dict) else None


_COUNTS = ("images", "errors", "masks", "bytes")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def marker_problems(info: dict, job: str | None = None, shard: int | None = None) -> list[str]:
    """What makes a parsed marker unusable (empty: usable): wrong field types, another job's or
    shard's name, or no file digests (a marker from before loftup recorded them, which cannot
    tell an intact shard from a damaged one)."""
    problems = []
    if job is not None and info.get("job", job) != job:
        problems.append(f"marker names job {info.get('job')!r}")
    if shard is not None and (type(info.get("shard", shard)) is not int or info.get("shard", shard) != int(shard)):
        problems.append(f"marker names shard {info.get('shard')!r}")
    for key in _COUNTS:
        value = info.get(key, 0)
        if type(value) is not int or value < 0:
            problems.append(f"marker field {key!r} is {value!r}, not a count")
    seconds = info.get("seconds", 0)
    if type(seconds) not in (int, float) or not seconds >= 0:
        problems.append(f"marker field 'seconds' is {seconds!r}, not a duration")
    for key, kind in (("config_hash", str), ("upstream", dict), ("config", dict)):
        if key in info and not isinstance(info[key], kind):
            problems.append(f"marker field {key!r} is a {type(info[key]).__name__}, not a {kind.__name__}")
    files = info.get("files")
    if files is None:
        problems.append("marker has no file digests (written before loftup recorded them)")
    elif not isinstance(files, dict):
        problems.append(f"marker field 'files' is a {type(files).__name__}, not a mapping")
    else:
        for rel, want in files.items():
            ok = (
                isinstance(want, dict)
                and type(want.get("size")) is int
                and want["size"] >= 0
                and isinstance(want.get("sha256"), str)
                and _HEX64.match(want["sha256"])
                and isinstance(want.get("footer_sha256", ""), str)
                and not rel.startswith("/")
                and ".." not in rel.split("/")
            )
            if not ok:
                problems.append(f"marker's digest of {rel!r} is malformed")
                break
    return problems


def _checked_marker(info: dict | None, job: str, shard: int) -> dict | None:
    if info is None:
        return None
    problems = marker_problems(info, job, shard)
    if problems:
        return {"job": job, "shard": int(shard), "invalid": "; ".join(problems[:3])}
    return info


def usable(marker: dict | None) -> bool:
    """True for a marker that commits its shard (present and valid)."""
    return marker is not None and "invalid" not in marker


def committed(fs, root: str, job: str) -> set[int]:
    """Shard numbers of ``job`` whose marker commits them (present and valid): what readers serve."""
    return {s for s, m in done_shards(fs, root, job).items() if usable(m)}


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


def parquet_footer(fs, path: str) -> bytes:
    """The footer of a Parquet file (metadata, its length and the magic): what readers trust for
    row counts, offsets and the min/max statistics that filters and indexes skip data by."""
    with fs.open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 12:
            raise StoreError(f"{path} is too short for a Parquet file ({size} bytes)")
        f.seek(size - 8)
        tail = f.read(8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or n + 12 > size:
            raise StoreError(f"{path} has no Parquet footer")
        f.seek(size - 8 - n)
        return f.read(n + 8)


def footer_digest(fs, path: str) -> str:
    return hashlib.sha256(parquet_footer(fs, path)).hexdigest()


def file_digests(fs, directory: str) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file of a shard's output directory, plus
    ``footer_sha256`` for Parquet files: the page checksums do not cover the footer, whose
    statistics decide which rows a filter or an index reads."""
    out = {}
    for rel, size in sorted(_walk(fs, directory).items()):
        out[rel] = {"size": size, "sha256": _sha256(fs, f"{directory}/{rel}")}
        if rel.endswith(".parquet"):
            out[rel]["footer_sha256"] = footer_digest(fs, f"{directory}/{rel}")
    return out


def check_files(fs, directory: str, recorded: dict | None, deep: bool = False) -> list[str]:
    """Problems of a shard's files against the digests its marker recorded (empty: intact).

    Cheap by default (one listing, sizes, and the footer of each Parquet file); ``deep`` also
    re-hashes every file. A file that cannot be read is a problem, not an exception.
    """
    if not isinstance(recorded, dict):
        return ["marker has no file digests"]
    present = _walk(fs, directory)
    problems = [f"unexpected file {rel} (not in the marker)" for rel in sorted(set(present) - set(recorded))]
    for rel, want in sorted(recorded.items()):
        path = f"{directory}/{rel}"
        try:
            if rel not in present:
                problems.append(f"missing file {rel}")
            elif present[rel] != want.get("size"):
                problems.append(f"{rel} has {present[rel]} bytes, committed {want.get('size')}")
            elif want.get("footer_sha256") and footer_digest(fs, path) != want["footer_sha256"]:
                problems.append(f"{rel}'s Parquet footer changed since commit (its statistics cannot be trusted)")
            elif deep and want.get("sha256") and _sha256(fs, path) != want["sha256"]:
                problems.append(f"{rel} changed since commit (sha256 differs)")
        except (OSError, StoreError) as exc:
            problems.append(f"{rel} cannot be read ({error_line(exc, 120)})")
    return problems


def _marker_blob(job: str, shard: int, info: dict) -> bytes:
    info = redact({"job": job, "shard": int(shard), **info})
    if info["job"] != job or int(info["shard"]) != int(shard):
        raise ValueError(f"marker for {job} shard {shard} names job {info['job']!r} shard {info['shard']!r}")
    return (json.dumps(info, indent=1, sort_keys=True, default=str) + "\n").encode()


def write_marker(fs, root: str, job: str, shard: int, info: dict) -> int:
    """Commit a shard: write its marker atomically. Call only after every output is in place."""
    return atomic_write(fs, marker_path(root, job, shard), _marker_blob(job, shard, info))


def done_shards(fs, root: str, job: str) -> dict[int, dict]:
    """Every shard of ``job`` with a marker: shard number -> marker (invalid ones as
    :func:`read_marker` returns them; :func:`usable` tells which commit their shard)."""
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
        shard = parse_shard_name(path)
        info = _checked_marker(_parse_marker(raw), job, shard)
        if info is not None:
            out[shard] = info
    return dict(sorted(out.items()))


def status_jobs(fs, root: str) -> list[str]:
    """Job keys that have a status directory."""
    return sorted(n for n in _list_names(fs, f"{root}/{STATUS}") if not n.startswith("."))


def reset_shard(fs, root: str, job: str, shard: int) -> None:
    """Undo a shard: marker first, then outputs, errors and stale temps."""
    remove(fs, marker_path(root, job, shard))
    remove(fs, output_dir(root, job, shard))
    remove(fs, errors_path(root, job, shard))
    remove_shard_temps(fs, root, job, shard)


def _shard_dirs(root: str, job: str, shard: int) -> tuple[str, ...]:
    """Directories where a shard's temps live: beside its outputs, its errors table, its marker."""
    parent = output_dir(root, job, shard).rpartition("/")[0]
    return parent, f"{root}/{ERRORS}/{job_key(job)}", f"{root}/{STATUS}/{job_key(job)}"


def remove_shard_temps(fs, root: str, job: str, shard: int) -> list[str]:
    """Delete what killed writers and builds of ``shard`` left behind (never the swap journal)."""
    removed = []
    for directory in _shard_dirs(root, job, shard):
        removed += remove_temps(fs, directory, prefix=shard_name(shard))
    return removed


def leftover_temps(fs, root: str, job: str) -> list[str]:
    """Hidden temp files and directories of ``job`` (store-relative), including inside its
    shard directories: what a killed writer left behind; the next run of the job removes them."""
    found = []
    base = f"{root}/{check_job(job)}"
    for directory in (base, f"{root}/{ERRORS}/{job_key(job)}", f"{root}/{STATUS}/{job_key(job)}"):
        for name in _list_names(fs, directory):
            if is_temp(name) and not name.startswith(LEASE):  # a live lease's heartbeat write
                found.append(f"{directory}/{name}")
            elif directory == base and parse_shard_name(name) is not None:
                found += [f"{directory}/{name}/{n}" for n in _list_names(fs, f"{directory}/{name}") if is_temp(n)]
    return sorted(p[len(root) + 1 :] for p in found)


def remove_leftovers(fs, root: str, job: str) -> list[str]:
    """Delete :func:`leftover_temps` of ``job``; only under the job's lease, before its builds."""
    found = leftover_temps(fs, root, job)
    for rel in found:
        remove(fs, f"{root}/{rel}")
    return found


# ---------------------------------------------------------------------------------------------
# building a shard beside its committed version, and swapping it in
_BUILDS: dict[tuple[str, str], str] = {}  # (protocol, final path) -> staged path, this process's builds
_BUILDS_LOCK = threading.Lock()
JOURNAL_SUFFIX = ".swap"


def _protocol(fs) -> str:
    proto = fs.protocol
    return proto if isinstance(proto, str) else proto[0]


def write_path(fs, path: str) -> str:
    """Where a writer must write ``path``: inside the staging area of a :class:`ShardBuild` when
    ``path`` is (under) the output directory or errors table of a shard being built in this
    process, else ``path`` itself. Every writer of shard outputs asks this."""
    proto = _protocol(fs)
    with _BUILDS_LOCK:
        for (p, final), staged in _BUILDS.items():
            if p == proto and (path == final or path.startswith(final + "/")):
                return staged + path[len(final) :]
    return path


def journal_path(root: str, job: str, shard: int) -> str:
    return f"{root}/{STATUS}/{job_key(job)}/.{shard_name(shard)}{JOURNAL_SUFFIX}"


class ShardBuild:
    """A new version of one shard, built beside the committed one (a context manager).

    Inside the block, :func:`write_path` sends the shard's outputs to a hidden staging directory
    and its errors table to a hidden file; readers keep seeing the committed shard, byte for byte.
    :meth:`commit` swaps the new version in (marker last); leaving the block without it (an
    exception, a failed job) deletes the staged files and leaves the committed shard as it was.
    """

    def __init__(self, fs, root: str, job: str, shard: int):
        self.fs, self.root, self.job, self.shard = fs, root, check_job(job), int(shard)
        token = uuid.uuid4().hex[:12]
        name = shard_name(shard)
        self.final = output_dir(root, job, shard)
        self.final_errors = errors_path(root, job, shard)
        self.stage = f"{self.final.rpartition('/')[0]}/.{name}.{token}.build{TMP_SUFFIX}"
        self.stage_errors = f"{self.final_errors.rpartition('/')[0]}/.{name}.parquet.{token}.build{TMP_SUFFIX}"
        self._keys = [(_protocol(fs), self.final), (_protocol(fs), self.final_errors)]

    def __enter__(self) -> Self:
        if self.fs.exists(journal_path(self.root, self.job, self.shard)):
            recover(self.fs, self.root, self.job, shards=[self.shard])  # a killed swap comes first
        remove_shard_temps(self.fs, self.root, self.job, self.shard)
        with _BUILDS_LOCK:
            if any(k in _BUILDS for k in self._keys):
                raise StoreError(f"{self.job} shard {self.shard} is already being built in this process")
            _BUILDS[self._keys[0]] = self.stage
            _BUILDS[self._keys[1]] = self.stage_errors
        return self

    def _release(self) -> None:
        with _BUILDS_LOCK:
            for k in self._keys:
                _BUILDS.pop(k, None)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release()
        # Once this build's journal is written the swap is decided: recover() finishes it with these files.
        journal = journal_path(self.root, self.job, self.shard)
        try:
            ours = (_parse_marker(self.fs.cat_file(journal)) or {}).get("stage") == self.stage.rpartition("/")[2]
        except FileNotFoundError:
            ours = False
        if not ours:
            remove(self.fs, self.stage)
            remove(self.fs, self.stage_errors)

    def commit(self, info: dict) -> dict:
        """Swap the built shard in: journal, old marker out, outputs and errors in, new marker,
        journal out. Returns the marker written (with the file digests)."""
        self._release()
        marker = {**info, "files": file_digests(self.fs, self.stage)}
        journal = {
            "stage": self.stage.rpartition("/")[2],
            "stage_errors": self.stage_errors.rpartition("/")[2] if self.fs.exists(self.stage_errors) else None,
            "marker": json.loads(_marker_blob(self.job, self.shard, marker)),
        }
        atomic_write(self.fs, journal_path(self.root, self.job, self.shard), json.dumps(journal).encode())
        if not _finish_swap(self.fs, self.root, self.job, self.shard, journal):
            raise StoreError(f"{self.job} shard {self.shard}: the built files changed before they were swapped in")
        return journal["marker"]


def _finish_swap(fs, root: str, job: str, shard: int, journal: dict) -> bool:
    """Carry out (or finish) a journaled swap; idempotent, so an interrupted one can be rerun.
    False when the files in place are not those the journal committed (then nothing is marked)."""
    final = output_dir(root, job, shard)
    parent = final.rpartition("/")[0]
    stage = f"{parent}/{journal['stage']}"
    # From the old marker's removal to the new one's write the shard is not committed: readers
    # skip it, and no reader ever sees the old marker beside the new files.
    remove(fs, marker_path(root, job, shard))
    if fs.exists(stage):
        if fs.exists(final):
            _move(fs, final, f"{parent}/.{shard_name(shard)}.{uuid.uuid4().hex[:12]}.old{TMP_SUFFIX}")
        _move(fs, stage, final)
    errors = errors_path(root, job, shard)
    if journal.get("stage_errors"):
        staged = f"{errors.rpartition('/')[0]}/{journal['stage_errors']}"
        if fs.exists(staged):
            rename_into_place(fs, staged, errors)
    else:
        remove(fs, errors)
    marker = journal["marker"]
    present = _walk(fs, final)
    ok = present == {rel: want["size"] for rel, want in marker["files"].items()}
    if ok:
        atomic_write(fs, marker_path(root, job, shard), _marker_blob(job, shard, marker))
    remove(fs, journal_path(root, job, shard))
    remove_shard_temps(fs, root, job, shard)  # the old version, moved aside
    return ok


def recover(fs, root: str, job: str, shards=None) -> dict[int, bool]:
    """Finish the swaps that a killed run of ``job`` left half done and delete what killed
    writers left behind (call under the job's lease, before planning; ``shards``: only those,
    and no cleaning). Returns shard -> True when its new version is now committed."""
    directory = f"{root}/{STATUS}/{job_key(job)}"
    out = {}
    for name in _list_names(fs, directory):
        if not (name.startswith(".") and name.endswith(JOURNAL_SUFFIX)):
            continue
        shard = parse_shard_name(name[1 : -len(JOURNAL_SUFFIX)])
        if shard is None or (shards is not None and shard not in shards):
            continue
        journal = _parse_marker(fs.cat_file(f"{directory}/{name}"))
        valid = (
            journal is not None
            and isinstance(journal.get("stage"), str)
            and is_temp(journal["stage"])
            and "/" not in journal["stage"]
            and isinstance(journal.get("marker"), dict)
            and not marker_problems(journal["marker"], job, shard)
        )
        if valid:
            out[shard] = _finish_swap(fs, root, job, shard, journal)
        else:  # written atomically, so only outside damage gets here: the shard is redone
            remove(fs, f"{directory}/{name}")
            out[shard] = False
    if shards is None:
        remove_leftovers(fs, root, job)  # e.g. an old version a killed swap had moved aside
    return out


def pending_swaps(fs, root: str, job: str) -> list[int]:
    """Shards whose swap a killed run left unfinished (the next run of the job finishes it)."""
    names = _list_names(fs, f"{root}/{STATUS}/{job_key(job)}")
    return sorted(
        s
        for n in names
        if n.startswith(".")
        and n.endswith(JOURNAL_SUFFIX)
        and (s := parse_shard_name(n[1 : -len(JOURNAL_SUFFIX)])) is not None
    )


# ---------------------------------------------------------------------------------------------
# errors table
def write_errors(fs, root: str, job: str, shard: int, rows) -> int:
    """Replace the shard's error table with ``rows``; no rows leaves no file. Returns bytes."""
    path = write_path(fs, errors_path(root, job, shard))
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
    """Record that ``shard`` failed as a whole: one error row, replaced on redo. A shard whose
    committed version survived the failed redo keeps that version's error table (returns 0)."""
    if usable(read_marker(fs, root, job, shard)):
        return 0
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


def _lease_age(lease: dict) -> float:
    try:
        return time.time() - float(lease.get("heartbeat", 0) or 0)
    except (TypeError, ValueError):
        return float("inf")  # a damaged lease is as good as a stale one


def job_running(fs, root: str, job: str) -> bool:
    """True while a run of ``job`` holds a live lease on the store (its temps are work in progress)."""
    current = read_lease(fs, root, job)
    return (
        current is not None and _lease_age(current) < LEASE_STALE and not _holder_gone(str(current.get("holder", "")))
    )


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
            age = _lease_age(current)
            if age < self.stale and not _holder_gone(str(current.get("holder", ""))):
                raise LoftupError(
                    f"job {self.job} is already running on this store ({current.get('holder')}, "
                    f"heartbeat {age:.0f} s ago); wait for it, or remove {self.path} if that run is gone"
                )
        try:
            self._write()
        except OSError as exc:  # the first write a job makes: a read-only store stops here
            raise StoreError(f"cannot write to the store at {self.root} ({error_line(exc)})") from None
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
