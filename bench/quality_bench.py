"""Held-out quality on real data: Stage 1 (along its run), Stage 2 and bilinear/bicubic, side by side.

Photo-disjoint split of the sample shards: 8 training tars of augmented crops of 14 photos, and
a held-out tar of 16 crops of the Pascal VOC and ARC2017 photos, scored against their real
instance masks by nearest-prototype mIoU (training/evaluation/masks.py). A real pretrained backbone
(hed_vgg16), features in a 64-channel PCA. Stage 1 is scored at its training size and at 112,
at every --eval-every steps of one run (resumed exactly between scores).

    python bench/quality_bench.py [--stage1-steps 600 --eval-every 100 --stage2-steps 30 --size 56]

On this 2-core CPU a step costs about a third of a second at 56 px, so a few hundred steps are
all a test can afford; the paper trains 125k steps at batch 8 on GPUs.
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
    ap.add_argument("--pca-dim", type=int, default=64)
    ap.add_argument("--size", type=int, default=56, help="Stage 1 training size")
    ap.add_argument("--stage1-steps", type=int, default=600)
    ap.add_argument("--stage2-steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-schedule", default="cosine")
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--bn-recalibrate", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.sample_data import photo_names, write_sample_shards
    from loftup.pipeline.shards import resolve_shards
    from loftup.storage import open_store
    from loftup.training.evaluation import MasksProtocol, baseline, evaluate, resolve_checkpoint
    from loftup.training.stage1 import Stage1Config
    from loftup.training.stage1 import train as train1
    from loftup.training.stage2 import Stage2Config
    from loftup.training.stage2 import train as train2

    console = Console()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-quality-"))
    store_path = work / "store"
    held_photos, train_tars = ("voc", "arc2017"), 8
    if not store_path.exists():
        write_sample_shards(work / "sa1b", tars=train_tars, images_per_tar=args.images_per_tar, seed=0,
                            photos=[p for p in photo_names() if p not in held_photos])
        write_sample_shards(work / "sa1b", tars=1, images_per_tar=16, seed=0, first_shard=train_tars, photos=held_photos)
        store = open_store(store_path, create=True)
        shards = resolve_shards(f"0-{train_tars}", work / "sa1b")
        for job in (ImagesJob(), MasksJob()):
            run_job(job, store, shards, executor="inline")
        run_job(FeaturesJob(backbone=args.backbone, batch_size=16), store, [(s, None) for s, _ in shards], executor="inline")
    store = open_store(store_path)
    held_out = store.image_ids(train_tars)
    train_shards = list(range(train_tars))

    def score(path, size):
        from dataclasses import replace

        ck = replace(resolve_checkpoint(path), name="loftup")
        ups = [replace(baseline(n), projection=ck.projection) for n in ("bilinear", "bicubic")] + [ck]
        res = evaluate("masks", ups, protocol=MasksProtocol(size=size), store=store, image_ids=held_out,
                       backbone=args.backbone, progress=False)
        return {u.name: res[u.name]["prototype_miou"] for u in ups}

    rows = []
    run1 = work / "run1"
    steps = list(range(args.eval_every, args.stage1_steps + 1, args.eval_every)) or [args.stage1_steps]
    for i, n in enumerate(steps):
        t = time.time()
        train1(Stage1Config(store=str(store_path), out=str(run1), backbone=args.backbone, shards=train_shards,
                            pca_dim=args.pca_dim, size=args.size, max_masks=60, batch_size=4, max_steps=n, lr=args.lr,
                            lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, decay_steps=args.stage1_steps,
                            bn_recalibrate=args.bn_recalibrate, seed=args.seed, workers=0, progress=False, log_every=10,
                            device="cpu", resume=i > 0))
        seconds = time.time() - t
        for size in (args.size, 112):
            rows.append((f"stage 1, {n} steps", size, score(run1 / "stage1.safetensors", size), seconds))
            console.print(rows[-1])
    if args.stage2_steps:
        t = time.time()
        train2(Stage2Config(init=str(run1 / "stage1.safetensors"), store=str(store_path), out=str(work / "run2"),
                            backbone=args.backbone, shards=train_shards, hr=448, sizes=[112, 160], max_masks=60,
                            batch_size=2, max_steps=args.stage2_steps, lr=1e-4, ema_every=5, workers=0, progress=False,
                            log_every=5, device="cpu"))
        seconds = time.time() - t
        for size in (args.size, 112):
            rows.append((f"stage 2, +{args.stage2_steps} steps", size, score(work / "run2" / "stage2.safetensors", size), seconds))

    table = Table(title=f"held-out prototype mIoU ({len(held_out)} crops of unseen photos {', '.join(held_photos)}; "
                        f"{args.backbone}, PCA {args.pca_dim}, seed {args.seed})")
    for col in ("run", "scored at", "loftup", "bilinear", "bicubic", "loftup - bilinear", "train seconds"):
        table.add_column(col, justify="right")
    for name, size, s, sec in rows:
        table.add_row(name, f"{size} px", f"{s['loftup']:.4f}", f"{s['bilinear']:.4f}", f"{s['bicubic']:.4f}",
                      f"{s['loftup'] - s['bilinear']:+.4f}", f"{sec:.0f}")
    console.print(table)
    (work / "quality.json").write_text(json.dumps([(n, z, s) for n, z, s, _ in rows], indent=1))


if __name__ == "__main__":
    main()
