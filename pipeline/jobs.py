"""Pipeline jobs. One job run = one shard = one SA-1B tar (or one shard of the image store).

A job is a small picklable config object. ``run_shard`` does the whole shard in one worker,
streaming: it reads the tar (or the image store) in batches and hands each batch to a store
writer that writes one row group / Zarr shard at a time under temp names and renames the file
into place at the end; the runner writes the marker last. Peak memory therefore depends on the
batch and row-group sizes, never on the number of images in the tar (``memory_bytes`` sizes it).
Per-sample faults become error rows; a broken tar raises ``ShardError`` and fails only that shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from loftup.pipeline.job_options import (
    GEOMETRY_SIZES,
    FeaturesOptions,
    ImagesOptions,
    LiveBackboneOptions,
    MasksOptions,
)
from loftup.storage.errors import LoftupError, StoreError, error_line
from loftup.storage.layout import feature_set, job_key

Progress = Callable[[int, int], None]  # (images done, errors) increments

# Images read from the tar before their rows go to the store writer.
TAR_BATCH = 32
GiB = 1 << 30


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def software_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("loftup", "torch", "timm", "segment-anything", "zarr", "pyarrow", "ray", "pycocotools"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@dataclass
class Job:
    """Base: ``name`` is the status/marker key; ``config()`` decides whether a done shard is stale."""

    name: str = field(init=False, default="")
    num_gpus_wanted: bool = field(init=False, default=False)

    def config(self) -> dict:
        return {"job": self.name, **asdict(self)}

    def upstream(self) -> tuple[str, ...]:
        """Jobs whose outputs this job reads: a shard is stale when any of them was redone."""
        return ()

    def config_hash(self) -> str:
        return config_hash(self.config())

    def check(self, store) -> None:
        """Raise a LoftupError before any work starts if the store cannot take this job."""

    def record(self, manifest: dict) -> dict:
        """Record this job's resolved config in the store manifest (beside the outputs)."""
        manifest.setdefault("jobs", {})[self.name] = {
            "config": self.config(),
            "config_hash": self.config_hash(),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return manifest

    def memory_bytes(self) -> int:
        """Peak host memory one shard task of this job needs, from its settings (Ray's ``memory=``).

        Streaming makes it independent of the tar's size; see the README's per-job figures.
        """
        return 2 * GiB

    def run_shard(self, store, shard: int, tar_path: str | None, progress: Progress) -> dict:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
@dataclass
class MasksJob(Job):
    source: str = MasksOptions.source
    source_options: dict = field(default_factory=dict)
    sizes: tuple[int, ...] = GEOMETRY_SIZES

    def __post_init__(self):
        self.name = "masks"
        self.num_gpus_wanted = self.source == "sam"

    def config(self) -> dict:
        from loftup.pipeline.mask_sources import mask_source_config

        # The resolved source config (defaults included), so a change of defaults redoes shards.
        return {
            "job": self.name,
            "source": mask_source_config(self.source, **self.source_options),
            "sizes": list(self.sizes),
        }

    def check(self, store) -> None:
        _check_sizes(store, self.sizes)
        self.config()  # unknown source or option: one clear error before any work

    def memory_bytes(self) -> int:
        from loftup.storage.masks import MASK_LIMIT_ROWS

        # Measured ~250 MB flat in the tar's size for sa1b (interpreter, pyarrow, pycocotools, a batch
        # of rows in flight), plus the writer's row limit should the tar list images out of id order
        # (~3 KB a mask row with the original RLE and two geometries).
        need = 0.4 * GiB + MASK_LIMIT_ROWS * 3 * 1024 * (1 + len(self.sizes)) / 3
        if self.source == "sam":
            need += 6 * GiB  # checkpoint load + SamAutomaticMaskGenerator's full-size masks
        elif self.source != "sa1b":
            need += 0.5 * GiB
        return int(need)

    def run_shard(self, store, shard, tar_path, progress):
        from loftup.pipeline.mask_sources import add_geometry_rles, create_mask_source, rows_to_table
        from loftup.pipeline.sa1b import decode_jpeg

        source = create_mask_source(self.source, **self.source_options)
        needs_image = self.source != "sa1b"
        rows, errors, n_images, in_batch = [], [], 0, 0
        with store.mask_writer(shard) as writer:
            for item in _tar_samples(tar_path, errors, progress):
                try:
                    image = decode_jpeg(item.jpeg) if needs_image else None
                    if item.ann is None and not needs_image:
                        raise ValueError("no annotation JSON for the sa1b mask source")
                    sample_rows = source.masks_for(image, item.ann, item.image_id)
                    add_geometry_rles(sample_rows, self.sizes)
                except Exception as exc:  # one bad sample never fails the shard
                    _image_failed(errors, progress, item.image_id, item.file_name, "masks", exc)
                    continue
                rows.extend(sample_rows)
                n_images += 1
                in_batch += 1
                progress(1, 0)
                if in_batch >= TAR_BATCH:
                    writer.add(rows_to_table(rows, self.sizes))
                    rows, in_batch = [], 0
            if rows:
                writer.add(rows_to_table(rows, self.sizes))
        store.write_errors(self.name, shard, errors)
        return {"images": n_images, "masks": writer.rows, "errors": len(errors), "bytes": writer.nbytes}


# ---------------------------------------------------------------------------------------------
@dataclass
class ImagesJob(Job):
    sizes: tuple[int, ...] = GEOMETRY_SIZES
    quality: int = ImagesOptions.quality

    def __post_init__(self):
        self.name = "images"

    def check(self, store) -> None:
        _check_sizes(store, self.sizes)

    def memory_bytes(self) -> int:
        from loftup.storage.images import IMAGE_LIMIT_ROWS

        # Measured ~250 MB flat in the tar's size (interpreter, pyarrow, PIL, a 1500 px image decoded
        # and resized), plus the writer's row limit of JPEGs (~0.5 byte a pixel at quality 95) should
        # the tar list images out of id order.
        jpeg_row = sum(0.5 * s * s for s in self.sizes)
        return int(0.4 * GiB + IMAGE_LIMIT_ROWS * jpeg_row)

    def run_shard(self, store, shard, tar_path, progress):
        import pyarrow as pa

        from loftup.pipeline.sa1b import decode_jpeg
        from loftup.storage.geometry import resize_image

        def new_cols() -> dict[str, list]:
            return {f.name: [] for f in store.image_schema}

        def flush(cols) -> None:
            for name in list(cols):
                if name.startswith("jpeg_") and int(name[5:]) not in self.sizes:
                    cols[name] = [None] * len(cols["image_id"])
            writer.add(pa.table(cols, schema=store.image_schema))

        cols, errors = new_cols(), []
        with store.image_writer(shard) as writer:
            for item in _tar_samples(tar_path, errors, progress):
                try:
                    img = decode_jpeg(item.jpeg)
                    encoded = {}
                    for size in self.sizes:
                        buf = io.BytesIO()
                        resize_image(img, size).save(buf, format="JPEG", quality=self.quality)
                        encoded[size] = buf.getvalue()
                except Exception as exc:
                    _image_failed(errors, progress, item.image_id, item.file_name, "decode", exc)
                    continue
                cols["image_id"].append(item.image_id)
                cols["file_name"].append(item.file_name)
                cols["height"].append(img.height)
                cols["width"].append(img.width)
                for size in self.sizes:
                    cols[f"jpeg_{size}"].append(encoded[size])
                progress(1, 0)
                if len(cols["image_id"]) >= TAR_BATCH:
                    flush(cols)
                    cols = new_cols()
            if cols["image_id"]:
                flush(cols)
        store.write_errors(self.name, shard, errors)
        return {"images": writer.rows, "errors": len(errors), "bytes": writer.nbytes}


# ---------------------------------------------------------------------------------------------
@dataclass
class BackboneJob(Job):
    """A job that runs a backbone on the stored images (not the tars); its key is
    ``KIND/backbone@res``."""

    KIND = ""
    backbone: str = LiveBackboneOptions.backbone
    res: int = LiveBackboneOptions.res
    weights: str | None = None
    random_init: bool = False

    def __post_init__(self):
        self.name = job_key(self.KIND, self.backbone, self.res)
        self.num_gpus_wanted = True

    def upstream(self) -> tuple[str, ...]:
        return ("images",)

    def config(self) -> dict:
        # Where the job runs does not change what it stores; the weights' contents do.
        cfg = super().config()
        cfg.pop("device")
        if self.weights:
            cfg["weights_sha256"] = _file_sha256(self.weights)
        return cfg

    def source_size(self, store) -> int:
        return _source_size(store, self.res, f"{self.KIND} at {self.res} needs")


@dataclass
class FeaturesJob(BackboneJob):
    """Low-res VFM features of the stored training images."""

    KIND = "features"
    batch_size: int = FeaturesOptions.batch_size
    device: str = FeaturesOptions.device

    def config(self) -> dict:
        # The batch size does not change the stored values beyond fp16 rounding.
        cfg = super().config()
        cfg.pop("batch_size")
        return cfg

    def check(self, store) -> None:
        info = _patch_checked(self.backbone, self.res)
        self.source_size(store)
        name = feature_set(self.backbone, self.res)
        known = store.manifest.get("backbones", {}).get(name)
        if known and known.get("dim") != info["dim"]:
            raise StoreError(f"store has {name} with dim {known.get('dim')}, backbone gives {info['dim']}")

    def memory_bytes(self) -> int:
        from loftup.pipeline.backbones import backbone_info
        from loftup.storage.features import zarr_shard_images

        info = backbone_info(self.backbone)
        grid = self.res // info["patch"]
        dim, tokens = info["dim"], grid**2
        params = 0.3 * dim**3 * 4  # ViT-S/B/L/g: 22M/86M/304M/1.1B parameters ~ 0.3 dim^3
        # A Zarr shard being written: the fp16 block, its encoded chunks and the assembled shard.
        zarr_shard = 3 * zarr_shard_images(dim, (grid, grid)) * dim * tokens * 2
        # A CPU forward holds ~12 token-sized tensors per block plus one attention matrix per head.
        forward = self.batch_size * (12 * (tokens + 1) * dim + 6 * (tokens + 1) ** 2) * 4
        decoded = 6 * self.batch_size * self.res**2 * 3 * 4  # the decode queue and its float copies
        # 0.9 GiB: interpreter, torch, timm, zarr, pyarrow (measured 1.27 GB in all at 128 images).
        return int(0.9 * GiB + params + zarr_shard + forward + decoded)

    def record(self, manifest: dict) -> dict:
        from loftup.pipeline.backbones import backbone_info

        info = backbone_info(self.backbone)
        grid = self.res // info["patch"]
        manifest.setdefault("backbones", {})[feature_set(self.backbone, self.res)] = {
            **info,
            "res": self.res,
            "grid": [grid, grid],
            "random_init": self.random_init,
            "weights": self.weights,
        }
        return super().record(manifest)

    def run_shard(self, store, shard, tar_path, progress):
        import torch

        from loftup.pipeline.backbones import create_backbone
        from loftup.pipeline.devices import autocast, pick_device

        if store.marker("images", shard) is None:
            raise StoreError(f"shard {shard}: no images in the store yet; run `loftup-pipeline images` first")
        device = pick_device(self.device)
        key = (self.backbone, self.weights, self.random_init, str(device))
        if key not in _BACKBONES:
            # A Ray worker runs many shards: build (and read the weights of) a backbone once per process.
            _BACKBONES.clear()
            _BACKBONES[key] = create_backbone(
                self.backbone, weights=self.weights, random_init=self.random_init, device=device
            )
        model = _BACKBONES[key]
        src = self.source_size(store)
        grid = self.res // model.patch
        n = store.image_count(shard)
        fstore = store.features(self.backbone, self.res)
        info = model.info() | {"res": self.res, "grid": [grid, grid], "source_size": src}
        with fstore.writer(shard, n, model.dim, (grid, grid), info=info) as writer, torch.inference_mode():
            for ids, batch in _image_batches(store, shard, src, self.res, self.batch_size):
                x = torch.from_numpy(batch).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
                with autocast(device):
                    y = model(x)
                writer.add(y.float().cpu().numpy().astype(np.float16), ids)
                progress(len(batch), 0)
        store.write_errors(self.name, shard, [])
        return {"images": n, "errors": 0, "bytes": writer.nbytes, "device": str(device)}


_BACKBONES: dict = {}


def _image_batches(store, shard, src_size, res, batch_size):
    """(image ids, uint8 (B, res, res, 3)) batches of the shard, read from the image store with
    ``iter_batches`` and decoded ahead in a background thread so JPEG decoding overlaps the
    backbone forward; a bounded queue keeps at most a few batches in memory."""
    import queue
    import threading

    from PIL import Image

    q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    def decode():
        try:
            for rb in store.image_batches(shard, ["image_id", f"jpeg_{src_size}"], batch_size):
                out = []
                for blob in rb.column(1).to_pylist():
                    img = Image.open(io.BytesIO(blob)).convert("RGB")
                    if img.size != (res, res):
                        img = img.resize((res, res), Image.BICUBIC)
                    out.append(np.asarray(img))
                if not put((rb.column(0).to_numpy(), np.stack(out))):
                    return
            put(None)
        except BaseException as exc:  # surfaces in the consumer, never a silent hang
            put(exc)

    threading.Thread(target=decode, daemon=True).start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------
def _check_sizes(store, sizes) -> None:
    missing = [s for s in sizes if s not in store.geometries]
    if missing:
        raise StoreError(f"store geometries are {list(store.geometries)}; job asks for {missing}")


def _source_size(store, res: int, needs: str) -> int:
    """The smallest stored image size of at least ``res``; ``needs`` opens the error when there is none."""
    sizes = sorted(store.geometries)
    bigger = [s for s in sizes if s >= res]
    if not bigger:
        raise StoreError(f"{needs} stored images of at least that size; store has {sizes}")
    return bigger[0]


def _patch_checked(backbone: str, res: int) -> dict:
    """The backbone's registry info; a LoftupError when ``res`` is not a whole number of its patches."""
    from loftup.pipeline.backbones import backbone_info

    info = backbone_info(backbone)
    if res % info["patch"]:
        raise LoftupError(f"--res {res} is not a multiple of {backbone}'s patch size {info['patch']}")
    return info


def _tar_samples(tar_path, errors: list[dict], progress: Progress):
    """The usable samples of one tar; each unusable one becomes an error row and an error tick."""
    from loftup.pipeline.sa1b import Sample, iter_samples

    for item in iter_samples(tar_path):
        if isinstance(item, Sample):
            yield item
        else:
            errors.append(item.as_row())
            progress(0, 1)


def _image_failed(
    errors: list[dict], progress: Progress, image_id, member: str | None, stage: str, exc: BaseException
) -> None:
    """Record an image that ``stage`` could not handle; the shard goes on without it."""
    errors.append({"image_id": image_id, "member": member, "stage": stage, "reason": error_line(exc, limit=500)})
    progress(0, 1)


def _file_sha256(path: str) -> str:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        return "missing"
    # Hashing multi-GB weights for every config check would be slow; size+mtime stand in.
    st = p.stat()
    return hashlib.sha256(f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


def upstream_state(job: Job, store, shard: int) -> dict:
    """Identity of the upstream runs of ``shard`` (their markers' config hash and finish time)."""
    out = {}
    for name in job.upstream():
        m = store.marker(name, shard)
        out[name] = None if m is None else f"{m.get('config_hash')}@{m.get('finished_at')}"
    return out


def run_and_time(job: Job, store, shard: int, tar_path: str | None, progress: Progress) -> dict:
    """Run one shard and return the full marker (counts, bytes, seconds, versions, config)."""
    from loftup.pipeline.cluster import where

    t0 = time.time()
    upstream = upstream_state(job, store, shard)
    info = job.run_shard(store, shard, tar_path, progress)
    return {
        "node": where(),
        "job": job.name,
        "shard": shard,
        "config_hash": job.config_hash(),
        "upstream": upstream,
        "config": job.config(),
        "tar": None if tar_path is None else str(tar_path),
        **info,
        "seconds": round(time.time() - t0, 3),
        "versions": software_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
