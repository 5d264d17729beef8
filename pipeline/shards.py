"""Shard specifications (``0-99,120,200-210``) and where each shard's SA-1B tar lives."""

from __future__ import annotations

import os
import re

from loftup.storage.errors import ShardSpecError

MAX_SHARD = 999_999

_PART = re.compile(r"^([0-9]+)(?:\s*-\s*([0-9]+))?$")


def _bad(spec: str, part: str, why: str) -> ShardSpecError:
    return ShardSpecError(f"invalid shard spec {spec!r}: {part!r} {why}")


def parse_shards(spec: str) -> list[int]:
    """Parse ``"0-99,120,200-210"`` into a sorted list of unique shard numbers.

    Whitespace around parts and dashes is tolerated. Empty parts, reversed ranges, negative
    numbers, non-numbers and shards above 999999 raise :class:`ShardSpecError` naming the part.
    """
    if spec is None or not str(spec).strip():
        raise ShardSpecError("empty shard spec: expected something like '0-99,120,200-210'")
    spec = str(spec)
    shards: set[int] = set()
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise _bad(spec, raw, "is an empty part (stray comma?)")
        if part.startswith("-") or re.search(r"-\s*-", part):
            raise _bad(spec, part, "is negative; shards are 0..999999")
        match = _PART.match(part)
        if match is None:
            raise _bad(spec, part, "is not a shard number or a range like 0-99")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise _bad(spec, part, "is a reversed range")
        if hi > MAX_SHARD:
            raise _bad(spec, part, f"is above the largest shard number {MAX_SHARD}")
        shards.update(range(lo, hi + 1))
    return sorted(shards)


def tar_name(shard: int) -> str:
    """File name of shard ``shard``'s tar: ``sa_000123.tar``."""
    return f"sa_{int(shard):06d}.tar"


def _is_url(root: str) -> bool:
    return "://" in root


def tar_path(root, shard: int) -> str:
    """Path (or fsspec URL, when ``root`` is one) of shard ``shard``'s tar under ``root``."""
    root = os.fspath(root)
    if _is_url(root):
        return root.rstrip("/") + "/" + tar_name(shard)
    return os.path.join(os.path.abspath(root), tar_name(shard))


def _present_names(root: str) -> set[str]:
    """Names of the regular files directly under ``root`` (one listing, not one stat per shard)."""
    if _is_url(root):
        import fsspec

        fs, path = fsspec.core.url_to_fs(root)
        try:
            if not fs.isdir(path):
                raise ShardSpecError(f"SA-1B root {root} is not a directory")
            entries = fs.ls(path, detail=True)
        except (OSError, ValueError) as exc:
            raise ShardSpecError(f"cannot list SA-1B root {root}: {exc}") from None
        return {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"}
    if not os.path.isdir(root):
        raise ShardSpecError(f"SA-1B root {root} is not a directory")
    with os.scandir(root) as it:
        return {e.name for e in it if e.is_file()}


def _compress_runs(shards: list[int]) -> str:
    """``[1, 5, 6, 7, 8, 9]`` -> ``sa_000001.tar, sa_000005.tar ... sa_000009.tar``."""
    runs: list[list[int]] = []
    for s in shards:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    parts = []
    for lo, hi in runs:
        if lo == hi:
            parts.append(tar_name(lo))
        elif hi == lo + 1:
            parts.append(f"{tar_name(lo)}, {tar_name(hi)}")
        else:
            parts.append(f"{tar_name(lo)} ... {tar_name(hi)}")
    return ", ".join(parts)


def resolve_shards(spec: str, root) -> list[tuple[int, str]]:
    """Parse ``spec`` and return ``[(shard, tar path)]`` for tars under ``root`` (path or URL).

    Every missing tar is reported in one :class:`ShardSpecError`, consecutive ones compressed
    (``sa_000005.tar ... sa_000009.tar``), with the total count.
    """
    shards = parse_shards(spec)
    root = os.fspath(root)
    present = _present_names(root)
    missing = [s for s in shards if tar_name(s) not in present]
    if missing:
        raise ShardSpecError(f"missing under {root}: {_compress_runs(missing)} ({len(missing)} missing)")
    return [(s, tar_path(root, s)) for s in shards]
