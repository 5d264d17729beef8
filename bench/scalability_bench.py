"""Scalability: per-image optimisation (FeatUp's implicit recipe) vs one-pass pseudo-GT, on the
same sample shards, the same machine and the real ``hed_vgg16`` backbone, in one run.

    python bench/scalability_bench.py [--tars 2 --images-per-tar 4 --steps 8 --views 32
                                       --timing-steps 100 --timing-views 128 --out runs/scalability]

1. images + masks (SA-1B annotations, 224 and 896) + hed_vgg16 features, the pipeline jobs;
2. ``pseudogt`` on every image: it measures the pseudo-GT build time on the device;
3. ``implicit`` on every image of shard 0 with a reduced recipe (``--steps``, ``--views``, dense maps
   kept), and on one image of the last shard with ``--timing-steps`` of FeatUp's 1200 steps and
   ``--timing-views`` of its 3000 views at its full per-step size (10 views of 224 x 224, 128-d);
4. ``loftup-store report``: FeatUp's full recipe per image is extrapolated from the measured
   seconds per view and per step (every optimisation step costs the same, so 1200 steps cost
   1200 x the measured mean), and set against the measured one-pass seconds per image.

Prints the report table, the ratio of per-image optimisation to one-pass time per image and of
dense per-image bytes to stored factors, and writes ``<out>/report.json`` and ``<out>/report.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tars", type=int, default=2)
    ap.add_argument("--images-per-tar", type=int, default=4)
    ap.add_argument("--backbone", default="hed_vgg16")
    ap.add_argument("--steps", type=int, default=8, help="reduced steps for the images of shard 0")
    ap.add_argument("--views", type=int, default=32, help="reduced views for the images of shard 0")
    ap.add_argument(
        "--timing-steps", type=int, default=100, help="steps timed at full size on one image of the last shard"
    )
    ap.add_argument("--timing-views", type=int, default=128, help="views featurised for that image")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="runs/scalability")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.sample_data import write_sample_shards
    from loftup.storage import open_store
    from loftup.storage.report import human_bytes, human_seconds, report_rows, scalability_report, write_png
    from loftup.training.implicit_job import ImplicitJob
    from loftup.training.materialise import PseudoGTJob

    torch.set_num_threads(args.threads)
    console = Console()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-scal-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    write_sample_shards(work / "sa1b", tars=args.tars, images_per_tar=args.images_per_tar, short_side=1500)
    shards = resolve_shards(f"0-{args.tars - 1}", work / "sa1b")
    store = open_store(work / "store", create=True)
    last = args.tars - 1

    def run(job, shard_list, what):
        t = time.time()
        s = run_job(job, store, shard_list, executor="inline")
        if s.failed:
            raise SystemExit(f"bench: {what} failed: {s.failed}")
        console.print(f"{what}: {s.images} images in {time.time() - t:.1f} s")
        return s

    run(ImagesJob(), shards, "images")
    run(MasksJob(), shards, "masks (sa1b)")
    plain = [(s, None) for s, _ in shards]
    run(FeaturesJob(backbone=args.backbone, batch_size=8), plain, f"features ({args.backbone})")
    run(PseudoGTJob(backbone=args.backbone, png=False), plain, "pseudogt")
    reduced = {"steps": args.steps, "views": args.views, "pca_views": min(50, args.views)}
    run(
        ImplicitJob(backbone=args.backbone, dense=True, images_per_shard=args.images_per_tar, recipe=reduced),
        [(0, None)],
        f"implicit, reduced recipe ({args.views} views, {args.steps} steps), dense",
    )
    timing = {"steps": args.timing_steps, "views": args.timing_views, "pca_views": min(50, args.timing_views)}
    if last > 0:
        run(
            ImplicitJob(backbone=args.backbone, images_per_shard=1, recipe=timing),
            [(last, None)],
            f"implicit, timing run ({args.timing_views} views, {args.timing_steps} of 1200 steps)",
        )

    rep = scalability_report(store, backbone=args.backbone)
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    write_png(rep, out / "report.png")
    table = Table(title=f"scalability, {args.backbone}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for col in ("", "one-pass pseudo-GT", "per-image optimisation", "paper (A100)"):
        table.add_column(col)
    for row in report_rows(rep):
        table.add_row(*row)
    console.print(table)
    one, per, ratios = rep["one_pass"], rep["per_image_optimisation"], rep["ratios"]
    console.print(f"per-image optimisation: {human_seconds(per['seconds_per_image'])}/image ({per['seconds_basis']})")
    console.print(f"one-pass pseudo-GT:     {human_seconds(one['seconds_per_image'])}/image (measured)")
    console.print(
        f"[bold]time ratio per-image / one-pass: x{ratios['seconds']:.0f}[/bold] (goal >= 1000 on this CPU; paper ~540 on an A100)"
    )
    console.print(
        f"[bold]bytes ratio dense per-image / stored factors: x{ratios['bytes_dense']:.0f} (fp16 Zarr), "
        f"x{ratios['bytes_dense_fp32']:.0f} (fp32 raw)[/bold] (goal >= 150); compact per-image "
        f"{human_bytes(per['bytes_per_image'])} vs factors {human_bytes(one['bytes_per_image'])}"
    )
    console.print(
        f"wrote {out / 'report.json'} and {out / 'report.png'}; store {work / 'store'}; "
        f"bench {time.time() - t_all:.0f} s; load average {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
