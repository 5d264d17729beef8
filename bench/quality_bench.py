"""Held-out quality of Stage 1 and Stage 1 + Stage 2 against bilinear, for both recipes and several seeds.

Photo-disjoint split of the sample shards: 8 training tars of augmented crops of 14 photos, and a
held-out tar of 16 crops of the Pascal VOC and ARC2017 photos (real instance masks), never seen
in training. A real pretrained backbone (hed_vgg16), features in a 64-channel PCA. Per held-out
image and upsampler (training/evaluation/masks.py's prototype mIoU; training/inference.py's retention):

  mIoU@S, mIoU@2S   nearest-prototype mIoU against the instance masks, at the training size S and 2S
  MSE               mean squared error to the image's pseudo-GT (Eq. 1, alpha 0.8) at S
  ret@S, ret@4S     retention: the upsampled map average-pooled onto the low-res grid, mean cosine
                    with the low-res features (same space); bilinear keeps about 0.95

The CPU-scale recipe (README results) for both recipes: Stage 1 at 56 px, batch 4, 300 steps, lr
2e-3 with 50 warm-up steps and cosine decay, the guidance image's hue rotated at random (hue_jitter
180), BatchNorm recalibrated over 32 batches, and (released recipe) one jitter per step for the
reconstruction instead of 4 (each jitter runs the backbone on the whole batch);
Stage 2 at HR 448, s in {112, 160}, batch 2, 30 steps, lr 1e-4, EMA every 5. --stage1 '{...}'
overrides any Stage 1 field.

Stage 1 is also scored every --eval-every steps of each run (resumed exactly between scores), on
the held-out photos and on --train-eval training crops: the learning curve against image-steps
(--png draws it; --plot LABEL=quality.json ... redraws earlier runs side by side). The pseudo-GT's
own retention is printed beside bilinear: a student that fitted its target exactly would keep
that much, no more. The goal (issue 11): Stage 1 above bilinear at both
sizes by more than the seed spread, MSE below bilinear's, retention >= 0.85 at S and >= 0.8 at 4S.

--targets trains the same Stage 1 on each pseudo-GT (``loftup-train stage1 --target``): the paper's
Table 1 at CPU scale. For ``implicit`` the bench first runs ``loftup-pipeline implicit``'s job on
every training image (FeatUp's recipe shrunk by --implicit-steps/--implicit-views/
--implicit-batch, dense maps kept); every target then trains on the same images, for the same
steps, and is scored on the same held-out photos beside bilinear. Each target's own retention is
printed on the training crops (MSE is always to the mask-bicubic pseudo-GT).

    python bench/quality_bench.py                        # 3 seeds x 2 recipes, the CPU-scale recipe
    python bench/quality_bench.py --seeds 0 --recipes paper --stage1-steps 2400 --eval-every 300 \
        --stage2-steps 0 --stage1 '{"hue_jitter": 0}' --png curves.png   # the README's long learning curve
    python bench/quality_bench.py --images-per-tar 2 --recipes paper --stage2-steps 0 \
        --targets mask-bicubic,implicit,bicubic --implicit-cpus 2        # the README's CPU-scale Table 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HELD_PHOTOS, TRAIN_TARS = ("voc", "arc2017"), 8


def build_store(work: Path, backbone: str, images_per_tar: int, photos_dir: str | None = None):
    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.sample_data import photo_names, write_sample_shards
    from loftup.pipeline.shards import resolve_shards
    from loftup.storage import open_store

    store_path = work / "store"
    if not (store_path / "manifest.json").exists():
        write_sample_shards(
            work / "sa1b",
            tars=TRAIN_TARS,
            images_per_tar=images_per_tar,
            seed=0,
            # Your own training photos (any folder of JPEG/PNG); the held-out tar stays the same.
            photos=None if photos_dir else [p for p in photo_names() if p not in HELD_PHOTOS],
            photos_dir=photos_dir,
        )
        write_sample_shards(
            work / "sa1b", tars=1, images_per_tar=16, seed=0, first_shard=TRAIN_TARS, photos=HELD_PHOTOS
        )
        store = open_store(store_path, create=True)
        shards = resolve_shards(f"0-{TRAIN_TARS}", work / "sa1b")
        for job in (ImagesJob(), MasksJob()):
            run_job(job, store, shards, executor="inline")
        run_job(FeaturesJob(backbone=backbone, batch_size=16), store, [(s, None) for s, _ in shards], executor="inline")
    return open_store(store_path)


def held_out_set(store, backbone: str, size: int, max_masks: int = 60, shards=(TRAIN_TARS,), limit: int | None = None):
    """Per image of ``shards`` (default: the held-out one), the first ``limit`` in store order:
    features, images at S and 2S, labels at S and 2S, masks at S."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from loftup.storage import rle
    from loftup.training.data import _subsample_index, normalise
    from loftup.training.evaluation.masks import label_map

    fs = store.features(backbone, 224)
    items = []
    ids = np.concatenate([store.image_ids(s) for s in shards])[:limit]
    for image_id in ids:
        img224 = Image.open(io.BytesIO(store.image_bytes(int(image_id), 224))).convert("RGB")
        rles = store.masks_for(int(image_id), size=224)[:max_masks]
        if not rles:
            continue
        item = {"id": int(image_id), "feats": torch.from_numpy(np.asarray(fs.get(int(image_id)))).float()[None]}
        for s in (size, 2 * size):
            idx = _subsample_index(224, s)
            masks = rle.decode_many([rle.resample(r, idx, idx) for r in rles])
            img = img224.resize((s, s), Image.BICUBIC)
            item[s] = {
                "image": normalise(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]),
                "labels": label_map(masks),
                "masks": torch.from_numpy(masks)[None],
            }
        items.append(item)
    return items


def score(items, upsample, projection, size: int, alpha: float = 0.8) -> dict:
    """Mean metrics of ``upsample(feats, image, (H, W))`` over the held-out items."""
    import numpy as np
    import torch

    from loftup.training.evaluation.masks import prototype_miou
    from loftup.training.inference import retention
    from loftup.training.pseudo_gt import pseudo_gt
    from loftup.training.target_space import layer_norm_target

    rows = []
    with torch.no_grad():
        for it in items:
            f = projection(it["feats"]) if projection is not None else it["feats"]
            low = layer_norm_target(f)
            out_s = upsample(f, it[size]["image"], (size, size))
            out_2s = upsample(f, it[2 * size]["image"], (2 * size, 2 * size))
            masks = it[size]["masks"]
            target = pseudo_gt(low, masks, torch.ones(masks.shape[:2], dtype=torch.bool), size, alpha=alpha)
            guide_4s = torch.nn.functional.interpolate(
                it[2 * size]["image"], size=(4 * size, 4 * size), mode="bilinear", align_corners=False
            )
            out_4s = upsample(f, guide_4s, (4 * size, 4 * size))
            rows.append(
                {
                    f"mIoU@{size}": prototype_miou(out_s[0], it[size]["labels"]),
                    f"mIoU@{2 * size}": prototype_miou(out_2s[0], it[2 * size]["labels"]),
                    "MSE": float(torch.nn.functional.mse_loss(out_s, target)),
                    f"ret@{size}": retention(out_s, low),
                    f"ret@{4 * size}": retention(out_4s, low),
                }
            )
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def target_retention(items, projection, size: int, alpha: float = 0.8, target: str = "mask-bicubic", implicit=None):
    """Retention of a pseudo-GT itself at ``size`` (Eq. 1 by default; ``implicit`` an
    ImplicitTargets for the per-image-optimised maps): the most a student that fits its target
    exactly can keep, since e.g. mask averaging moves every cell towards its regions' means."""
    import numpy as np
    import torch

    from loftup.training.inference import retention
    from loftup.training.stage1 import stage1_target
    from loftup.training.target_space import layer_norm_target

    out = []
    with torch.no_grad():
        for it in items:
            low = layer_norm_target(projection(it["feats"]) if projection is not None else it["feats"])
            if target == "implicit":
                tgt = implicit([it["id"]], size, projection)
            else:
                masks = it[size]["masks"]
                tgt = stage1_target(target, low, masks, torch.ones(masks.shape[:2], dtype=torch.bool), size, alpha)
            out.append(retention(tgt, low))
    return float(np.mean(out))


def run_implicit(store, backbone: str, images_per_tar: int, recipe: dict, console, cpus: int = 1) -> None:
    """``loftup-pipeline implicit --dense`` on every training image (resumes like the job does);
    with ``cpus`` > 1 on embedded Ray, one single-threaded shard task per CPU."""
    from loftup.pipeline.runner import run_job
    from loftup.training.implicit_job import ImplicitJob

    t = time.time()
    s = run_job(
        ImplicitJob(backbone=backbone, dense=True, images_per_shard=images_per_tar, recipe=recipe),
        store,
        [(i, None) for i in range(TRAIN_TARS)],
        executor="inline" if cpus <= 1 else "ray",
        num_cpus=cpus if cpus > 1 else None,
    )
    if s.failed:
        raise SystemExit(f"bench: implicit failed on shards {s.failed}")
    console.print(f"implicit targets ({recipe}): {s.images} images in {time.time() - t:.0f} s")


def bilinear_upsampler():
    """The baseline, in LoftUp's output space (as ``loftup-train upsample`` writes it)."""
    import torch.nn.functional as F

    from loftup.training.target_space import layer_norm_target

    return lambda f, img, size: F.interpolate(layer_norm_target(f), size=size, mode="bilinear", align_corners=False)


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def plot_curves(runs: list[tuple[str, dict]], png: str) -> None:
    """One panel per metric: each run's Stage 1 curve on the held-out photos (solid, dots) and on
    training crops (thin), against image-steps (steps x the bench's batch of 4); bilinear in grey
    (thick: held-out, thin: training crops). PIL only (the project has no plotting dependency)."""
    import numpy as np
    from PIL import Image, ImageDraw

    keys = list(runs[0][1]["bilinear"])
    w, h, m, top = 330, 300, 46, 30
    legend = 16 * (2 * len(runs) + 2) + 10
    img = Image.new("RGB", (w * len(keys), top + h + legend), "white")
    draw = ImageDraw.Draw(img)
    draw.text(
        (8, 8),
        "Stage 1 learning curves: held-out photos (thick, dots), training crops (thin); "
        "bilinear in grey (thick: held-out, thin: training crops)",
        fill="black",
    )
    series = {}
    for i, (label, data) in enumerate(runs):
        for which in ("curves", "train_curves"):
            for key in keys:
                pts = sorted(
                    (int(k.split("|")[1]) * 4, float(np.mean([v[key] for v in vals])))
                    for k, vals in (data.get(which) or {}).items()
                )
                series[(i, which, key)] = pts
    xmax = max((p[-1][0] for p in series.values() if p), default=1)
    for j, key in enumerate(keys):
        ox = j * w
        base = runs[0][1]["bilinear"][key]
        train_base = (runs[0][1].get("train_bilinear") or {}).get(key)
        vals = [v for (i, which, k), pts in series.items() if k == key for _, v in pts] + [base]
        vals += [train_base] if train_base is not None else []
        lo, hi = min(vals), max(vals)
        lo, hi = lo - 0.05 * (hi - lo + 1e-6), hi + 0.05 * (hi - lo + 1e-6)
        x0, y0, x1, y1 = ox + m, top + 20, ox + w - 12, top + h - 30

        def px(x, y, lo=lo, hi=hi, x0=x0, y0=y0, x1=x1, y1=y1):
            return x0 + x / xmax * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)

        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, top + 4), key, fill="black")
        for t in np.linspace(lo, hi, 5):
            _, y = px(0, t)
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.text((ox + 4, y - 6), f"{t:.2f}", fill="black")
        for t in np.linspace(0, xmax, 4):
            x, _ = px(t, lo)
            draw.line([x, y1, x, y1 + 4], fill="black")
            draw.text((x - 12, y1 + 6), f"{t:.0f}", fill="black")
        draw.text((x0 + 60, y1 + 18), "image-steps", fill="black")
        _, yb = px(0, base)
        draw.line([x0, yb, x1, yb], fill=(150, 150, 150), width=2)
        if train_base is not None:
            _, yt = px(0, train_base)
            draw.line([x0, yt, x1, yt], fill=(150, 150, 150), width=1)
        for (i, which, k), pts in series.items():
            if k != key or not pts:
                continue
            colour = COLOURS[i % len(COLOURS)]
            xy = [px(x, y) for x, y in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=3 if which == "curves" else 1)
            if which == "curves":
                for x, y in xy:
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    ly = top + h + 6
    for i, (label, _) in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        draw.line([10, ly + 7, 40, ly + 7], fill=colour, width=3)
        draw.text((48, ly), f"{label}: held-out photos", fill="black")
        draw.line([10, ly + 23, 40, ly + 23], fill=colour, width=1)
        draw.text((48, ly + 16), f"{label}: training crops", fill="black")
        ly += 32
    draw.line([10, ly + 7, 40, ly + 7], fill=(150, 150, 150), width=2)
    draw.text((48, ly), "bilinear, held-out photos", fill="black")
    draw.line([10, ly + 23, 40, ly + 23], fill=(150, 150, 150), width=1)
    draw.text((48, ly + 16), "bilinear, training crops", fill="black")
    img.save(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="Keeps the store between runs (default: a fresh temp dir).")
    ap.add_argument("--images-per-tar", type=int, default=16)
    ap.add_argument(
        "--photos-dir", default=None, help="train on the JPEG/PNG photos of this folder (held-out photos unchanged)"
    )
    ap.add_argument("--backbone", default="hed_vgg16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default="released,paper")
    ap.add_argument("--size", type=int, default=56, help="Stage 1 training size S")
    ap.add_argument("--stage1-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--stage2-steps", type=int, default=30)
    ap.add_argument(
        "--train-eval", type=int, default=16, help="also score the curve on this many training crops (0 = off)"
    )
    ap.add_argument("--png", default=None, help="write the learning curves as a PNG (with --plot: of those runs)")
    ap.add_argument(
        "--plot",
        nargs="*",
        default=None,
        metavar="LABEL=QUALITY_JSON",
        help="only plot the curves of earlier runs (their quality.json) into --png",
    )
    ap.add_argument(
        "--stage1", default="{}", help="JSON of extra Stage1Config fields (the CPU-scale recipe is the default)"
    )
    ap.add_argument(
        "--targets", default="mask-bicubic", help="Stage 1 pseudo-GTs to compare (mask-bicubic,implicit,bicubic)"
    )
    ap.add_argument("--implicit-steps", type=int, default=100, help="implicit target: optimisation steps (FeatUp 1200)")
    ap.add_argument("--implicit-views", type=int, default=60, help="implicit target: jittered views (FeatUp 3000)")
    ap.add_argument("--implicit-batch", type=int, default=2, help="implicit target: views per step (FeatUp 10)")
    ap.add_argument("--implicit-cpus", type=int, default=1, help="implicit target: shards optimised in parallel")
    ap.add_argument("--json", default="quality.json", help="the figures' file, in the work folder")
    args = ap.parse_args()
    if args.plot is not None:
        if not args.png:
            ap.error("--plot needs --png")
        plot_curves(
            [(a.split("=", 1)[0], json.loads(Path(a.split("=", 1)[1]).read_text())) for a in args.plot], args.png
        )
        print(f"wrote {args.png}")
        return

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from loftup.training.checkpoint import load_model
    from loftup.training.stage1 import Stage1Config
    from loftup.training.stage1 import train as train1
    from loftup.training.stage2 import Stage2Config
    from loftup.training.stage2 import train as train2

    console = Console()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-quality-"))
    store = build_store(work, args.backbone, args.images_per_tar, args.photos_dir)
    items = held_out_set(store, args.backbone, args.size)
    # Training crops, scored the same way: tells underfitting (both bad) from not generalising.
    train_items = (
        held_out_set(store, args.backbone, args.size, shards=range(TRAIN_TARS), limit=args.train_eval)
        if args.train_eval
        else []
    )
    shards = list(range(TRAIN_TARS))
    extra = json.loads(args.stage1)

    def model_upsampler(path):
        model, meta = load_model(path, with_meta=True)
        return (lambda f, img, sz: model(f, img, output_size=sz)), meta["projection_module"]

    results, curves, train_curves, timing = {}, {}, {}, {}
    targets = args.targets.split(",")
    implicit = None
    if "implicit" in targets:
        run_implicit(
            store,
            args.backbone,
            args.images_per_tar,
            {
                "steps": args.implicit_steps,
                "views": args.implicit_views,
                "pca_views": min(50, args.implicit_views),
                "views_per_step": args.implicit_batch,
            },
            console,
            args.implicit_cpus,
        )
        from loftup.training.implicit import ImplicitTargets

        implicit = ImplicitTargets(store, args.backbone, 224)
    projection = None
    for recipe, target in [(r, t) for r in args.recipes.split(",") for t in targets]:
        # One label per run family; with one target the labels (and run folders) stay the recipe's.
        label = recipe if len(targets) == 1 else f"{recipe}/{target}"
        for seed in map(int, args.seeds.split(",")):
            run = work / (f"{recipe}-s{seed}" if target == "mask-bicubic" else f"{recipe}-{target}-s{seed}")
            run1, run2 = run / "run1", run / "run2"
            steps = list(range(args.eval_every, args.stage1_steps + 1, args.eval_every)) or [args.stage1_steps]
            if steps[-1] != args.stage1_steps:
                steps.append(args.stage1_steps)
            t = time.time()
            for i, n in enumerate(steps):
                cfg = dict(
                    store=store.url,
                    out=str(run1),
                    backbone=args.backbone,
                    shards=shards,
                    pca_dim=64,
                    size=args.size,
                    max_masks=60,
                    batch_size=4,
                    max_steps=n,
                    lr=2e-3,
                    lr_schedule="cosine",
                    warmup_steps=50,
                    decay_steps=args.stage1_steps,
                    bn_recalibrate=32,
                    recon_jitters=1,
                    hue_jitter=180.0,
                    seed=seed,
                    recipe=recipe,
                    target=target,
                    workers=0,
                    progress=False,
                    log_every=10,
                    device="cpu",
                    resume=i > 0,
                )
                train1(Stage1Config(**{**cfg, **extra}))
                up, projection = model_upsampler(run1 / "stage1.safetensors")
                curves.setdefault((label, n), []).append(score(items, up, projection, args.size))
                console.print(
                    f"{label} seed {seed} stage 1 @ {n} steps ({n * 4} image-steps): {curves[(label, n)][-1]}"
                )
                if train_items:
                    train_curves.setdefault((label, n), []).append(score(train_items, up, projection, args.size))
                    console.print(f"    on training crops: {train_curves[(label, n)][-1]}")
            timing[(label, "stage1")] = time.time() - t
            results.setdefault((label, "stage 1"), []).append(curves[(label, steps[-1])][-1])
            if args.stage2_steps:
                t = time.time()
                train2(
                    Stage2Config(
                        init=str(run1 / "stage1.safetensors"),
                        store=store.url,
                        out=str(run2),
                        backbone=args.backbone,
                        shards=shards,
                        hr=448,
                        sizes=[112, 160],
                        max_masks=60,
                        batch_size=2,
                        max_steps=args.stage2_steps,
                        lr=1e-4,
                        ema_every=5,
                        seed=seed,
                        recipe=recipe,
                        workers=0,
                        progress=False,
                        log_every=5,
                        device="cpu",
                    )
                )
                timing[(label, "stage2")] = time.time() - t
                up, proj2 = model_upsampler(run2 / "stage2.safetensors")
                results.setdefault((label, "stage 1 + 2"), []).append(score(items, up, proj2, args.size))
                console.print(f"{label} seed {seed} stage 1 + 2: {results[(label, 'stage 1 + 2')][-1]}")
    bil = bilinear_upsampler()
    baseline = score(items, bil, projection, args.size)
    train_baseline = score(train_items, bil, projection, args.size) if train_items else None
    ceiling = {"held_out": target_retention(items, projection, args.size)}
    if train_items:
        ceiling["training_crops"] = target_retention(train_items, projection, args.size)
    # Every target's own retention on the training crops (the implicit maps exist only there).
    target_ceiling = {
        t: ceiling["training_crops"]
        if t == "mask-bicubic"
        else target_retention(train_items, projection, args.size, target=t, implicit=implicit)
        for t in targets
        if train_items
    }

    def fmt(vals, key):
        v = np.array([x[key] for x in vals])
        return f"{v.mean():.4f}" + (f" ± {v.std():.4f}" if len(v) > 1 else "")

    keys = list(baseline)
    table = Table(
        title=f"held-out ({len(items)} crops of unseen photos {', '.join(HELD_PHOTOS)}; {args.backbone}, PCA 64, "
        f"S = {args.size}; seeds {args.seeds}; mean ± std over seeds)"
    )
    table.add_column("upsampler")
    for k in keys:
        table.add_column(k, justify="right")
    table.add_row("bilinear", *[f"{baseline[k]:.4f}" for k in keys])
    for (label, stage), vals in results.items():
        table.add_row(f"{stage} ({label})", *[fmt(vals, k) for k in keys])
    console.print(table)
    console.print(
        f"retention of the pseudo-GT itself at {args.size} (the ceiling of a student that fits it): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in ceiling.items())
    )
    if target_ceiling:
        console.print(
            "each target's own retention on the training crops: "
            + ", ".join(f"{t} {v:.3f}" for t, v in target_ceiling.items())
        )

    def curve_table(title: str, base: dict, data: dict) -> Table:
        t = Table(title=f"{title} (bilinear: " + ", ".join(f"{k} {base[k]:.3f}" for k in keys) + ")")
        t.add_column("run")
        t.add_column("steps (image-steps)", justify="right")
        for k in keys:
            t.add_column(k, justify="right")
        for (label, n), vals in data.items():
            t.add_row(label, f"{n} ({n * 4})", *[fmt(vals, k) for k in keys])
        return t

    console.print(curve_table("Stage 1 learning curve on the held-out photos, mean over seeds", baseline, curves))
    if train_items:
        console.print(curve_table(f"the same on {len(train_items)} training crops", train_baseline, train_curves))
    console.print("training seconds (last seed): " + ", ".join(f"{r} {s} {v:.0f}" for (r, s), v in timing.items()))
    (work / args.json).write_text(
        json.dumps(
            {
                "bilinear": baseline,
                "results": {f"{r}|{s}": v for (r, s), v in results.items()},
                "curves": {f"{r}|{n}": v for (r, n), v in curves.items()},
                "train_bilinear": train_baseline,
                "pseudo_gt_retention": ceiling,
                "target_retention": target_ceiling,
                "train_curves": {f"{r}|{n}": v for (r, n), v in train_curves.items()},
            },
            indent=1,
        )
    )
    if args.png:
        plot_curves([(args.recipes, json.loads((work / args.json).read_text()))], args.png)
    console.print(f"figures in {work / args.json}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
