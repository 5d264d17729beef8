"""Peak memory per shard task vs. the number of images in the tar, and random access at real size.

Each job runs inline in a fresh process (peak RSS = the kernel's VmHWM of that whole process,
imports included) on a 1500 px SA-1B-format tar of each size (cycling over --distinct sample images under new ids). The slope
per image and the extrapolation to a real SA-1B tar (11,186 images) are least-squares fits over
the sizes. Features are measured twice: the real job (DINOv2-S/14 @224, random init, CPU) and the
store's writer alone fed synthetic fp16 maps up to 11,186 images without a backbone. Then a store
whose one shard holds 11,186 images (real masks and features replicated under new ids) is read at
random: features + 224 masks per image, from a freshly opened store.

    python bench/shard_memory_bench.py [--sizes 128,512,2048] [--real 11186] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Issue 16's measurements of the one-shot writers (inline, whole process): slope, at 11,186.
BASELINE = {
    "images": (0.95, 11.0, "313 MB @128, 678 MB @512"),
    "masks": (1.27, 15.0, "373 MB @128, 862 MB @512"),
    "features": (0.93, 11.5, "1.30 GB @256, 2.01 GB @1024"),
    "features (writer, synthetic)": (None, None, "one in-memory array + concat copy"),
}
GOAL_GB = {"images": 1.5, "masks": 1.5, "features": 2.0, "features (writer, synthetic)": 2.0}
TIMEOUT_S = 3600


# ---------------------------------------------------------------------------------------------
# child: one job in this process, then its peak RSS
def child(args) -> None:
    from memprobe import status_kb

    t0 = time.perf_counter()
    if args.child == "synthetic":
        import numpy as np

        from loftup.storage import open_store

        store = open_store(args.store, create=True)
        rng = np.random.default_rng(0)
        base = rng.standard_normal((32, 384, 16, 16)).astype(np.float16)
        fs = store.features("synthetic", 224)
        with fs.writer(0, args.n, 384, (16, 16), info={"patch": 14}) as w:
            for start in range(0, args.n, 32):
                b = min(32, args.n - start)
                w.add(base[:b] + np.float16(start % 7), np.arange(start, start + b))
    else:
        from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
        from loftup.pipeline.runner import run_job
        from loftup.pipeline.shards import resolve_shards
        from loftup.storage import open_store

        store = open_store(args.store, create=True)
        if args.child == "features":
            job, shards = FeaturesJob(random_init=True, batch_size=32, device="cpu"), [(0, None)]
        else:
            job = ImagesJob() if args.child == "images" else MasksJob()
            shards = resolve_shards("0", args.tar)
        summary = run_job(job, store, shards, executor="inline")
        if summary.failed:
            raise SystemExit(f"{args.child}: {summary.failed}")
    print(json.dumps({"peak_mb": status_kb("VmHWM") / 1024, "seconds": time.perf_counter() - t0}))


def run_child(kind: str, store: Path, tar: Path | None = None, n: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--store", str(store), "--n", str(n)]
    if tar is not None:
        cmd += ["--tar", str(tar)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    if p.returncode:
        raise SystemExit(f"{kind} at {n} images failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
def grow_tar(src: Path, dst: Path, k: int) -> None:
    """A tar of ``k`` images cycling over the distinct images of ``src`` under new ids (ascending,
    as in SA-1B tars), each JPEG with its JSON."""
    import io

    pairs: dict[str, dict] = {}
    with tarfile.open(src, "r:") as tin:
        for m in tin:
            if m.isfile():
                stem, ext = os.path.splitext(os.path.basename(m.name))
                pairs.setdefault(stem, {})[ext] = tin.extractfile(m).read()
    items = [p for p in pairs.values() if ".jpg" in p and ".json" in p]
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dst, "w") as tout:
        for i in range(k):
            pair, image_id = items[i % len(items)], 1_000_000 + 7 * i
            ann = json.loads(pair[".json"])
            ann["image"].update(image_id=image_id, file_name=f"sa_{image_id}.jpg")
            for name, data in ((f"sa_{image_id}.jpg", pair[".jpg"]), (f"sa_{image_id}.json", json.dumps(ann).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tout.addfile(info, io.BytesIO(data))


def fit(ns, peaks_mb):
    import numpy as np

    slope, icpt = np.polyfit(np.asarray(ns, float), np.asarray(peaks_mb, float), 1)
    return slope, icpt


def build_real_store(mask_store, feat_store, dst: Path, n: int, shard_images: int) -> tuple:
    """One shard of ``n`` images: the source shard's masks and features replicated under new ids."""
    import numpy as np
    import pyarrow as pa

    from loftup.storage import open_store

    st = open_store(dst, create=True)
    masks = mask_store.masks_table(0)
    src_ids = np.unique(masks.column("image_id").to_numpy())
    by_src = {}
    ids_col = masks.column("image_id").to_numpy()
    for i in src_ids:
        lo, hi = np.searchsorted(ids_col, i, "left"), np.searchsorted(ids_col, i, "right")
        by_src[int(i)] = masks.slice(lo, hi - lo)
    src_f = feat_store.features("dinov2_vits14", 224)
    fids = src_f.image_ids()
    feats = src_f.get_many(fids)
    new_ids = 50_000_000 + np.arange(n, dtype=np.int64) * 3
    t0 = time.perf_counter()
    with st.mask_writer(0) as w:
        for start in range(0, n, 256):
            parts = []
            for k in range(start, min(start + 256, n)):
                t = by_src[int(src_ids[k % len(src_ids)])]
                parts.append(t.set_column(0, "image_id", pa.array(np.full(t.num_rows, new_ids[k]))))
            w.add(pa.concat_tables(parts))
    t_masks = time.perf_counter() - t0
    t0 = time.perf_counter()
    fs = st.features("dinov2_vits14", 224)
    with fs.writer(0, n, feats.shape[1], feats.shape[2:], info=src_f.info, shard_images=shard_images) as fw:
        for start in range(0, n, 256):
            idx = np.arange(start, min(start + 256, n))
            fw.add(feats[idx % len(fids)], new_ids[idx])
    t_feats = time.perf_counter() - t0
    return st, new_ids, w.rows, t_masks, t_feats


def lookups(path: Path, ids, count: int, seed: int = 0) -> dict:
    import numpy as np

    from loftup.storage import open_store

    rng = np.random.default_rng(seed)
    pick = rng.choice(ids, size=count)
    st = open_store(path)
    fs = st.features("dinov2_vits14", 224)
    lat_f, lat_m = [], []
    for image_id in pick:
        t0 = time.perf_counter()
        f = fs.get(int(image_id))
        t1 = time.perf_counter()
        m = st.masks_for(int(image_id), size=224)
        t2 = time.perf_counter()
        assert f.shape == (384, 16, 16) and len(m) > 0
        lat_f.append(t1 - t0)
        lat_m.append(t2 - t1)
    f_ms, m_ms = np.array(lat_f) * 1e3, np.array(lat_m) * 1e3
    return {
        "f50": np.percentile(f_ms, 50),
        "f95": np.percentile(f_ms, 95),
        "m50": np.percentile(m_ms, 50),
        "m95": np.percentile(m_ms, 95),
        "b50": np.percentile(f_ms + m_ms, 50),
        "first": f_ms[0] + m_ms[0],
    }


def raw_zarr_p50(path: Path, ids, count: int) -> float:
    """get() through plain zarr (no shard-index cache), the read path of the previous release."""
    import numpy as np
    import zarr

    from loftup.storage import open_store

    fs = open_store(path).features("dinov2_vits14", 224)
    arr = zarr.open_group(f"{fs.path}/shard=000000", mode="r")["features"]
    rows = np.random.default_rng(1).integers(0, len(ids), size=count)
    lat = []
    for r in rows:
        t0 = time.perf_counter()
        arr[int(r)]
        lat.append(time.perf_counter() - t0)
    return float(np.percentile(np.array(lat) * 1e3, 50))


# ---------------------------------------------------------------------------------------------
def latency(args, work: Path, mask_path: Path, feat_path: Path, console) -> None:
    """Random access at real size: one shard of ``args.real`` images, 1,024-image Zarr shards
    against one Zarr shard per tar, each built fresh from the measured stores."""
    from rich.table import Table

    from loftup.storage import open_store

    mask_store, feat_store = open_store(mask_path), open_store(feat_path)
    out = {}
    for name, shard_images in (("new", 1024), ("one Zarr shard per tar", args.real)):
        path = work / f"real-{shard_images}"
        if path.exists():
            import shutil

            shutil.rmtree(path)
        _, ids, n_masks, t_m, t_f = build_real_store(mask_store, feat_store, path, args.real, shard_images)
        out[name] = (lookups(path, ids, args.lookups), raw_zarr_p50(path, ids, args.lookups), n_masks, t_m, t_f)
    lt = Table(
        title=f"random access, one shard of {args.real:,} images ({out['new'][2]:,} masks), fresh store, "
        f"{args.lookups} lookups; baseline p50 = 20 ms (issue 16, features + masks)"
    )
    for c in (
        "layout",
        "features p50",
        "features p95",
        "masks p50",
        "masks p95",
        "both p50",
        "first lookup",
        "plain zarr get p50 (no index cache)",
    ):
        lt.add_column(c, justify="right" if c != "layout" else "left")
    for name, (r, raw, *_rest) in out.items():
        label = "1,024-image Zarr shards (this build)" if name == "new" else f"one {args.real:,}-image Zarr shard"
        lt.add_row(
            label,
            f"{r['f50']:.2f} ms",
            f"{r['f95']:.2f} ms",
            f"{r['m50']:.2f} ms",
            f"{r['m95']:.2f} ms",
            f"{r['b50']:.2f} ms",
            f"{r['first']:.1f} ms",
            f"{raw:.2f} ms",
        )
    console.print(lt)
    console.print(
        f"real-size store written in {out['new'][3]:.1f} s (masks) + {out['new'][4]:.1f} s (features); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; workdir {work}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,512,2048", help="images per tar for the job runs")
    for job in ("images", "masks", "features"):
        ap.add_argument(f"--{job}-sizes", default=None, help=f"sizes for the {job} job (default: --sizes)")
    ap.add_argument("--real", type=int, default=11186, help="images in a real SA-1B tar")
    ap.add_argument("--distinct", type=int, default=64, help="distinct 1500 px sample images the tars cycle over")
    ap.add_argument("--lookups", type=int, default=300)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-latency", action="store_true", help="only the memory table")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tar", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from rich.console import Console
    from rich.table import Table

    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.sample_data import write_sample_shards

    console = Console(width=220)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    per_job = {
        j: sorted(int(s) for s in (getattr(args, f"{j}_sizes") or args.sizes).split(","))
        for j in ("images", "masks", "features")
    }
    sizes = sorted(set(sizes) | {k for v in per_job.values() for k in v})
    fsizes = per_job["features"]
    # Finished runs are kept in the workdir, so an interrupted bench resumes where it stopped.
    done_path = Path(args.workdir or ".") / "results.json"
    done = json.loads(done_path.read_text()) if args.workdir and done_path.exists() else {}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-shard-mem-"))
    big = work / "src" / "sa_000000.tar"
    if not big.exists():
        t0 = time.perf_counter()
        write_sample_shards(work / "src", tars=1, images_per_tar=args.distinct, short_side=1500)
        console.print(f"sample tar of {args.distinct} images written in {time.perf_counter() - t0:.0f} s")
    peaks: dict[str, list] = {k: [] for k in BASELINE}
    for k in sizes:
        tar = work / f"tar{k}" / "sa_000000.tar"
        if not tar.exists():
            grow_tar(big, tar, k)
        store = work / f"store{k}"
        for kind, label in (("images", "images"), ("masks", "masks"), ("features", "features")):
            if k not in per_job[kind]:
                continue
            key = f"{kind}:{k}"
            if key not in done:
                done[key] = run_child(kind, store, tar.parent, k)
                done_path.write_text(json.dumps(done))
            r = done[key]
            peaks[label].append((k, r["peak_mb"], r["seconds"]))
            console.print(f"{label:9s} {k:6d} images: peak {r['peak_mb']:8.0f} MB, {r['seconds']:6.1f} s")
    for k in [*sizes, args.real]:
        key = f"synthetic:{k}"
        if key not in done:
            done[key] = run_child("synthetic", work / f"synth{k}", None, k)
            done_path.write_text(json.dumps(done))
        r = done[key]
        peaks["features (writer, synthetic)"].append((k, r["peak_mb"], r["seconds"]))
        console.print(f"synthetic {k:6d} images: peak {r['peak_mb']:8.0f} MB, {r['seconds']:6.1f} s")

    t = Table(
        title=f"peak RSS per shard task (inline, whole process), sizes {sizes}; baseline = issue 16, one-shot writers"
    )
    for c in (
        "job",
        "peak MB at each size",
        "slope MB/image (sizes >= 1,024 if 2+)",
        f"at {args.real:,}",
        "baseline slope",
        "baseline at 11,186",
        "goal",
        "declared memory=",
    ):
        t.add_column(c, justify="right" if c != "job" else "left")
    declared = {
        "images": ImagesJob().memory_bytes(),
        "masks": MasksJob().memory_bytes(),
        "features": FeaturesJob().memory_bytes(),
        "features (writer, synthetic)": None,
    }
    synth = dict((n, m) for n, m, _ in peaks["features (writer, synthetic)"])
    for label, rows in peaks.items():
        ns, mb = [r[0] for r in rows], [r[1] for r in rows]
        # Past one Zarr shard (1,024 images) the feature writer is flat: fit only there when measured.
        big = [(n, m) for n, m in zip(ns, mb) if n >= 1024]
        slope, icpt = fit(*zip(*big)) if len(big) >= 2 else fit(ns, mb)
        at_real = icpt + slope * args.real
        if label == "features" and args.real in synth:
            # The job's own peak plus the writer's measured growth from that size to a real tar.
            at_real = mb[-1] + synth[args.real] - synth.get(ns[-1], synth[min(synth)])
        b_slope, b_real, b_note = BASELINE[label]
        dec = declared[label]
        t.add_row(
            label,
            ", ".join(f"{m:.0f} @{n}" for n, m in zip(ns, mb)),
            f"{slope:.4f}",
            f"{at_real / 1024:.2f} GB"
            + (
                " (measured)"
                if ns[-1] == args.real
                else " (+ writer growth)"
                if label == "features" and args.real in synth
                else ""
            ),
            "-" if b_slope is None else f"{b_slope:.2f}",
            "-" if b_real is None else f"~{b_real:.1f} GB ({b_note})",
            f"< {GOAL_GB[label]} GB",
            "-" if dec is None else f"{dec / 2**30:.2f} GiB",
        )
    console.print(t)

    if args.skip_latency:
        return
    latency(args, work, work / f"store{per_job['masks'][-1]}", work / f"store{fsizes[-1]}", console)


if __name__ == "__main__":
    main()
