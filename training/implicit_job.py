"""``implicit/<backbone>@<res>``: the per-image optimisation baseline as a pipeline job.

One shard = one task, like every job: for each stored image (at the backbone's input size) it
runs :func:`loftup.training.implicit.fit_image` with the live backbone, keeps the network and
its un-projector (compact) and, with ``dense``, the rendered full-resolution map; the runner
writes the marker last. A failing image becomes an error row and the shard goes on.

It lives in ``training`` (like ``PseudoGTJob``) because it needs the optimiser; the pipeline
package does not import training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from loftup.pipeline.job_options import ImplicitOptions
from loftup.pipeline.jobs import BackboneJob, _image_failed, _patch_checked
from loftup.storage.errors import LoftupError, StoreError

# FeatureStore.write_shard takes the dense maps as one in-memory array.
MAX_DENSE_BYTES = 16 << 30


@dataclass
class ImplicitJob(BackboneJob):
    KIND = "implicit"
    images_per_shard: int | None = None  # first N images of each shard, in store order
    dense: bool = ImplicitOptions.dense
    recipe: dict = field(default_factory=dict)  # ImplicitConfig overrides (steps, views, ...)
    device: str = ImplicitOptions.device

    def resolved_recipe(self) -> dict:
        from loftup.training.implicit import ImplicitConfig

        cfg = ImplicitConfig()
        unknown = sorted(set(self.recipe) - set(asdict(cfg)))
        if unknown:
            raise LoftupError(f"unknown implicit recipe field(s): {', '.join(unknown)}")
        return asdict(ImplicitConfig(**{**asdict(cfg), **self.recipe}))

    def config(self) -> dict:
        return {**super().config(), "recipe": self.resolved_recipe()}

    def check(self, store) -> None:
        _patch_checked(self.backbone, self.res)
        recipe = self.resolved_recipe()
        for key in ("steps", "views", "views_per_step", "pca_views"):
            if int(recipe[key]) < (0 if key == "steps" else 1):
                raise LoftupError(
                    f"implicit recipe: {key} must be {'>= 0' if key == 'steps' else '>= 1'}, got {recipe[key]}"
                )
        if recipe["kernel_size"] > self.res:
            raise LoftupError(f"implicit recipe: kernel_size {recipe['kernel_size']} exceeds the input size {self.res}")
        if self.images_per_shard is not None and int(self.images_per_shard) < 0:
            raise LoftupError(f"--images-per-shard must be >= 0, got {self.images_per_shard}")
        if self.dense and self.images_per_shard is None:
            raise LoftupError(
                "--dense keeps ~37 MB per image in memory until the shard is written: give --images-per-shard"
            )
        self.source_size(store)

    def memory_bytes(self) -> int:
        """Backbone and views, plus FeatUp's downsampler, which unfolds every view's HR map into
        kernel x kernel windows (about 1 GB per step at 224 with 10 views), and the dense maps."""
        from loftup.pipeline.backbones import backbone_info

        GiB = 1 << 30
        r = self.resolved_recipe()
        info = backbone_info(self.backbone)
        grid = self.res // info["patch"]
        views = r["views"] * r["proj_dim"] * grid * grid * 4
        unfold = r["views_per_step"] * (r["proj_dim"] + 1) * r["kernel_size"] ** 2 * grid * grid * 4
        dense = (self.images_per_shard or 0) * info["dim"] * self.res**2 * 2 if self.dense else 0
        return int(2 * GiB + views + 4 * unfold + dense)

    def run_shard(self, store, shard, tar_path, progress):
        import torch

        from loftup.pipeline.backbones import create_backbone
        from loftup.pipeline.devices import pick_device
        from loftup.pipeline.jobs import _image_batches
        from loftup.storage.implicit import implicit_store
        from loftup.training.implicit import ImplicitConfig, fit_image, render, to_compact

        if store.marker("images", shard) is None:
            raise StoreError(f"shard {shard}: no images in the store yet; run `loftup-pipeline images` first")
        device = pick_device(self.device)
        cfg = ImplicitConfig(**self.resolved_recipe())
        backbone = create_backbone(self.backbone, weights=self.weights, random_init=self.random_init, device=device)
        n_stored = store.image_count(shard)
        limit = n_stored if self.images_per_shard is None else min(n_stored, int(self.images_per_shard))
        grid = self.res // backbone.patch
        need = limit * backbone.dim * self.res * self.res * 2
        if self.dense and need > MAX_DENSE_BYTES:
            raise LoftupError(
                f"shard {shard}: {limit} dense maps need {need / 2**30:.0f} GiB in memory; pass --images-per-shard"
            )
        rows, dense, errors = [], [], []
        totals = {"featurize": 0.0, "optimise": 0.0, "render": 0.0, "views": 0, "steps": 0}
        for k, (ids, batch) in enumerate(_image_batches(store, shard, self.source_size(store), self.res, 1)):
            if k >= limit:
                break
            image_id = int(ids[0])
            try:
                image01 = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255)
                t0 = time.perf_counter()
                fit = fit_image(image01, backbone, cfg, image_id=image_id, device=device)
                if not np.isfinite(fit.losses[-1] if fit.losses else 0.0):
                    raise FloatingPointError(f"loss is {fit.losses[-1]} after {len(fit.losses)} steps")
                blob = to_compact(
                    fit.network,
                    fit.unprojector,
                    cfg,
                    extra={"image_id": image_id, "backbone": self.backbone, "res": self.res, "grid": [grid, grid]},
                )
                t1 = time.perf_counter()
                if self.dense:
                    dense.append(render(fit.network, fit.unprojector, image01).to(torch.float16).cpu().numpy())
                totals["render"] += time.perf_counter() - t1
            except Exception as exc:  # one bad image never fails the shard
                _image_failed(errors, progress, image_id, None, "implicit", exc)
                continue
            totals["featurize"] += fit.featurize_seconds
            totals["optimise"] += fit.optimise_seconds
            totals["views"] += cfg.views
            totals["steps"] += cfg.steps
            rows.append(
                {
                    "image_id": image_id,
                    "blob": blob,
                    "seconds": t1 - t0,
                    "featurize_seconds": fit.featurize_seconds,
                    "optimise_seconds": fit.optimise_seconds,
                    "views": cfg.views,
                    "steps": cfg.steps,
                    "loss_first": fit.losses[0] if fit.losses else None,
                    "loss_last": fit.losses[-1] if fit.losses else None,
                }
            )
            progress(1, 0)
        info = {
            "backbone": self.backbone,
            "res": self.res,
            "what": "per-image-optimised HR features (FeatUp implicit)",
            "space": "channel LayerNorm of the backbone features" if cfg.channel_norm else "backbone features",
        }
        sizes = implicit_store(store, self.backbone, self.res).write_shard(
            shard, rows, np.stack(dense) if self.dense and dense else None, info=info
        )
        store.write_errors(self.name, shard, errors)
        n = len(rows)
        fit_seconds = totals["featurize"] + totals["optimise"]
        default = ImplicitConfig()
        return {
            "images": n,
            "errors": len(errors),
            "bytes": sizes["compact_bytes"] + sizes["dense_bytes"],
            "compact_bytes": sizes["compact_bytes"],
            "dense_bytes": sizes["dense_bytes"],
            "dense_images": n if self.dense else 0,
            "fit_seconds": round(fit_seconds, 4),
            "seconds_per_image": round(fit_seconds / n, 4) if n else None,
            "featurize_seconds": round(totals["featurize"], 4),
            "optimise_seconds": round(totals["optimise"], 4),
            "render_seconds": round(totals["render"], 4),
            "views_total": totals["views"],
            "steps_total": totals["steps"],
            "recipe": cfg.resolved(),
            # FeatUp's recipe counts, so a reduced run can be extrapolated from its measured rates.
            "full_recipe": {"views": default.views, "steps": default.steps},
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        }


def _cpu_name() -> str:
    import os
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"
