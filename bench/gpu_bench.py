"""The speed story on one accelerator, in one command: one table, also written as JSON.

- LoftUp dim 384, dense and bounded (the planner's tiles for this device), fp32 and bf16
  autocast, outputs 224 / 448 / 896 / 2048 and the largest bounded output that fits, from
  16x16 and 32x32 grids: ms per image (synchronised, warm: best of the timed calls) and peak
  device memory beyond what was allocated before the call, with the DINOv2-S/14 forward that
  produces each grid beside it. ``--compile`` adds torch.compile'd rows.
- Stage 1 step at the released settings (dim 384, 224, batch 8) and Stage 2 step (student 518,
  HR 896, 2 crops, batch 2): the trainers' own loops for a few steps, seconds per step from
  their per-step log (steps after the first), peak memory of the whole run.
- The features job over sample shards (DINOv2-S random init, batch 64) against the bare
  backbone over the same decoded images: images/s and the job's overhead.
- SAM vit_h (random init) automatic mask generation at SA-1B's settings (32x32 points plus two
  crop layers), through segment-anything's generator and our row conversion: seconds per image.

Nothing is downloaded: random weights of the real shapes, sample shards built on the spot.

    python bench/gpu_bench.py [--json gpu_bench.json] [--compile] [--only upsampler,stage1,...]
    python bench/gpu_bench.py --cpu-small     # tiny sizes on the CPU (what the test runs)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SECTIONS = ("upsampler", "stage1", "stage2", "features", "sam")

FULL = {
    "dim": 384,
    "sizes": [224, 448, 896, 2048],
    "grids": [16, 32],
    "largest": [2896, 4096, 5792, 8192],
    "dense_max": 2048,
    "repeats": 5,
    "budget_s": 10.0,
    "stage1": {"pca_dim": None, "size": 224, "batch_size": 8, "steps": 6, "recipe": "released"},
    "stage2": {"sizes": [518], "hr": None, "batch_size": 2, "crops": 2, "steps": 5, "recipe": "released"},
    "shards": {"tars": 2, "per_tar": 64, "short_side": 1500},
    "features_batch": 64,
    "sam": {"model": "vit_h", "images": 2, "settings": {}},
}
SMALL = {
    "dim": 384,
    "sizes": [28],
    "grids": [2],
    "largest": [42],
    "dense_max": 28,
    "repeats": 1,
    "budget_s": 1.0,
    # The paper recipe: the released one's live-backbone terms would dominate a 28 px test step.
    "stage1": {"pca_dim": 16, "size": 28, "batch_size": 2, "steps": 2, "recipe": "paper"},
    "stage2": {"sizes": [28], "hr": 56, "batch_size": 2, "crops": 2, "steps": 2, "recipe": "paper"},
    "shards": {"tars": 1, "per_tar": 4, "short_side": 96},
    "features_batch": 2,
    "sam": {
        "model": "tiny",
        "images": 1,
        "settings": {
            "points_per_side": 2,
            "points_per_batch": 4,
            "crop_n_layers": 0,
            "crop_n_points_downscale_factor": 1,
        },
    },
}


# --------------------------------------------------------------------------- timing helpers
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int, budget_s: float) -> float:
    """Best seconds of up to ``repeats`` calls after one warm-up call (fewer when slow)."""
    fn()
    _sync(device)
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget_s:
            break
    return best


def _peak(fn, device) -> int | None:
    """Peak device memory of one call beyond what was allocated before it (None on the CPU)."""
    import torch

    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def _oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _precision(device, name: str):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if name == "bf16" else nullcontext()


# --------------------------------------------------------------------------- upsampler
BYTES_PER_VALUE = {"fp32": 4, "bf16": 2}


def _row_line(row: dict) -> str:
    """One log line of an upsampler row: its time and peak memory, or its error."""
    what = f"  {row['what']:9s} {row['precision']} out {row['out']:5d} grid {row['grid']:2d}: "
    if row.get("error"):
        return what + row["error"]
    peak = f", {row['peak_bytes'] / 2**20:,.0f} MiB" if row.get("peak_bytes") else ""
    return what + f"{row['ms']:.1f} ms" + peak


def bench_upsampler(cfg: dict, device, compile_: bool, log) -> list[dict]:
    import torch

    from loftup.pipeline.backbones import create_backbone
    from loftup.training.model import DeviceSpec, LoftUp, plan_execution

    rows = []
    torch.manual_seed(0)
    model = LoftUp(cfg["dim"]).to(device).eval()
    model.autocast = None  # precision is set per row by the bench
    vit = create_backbone("dinov2_vits14", random_init=True, device=device).eval()

    def one(kind, out, grid, precision, plan=None, compiled=False) -> dict:
        row = {"what": kind, "out": out, "grid": grid, "precision": precision, "compiled": compiled}
        lr = torch.randn(1, cfg["dim"], grid, grid, device=device)
        img = torch.randn(1, 3, out, out, device=device)
        if kind == "dinov2_s":
            x = torch.rand(1, 3, grid * 14, grid * 14, device=device)
            run = lambda: vit(x)  # noqa: E731
        else:
            m = compiled_model if compiled else model
            if kind == "dense":
                m.set_memory_bound(0, 0)
            else:
                m.set_memory_bound(plan[1], plan[0])
                row["plan"] = list(plan)
            run = lambda: m(lr, img)  # noqa: E731
        try:
            with torch.inference_mode(), _precision(device, precision):
                row["peak_bytes"] = _peak(run, device)
                row["ms"] = 1e3 * _timed(run, device, cfg["repeats"], cfg["budget_s"])
        except Exception as exc:  # an OOM is a result, anything else a failure of the bench
            if not _oom(exc):
                raise
            row["error"] = "out of memory"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(_row_line(row))
        return row

    compiled_model = None
    if compile_:
        compiled_model = LoftUp(cfg["dim"]).to(device).eval()
        compiled_model.load_state_dict(model.state_dict())
        compiled_model.autocast = None
        compiled_model.enable_compile()
    for grid in cfg["grids"]:
        for precision in ("fp32", "bf16"):
            rows.append(one("dinov2_s", grid * 14, grid, precision))
        for out in cfg["sizes"]:
            for precision in ("fp32", "bf16"):
                bpv = BYTES_PER_VALUE[precision]
                spec = DeviceSpec.of(device)
                plan = plan_execution(spec, out, out, keys=grid * grid, bytes_per_value=bpv, allow_dense=False)
                if out <= cfg["dense_max"]:
                    rows.append(one("dense", out, grid, precision))
                    dense_fits = plan_execution(spec, out, out, keys=grid * grid, bytes_per_value=bpv) is None
                    rows[-1]["planned"] = ("bounded", "dense")[dense_fits]
                rows.append(one("bounded", out, grid, precision, plan))
                if compiled_model is not None:
                    rows.append(one("bounded", out, grid, precision, plan, compiled=True))
                    if out <= cfg["dense_max"]:
                        rows.append(one("dense", out, grid, precision, compiled=True))
    rows += _largest_bounded(one, cfg, device)
    return rows


def _largest_bounded(one, cfg: dict, device) -> list[dict]:
    """The largest bounded output that fits, per precision: the output tensor itself is the limit."""
    from loftup.training.model import DeviceSpec, plan_execution

    found = []
    grid = cfg["grids"][-1]
    for precision in ("fp32", "bf16"):
        largest = None
        for out in cfg["largest"]:
            plan = plan_execution(
                DeviceSpec.of(device),
                out,
                out,
                keys=grid * grid,
                bytes_per_value=BYTES_PER_VALUE[precision],
                allow_dense=False,
            )
            row = one("bounded", out, grid, precision, plan)
            if "error" in row:
                break
            largest = row
        if largest is not None:
            largest["largest"] = True
            found.append(largest)
    return found


# --------------------------------------------------------------------------- training steps
def _step_seconds(run_dir: Path, batch: int) -> list[float]:
    """Seconds of each logged step (the trainers log every step here), first step excluded."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    return [batch / r for r in rates[1:]]


def _run_peak(fn, device):
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    return result, (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def _timed_training(train, config_cls, out: Path, c: dict, device, **fields) -> dict:
    """Run ``train`` for ``c["steps"]`` steps of ``c["batch_size"]`` (random weights, every step
    logged): the timing and peak-memory columns of its row."""
    run_cfg = config_cls(
        out=str(out),
        recipe=c["recipe"],
        random_init=True,
        batch_size=c["batch_size"],
        max_steps=c["steps"],
        log_every=1,
        checkpoint_every=10**9,
        workers=0 if device.type == "cpu" else 4,
        progress=False,
        device=str(device),
        **fields,
    )
    _, peak = _run_peak(lambda: train(run_cfg), device)
    steps = _step_seconds(out, c["batch_size"])
    return {
        "s_per_step": min(steps),
        "s_per_step_median": sorted(steps)[len(steps) // 2],
        "steps_timed": len(steps),
        "peak_bytes": peak,
    }


def bench_stage1(cfg: dict, url: str, work: Path, device, log) -> tuple[dict, str]:
    from loftup.training.stage1 import Stage1Config, train

    c = cfg["stage1"]
    out = work / "stage1"
    # The released recipe (the default) runs the backbone live for its reconstruction term: random weights.
    timing = _timed_training(train, Stage1Config, out, c, device, store=url, pca_dim=c["pca_dim"], size=c["size"])
    row = {
        "what": "stage1_step",
        "recipe": c["recipe"],
        "size": c["size"],
        "batch": c["batch_size"],
        "pca_dim": c["pca_dim"],
        **timing,
    }
    log(f"  stage 1 step: {row['s_per_step']:.3f} s (median {row['s_per_step_median']:.3f})")
    return row, str(out / "stage1.safetensors")


def bench_stage2(cfg: dict, url: str, init: str, work: Path, device, log) -> dict:
    from loftup.training.stage2 import Stage2Config, train

    c = cfg["stage2"]
    out = work / "stage2"
    fields = {"init": init, "store": url, "sizes": c["sizes"], "hr": c["hr"], "crops": c["crops"]}
    timing = _timed_training(train, Stage2Config, out, c, device, **fields)
    row = {
        "what": "stage2_step",
        "recipe": c["recipe"],
        "student": c["sizes"],
        "hr": c["hr"] or 896,
        "batch": c["batch_size"],
        "crops": c["crops"],
        **timing,
    }
    log(f"  stage 2 step: {row['s_per_step']:.3f} s (median {row['s_per_step_median']:.3f})")
    return row


# --------------------------------------------------------------------------- features job
def bench_features(cfg: dict, url: str, shards: list, device, log) -> list[dict]:
    import io

    import numpy as np
    import torch
    from PIL import Image
    from rich.console import Console

    from loftup.pipeline.backbones import create_backbone
    from loftup.pipeline.devices import autocast
    from loftup.pipeline.jobs import FeaturesJob
    from loftup.pipeline.runner import run_job
    from loftup.storage import open_store

    store = open_store(url)
    batch = cfg["features_batch"]
    ids = [int(i) for s, _ in shards for i in store.image_ids(s)]
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(store.image_bytes(i, 224))).convert("RGB")) for i in ids])
    model = create_backbone("dinov2_vits14", random_init=True, device=device)

    def bare():
        with torch.inference_mode():
            for i in range(0, len(imgs), batch):
                x = torch.from_numpy(imgs[i : i + batch]).to(device).permute(0, 3, 1, 2).float().div_(255)
                with autocast(device):
                    model(x)
        _sync(device)

    bare()  # warm-up
    t0 = time.perf_counter()
    bare()
    bare_rate = len(ids) / (time.perf_counter() - t0)
    job = FeaturesJob(random_init=True, batch_size=batch, device=str(device))
    job_shards = [(s, None) for s, _ in shards]
    run_job(job, store, job_shards, executor="inline", overwrite=True, console=Console(quiet=True))  # warm
    summary = run_job(job, store, job_shards, executor="inline", overwrite=True, console=Console(quiet=True))
    job_rate = len(ids) / summary.seconds
    log(f"  features job {job_rate:.1f} img/s vs bare backbone {bare_rate:.1f} img/s")
    return [
        {"what": "backbone_bare", "images": len(ids), "batch": batch, "images_per_s": bare_rate},
        {
            "what": "features_job",
            "images": len(ids),
            "batch": batch,
            "images_per_s": job_rate,
            "overhead_pct": 100 * (bare_rate / job_rate - 1),
        },
    ]


# --------------------------------------------------------------------------- SAM
def bench_sam(cfg: dict, url: str, shards: list, device, log) -> dict:
    import importlib
    import io
    import tarfile

    import numpy as np
    import torch
    from PIL import Image
    from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

    from loftup.pipeline.mask_sources import SamSettings, sam_records_to_rows

    c = cfg["sam"]
    torch.manual_seed(0)
    if c["model"] == "tiny":  # CPU test: the real generator around a one-block encoder
        build = importlib.import_module("segment_anything.build_sam")
        sam = build._build_sam(
            encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1, encoder_global_attn_indexes=[0]
        )
    else:
        sam = sam_model_registry[c["model"]](checkpoint=None)
    sam = sam.to(device).eval()
    settings = SamSettings(**c["settings"])
    generator = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **settings.generator_kwargs())
    # The original photos from the tars (SA-1B images are ~1500 x 2250 px; the samples' short side
    # is the store's --short-side), as the masks job feeds them to the generator.
    images = []
    with tarfile.open(shards[0][1]) as tar:
        for member in tar:
            if member.name.endswith(".jpg") and len(images) <= c["images"]:
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
    generator.generate(images[0])  # warm-up (kernel selection)
    times, masks = [], 0
    for i, img in enumerate(images[1:]):
        _sync(device)
        t0 = time.perf_counter()
        rows = sam_records_to_rows(generator.generate(img), i, img.shape[:2])
        _sync(device)
        times.append(time.perf_counter() - t0)
        masks += len(rows)
    row = {
        "what": "sam_amg",
        "model": c["model"],
        "image_px": list(images[0].shape[:2]),
        "settings": settings.generator_kwargs(),
        "s_per_image": sum(times) / len(times),
        "masks_per_image": masks / len(times),
        "images": len(times),
    }
    log(f"  SAM {c['model']} AMG: {row['s_per_image']:.2f} s/img ({row['masks_per_image']:.0f} masks, random weights)")
    return row


# --------------------------------------------------------------------------- report
def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    env = result["environment"]
    rows = result["rows"]
    up = [r for r in rows if r["what"] in ("dense", "bounded", "dinov2_s")]
    if up:
        table = Table(
            title=f"LoftUp dim {result['config']['dim']} on {env['device_name']} (batch 1, warm, synchronised)"
        )
        for col in ("output", "grid", "path", "precision", "plan (tile, chunk)", "ms / img", "peak MiB", "x DINOv2-S"):
            table.add_column(col, justify="left" if col in ("path", "precision") else "right")
        backbone = {(r["grid"], r["precision"]): r.get("ms") for r in up if r["what"] == "dinov2_s"}
        for r in up:
            path = r["what"] + (" (compiled)" if r.get("compiled") else "") + (" largest" if r.get("largest") else "")
            if r["what"] == "dense" and r.get("planned"):
                path += f" [plan: {r['planned']}]"
            bb = backbone.get((r["grid"], r["precision"]))
            ratio = f"{r['ms'] / bb:.1f}" if r["what"] != "dinov2_s" and bb and r.get("ms") else ""
            table.add_row(
                str(r["out"]),
                f"{r['grid']}x{r['grid']}",
                "DINOv2-S/14 forward" if r["what"] == "dinov2_s" else path,
                r["precision"],
                ", ".join(map(str, r.get("plan", []))),
                r.get("error") or f"{r['ms']:.1f}",
                _mib(r.get("peak_bytes")),
                ratio,
            )
        console.print(table)
    other = [r for r in rows if r["what"] not in ("dense", "bounded", "dinov2_s")]
    if other:
        table = Table(title="training steps, pipeline, SAM")
        for col in ("what", "setting", "value", "peak MiB"):
            table.add_column(col)
        for r in other:
            if r["what"].endswith("_step"):
                setting = (
                    f"dim {r.get('pca_dim') or result['config']['dim']}, {r['size']} px, batch {r['batch']}"
                    if r["what"] == "stage1_step"
                    else f"student {r['student']}, HR {r['hr']}, {r['crops']} crops, batch {r['batch']}"
                )
                value = f"{r['s_per_step']:.3f} s/step (median {r['s_per_step_median']:.3f}, {r['steps_timed']} steps)"
                table.add_row(r["what"], f"{setting}, {r['recipe']} recipe", value, _mib(r["peak_bytes"]))
            elif r["what"] == "features_job":
                table.add_row(
                    "features job",
                    f"{r['images']} images, batch {r['batch']}",
                    f"{r['images_per_s']:.1f} img/s, overhead {r['overhead_pct']:+.1f}%",
                    "",
                )
            elif r["what"] == "backbone_bare":
                table.add_row(
                    "bare DINOv2-S (baseline)",
                    f"{r['images']} images, batch {r['batch']}",
                    f"{r['images_per_s']:.1f} img/s",
                    "",
                )
            elif r["what"] == "sam_amg":
                table.add_row(
                    f"SAM {r['model']} AMG (random init)",
                    f"{r['image_px'][0]}x{r['image_px'][1]} px",
                    f"{r['s_per_image']:.2f} s/img, {r['masks_per_image']:.0f} masks",
                    "",
                )
        console.print(table)
    console.print(
        f"  {env['device_name']}, torch {env['torch']}, {env['threads']} threads, "
        f"load average {env['load_start']:.1f} -> {env['load_end']:.1f}, {result['seconds']:.0f} s"
    )


def run(
    cpu_small: bool = False,
    only=SECTIONS,
    compile_: bool = False,
    workdir: str | None = None,
    device: str = "auto",
    log=print,
) -> dict:
    import torch

    from loftup.pipeline.devices import pick_device

    cfg = SMALL if cpu_small else FULL
    dev = torch.device("cpu") if cpu_small else pick_device(device)
    threads = torch.get_num_threads()
    if cpu_small:
        # Tiny ops on a shared CPU: one thread avoids stalls at every OpenMP barrier.
        torch.set_num_threads(1)
    try:
        return _run(cfg, dev, only, compile_, workdir, cpu_small, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg, dev, only, compile_, workdir, cpu_small, log) -> dict:
    import torch

    t0 = time.perf_counter()
    env = {
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "load_start": os.getloadavg()[0],
    }
    rows = []
    work = Path(workdir or tempfile.mkdtemp(prefix="loftup-gpu-bench-"))
    if "upsampler" in only:
        log("upsampler")
        rows += bench_upsampler(cfg, dev, compile_, log)
    needs_store = {"stage1", "stage2", "features", "sam"} & set(only)
    if needs_store:
        from loftup.pipeline.shards import resolve_shards
        from loftup.sample_data import build_sample_store

        # Images, masks and (CPU-made, random-init) DINOv2-S features of fresh sample shards.
        c = cfg["shards"]
        kw = {"tars": c["tars"], "images_per_tar": c["per_tar"], "short_side": c["short_side"]}
        url = build_sample_store(work / "store", work / "sa1b", **kw, sizes=(224, 896), device="cpu", log=log).url
        shards = resolve_shards(f"0-{c['tars'] - 1}", work / "sa1b")
        init = None
        if {"stage1", "stage2"} & set(only):
            log("training steps")
            row, init = bench_stage1(cfg, url, work, dev, log)
            rows.append(row)
        if "stage2" in only:
            rows.append(bench_stage2(cfg, url, init, work, dev, log))
        if "features" in only:
            log("features job")
            rows += bench_features(cfg, url, shards, dev, log)
        if "sam" in only:
            log("SAM")
            rows.append(bench_sam(cfg, url, shards, dev, log))
    env["load_end"] = os.getloadavg()[0]
    return {
        "config": {"dim": cfg["dim"], "cpu_small": cpu_small, "compile": compile_},
        "environment": env,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-small", action="store_true", help="tiny sizes on the CPU (the test's run)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd upsampler rows")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default="gpu_bench.json", help="where to write the rows (default gpu_bench.json)")
    ap.add_argument("--workdir", help="for the sample store and training runs (default: a temporary folder)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    import torch

    if not args.cpu_small and args.device == "auto" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --cpu-small for the CPU check", file=sys.stderr)
        return 2
    result = run(
        args.cpu_small,
        only,
        args.compile,
        args.workdir,
        args.device,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    render(result)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"  rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
