"""The store's ``manifest.json``: schema version, geometry, backbones and jobs run."""

from __future__ import annotations

import json
import time

from loftup.storage import geometry
from loftup.storage.commit import atomic_write
from loftup.storage.errors import StoreError
from loftup.storage.redact import redact

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def check_geometries(sizes) -> tuple[int, ...]:
    """Validated, sorted, de-duplicated training sizes."""
    try:
        out = tuple(sorted({int(s) for s in sizes}))
    except (TypeError, ValueError):
        raise StoreError(f"geometries must be integers, got {sizes!r}") from None
    if not out or any(s <= 0 for s in out):
        raise StoreError(f"geometries must be positive sizes, got {list(sizes)}")
    return out


def new_manifest(sizes) -> dict:
    """A fresh manifest for a store with the given training sizes."""
    from loftup import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"loftup {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "geometry": {
            "transform": geometry.TRANSFORM["transform"],
            "sizes": list(check_geometries(sizes)),
            "mask_resample": geometry.TRANSFORM["mask_resample"],
            "image_resample": geometry.TRANSFORM["image_resample"],
        },
        "backbones": {},
        "jobs": {},
    }


def parse_manifest(raw: bytes, where: str) -> dict:
    """Decode and validate manifest bytes; every problem is one StoreError line."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(
            f"store at {where} has an unreadable {MANIFEST} ({exc.msg if hasattr(exc, 'msg') else exc})"
        ) from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise StoreError(f"{where} is not a loftup store ({MANIFEST} has no schema_version)")
    version = manifest["schema_version"]
    if type(version) is not int:
        raise StoreError(
            f"store at {where} has a damaged {MANIFEST}: schema_version is {version!r} "
            f"(a {type(version).__name__}); loftup writes the integer {SCHEMA_VERSION}"
        )
    if version != SCHEMA_VERSION:
        raise StoreError(f"store at {where} has schema version {version}; this loftup reads version {SCHEMA_VERSION}")
    geometry = manifest.get("geometry")
    sizes = geometry.get("sizes") if isinstance(geometry, dict) else None
    if not sizes or not isinstance(sizes, list):
        raise StoreError(f"store at {where} has no geometry sizes in its {MANIFEST}")
    check_geometries(sizes)
    for key in ("backbones", "jobs"):
        entries = manifest.setdefault(key, {})
        bad = (
            f"a {type(entries).__name__}"
            if not isinstance(entries, dict)
            else next((f"{k!r}: a {type(v).__name__}" for k, v in entries.items() if not isinstance(v, dict)), None)
        )
        if bad:
            raise StoreError(
                f"store at {where} has a damaged {MANIFEST}: {key!r} must map names to objects, found {bad}"
            )
    return manifest


def dump_manifest(manifest: dict) -> bytes:
    return (json.dumps(redact(manifest), indent=2, sort_keys=True, default=str) + "\n").encode()


def write_manifest(fs, path: str, manifest: dict) -> None:
    """Atomically replace the manifest file at ``path``."""
    atomic_write(fs, path, dump_manifest(manifest))
