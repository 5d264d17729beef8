"""Stage 2: where one training step's time goes, and what the affinity loss costs in memory.

(a) The time split of one Stage 2 step, from the trainer's own ``timings``: a run of 1 step
    and a run of 1 + k steps with the same seed; their difference over k is the steady
    per-step cost (the first step pays allocations and loader start-up). Setting: a PCA-64
    Stage 1 checkpoint trained for 1 step, student size s = 224, HR 896, batch 2, 2 crops per
    image, a random-init dinov2_vits14, DataLoader workers 0 (so "data" is the decode cost).
    Below it, the trainer's "teacher" phase split into upsampler / mask refinement / roi_align.
(b) ``affinity_loss`` (Gram form) at s = 518, C = 384, border 0.1 (N = 414^2 = 171,396 pixels):
    peak memory measured in a fresh subprocess (peak RSS counter reset just before the call,
    VmHWM - VmRSS), beside the N x N float32 matrix the explicit form would need (computed,
    never allocated). At s = 224 (N = 32,400) the Gram form against the explicit N x N form:
    the library's ``affinity_loss_explicit`` holds four N x N float32 matrices (16.8 GB), so
    by default it runs at s = 112 and, at s = 224, the explicit form is evaluated by row blocks
    of the N x N matrices (every entry formed, never all at once); --explicit-224 runs the
    library one there too on a machine with the memory.

    python bench/stage2_bench.py [--workdir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE = "dinov2_vits14"
PHASES = ("data", "vfm_student", "vfm_crops", "teacher", "student", "loss", "backward")
PHASE_NOTES = {
    "data": "next(loader) in-process: 896 JPEG decode + crop masks (workers=0)",
    "vfm_student": "ViT on the HR image resized to s",
    "vfm_crops": "ViT on the 2 s x s crops per image",
    "teacher": "EMA upsampler on the crops + mask refinement (alpha 0.5) + roi_align onto the student grid",
    "student": "student upsampler forward at s (autograd on)",
    "loss": "student regions + affinity loss (Gram form)",
    "backward": "backward + grad clip + AdamW (timed by the loop's train_step)",
}


# --------------------------------------------------------------------------- memory probes
from memprobe import reset_peak as _reset_peak  # noqa: E402
from memprobe import status_kb as _status_kb  # noqa: E402
from timing import best_seconds, run_header  # noqa: E402


def _peak_over(fn) -> tuple[float, int, object, bool]:
    """(seconds, bytes of peak RSS above the RSS before the call, result, whether the peak
    counter could be reset) of ``fn()``."""
    import resource

    base = _status_kb("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    # Without clear_refs, ru_maxrss is the peak of the whole process life; it is still right
    # when this call sets a new peak, which is the case for every probe here (inputs are built
    # first and are smaller than what the call adds on top of them).
    peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return seconds, max(0, peak_kb - base) * 1024, result, exact


def smooth_features(batch: int, chans: int, size: int, seed: int):
    """ViT-like features: a random (size/14)^2 grid upsampled bicubically to size x size, so
    neighbouring pixels are correlated and the affinity matrices are not near-diagonal."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    grid = max(2, size // 14)
    low = torch.randn(batch, chans, grid, grid, generator=gen)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)


def explicit_blocked(student, teacher, border: float, rows: int = 1024) -> float:
    """The explicit N x N loss, built row block by row block (float32 entries, float64 sum)."""
    import torch.nn.functional as F

    h, w = student.shape[-2:]
    bh, bw = int(round(border * h)), int(round(border * w))
    total = 0.0
    n = (h - 2 * bh) * (w - 2 * bw)
    for b in range(student.shape[0]):
        s = F.normalize(student[b, :, bh : h - bh, bw : w - bw].float(), dim=0).flatten(1)
        t = F.normalize(teacher[b, :, bh : h - bh, bw : w - bw].float(), dim=0).flatten(1)
        acc = 0.0
        for r in range(0, n, rows):
            diff = s[:, r : r + rows].t() @ s - t[:, r : r + rows].t() @ t
            acc += float(diff.double().pow(2).sum())
        total += acc / n / n
    return total / student.shape[0]


def worker(args) -> dict:
    """Peak memory of one loss evaluation on fresh inputs in this fresh process, and its time
    (of a second call with --warmup); main() prints the result as a JSON line."""
    import torch

    from loftup.training.losses import affinity_loss, affinity_loss_explicit

    torch.set_num_threads(args.threads)
    student = smooth_features(1, args.chans, args.size, seed=1)
    teacher = student + 0.3 * smooth_features(1, args.chans, args.size, seed=2)
    if args.grad:
        student.requires_grad_(True)

    def run():
        if args.worker == "gram":
            loss = affinity_loss(student, teacher, border=0.1)
            if args.grad:
                loss.backward()
            return float(loss.detach())
        if args.worker == "explicit":
            with torch.no_grad():
                return float(affinity_loss_explicit(student, teacher, border=0.1))
        with torch.no_grad():
            return explicit_blocked(student, teacher, 0.1)

    # The peak is taken on the first call: later calls reuse memory the allocator kept.
    with torch.no_grad() if not args.grad else torch.enable_grad():
        seconds, peak, value, exact = _peak_over(run)
        if args.warmup:
            student.grad = None
            t0 = time.perf_counter()
            run()
            seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_bytes": peak, "value": value, "exact_peak": exact}


def run_worker(form: str, size: int, chans: int, grad: bool, warmup: bool, threads: int) -> dict:
    cmd = (
        [
            sys.executable,
            __file__,
            "--worker",
            form,
            "--size",
            str(size),
            "--chans",
            str(chans),
            "--threads",
            str(threads),
        ]
        + (["--grad"] if grad else [])
        + (["--warmup"] if warmup else [])
    )
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def n_pixels(size: int, border: float = 0.1) -> int:
    b = int(round(border * size))
    return (size - 2 * b) ** 2


# --------------------------------------------------------------------------- stage 2 step
def stage1_checkpoint(url: str, work: Path, log) -> str:
    """A PCA-64 Stage 1 checkpoint trained for one step (reused when already there)."""
    from loftup.training.stage1 import Stage1Config, train

    ckpt = work / "stage2_bench_init" / "stage1.safetensors"
    if not ckpt.exists():
        t0 = time.perf_counter()
        train(
            Stage1Config(
                store=url,
                out=str(ckpt.parent),
                backbone=BACKBONE,
                pca_dim=64,
                size=112,
                random_init=True,
                max_steps=1,
                batch_size=8,
                workers=0,
                progress=False,
                device="cpu",
            )
        )
        log(f"stage 1 init (PCA-64, 1 step) in {time.perf_counter() - t0:.0f} s")
    return str(ckpt)


def stage2_timings(url: str, init: str, work: Path, steps: int, tag: str) -> dict:
    from loftup.training.stage2 import Stage2Config, train

    out = work / f"stage2_bench_{tag}"
    cfg = Stage2Config(
        init=init,
        store=url,
        out=str(out),
        backbone=BACKBONE,
        random_init=True,
        sizes=[224],
        hr=None,
        batch_size=2,
        crops=2,
        max_steps=steps,
        workers=0,
        progress=False,
        log_every=10_000,
        checkpoint_every=10_000,
        device="cpu",
        seed=0,
    )
    t0 = time.perf_counter()
    result = train(cfg)
    return {"timings": result["timings"], "wall": time.perf_counter() - t0, "steps": result["steps"]}


def teacher_split(url: str, init: str, repeats: int) -> dict:
    """Seconds of the pieces of the trainer's "teacher" phase on one batch like the runs'."""
    import torch

    from loftup.pipeline.backbones import create_backbone
    from loftup.storage import open_store
    from loftup.training.data import Stage2Dataset, batch_masks, build_index, collate_stage2, normalise_float
    from loftup.training.pseudo_gt import mask_refine
    from loftup.training.stage2 import load_init, teacher_targets

    torch.manual_seed(0)
    store = open_store(url)
    index = build_index(store, ["images", "masks"])
    ds = Stage2Dataset(url, index, geometry=896, crops=2)
    batch = collate_stage2([ds[(0, 224, 1)], ds[(1, 224, 2)]])
    batch["masks"], batch["valid"] = batch_masks(batch, "cpu")
    teacher, projection, _ = load_init(init, BACKBONE)
    teacher.eval()
    vfm = create_backbone(BACKBONE, random_init=True)
    img = batch["image"].float().div_(255)
    s, crops = batch["s"], batch["crops"]
    crop_imgs = torch.stack([img[k // 2, :, c.top : c.top + s, c.left : c.left + s] for k, c in enumerate(crops)])
    with torch.no_grad():
        lr = projection(vfm(crop_imgs))
        out = teacher(lr, normalise_float(crop_imgs))
        refined = mask_refine(out, batch["masks"], batch["valid"], 0.5)
        n = min(c.n for c in crops)
        pieces = {
            "teacher upsampler forward": lambda: teacher(lr, normalise_float(crop_imgs)),
            "mask_refine (alpha 0.5)": lambda: mask_refine(out, batch["masks"], batch["valid"], 0.5),
            "teacher_targets (roi_align)": lambda: teacher_targets(refined, crops, n),
        }
        timings = {name: _best(fn, repeats) for name, fn in pieces.items()}
        # Its per-mask loop is ~10 small ops per mask: with more threads than free cores,
        # each op waits for a descheduled pool thread, so it is also timed on one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            timings["mask_refine (alpha 0.5), 1 thread"] = _best(pieces["mask_refine (alpha 0.5)"], repeats)
            timings["one 7.5 MB copy, 1 thread"] = _best(_copy_probe(), 10)
        finally:
            torch.set_num_threads(threads)
        timings[f"one 7.5 MB copy, {threads} threads"] = _best(_copy_probe(), 10)
    masks = int(batch["valid"].sum()) / batch["valid"].shape[0]
    return {"timings": timings, "crops": len(crops), "masks_per_crop": masks, "n": n, "dim": out.shape[1]}


_best = best_seconds


def _copy_probe():
    """A pure memory copy: its time at 1 vs N threads shows the fork-join wait of a parallel
    torch op when the cores are shared (it should be ~0.2 ms either way on idle cores)."""
    import torch

    x = torch.ones(150, 224, 224, dtype=torch.bool)
    y = torch.empty_like(x)
    return lambda: y.copy_(x)


# --------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="build the store here, or reuse the one already there")
    ap.add_argument("--steps", type=int, default=None, help="timed Stage 2 steps after the first (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--explicit-224", action="store_true", help="also run the library's explicit loss at s=224 (~17 GB)"
    )
    ap.add_argument("--quick", action="store_true", help="fewer steps; no blocked explicit check at 224")
    ap.add_argument("--worker", choices=("gram", "explicit", "blocked"), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=518, help=argparse.SUPPRESS)
    ap.add_argument("--chans", type=int, default=384, help=argparse.SUPPRESS)
    ap.add_argument("--grad", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch
    from rich.console import Console
    from rich.table import Table

    from loftup.sample_data import build_sample_store

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    console = Console(width=200)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loftup-stage2-bench-"))
    t_run, load0 = run_header(console, work, str(threads))
    steps = args.steps or (1 if args.quick else 2)

    # (a) ------------------------------------------------------------------------------------
    store = build_sample_store(
        work / "store", work / "sa1b", tars=2, images_per_tar=16, short_side=1500, sizes=(224, 896), log=console.print
    )
    url = store.url
    init = stage1_checkpoint(url, work, console.print)
    first = stage2_timings(url, init, work, 1, "a")
    more = stage2_timings(url, init, work, 1 + steps, "b")
    console.print(f"[dim]stage 2 runs done ({time.perf_counter() - t_run:.0f} s)[/]")
    steady = {k: max(0.0, (more["timings"][k] - first["timings"][k]) / steps) for k in PHASES}
    total = sum(steady.values())
    split = Table(
        title=f"(a) one Stage 2 step: dim 64 (PCA-64 Stage 1 init), s = 224, HR 896, batch 2, 2 crops/image; "
        f"{threads} torch threads; steady = (run of {1 + steps} steps - run of 1) / {steps}"
    )
    mean = {k: more["timings"][k] / more["steps"] for k in PHASES}
    for col in ("phase", "first step (s)", f"mean of {1 + steps} (s)", "steady step (s)", "share", "what it covers"):
        split.add_column(col, overflow="fold")
    for k in PHASES:
        split.add_row(
            k,
            f"{first['timings'][k]:.2f}",
            f"{mean[k]:.2f}",
            f"{steady[k]:.2f}",
            f"{100 * steady[k] / max(total, 1e-9):.0f}%",
            PHASE_NOTES[k],
        )
    split.add_row(
        "total",
        f"{sum(first['timings'].values()):.2f}",
        f"{sum(mean.values()):.2f}",
        f"{total:.2f}",
        "100%",
        f"{2 / max(total, 1e-9):.2f} samples/s; run walls {first['wall']:.0f} s / {more['wall']:.0f} s (model builds, checkpoints)",
    )
    ts = teacher_split(url, init, repeats=1 if args.quick else 2)
    for name, sec in ts["timings"].items():
        where = "teacher" if "copy" not in name else "fork-join probe"
        split.add_row(
            f"  {where}: {name}",
            "",
            "",
            f"{sec * 1e3:.2f} ms" if sec < 0.1 else f"{sec:.2f}",
            "",
            f"{ts['crops']} crops, dim {ts['dim']}, {ts['masks_per_crop']:.0f} masks/crop, region n = {ts['n']}; "
            "separate measurement, best of repeats"
            if where == "teacher"
            else "same bytes at 1 and N threads: a gap = cores shared with other processes",
        )
    console.print(split)

    # (b) ------------------------------------------------------------------------------------
    rows = []
    n518 = n_pixels(518)
    for grad in (False, True):
        r = run_worker("gram", 518, 384, grad, warmup=not args.quick, threads=threads)
        rows.append(
            (
                "gram (affinity_loss)",
                "518",
                n518,
                "fwd+bwd" if grad else "forward",
                r,
                "+ the 412 MB gradient of the student input" if grad else "inputs: 2 x 412 MB, not counted",
            )
        )
    explicit_bytes = n518**2 * 4
    rows.append(
        (
            "explicit N x N float32",
            "518",
            n518,
            "one N x N matrix",
            {"computed_bytes": explicit_bytes},
            f"computed, not allocated; the library's explicit form holds 4 of them: {4 * explicit_bytes / 1e9:.0f} GB",
        )
    )
    n224 = n_pixels(224)
    g224 = run_worker("gram", 224, 384, False, warmup=True, threads=threads)
    rows.append(("gram (affinity_loss)", "224", n224, "forward", g224, ""))
    if not args.quick:
        b224 = run_worker("blocked", 224, 384, False, warmup=False, threads=threads)
        rows.append(("explicit, row blocks of 1024", "224", n224, "forward", b224, _agree(g224, b224)))
    if args.explicit_224:
        e224 = run_worker("explicit", 224, 384, False, warmup=False, threads=threads)
        rows.append(("explicit (affinity_loss_explicit)", "224", n224, "forward", e224, _agree(g224, e224)))
    else:
        rows.append(
            (
                "explicit (affinity_loss_explicit)",
                "224",
                n224,
                "not run",
                {"computed_bytes": 4 * n224**2 * 4},
                "4 N x N float32 matrices (a_s, a_t, difference, square); --explicit-224 runs it",
            )
        )
    g112 = run_worker("gram", 112, 384, False, warmup=True, threads=threads)
    e112 = run_worker("explicit", 112, 384, False, warmup=True, threads=threads)
    rows.append(("gram (affinity_loss)", "112", n_pixels(112), "forward", g112, ""))
    rows.append(("explicit (affinity_loss_explicit)", "112", n_pixels(112), "forward", e112, _agree(g112, e112)))

    mem = Table(
        title=f"(b) affinity loss, C = 384, border 0.1, batch 1 ({threads} torch threads; "
        "peak = VmHWM - VmRSS before the call, in a fresh process)"
    )
    for col in ("form", "s", "N pixels", "pass", "time (s)", "peak memory", "loss value", "notes"):
        mem.add_column(col, overflow="fold")
    for form, s, n, what, r, note in rows:
        if "error" in r:
            mem.add_row(form, s, f"{n:,}", what, "-", "-", "-", f"failed: {r['error']}")
        elif "computed_bytes" in r:
            mem.add_row(form, s, f"{n:,}", what, "-", f"{_gb(r['computed_bytes'])} (computed)", "-", note)
        else:
            mem.add_row(form, s, f"{n:,}", what, f"{r['seconds']:.2f}", _gb(r["peak_bytes"]), f"{r['value']:.6g}", note)
    console.print(mem)
    console.print(
        f"In the trainer the loss sees each crop's student region, n x n with n = floor(s * s / HR): at s = 518, "
        f"HR 896, n = 299 and N = {n_pixels(299):,} per crop, batch x 2 crops of them."
    )
    console.print(f"total {time.perf_counter() - t_run:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _agree(gram: dict, explicit: dict) -> str:
    if "value" not in gram or "value" not in explicit:
        return ""
    rel = abs(gram["value"] - explicit["value"]) / max(abs(explicit["value"]), 1e-30)
    return f"relative difference to the Gram form {rel:.1e}"


if __name__ == "__main__":
    main()
