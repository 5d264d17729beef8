"""Stage 1 throughput: the training loader beside what a training step consumes.

One table, measured in one run on this machine:

- loader: DataLoader over Stage1Dataset with the shard-aware sampler, batch 8, full 224 masks
  (at most 150 per image), 0 / 1 / 2 workers; the first batches are a warm-up (worker start,
  first file opens) and excluded. Under it, what one sample costs in one process, piece by piece.
- training step (forward + loss + backward + clip + NAdam) at global batch 8: LoftUp dim 384 at
  224 (the released setting) and a CPU setting (a PCA-64 of the features, at 112).
- pseudo-GT per image (bicubic + Eq. 1 mask refinement, alpha 0.8, C = 384, 224, ~100 masks)
  next to the upsampler's eval forward per image (dim 384, 224).

The store (2 tars x 16 images at 1500 px: images, masks, features of a random-init
dinov2_vits14) is built under --workdir, or reused when it is already there.

    python bench/train_bench.py [--workdir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from timing import run_header

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE = "dinov2_vits14"
RES = 224
BATCH = 8
LOADER_GOAL = 100.0  # samples/s on 2 cores (issue 5)
# The store's shards: photos at SA-1B's size, both training geometries.
SAMPLE_STORE = {"short_side": 1500, "sizes": (224, 896)}


# --------------------------------------------------------------------------- loader
def epoch_chain(index, epochs: int, seed: int = 0):
    """A sampler walking ``epochs`` consecutive epochs of the shard-aware order.

    The trainer rebuilds its loader once per epoch; with 32 images that restart would dominate,
    while on SA-1B an epoch is millions of samples, so the bench streams epochs back to back.
    """
    from torch.utils.data import Sampler

    from loftup.training.data import ShardAwareSampler

    class EpochChain(Sampler):
        def __len__(self):
            return epochs * len(index)

        def __iter__(self):
            for e in range(epochs):
                yield from ShardAwareSampler(index, seed=seed, epoch=e)

    return EpochChain()


def bench_loader(dataset, index, workers: int, samples: int, warmup_batches: int, collate=None) -> dict:
    """Steady-state samples/s of the Stage 1 DataLoader, after ``warmup_batches`` batches."""
    from torch.utils.data import DataLoader

    if collate is None:
        from loftup.training.data import collate

    n_batches = warmup_batches + math.ceil(samples / BATCH)
    epochs = math.ceil(n_batches * BATCH / len(index)) + 1
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=epoch_chain(index, epochs),
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        prefetch_factor=4 if workers else None,
    )
    t_start = time.perf_counter()
    it = iter(loader)
    timed, masks, mask_bytes, t0 = 0, 0, 0, None
    for b in range(n_batches):
        batch = next(it)
        if b == warmup_batches - 1:
            t0 = time.perf_counter()
            first = t0 - t_start
        elif b >= warmup_batches:
            timed += batch["image"].shape[0]
            masks += int(batch["valid"].sum())
            mask_bytes += batch["mask_bits" if "mask_bits" in batch else "masks"].numel()
    elapsed = time.perf_counter() - t0
    del it
    return {
        "workers": workers,
        "samples": timed,
        "seconds": elapsed,
        "rate": timed / elapsed,
        "warmup_s": first,
        "masks_per_sample": masks / timed,
        "mask_mb_per_batch": mask_bytes / (timed / BATCH) / 1e6,
    }


def bench_sample_parts(store_url: str, index, repeats: int = 2) -> tuple[list[tuple[str, float]], float]:
    """Milliseconds per sample of each piece of Stage1Dataset.__getitem__ and collate, warm, with
    one torch thread as in a DataLoader worker; plus, for comparison, the earlier path that
    decoded to row-major bool masks (a transposing copy larger than the decode itself)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from loftup.storage import open_store, rle
    from loftup.training.data import collate

    store = open_store(store_url)
    fs = store.features(BACKBONE, RES)
    ids = [int(i) for i in index.image_ids]
    rles = {i: store.masks_for(i, size=224)[:150] for i in ids}
    packed = {i: torch.from_numpy(rle.decode_packed(rles[i])[0]) for i in ids}

    def image(i):
        return np.asarray(Image.open(io.BytesIO(store.image_bytes(i, 224))).convert("RGB"))

    def row_major_decode(i):
        return rle.decode_many(rles[i])

    samples = [
        {
            "image_id": i,
            "image": torch.zeros(3, 224, 224, dtype=torch.uint8),
            "feats": torch.zeros(384, 16, 16, dtype=torch.float16),
            "mask_bits": packed[i],
        }
        for i in ids
    ]
    n_collated = (len(samples) // BATCH) * BATCH
    parts = [
        ("image read + JPEG decode", lambda: [image(i) for i in ids], len(ids)),
        ("masks_for (Parquet row lookup)", lambda: [store.masks_for(i, size=224) for i in ids], len(ids)),
        ("rle.decode_packed (224, <=150 masks)", lambda: [rle.decode_packed(rles[i]) for i in ids], len(ids)),
        ("features get (Zarr, fp16)", lambda: [fs.get(i) for i in ids], len(ids)),
        (
            "collate (pad packed masks to batch max)",
            lambda: [collate(samples[k : k + BATCH]) for k in range(0, n_collated, BATCH)],
            n_collated,
        ),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for name, fn, n in parts:
            fn()  # warm: file handles, row-group index caches
            out.append((name, min(_timed(fn) for _ in range(repeats)) / n * 1e3))
        [row_major_decode(i) for i in ids]
        alt = min(_timed(lambda: [row_major_decode(i) for i in ids]) for _ in range(repeats)) / len(ids) * 1e3
    finally:
        torch.set_num_threads(threads)
    return out, alt


def row_major_baseline(url: str, index):
    """The previous loader, for a side-by-side row: masks decoded to row-major bool in the worker
    (pycocotools + a transposing copy) and padded as (B, M, H, W) bool, 8x the bytes to move."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from loftup.storage import rle
    from loftup.training.data import Stage1Dataset

    class RowMajor(Stage1Dataset):
        def __getitem__(self, i):
            store = self._open()
            image_id = int(self.index.image_ids[i])
            img = Image.open(io.BytesIO(store.image_bytes(image_id, self.geometry))).convert("RGB")
            rles = store.masks_for(image_id, size=self.geometry)[: self.max_masks]
            masks = rle.decode_many(rles) if rles else np.zeros((0, 224, 224), bool)
            return {
                "image_id": image_id,
                "image": torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(),
                "feats": torch.from_numpy(np.asarray(self._features.get(image_id))),
                "masks": torch.from_numpy(masks),
            }

    def collate_bool(samples):
        m = max(x["masks"].shape[0] for x in samples)
        masks = torch.zeros((len(samples), m, 224, 224), dtype=torch.bool)
        valid = torch.zeros((len(samples), m), dtype=torch.bool)
        for j, x in enumerate(samples):
            masks[j, : x["masks"].shape[0]] = x["masks"]
            valid[j, : x["masks"].shape[0]] = True
        return {
            "image_id": torch.tensor([x["image_id"] for x in samples]),
            "image": torch.stack([x["image"] for x in samples]),
            "feats": torch.stack([x["feats"] for x in samples]),
            "masks": masks,
            "valid": valid,
        }

    return RowMajor(url, index, BACKBONE, RES, geometry=224, size=224, max_masks=150), collate_bool


def bench_loader_ceiling(dataset, index, workers: int, samples: int) -> dict:
    """The same DataLoader over samples decoded once and kept in memory: what batching,
    padding and the worker -> main process transfer alone allow."""
    from torch.utils.data import Dataset

    class Cached(Dataset):
        def __init__(self):
            self.items = [dataset[i] for i in range(len(dataset))]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    return bench_loader(Cached(), index, workers, samples, warmup_batches=2)


def bench_fork_join(threads: int) -> tuple[float, float]:
    """Milliseconds of one 7.5 MB tensor copy with 1 thread and with ``threads``: on a shared,
    oversubscribed machine every parallel torch op waits for a descheduled pool thread."""
    import torch

    x = torch.ones(150, 224, 224, dtype=torch.bool)
    y = torch.empty_like(x)
    out = []
    for n in (1, threads):
        torch.set_num_threads(n)
        y.copy_(x)
        out.append(min(_timed(lambda: y.copy_(x)) for _ in range(20)) * 1e3)
    torch.set_num_threads(threads)
    return out[0], out[1]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- model step
def real_batch(store_url: str, index, size: int, count: int = BATCH):
    """One batch of real inputs (images, stored features, masks) at ``size``; images with the
    most masks first, so the pseudo-GT rows see ~100-150 masks each."""
    from loftup.training.data import Stage1Dataset, batch_masks, collate

    ds = Stage1Dataset(store_url, index, BACKBONE, RES, geometry=224, size=size, max_masks=150)
    samples = sorted((ds[i] for i in range(len(ds))), key=lambda s: -s["mask_bits"].shape[0])
    batch = collate(samples[:count])
    batch["masks"], batch["valid"] = batch_masks(batch, "cpu")
    return batch


def bench_train_step(
    store_url: str,
    pca_dim: int | None,
    size: int,
    micro: int,
    timed_micro: int,
    warmup_micro: int,
    recipe: str = "released",
) -> dict:
    """Seconds of one Stage 1 optimizer step at global batch 8: the trainer's own step
    (``loop.train_step``: ``Stage1.step``, forward + every loss term of ``recipe``, then backward,
    clip when due, NAdam), on batches from the recipe's own loader.

    A step of the 384-d model at 224 and batch 8 needs ~20 GB here, so the recipe runs at batch
    ``micro`` and the time is scaled by 8 / micro (each micro step includes its optimizer step);
    ``timed_micro`` steps are timed after ``warmup_micro`` untimed ones.
    """
    import tempfile

    import torch

    from loftup.training.distributed import Dist
    from loftup.training.loop import resolve, train_step
    from loftup.training.stage1 import RECIPES, Stage1, Stage1Config

    torch.manual_seed(0)
    cfg = resolve(
        Stage1Config(
            store=store_url,
            out=tempfile.mkdtemp(),
            backbone=BACKBONE,
            random_init=True,
            pca_dim=pca_dim,
            size=size,
            batch_size=micro,
            workers=0,
            progress=False,
            device="cpu",
            recipe=recipe,
        ),
        RECIPES,
    )
    r = Stage1(cfg, Dist())
    batches = r.batches(0, 0, 0)

    def one(k):
        train_step(r, cfg, next(batches), k, Dist())

    for k in range(warmup_micro):
        one(k)
    times = [_timed(lambda: one(warmup_micro + k)) for k in range(timed_micro)]
    step = sum(times) / len(times) * (BATCH / micro)
    dim = pca_dim or 384
    return {
        "dim": dim,
        "size": size,
        "micro": micro,
        "timed": timed_micro * micro,
        "step_s": step,
        "recipe": recipe,
        "steps_per_s": 1.0 / step,
        "samples_per_s": BATCH / step,
        "real": micro >= BATCH,
    }


# --------------------------------------------------------------------------- pseudo-GT vs forward
def bench_pseudo_gt(batch, masks_per_image: int, repeats: int) -> dict:
    """Per-image seconds of pseudo-GT (bicubic 16 -> 224 + Eq. 1, alpha 0.8, C = 384), batched
    over 8 images and for one image; and of the independent per-mask gather implementation."""
    import torch

    from loftup.training.pseudo_gt import bicubic_upsample, mask_refine
    from loftup.training.target_space import layer_norm_target

    feats = layer_norm_target(batch["feats"].float())
    masks = batch["masks"][:, :masks_per_image]
    valid = batch["valid"][:, :masks_per_image]
    out = {"masks_per_image": float(valid.sum(1).float().mean()), "channels": feats.shape[1]}

    def run(sl, impl):
        return mask_refine(bicubic_upsample(feats[sl], 224), masks[sl], valid[sl], 0.8, impl=impl)

    with torch.no_grad():
        for key, sl, n, impl in (
            ("batch8", slice(0, BATCH), BATCH, "regions"),
            ("single", slice(0, 1), 1, "regions"),
            ("gather8", slice(0, BATCH), BATCH, "gather"),
        ):
            run(sl, impl)
            out[key] = min(_timed(lambda: run(sl, impl)) for _ in range(repeats)) / n
        out["bicubic"] = min(_timed(lambda: bicubic_upsample(feats, 224)) for _ in range(repeats)) / BATCH
        # The per-mask loop is many small ops; where the cores are shared each one waits for
        # the pool's other thread, so one thread is the fair reference.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out["batch8_1t"] = min(_timed(lambda: run(slice(0, BATCH), "regions")) for _ in range(repeats)) / BATCH
        finally:
            torch.set_num_threads(threads)
    return out


def bench_forward(batch, repeats: int) -> dict:
    """Per-image seconds of the 384-d upsampler's eval forward at 224, batch 1 (a batch of 8 is
    ~8x one image on a CPU and would cost minutes here)."""
    import torch

    from loftup.training.data import normalise
    from loftup.training.model import LoftUp

    torch.manual_seed(0)
    model = LoftUp(384).eval()
    feats, image = batch["feats"].float(), normalise(batch["image"])
    with torch.no_grad():
        model(feats[:1], image[:1])
        return {"single": min(_timed(lambda: model(feats[:1], image[:1])) for _ in range(repeats))}


# --------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="build the store here, or reuse the one already there")
    ap.add_argument("--tars", type=int, default=2)
    ap.add_argument("--images-per-tar", type=int, default=16)
    ap.add_argument(
        "--samples", type=int, default=None, help="timed loader samples per setting (default 240, quick 96)"
    )
    ap.add_argument("--workers", default=None, help="comma list (default 0,1,2; quick 0,2)")
    ap.add_argument(
        "--micro-batch", type=int, default=1, help="micro-batch of the 384-d step (batch 8 in one go needs ~20 GB)"
    )
    ap.add_argument(
        "--timed-micro",
        type=int,
        default=None,
        help="timed micro-batches of the 384-d step (default 2, quick 1); 8/micro = one real step",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="fewer samples, settings and repeats")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    from loftup.sample_data import build_sample_store
    from loftup.storage.layout import job_key
    from loftup.training.data import Stage1Dataset, build_index
    from loftup.training.projection import FeatureProjection

    console = Console(width=200)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-train-bench-"))
    t_run, load0 = run_header(console, work, f"{torch.get_num_threads()} (main process)")
    # Random-init features: the bench measures cost, which does not depend on the values.
    store = build_sample_store(
        work / "store",
        work / "sa1b",
        tars=args.tars,
        images_per_tar=args.images_per_tar,
        **SAMPLE_STORE,
        log=console.print,
    )
    url = store.url
    index = build_index(store, ["images", "masks", job_key("features", BACKBONE, RES)])
    samples = args.samples or (96 if args.quick else 240)
    workers = [int(w) for w in (args.workers or ("0,2" if args.quick else "0,1,2")).split(",")]
    repeats = 1 if args.quick else 3
    timed_micro = args.timed_micro or (1 if args.quick else 2)

    rows: list[tuple[str, str, str, str]] = []
    dataset = Stage1Dataset(url, index, BACKBONE, RES, geometry=224, size=224, max_masks=150)
    loader_rates = {}
    for w in workers:
        r = bench_loader(dataset, index, w, samples, warmup_batches=2)
        loader_rates[w] = r["rate"]
        verdict = "ok" if r["rate"] >= LOADER_GOAL else "below"
        rows.append(
            (
                "loader, batch 8, 224 masks <=150",
                f"{w} worker(s)",
                f"{r['rate']:.1f} samples/s",
                f"{verdict} vs goal {LOADER_GOAL:.0f}; {r['samples']} timed samples, warm-up {r['warmup_s']:.1f} s, "
                f"{r['masks_per_sample']:.0f} masks/sample, {r['mask_mb_per_batch']:.0f} MB masks/batch",
            )
        )
    base_ds, base_collate = row_major_baseline(url, index)
    base = bench_loader(base_ds, index, max(workers), samples, warmup_batches=2, collate=base_collate)
    rows.append(
        (
            "baseline: previous loader (row-major bool masks)",
            f"{max(workers)} worker(s)",
            f"{base['rate']:.1f} samples/s",
            f"packed masks are {loader_rates[max(workers)] / base['rate']:.2f}x this; {base['mask_mb_per_batch']:.0f} MB masks/batch",
        )
    )
    ceiling = bench_loader_ceiling(dataset, index, max(workers), samples)
    rows.append(
        (
            "loader ceiling: samples cached in RAM",
            f"{max(workers)} worker(s)",
            f"{ceiling['rate']:.1f} samples/s",
            "collate + padding + worker->main transfer only (no decode)",
        )
    )
    parts, alt_decode = bench_sample_parts(url, index, repeats=repeats)
    total_ms = sum(ms for name, ms in parts)
    for name, ms in parts:
        rows.append(
            (
                "  per sample, 1 thread (as a worker)",
                name,
                f"{ms:.2f} ms",
                f"{100 * ms / total_ms:.0f}% of {total_ms:.1f} ms (1 core: {1e3 / total_ms:.0f} samples/s)",
            )
        )
    rows.append(
        (
            "  per sample, 1 thread (as a worker)",
            "baseline: rle.decode_many, row-major bool",
            f"{alt_decode:.2f} ms",
            "the previous loader's decode: pycocotools + a transposing copy, 8x the bytes to move",
        )
    )
    one, many = bench_fork_join(torch.get_num_threads())
    rows.append(
        (
            "fork-join cost of one torch op",
            f"7.5 MB copy, 1 vs {torch.get_num_threads()} threads",
            f"{one:.2f} ms vs {many:.2f} ms",
            "a large gap means the cores are shared: small-op code suffers at >1 thread",
        )
    )

    batch224 = real_batch(url, index, 224)
    feats_all = torch.from_numpy(store.features(BACKBONE, RES).get_many(index.image_ids)).float()
    FeatureProjection.fit(feats_all, 64)
    real_batch(url, index, 112)
    steps = [
        bench_train_step(url, 64, 112, micro=BATCH, timed_micro=1 if args.quick else 2, warmup_micro=1, recipe=recipe)
        for recipe in ("paper", "released")
    ]
    console.print(f"[dim]step dim 64 @112 done ({time.perf_counter() - t_run:.0f} s); dim 384 @224 next[/]")
    steps.append(bench_train_step(url, None, 224, micro=args.micro_batch, timed_micro=timed_micro, warmup_micro=1))
    best_loader = max(loader_rates.values())
    for s in steps:
        how = (
            f"{s['timed']} timed samples as micro-batches of {s['micro']}; no extrapolation"
            if s["real"]
            else f"{s['timed']} samples timed as steps of batch {s['micro']}, x{BATCH // s['micro']}"
        )
        rows.append(
            (
                f"train step, batch 8, dim {s['dim']} @{s['size']}",
                f"Stage1.step + loop.optimize, --recipe {s['recipe']}",
                f"{s['steps_per_s']:.4f} steps/s ({s['step_s']:.1f} s/step)",
                f"consumes {s['samples_per_s']:.2f} samples/s: loader is {best_loader / s['samples_per_s']:.0f}x that; {how}",
            )
        )

    pg = bench_pseudo_gt(batch224, masks_per_image=100, repeats=repeats)
    fw = bench_forward(batch224, repeats=1 if args.quick else 2)
    pg_note = f"C={pg['channels']}, {pg['masks_per_image']:.0f} masks/image, alpha 0.8"
    rows.append(
        (
            "pseudo-GT per image (bicubic + Eq. 1)",
            "batch 8, regions impl",
            f"{pg['batch8'] * 1e3:.0f} ms",
            f"{pg_note}; bicubic alone {pg['bicubic'] * 1e3:.0f} ms",
        )
    )
    rows.append(
        (
            "pseudo-GT per image (bicubic + Eq. 1)",
            "batch 8, regions impl, 1 thread",
            f"{pg['batch8_1t'] * 1e3:.0f} ms",
            "reference where the cores are shared (see the fork-join row)",
        )
    )
    rows.append(
        ("pseudo-GT per image (bicubic + Eq. 1)", "batch 1, regions impl", f"{pg['single'] * 1e3:.0f} ms", pg_note)
    )
    rows.append(
        (
            "pseudo-GT per image (bicubic + Eq. 1)",
            "batch 8, gather impl",
            f"{pg['gather8'] * 1e3:.0f} ms",
            "independent per-mask implementation, for comparison",
        )
    )
    rows.append(
        (
            "upsampler forward per image, eval",
            "dim 384 @224, batch 1",
            f"{fw['single'] * 1e3:.0f} ms",
            f"pseudo-GT (batch 8) is {fw['single'] / pg['batch8']:.0f}x cheaper than this forward",
        )
    )

    table = Table(
        title=f"Stage 1 training throughput ({torch.get_num_threads()} torch threads; "
        f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}; {len(index)} images)"
    )
    for col in ("what", "setting", "measured", "notes"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"total {time.perf_counter() - t_run:.0f} s")


if __name__ == "__main__":
    main()
