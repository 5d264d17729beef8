"""What the integrity checks cost: Zarr CRC32C on feature chunks, Parquet page checksums on the
mask table, and the sha256 file digests that markers record, each beside the same work without.

Features: DINOv2-S/14-shaped fp16 maps (16x16x384, a smooth random field, so they compress like
real maps); masks: the real masks job over real sample photos at SA-1B's 1500 px, the table
replicated to --mask-rows.

    python bench/checksum_bench.py [--images 512 --mask-rows 200000 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from timing import best_seconds

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _best(fn, repeats: int) -> float:
    return best_seconds(fn, repeats, warmup=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--mask-rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr
    from fsspec.implementations.local import LocalFileSystem
    from rich.console import Console
    from rich.table import Table
    from zarr.codecs import BloscCodec, Crc32cCodec

    from loftup.pipeline.jobs import MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.sample_data import write_sample_shards
    from loftup.storage import open_store
    from loftup.storage.commit import file_digests
    from loftup.storage.features import SHUFFLE

    work = Path(tempfile.mkdtemp(prefix="loftup-checksum-bench-"))
    rng = np.random.default_rng(0)
    coarse = rng.standard_normal((args.images, 384, 4, 4)).astype(np.float32)
    feats = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3) + 0.1 * rng.standard_normal((args.images, 384, 16, 16))
    feats = feats.astype(np.float16)

    def zarr_write(name, codecs):
        def go():
            arr = zarr.create_array(
                str(work / name),
                shape=feats.shape,
                dtype="float16",
                chunks=(1, 384, 16, 16),
                shards=feats.shape,
                compressors=codecs,
                fill_value=0.0,
                overwrite=True,
            )
            arr[...] = feats

        return go

    def zarr_read(name):
        def go():
            arr = zarr.open_array(str(work / name), mode="r")
            for i in range(arr.shape[0]):
                arr[i]

        return go

    blosc = BloscCodec(cname="zstd", clevel=3, shuffle=SHUFFLE)
    rows = []
    for label, name, codecs in (
        ("features, Blosc only", "plain.zarr", (blosc,)),
        ("features, Blosc + CRC32C", "crc.zarr", (blosc, Crc32cCodec())),
    ):
        w = _best(zarr_write(name, codecs), args.repeats)
        r = _best(zarr_read(name), args.repeats)
        size = sum(p.stat().st_size for p in (work / name).rglob("*") if p.is_file())
        rows.append((label, f"{w * 1e3:.0f}", f"{r * 1e3:.0f}", f"{size / 2**20:.1f}"))

    store = open_store(work / "store", create=True)
    write_sample_shards(work / "sa1b", tars=1, images_per_tar=8, short_side=1500)
    run_job(MasksJob(), store, resolve_shards("0", work / "sa1b"), executor="inline")
    one = store.masks_table(0)
    table = pa.concat_tables([one] * max(1, args.mask_rows // one.num_rows))
    for label, name, check in (
        ("masks, no page checksums", "plain.parquet", False),
        ("masks, page checksums (write + verified read)", "crc.parquet", True),
    ):
        path = str(work / name)
        w = _best(
            lambda: pq.write_table(table, path, compression="zstd", row_group_size=20_000, write_page_checksum=check),
            args.repeats,
        )
        r = _best(lambda: pq.ParquetFile(path, page_checksum_verification=check).read(), args.repeats)
        rows.append((label, f"{w * 1e3:.0f}", f"{r * 1e3:.0f}", f"{os.path.getsize(path) / 2**20:.1f}"))

    fs = LocalFileSystem()
    total = sum(p.stat().st_size for p in (work / "crc.zarr").rglob("*") if p.is_file())
    d = _best(lambda: file_digests(fs, str(work / "crc.zarr")), args.repeats)
    rows.append(("marker sha256 of the feature shard's files", f"{d * 1e3:.0f}", "-", f"{total / 2**20:.1f}"))
    t = Table(title=f"checksum cost: {args.images} feature maps, {table.num_rows} mask rows (best of {args.repeats})")
    for col in ("what", "write ms", "read ms", "MiB"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for row in rows:
        t.add_row(*row)
    Console().print(t)
    print(f"load average: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
