"""Pipeline throughput on sample shards with 1500 px images, side by side with its baselines.

- features job (images/s) vs the bare backbone forward over the same images in the same run:
  the difference is the pipeline's overhead (decode, batching, fp16, Zarr write, marker).
- sa1b masks job: images/s per core (RLE parse + re-encode into 224 and 896, Parquet write).

    python bench/pipeline_bench.py [--tars 2 --images-per-tar 64 --backbone dinov2_vits14]

A real tar holds ~11k images, so per-shard fixed costs (worker start, model build, Zarr write)
weigh far less there than in this small run.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tars", type=int, default=2)
    ap.add_argument("--images-per-tar", type=int, default=64)
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image
    from rich.console import Console
    from rich.table import Table

    from loftup.pipeline.backbones import create_backbone
    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.sample_data import write_sample_shards
    from loftup.storage import open_store

    console = Console()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-bench-"))
    spec = f"0-{args.tars - 1}"
    t0 = time.time()
    write_sample_shards(work / "sa1b", tars=args.tars, images_per_tar=args.images_per_tar, short_side=1500)
    console.print(f"sample shards: {args.tars} x {args.images_per_tar} images at 1500 px in {time.time() - t0:.1f} s")
    shards = resolve_shards(spec, work / "sa1b")
    store = open_store(work / "store", create=True)
    n_images = args.tars * args.images_per_tar
    rows = []

    def run(*a, **kw):
        summary = run_job(*a, **kw)
        if summary.failed:
            raise SystemExit(f"bench run failed: {summary.failed}")
        return summary

    # masks (sa1b source), one process = one core
    s = run(MasksJob(), store, shards, executor="inline")
    rows.append(
        (
            "masks job (sa1b), inline, 1 core",
            n_images / s.seconds,
            f"{n_images / s.seconds:.2f} img/s/core",
            "goal >= 2 img/s/core",
        )
    )
    s = run(ImagesJob(), store, shards, executor="inline")
    rows.append(
        (
            "images job (224+896 JPEG), inline, 1 core",
            n_images / s.seconds,
            f"{n_images / s.seconds:.2f} img/s/core",
            "",
        )
    )

    # features: the job versus the bare forward over the same stored images
    model = create_backbone(args.backbone, random_init=True)
    ids = store.image_ids(0).tolist() + (store.image_ids(1).tolist() if args.tars > 1 else [])
    imgs = [np.asarray(Image.open(io.BytesIO(store.image_bytes(i, 224))).convert("RGB")) for i in ids]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255)
    with torch.inference_mode():
        model(x[:2])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            model(x[i : i + args.batch_size])
        bare = time.perf_counter() - t
    bare_rate = len(x) / bare
    job = FeaturesJob(backbone=args.backbone, random_init=True, batch_size=args.batch_size)
    fshards = [(i, None) for i, _ in shards]
    s = run(job, store, fshards, executor="inline", overwrite=True)
    inline_rate = n_images / s.seconds
    s = run(job, store, fshards, executor="ray", num_cpus=os.cpu_count(), cpus_per_task=os.cpu_count(), overwrite=True)
    ray_rate = n_images / s.seconds
    import ray

    # The first Ray run pays for starting the local instance; a second run shows the steady state.
    s = run(job, store, fshards, executor="ray", cpus_per_task=os.cpu_count(), overwrite=True)
    ray_warm = n_images / s.seconds
    ray.shutdown()
    rows.append((f"bare {args.backbone} forward (baseline)", bare_rate, f"{bare_rate:.2f} img/s", ""))
    rows.append(
        (
            "features job, inline",
            inline_rate,
            f"{inline_rate:.2f} img/s",
            f"overhead {100 * (bare_rate / inline_rate - 1):+.1f}%",
        )
    )
    rows.append(
        (
            "features job, Ray (incl. Ray start)",
            ray_rate,
            f"{ray_rate:.2f} img/s",
            f"overhead {100 * (bare_rate / ray_rate - 1):+.1f}%",
        )
    )
    rows.append(
        (
            "features job, Ray (warm)",
            ray_warm,
            f"{ray_warm:.2f} img/s",
            f"overhead {100 * (bare_rate / ray_warm - 1):+.1f}% (goal < 15%)",
        )
    )

    table = Table(
        title=f"pipeline bench: {n_images} images, 1500 px, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    for col in ("what", "rate", "vs baseline"):
        table.add_column(col)
    for what, _, rate, note in rows:
        table.add_row(what, rate, note)
    console.print(table)


if __name__ == "__main__":
    main()
