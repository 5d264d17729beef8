"""Store sizes, write throughput and random-access latency for a store of 1,000 images.

Masks are real: the sample shards' annotations (VOC/ARC2017 instance masks and scikit-image
segments upscaled to SA-1B's 1500 px), run through the real masks job, then replicated under
new image ids up to --images. Features are DINOv2-S/14 outputs (random init, 16x16x384 fp16)
of the real sample images.

    python bench/store_bench.py [--images 1000 --photos 40 --shards 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--photos", type=int, default=40, help="distinct real sample images to replicate")
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--lookups", type=int, default=500)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch
    from rich.console import Console
    from rich.table import Table

    from loftup.pipeline.backbones import create_backbone
    from loftup.pipeline.jobs import ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.sample_data import write_sample_shards
    from loftup.storage import open_store

    console = Console()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-store-bench-"))
    src = open_store(work / "src", create=True)
    if not src.done_shards("masks"):
        write_sample_shards(work / "sa1b", tars=1, images_per_tar=args.photos, short_side=1500)
        shards = resolve_shards("0", work / "sa1b")
        run_job(MasksJob(), src, shards, executor="inline")
        run_job(ImagesJob(), src, shards, executor="inline")
    masks = src.masks_table(0)
    src_ids = np.unique(masks.column("image_id").to_numpy())
    imgs = np.stack([np.asarray(src.image(int(i), 224)) for i in src_ids])
    model = create_backbone("dinov2_vits14", random_init=True)
    with torch.inference_mode():
        feats = model(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255).numpy().astype(np.float16)

    dst_path = work / "dst"
    if dst_path.exists():
        import shutil

        shutil.rmtree(dst_path)
    dst = open_store(dst_path, create=True)
    per_shard = args.images // args.shards
    fs = dst.features("dinov2_vits14", 224)
    n_masks = 0
    t_feat = t_mask = 0.0
    by_src = {int(i): masks.filter(pc.equal(masks["image_id"], int(i))) for i in src_ids}
    for shard in range(args.shards):
        new_ids = np.arange(per_shard, dtype=np.int64) + 10_000_000 * (shard + 1)
        pick = np.arange(shard * per_shard, (shard + 1) * per_shard) % len(src_ids)
        parts = []
        for new, k in zip(new_ids, pick):
            t = by_src[int(src_ids[k])]
            parts.append(
                t.set_column(t.schema.get_field_index("image_id"), "image_id", pa.array(np.full(t.num_rows, new)))
            )
        table = pa.concat_tables(parts)
        n_masks += table.num_rows
        t0 = time.perf_counter()
        dst.write_masks(shard, table)
        t_mask += time.perf_counter() - t0
        t0 = time.perf_counter()
        fs.write_shard(shard, feats[pick], new_ids)
        t_feat += time.perf_counter() - t0

    n = per_shard * args.shards
    feat_bytes = _dir_bytes(dst_path / "features")
    mask_bytes = _dir_bytes(dst_path / "masks")
    raw = 384 * 16 * 16 * 2
    col_bytes = {}
    import pyarrow.parquet as pq

    md = pq.ParquetFile(next((dst_path / "masks").rglob("*.parquet"))).metadata
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(rg).column(c)
            top = col.path_in_schema.split(".")[0]
            col_bytes[top] = col_bytes.get(top, 0) + col.total_compressed_size
    per_mask_file = md.num_rows

    # Random access from a freshly opened store: the first lookup of a shard pays its metadata read.
    rng = np.random.default_rng(0)
    all_ids = np.concatenate([np.arange(per_shard) + 10_000_000 * (s + 1) for s in range(args.shards)])
    lookups = rng.choice(all_ids, size=args.lookups)
    reader = open_store(dst_path)
    ffs = reader.features("dinov2_vits14", 224)
    lat = []
    for image_id in lookups:
        t0 = time.perf_counter()
        f = ffs.get(int(image_id))
        m = reader.masks_for(int(image_id), size=224)
        lat.append(time.perf_counter() - t0)
        assert f.shape == (384, 16, 16) and len(m) > 0
    lat_ms = np.array(lat) * 1e3

    t = Table(title=f"store bench: {n} images, {n_masks} real masks ({n_masks / n:.0f}/image), {args.shards} shards")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("baseline / goal", justify="right")
    t.add_row(
        "feature bytes / image",
        f"{feat_bytes / n:,.0f} B",
        f"raw fp16 {raw:,} B; ratio {feat_bytes / n / raw:.3f} (goal within 5%: <= 1.05)",
    )
    t.add_row(
        "mask bytes / mask (all columns)",
        f"{mask_bytes / n_masks:,.0f} B",
        "design estimate ~250 B (original RLE only)",
    )
    for col in ("counts", "rle_224", "rle_896"):
        t.add_row(f"  of which {col}", f"{col_bytes.get(col, 0) / per_mask_file:,.0f} B", "")
    t.add_row(
        "feature write throughput",
        f"{feat_bytes / 2**20 / t_feat:,.1f} MB/s",
        f"raw {n * raw / 2**20 / t_feat:,.1f} MB/s",
    )
    t.add_row("mask write throughput", f"{mask_bytes / 2**20 / t_mask:,.1f} MB/s", f"{n_masks / t_mask:,.0f} masks/s")
    t.add_row("features + 224 masks, p50", f"{np.percentile(lat_ms, 50):.2f} ms", "goal < 20 ms")
    t.add_row("features + 224 masks, p95", f"{np.percentile(lat_ms, 95):.2f} ms", "")
    t.add_row("  first lookup (cold store)", f"{lat_ms[0]:.2f} ms", "")
    console.print(t)
    console.print(f"workdir: {work}")


if __name__ == "__main__":
    main()
