"""Held-out quality on real data: Stage 1, Stage 2 and bilinear/bicubic, side by side.

Real photos and masks (sample shards: VOC/ARC2017 instance masks, scikit-image segments for
the other photos), a real pretrained backbone (hed_vgg16), train on shards 0-1, evaluate on
shard 2 by nearest-prototype mIoU against the held-out images' masks (training/evaluate.py).

    python bench/quality_bench.py [--stage1-steps 200 --stage2-steps 50 --pca-dim 32 --size 112]

On this 2-core CPU a step costs seconds, so a few hundred steps are all a run can afford;
the paper trains 125k steps at batch 8 on GPUs. See the README's results for what it shows.
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
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--images-per-tar", type=int, default=16)
    ap.add_argument("--backbone", default="hed_vgg16")
    ap.add_argument("--pca-dim", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--stage1-steps", type=int, default=200)
    ap.add_argument("--stage2-steps", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.sample_data import write_sample_shards
    from loftup.pipeline.shards import resolve_shards
    from loftup.storage import open_store
    from loftup.training.checkpoint import load_model
    from loftup.training.evaluate import evaluate_store, standard_upsamplers
    from loftup.training.stage1 import Stage1Config
    from loftup.training.stage1 import train as train1
    from loftup.training.stage2 import Stage2Config
    from loftup.training.stage2 import train as train2

    console = Console()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-quality-"))
    store_path = work / "store"
    if not store_path.exists():
        write_sample_shards(work / "sa1b", tars=3, images_per_tar=args.images_per_tar, short_side=1500, seed=0)
        store = open_store(store_path, create=True)
        shards = resolve_shards("0-2", work / "sa1b")
        for job in (ImagesJob(), MasksJob()):
            run_job(job, store, shards, executor="inline")
        run_job(FeaturesJob(backbone=args.backbone, batch_size=16), store, [(s, None) for s, _ in shards], executor="inline")
    store = open_store(store_path)
    held_out = store.image_ids(2)

    def score(path):
        model, meta = load_model(path, with_meta=True)
        ups = standard_upsamplers()
        ups["loftup"] = lambda f, img, size: model(f, img, output_size=size)
        return evaluate_store(store, held_out, args.backbone, 224, ups, size=args.size, projection=meta["projection_module"])

    rows = []
    run1 = work / "run1"
    steps = list(range(args.eval_every, args.stage1_steps + 1, args.eval_every)) or [args.stage1_steps]
    for i, n in enumerate(steps):
        t = time.time()
        train1(Stage1Config(store=str(store_path), out=str(run1), backbone=args.backbone, shards=[0, 1], pca_dim=args.pca_dim,
                            size=args.size, max_masks=60, batch_size=4, max_steps=n, lr=args.lr, workers=1, progress=False,
                            log_every=10, device="cpu", resume=i > 0))
        s = score(run1 / "stage1.safetensors")
        rows.append((f"stage 1, {n} steps", s, time.time() - t))
        console.print(rows[-1])
    if args.stage2_steps:
        t = time.time()
        train2(Stage2Config(init=str(run1 / "stage1.safetensors"), store=str(store_path), out=str(work / "run2"),
                            backbone=args.backbone, shards=[0, 1], hr=448, sizes=[args.size, args.size + 48], max_masks=60,
                            batch_size=2, max_steps=args.stage2_steps, lr=1e-4, ema_every=5, workers=1, progress=False,
                            log_every=5, device="cpu"))
        rows.append((f"stage 2, {args.stage2_steps} steps", score(work / "run2" / "stage2.safetensors"), time.time() - t))

    table = Table(title=f"held-out prototype mIoU ({len(held_out)} images, {args.size}px, {args.backbone}, PCA {args.pca_dim})")
    for col in ("run", "loftup", "bilinear", "bicubic", "loftup - bilinear", "seconds"):
        table.add_column(col, justify="right")
    for name, s, sec in rows:
        table.add_row(name, f"{s['loftup']:.4f}", f"{s['bilinear']:.4f}", f"{s['bicubic']:.4f}", f"{s['loftup'] - s['bilinear']:+.4f}", f"{sec:.0f}")
    console.print(table)
    (work / "quality.json").write_text(json.dumps([(n, s) for n, s, _ in rows], indent=1))


if __name__ == "__main__":
    main()
