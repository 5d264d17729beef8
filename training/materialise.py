"""Materialised pseudo-GT, for inspection only: the trainer never reads it (it rebuilds the
target on its device from the stored features and masks, which is far cheaper than storing it).

``PseudoGTJob`` is a pipeline job over store shards (no tar): for each image it takes the
stored low-res features, maps them into the trainer's target space (``layer_norm_target``),
and writes ``pseudo_gt`` (bicubic to the mask geometry, then Eq. 1 with ``alpha``) as float16
to ``STORE/pseudogt/<backbone>@<res>/shard=.../``, plus one PNG per image:
image | masks overlaid | bicubic (PCA) | mask-refined (PCA, same projection).

At 224 x 224 x 384 fp16 one image is ~38 MB, so ``limit`` (first N images of each shard, in
store order) is what keeps a run small. It lives in ``training`` because it needs torch and
the pseudo-GT code; the pipeline package must not import training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loftup.pipeline.job_options import FeaturesOptions, PseudoGTOptions
from loftup.pipeline.jobs import Job
from loftup.storage.commit import is_local, shard_name
from loftup.storage.errors import LoftupError, StoreError
from loftup.storage.layout import feature_set, job_key

__all__ = ["PseudoGTJob", "materialise", "png_shard_dir"]

# FeatureStore.write_shard takes the shard as one in-memory array (one Zarr shard), so a full
# SA-1B tar (~11k images, ~420 GB at 224x224x384 fp16) would die of OOM rather than fail clearly.
MAX_SHARD_BYTES = 16 << 30


@dataclass
class PseudoGTJob(Job):
    """Materialise mask-refined bicubic pseudo-GT of ``backbone@res`` features at ``geometry``.

    ``limit``: at most this many images per shard (first ones in store order; None = all).
    ``png_dir``: where PNGs go (``<png_dir>/shard=000123/<image_id>.png``); by default
    ``<store root>/pseudogt_png/<backbone>@<res>/`` for a local store, required otherwise.
    ``batch_size`` and ``device`` do not change the stored values, so they are not part of the
    config hash; everything else is.
    """

    backbone: str = FeaturesOptions.backbone
    res: int = FeaturesOptions.res
    geometry: int = PseudoGTOptions.geometry
    alpha: float = PseudoGTOptions.alpha
    max_masks: int = PseudoGTOptions.max_masks
    limit: int | None = None
    png: bool = PseudoGTOptions.png
    png_dir: str | None = None
    device: str = PseudoGTOptions.device
    batch_size: int = 8

    def __post_init__(self):
        self.name = job_key("pseudogt", self.backbone, self.res)
        self.num_gpus_wanted = True

    # -- config ----------------------------------------------------------------------------------

    def upstream(self) -> tuple[str, ...]:
        return ("masks", job_key("features", self.backbone, self.res)) + (("images",) if self.png else ())

    def config(self) -> dict:
        cfg = super().config()
        cfg.pop("device")
        cfg.pop("batch_size")
        # Named explicitly so a future change of target space makes old shards stale.
        from loftup.training.target_space import DEFAULT_SPACE

        cfg["target"] = DEFAULT_SPACE
        return cfg

    def check(self, store) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise LoftupError(f"alpha must be in [0, 1], got {self.alpha}")
        if int(self.max_masks) < 0:
            raise LoftupError(f"max_masks must be >= 0, got {self.max_masks}")
        if self.limit is not None and int(self.limit) < 0:
            raise LoftupError(f"limit must be >= 0 or unset, got {self.limit}")
        if int(self.batch_size) < 1:
            raise LoftupError(f"batch_size must be >= 1, got {self.batch_size}")
        if int(self.geometry) not in store.geometries:
            raise StoreError(
                f"no masks at geometry {self.geometry} in this store; its geometries are {list(store.geometries)}"
            )
        if self.png and self.png_dir is None and not is_local(store.fs):
            raise LoftupError(f"store {store.url} is not local: give --png-dir (a local directory) or --no-png")
        # The group records one grid for all its shards (FeatureStore.set_info refuses a second).
        grid = store.pseudogt(self.backbone, self.res).info.get("grid")
        if grid and list(grid) != [int(self.geometry)] * 2:
            raise StoreError(
                f"{self.name} already holds pseudo-GT at {grid[0]}x{grid[1]}; remove "
                f"{store.path('pseudogt', feature_set(self.backbone, self.res))} to materialise it at {self.geometry}"
            )

    # -- work ------------------------------------------------------------------------------------
    def _inputs(self, store, shard: int) -> tuple[dict, dict]:
        """The shard's features and masks markers, or one StoreError naming what to run."""
        feats_job = job_key("features", self.backbone, self.res)
        feats_marker = store.marker(feats_job, shard)
        masks_marker = store.marker("masks", shard)
        missing = []
        if feats_marker is None:
            missing.append(
                f"no {feats_job} (run `loftup-pipeline features --shards {shard} "
                f"--backbone {self.backbone} --res {self.res} --store ...`)"
            )
        if masks_marker is None:
            missing.append(f"no masks (run `loftup-pipeline masks --shards {shard} --store ...`)")
        if missing:
            raise StoreError(f"shard {shard}: " + "; ".join(missing))
        sizes = (masks_marker.get("config") or {}).get("sizes")
        if sizes is not None and int(self.geometry) not in [int(s) for s in sizes]:
            raise StoreError(
                f"shard {shard}: masks were stored at sizes {list(sizes)}, not {self.geometry}; "
                f"rerun `loftup-pipeline masks --shards {shard} --sizes ...` including {self.geometry}"
            )
        if self.png and store.marker("images", shard) is None:
            raise StoreError(
                f"shard {shard}: PNGs need the stored images; run `loftup-pipeline images` or pass --no-png"
            )
        return feats_marker, masks_marker

    def png_shard_dir(self, store, shard: int) -> Path:
        return png_shard_dir(store, self.backbone, self.res, shard, self.png_dir)

    def run_shard(self, store, shard, tar_path, progress):
        import torch

        from loftup.pipeline.devices import pick_device
        from loftup.training.pseudo_gt import masks_from_rles, pseudo_gt
        from loftup.training.target_space import DEFAULT_SPACE, layer_norm_target

        feats_marker, masks_marker = self._inputs(store, shard)
        device = pick_device(self.device)
        features = store.features(self.backbone, self.res)
        ids = features.shard_image_ids(shard)
        if self.limit is not None:
            ids = ids[: int(self.limit)]
        size = int(self.geometry)
        dim = features.dim
        need = len(ids) * dim * size * size * 2
        if need > MAX_SHARD_BYTES:
            raise LoftupError(
                f"shard {shard}: {len(ids)} images of pseudo-GT need {need / 2**30:.0f} GiB in memory "
                f"(limit {MAX_SHARD_BYTES / 2**30:.0f} GiB); pass --limit N to materialise a sample"
            )
        # Filled in place: a concatenation of batches would hold the shard twice.
        out = np.empty((len(ids), dim, size, size), np.float16)

        png_dir = None
        if self.png:
            png_dir = self.png_shard_dir(store, shard)
            png_dir.mkdir(parents=True, exist_ok=True)
            # A previous run with a larger limit would otherwise leave PNGs of images not stored now.
            for stale in png_dir.glob("*.png"):
                stale.unlink()

        n_masks = no_masks = pngs = 0
        compute_s = 0.0
        with torch.inference_mode():
            for start in range(0, len(ids), int(self.batch_size)):
                batch_ids = ids[start : start + int(self.batch_size)]
                lr = torch.from_numpy(features.get_many(batch_ids)).to(device).float()
                rles = store.masks_for_many(batch_ids, size)
                masks, valid = masks_from_rles(rles, size, self.max_masks)
                masks, valid = masks.to(device), valid.to(device)
                _sync(device)
                t0 = time.perf_counter()
                target = layer_norm_target(lr)
                refined = pseudo_gt(target, masks, valid, size, alpha=float(self.alpha))
                _sync(device)
                compute_s += time.perf_counter() - t0
                out[start : start + len(batch_ids)] = refined.to(torch.float16).cpu().numpy()
                counts = valid.sum(dim=1).cpu()
                n_masks += int(counts.sum())
                no_masks += int((counts == 0).sum())
                if png_dir is not None:
                    for k, image_id in enumerate(batch_ids.tolist()):
                        write_png(
                            png_dir / f"{image_id}.png",
                            image=np.asarray(store.image(image_id, size)),
                            masks=masks[k][valid[k]].cpu().numpy(),
                            target=target[k],
                            refined=refined[k],
                            image_id=image_id,
                            alpha=float(self.alpha),
                        )
                        pngs += 1
                progress(len(batch_ids), 0)

        info = {
            "backbone": self.backbone,
            "res": int(self.res),
            "geometry": size,
            "target": DEFAULT_SPACE,
            "upsampling": "bicubic, align_corners=False",
            "refinement": "LoftUp Eq. 1, sequential in annotation order",
        }
        nbytes = store.pseudogt(self.backbone, self.res).write_shard(shard, out, np.asarray(ids, np.int64), info=info)
        store.write_errors(self.name, shard, [])
        return {
            "images": len(ids),
            "errors": 0,
            "bytes": nbytes,
            "masks": n_masks,
            "images_without_masks": no_masks,
            "pngs": pngs,
            "png_dir": None if png_dir is None else str(png_dir),
            "device": str(device),
            "pseudogt_seconds": round(compute_s, 4),
            "pseudogt_seconds_per_image": round(compute_s / len(ids), 5) if len(ids) else None,
            # Provenance: which upstream runs these values were built from.
            "features_config_hash": feats_marker.get("config_hash"),
            "masks_config_hash": masks_marker.get("config_hash"),
        }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def png_shard_dir(store, backbone: str, res: int, shard: int, png_dir: str | None = None) -> Path:
    """Directory of one shard's PNGs: ``<png_dir>/shard=000123`` or, for a local store without
    ``png_dir``, ``<store root>/pseudogt_png/<backbone>@<res>/shard=000123``."""
    if png_dir is not None:
        return Path(png_dir) / shard_name(shard)
    if not is_local(store.fs):
        raise LoftupError(f"store {store.url} is not local: PNGs need an explicit local png_dir")
    return Path(store.root) / "pseudogt_png" / feature_set(backbone, res) / shard_name(shard)


def write_png(path, image, masks, target, refined, image_id: int, alpha: float) -> Path:
    """One inspection panel: image | masks overlaid | bicubic | mask-refined.

    ``target`` is the low-res target-space map (C, h, w); its bicubic upsampling is the
    refinement's starting point. One PCA, fitted on the refined map, colours both maps, so a
    colour means the same feature direction in the two panels.
    """
    from loftup.pictures import overlay_masks, pca_rgb, save_panels
    from loftup.training.pseudo_gt import bicubic_upsample

    size = refined.shape[-2:]
    bicubic = bicubic_upsample(target[None].float(), size)[0]
    bicubic_rgb, refined_rgb = pca_rgb([bicubic, refined.float()], fit_on=1)
    panels = [image, overlay_masks(image, masks), bicubic_rgb, refined_rgb]
    titles = [f"image {image_id}", f"{len(masks)} masks", "bicubic", f"mask-refined a={alpha:g}"]
    return save_panels(panels, titles, path)


def materialise(store, shards, *, executor: str = "inline", overwrite: bool = False, **job_kwargs):
    """Run :class:`PseudoGTJob` (``job_kwargs``) over ``shards`` of ``store``.

    ``store``: a Store, a path or a URL; ``shards``: shard numbers or a spec such as ``"0-3,7"``.
    Returns the runner's ``RunSummary`` (done shards' markers, skipped and failed shards).
    """
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import parse_shards
    from loftup.storage import open_store

    if not hasattr(store, "marker"):
        store = open_store(store)
    if isinstance(shards, str):
        shards = parse_shards(shards)
    elif isinstance(shards, int):
        shards = [shards]
    job = PseudoGTJob(**job_kwargs)
    return run_job(job, store, [(int(s), None) for s in shards], executor=executor, overwrite=overwrite)
