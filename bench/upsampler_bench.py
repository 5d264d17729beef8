"""Time and peak memory of LoftUp (dense and memory-bounded), bilinear and the backbone.

One table, measured in one run on this machine: for each output size and method a fresh
subprocess builds the module and its inputs, then runs one forward while a thread samples
the process's anonymous RSS every 5 ms: "peak" is its highest value minus the value just
before the call, "beyond output" subtracts the bytes of the output tensor itself. The
kernel's own high-water mark (ru_maxrss after resetting it through /proc/self/clear_refs)
is shown beside it as a cross-check; it also counts file-backed pages, which this VM drops
from memory during long runs. Time: the best of further calls when the first one is short
enough to repeat, else that first call.

Before that table, one process measures compute efficiency: the bare fp32 matmul rate
(2048^3, best of several, before and after), then the dense and the bounded path at 224 and
448 alternately (best of a few calls each), then the bounded path back to back (best of 3:
a loop over images, where its buffers are not faulted in afresh after each dense call), as model GFLOP/s (the dense model's FLOPs counted
from its shapes: halo recomputation counts against the bounded path) and as a share of that
matmul rate, with the bounded output's relative error against the dense one. On a shared
machine the ratio is more robust than the seconds, but only partly: other jobs slow the
model's memory-bound steps more than a matmul.

    python bench/upsampler_bench.py            # 224, 448, 896, 1024 (+2048 bounded)
    python bench/upsampler_bench.py --quick    # 224 and 448 only
    python bench/upsampler_bench.py --efficiency-only
    python bench/upsampler_bench.py --heads --threads 1   # the released vs the convex output head
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DIM = 384
PATCH = 14
REPEAT_BUDGET_S = 20.0
REPEAT_MAX_FIRST_S = 90.0
GOAL_BYTES = 1.5e9


from memprobe import reset_peak as _reset_peak  # noqa: E402
from memprobe import status_kb as _status_kb  # noqa: E402


class AnonPeak:
    """Highest anonymous RSS seen while active, sampled every few milliseconds.

    ru_maxrss counts file-backed pages too, and on this VM the kernel drops cold pages of
    the mapped torch libraries during long runs, which hides part of the working memory;
    anonymous memory (tensors, heap) is what the forward itself allocates.
    """

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval = interval
        self.peak = _status_kb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kb("RssAnon"))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kb("RssAnon"))


def _build(method: str, out: int, grid: int):
    """(callable running one forward, output bytes) for one configuration."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if method == "backbone":
        import timm

        vit = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, dynamic_img_size=True, num_classes=0
        ).eval()
        x = torch.rand(1, 3, grid * PATCH, grid * PATCH)
        return (lambda: vit.forward_features(x)), (grid * grid + 1) * DIM * 4  # + class token
    lr = torch.randn(1, DIM, grid, grid)
    img = torch.randn(1, 3, out, out)
    out_bytes = DIM * out * out * 4
    if method == "bilinear":
        return (lambda: F.interpolate(lr, size=(out, out), mode="bilinear", align_corners=False)), out_bytes
    from loftup.training import model as model_mod

    # convex_*: the same LoftUp with the backbone-space output head (training/heads.py).
    model = model_mod.LoftUp(DIM, head="convex" if method.startswith("convex") else "loftup").eval()
    if method.endswith("_dense"):
        model.set_memory_bound(0, 0)
    else:
        model.set_memory_bound(model_mod.CPU_QUERY_CHUNK, model_mod.CPU_CONV_TILE)
    return (lambda: model(lr, img)), out_bytes


def worker(method: str, out: int, grid: int, threads: int) -> dict:
    import gc

    import torch

    torch.set_num_threads(threads)
    run, out_bytes = _build(method, out, grid)
    gc.collect()
    exact = _reset_peak()
    base_rss = _status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_anon = _status_kb("RssAnon")
    with torch.inference_mode():
        with AnonPeak() as anon:
            t0, c0 = time.perf_counter(), time.process_time()
            result = run()
            first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del result
        # The first call also pays one-time costs (kernel selection, page faults of fresh
        # memory): time further calls whenever they are affordable and report their best.
        times, cpus = [first], [first_cpu]
        spent = 0.0
        while first < REPEAT_MAX_FIRST_S and (len(times) < 2 or spent < REPEAT_BUDGET_S) and len(times) < 6:
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            spent += times[-1]
    best = min(times[1:]) if len(times) > 1 else first
    best_cpu = min(cpus[1:]) if len(cpus) > 1 else first_cpu
    return {
        "method": method,
        "out": out,
        "grid": grid,
        "time_s": best,
        "cpu_s": best_cpu,
        "first_s": first,
        "runs": len(times),
        "peak_bytes": max(0, anon.peak - base_anon) * 1024,
        "maxrss_bytes": max(0, maxrss - base_rss) * 1024,
        "output_bytes": out_bytes,
        "exact_peak": exact,
    }


def loftup_flops(model, height: int, width: int, tokens: int) -> float:
    """Multiply-adds x 2 of one dense forward, from the module's shapes (elementwise ops excluded).
    The convex head: query and key projections, logits and the weighted sum over all tokens (the
    window is a mask on them), in place of the released 1x1 output projection."""
    core = model.upsampler
    c, fourier, dim = core.width, core.fourier_feat[1].out_channels, model.dim
    hidden = core.ca_transformer.layers[0][1].net[1].out_features
    n = height * width
    convs = 2 * 9 * n * (fourier * c + c * c)
    per_block = 2 * n * (c * c + 2 * tokens * c + c * c + 2 * c * hidden) + 2 * 2 * tokens * c * c
    if core.head is not None:
        k = core.head.q_proj.out_features
        head = 2 * n * c * k + 2 * tokens * c * k + 2 * n * tokens * (k + dim)
    else:
        head = 2 * n * c * dim
    return convs + len(core.ca_transformer.layers) * per_block + head


def heads_table(threads: int) -> list[dict]:
    """The two output heads side by side (dim 384, 16x16 -> 224 and 32x32 -> 448): model FLOPs,
    seconds and CPU seconds, memory beyond the output, dense and bounded, one subprocess per row."""
    from loftup.training.model import LoftUp

    rows = []
    for out, grid in ((224, 16), (448, 32)):
        for head in ("loftup", "convex"):
            flops = loftup_flops(LoftUp(DIM, head=head), out, out, grid * grid)
            for path in ("dense", "bounded"):
                print(f"measuring the {head} head, {path}, -> {out} ...", file=sys.stderr, flush=True)
                row = measure((f"{head}_{path}", out, grid), threads)
                rows.append({**row, "head": head, "path": path, "gflop": flops / 1e9})
    return rows


def render_heads(rows: list[dict], threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"LoftUp's output heads, dim {DIM}, batch 1, {threads} thread(s), one subprocess per row")
    for col in ("output", "head", "GFLOP", "path", "seconds", "CPU s", "MB beyond output"):
        t.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            t.add_row(str(r["out"]), r["head"], f"{r['gflop']:.0f}", r["path"], "error: " + r["error"], "", "")
            continue
        t.add_row(
            f"{r['out']} ({r['grid']}x{r['grid']})",
            r["head"],
            f"{r['gflop']:.0f}",
            r["path"],
            f"{r['time_s']:.2f}",
            f"{r['cpu_s']:.2f}",
            _mb(max(0, r["peak_bytes"] - r["output_bytes"])),
        )
    Console().print(t)


def efficiency_worker(sizes: list[int], threads: int, repeats: int = 2) -> dict:
    import torch

    from loftup.training import model as model_mod

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def best(fn, n):
        out, times = None, []
        for _ in range(n):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rows = []
    with torch.inference_mode():
        a @ b
        matmul = [2 * 2048**3 / best(lambda: a @ b, 5)[0]]
        for out in sizes:
            grid = 16 if out == 224 else 32
            model = model_mod.LoftUp(DIM).eval()
            lr, img = torch.randn(1, DIM, grid, grid), torch.randn(1, 3, out, out)
            plan = model.set_memory_bound().plan(out, out, lr_tokens=grid * grid)
            dense_t, bounded_t = [], []
            dense = bounded = None
            for _ in range(repeats):  # alternate, so both see the same machine
                t, dense = best(lambda: model.set_memory_bound(0, 0)(lr, img), 1)
                dense_t.append(t)
                t, bounded = best(lambda: model.set_memory_bound(plan[1], plan[0])(lr, img), 1)
                bounded_t.append(t)
            # A user's loop calls the bounded path back to back; after a dense call the allocator
            # has handed its memory back, and the first bounded call faults its buffers in again.
            t_repeat, _ = best(lambda: model.set_memory_bound(plan[1], plan[0])(lr, img), 3)
            flops = loftup_flops(model, out, out, grid * grid)
            err = ((bounded - dense).norm() / dense.norm()).item()
            rows.append(
                {
                    "out": out,
                    "grid": grid,
                    "plan": list(plan),
                    "gflop": flops / 1e9,
                    "dense_s": min(dense_t),
                    "bounded_s": min(bounded_t),
                    "bounded_repeat_s": t_repeat,
                    "rel_err": err,
                }
            )
        matmul.append(2 * 2048**3 / best(lambda: a @ b, 5)[0])
    return {
        "matmul_gflops": max(matmul) / 1e9,
        "matmul_runs": [m / 1e9 for m in matmul],
        "rows": rows,
        "threads": threads,
    }


def render_efficiency(res: dict, load: tuple[float, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    peak = res["matmul_gflops"]
    table = Table(
        title=f"LoftUp dim {DIM} compute efficiency, float32 CPU, {res['threads']} threads, one process "
        f"(bare 2048^3 matmul: {peak:.0f} GFLOP/s, best of runs {', '.join(f'{m:.0f}' for m in res['matmul_runs'])})"
    )
    for col in (
        "output",
        "lr grid",
        "model GFLOP",
        "dense s",
        "dense % of matmul",
        "bounded (tile, chunk)",
        "bounded s",
        "bounded % of matmul",
        "bounded, back to back",
        "bounded / dense",
        "rel. error vs dense",
    ):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        d, b = r["gflop"] / r["dense_s"], r["gflop"] / r["bounded_s"]
        table.add_row(
            str(r["out"]),
            f"{r['grid']}x{r['grid']}",
            f"{r['gflop']:.0f}",
            f"{r['dense_s']:.2f}",
            f"{100 * d / peak:.0f}%",
            f"{r['plan'][0]}, {r['plan'][1]}",
            f"{r['bounded_s']:.2f}",
            f"{100 * b / peak:.0f}%",
            f"{r['bounded_repeat_s']:.2f} s, {100 * r['gflop'] / r['bounded_repeat_s'] / peak:.0f}%",
            f"{r['bounded_s'] / r['dense_s']:.2f}",
            f"{r['rel_err']:.1e}",
        )
    console = Console(width=160)
    console.print(table)
    console.print(
        f"  goal: bounded >= 80% of the matmul rate with rel. error < 1e-5; 1-min load average "
        f"{load[0]:.1f} at start, {load[1]:.1f} at end ({os.cpu_count()} cores)"
    )


def plan(quick: bool) -> list[tuple[str, int, int]]:
    rows = []
    sizes = (224, 448) if quick else (224, 448, 896, 1024, 2048)
    grids_done = set()
    for out in sizes:
        # 16x16 from a 224 input for the 224 output, 32x32 from a 448 input above it;
        # the backbone row is the forward that produced the upsampled grid.
        grid = 16 if out == 224 else 32
        if grid not in grids_done:
            rows.append(("backbone", out, grid))
            grids_done.add(grid)
        rows.append(("bilinear", out, grid))
        if out <= 448:
            rows.append(("loftup_dense", out, grid))
        rows.append(("loftup_bounded", out, grid))
    return rows


def measure(config, threads: int) -> dict:
    method, out, grid = config
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        str(out),
        str(grid),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "out": out, "grid": grid, "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(b) -> str:
    return f"{b / 2**20:,.0f}"


def render(results: list[dict], threads: int, wall: float) -> None:
    from rich.console import Console
    from rich.table import Table

    by = {(r["method"], r["out"]): r for r in results}
    backbone = {r["grid"]: r for r in results if r["method"] == "backbone"}
    table = Table(
        title=f"LoftUp upsampler, dim {DIM}, batch 1, float32 CPU, {threads} threads "
        f"(one subprocess per row; measured in one run of {wall / 60:.1f} min)"
    )
    for col in (
        "output",
        "lr grid",
        "method",
        "time s",
        "cpu s",
        "peak MB",
        "output MB",
        "peak beyond output MB",
        "maxrss delta MB",
        "time / backbone",
        "time / bilinear",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    names = {
        "backbone": "DINOv2-S/14 forward",
        "bilinear": "bilinear",
        "loftup_dense": "LoftUp dense",
        "loftup_bounded": "LoftUp bounded",
    }
    for r in results:
        if "error" in r:
            table.add_row(
                str(r["out"]),
                f"{r['grid']}x{r['grid']}",
                names[r["method"]],
                "error",
                r["error"][:60],
                "",
                "",
                "",
                "",
                "",
                "",
            )
            continue
        bb, bil = backbone.get(r["grid"]), by.get(("bilinear", r["out"]))
        is_up = r["method"].startswith("loftup")
        ratio = lambda ref: f"{r['time_s'] / ref['time_s']:,.1f}x" if is_up and ref and "time_s" in ref else ""  # noqa: E731
        label = names[r["method"]]
        if r["method"] == "backbone":
            label += f" @{r['grid'] * PATCH}"
        table.add_row(
            str(r["out"]) if r["method"] != "backbone" else f"({r['grid'] * PATCH} in)",
            f"{r['grid']}x{r['grid']}",
            label,
            f"{r['time_s']:.3f}",
            f"{r['cpu_s']:.3f}",
            _mb(r["peak_bytes"]),
            _mb(r["output_bytes"]),
            _mb(r["peak_bytes"] - r["output_bytes"]),
            _mb(r["maxrss_bytes"]),
            ratio(bb),
            ratio(bil),
        )
    console = Console(width=160)
    console.print(table)
    notes = []
    for out in (1024, 2048):
        r = by.get(("loftup_bounded", out))
        if r and "peak_bytes" in r:
            beyond = r["peak_bytes"] - r["output_bytes"]
            notes.append(
                f"bounded peak beyond output at {out}: {beyond / 1e9:.2f} GB "
                f"({'meets' if beyond < GOAL_BYTES else 'MISSES'} the < 1.5 GB goal)"
            )
    for out in (224, 448):
        d, b = by.get(("loftup_dense", out)), by.get(("loftup_bounded", out))
        if d and b and "time_s" in d and "time_s" in b:
            notes.append(
                f"bounded/dense at {out}: wall {b['time_s'] / d['time_s']:.2f}, cpu {b['cpu_s'] / d['cpu_s']:.2f}"
            )
    if not all(r.get("exact_peak", True) for r in results):
        notes.append("clear_refs unavailable: peaks are ru_maxrss deltas from process start state")
    for n in notes:
        console.print("  " + n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only outputs 224 and 448")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the raw rows to this file")
    parser.add_argument("--efficiency-only", action="store_true", help="only the compute-efficiency table")
    parser.add_argument("--efficiency-sizes", default="224,448", help="outputs of the efficiency table")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "OUT", "GRID"), help=argparse.SUPPRESS)
    parser.add_argument("--efficiency-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--heads", action="store_true", help="only the output heads' cost: released vs convex (training/heads.py)"
    )
    args = parser.parse_args(argv)
    if args.worker:
        method, out, grid = args.worker
        print(json.dumps(worker(method, int(out), int(grid), args.threads)))
        return 0
    if args.efficiency_worker:
        print(json.dumps(efficiency_worker([int(x) for x in args.efficiency_sizes.split(",")], args.threads)))
        return 0
    if args.heads:
        load_start = os.getloadavg()[0]
        rows = heads_table(args.threads)
        render_heads(rows, args.threads)
        print(f"  1-min load average: {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"heads": rows}, fh, indent=2)
        return 0
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    print(
        f"measuring compute efficiency (matmul, dense, bounded at {args.efficiency_sizes}) ...",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--efficiency-worker",
            "--threads",
            str(args.threads),
            "--efficiency-sizes",
            args.efficiency_sizes,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(f"error: efficiency run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return 1
    efficiency = json.loads(proc.stdout.strip().splitlines()[-1])
    render_efficiency(efficiency, (load_start, os.getloadavg()[0]))
    if args.efficiency_only:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"efficiency": efficiency}, fh, indent=2)
        return 0
    results = []
    for config in plan(args.quick):
        print(f"measuring {config[0]} -> {config[1]} ...", file=sys.stderr, flush=True)
        results.append(measure(config, args.threads))
    render(results, args.threads, time.perf_counter() - t0)
    # Other jobs on a shared machine inflate wall times; the load average says how much.
    print(
        f"  1-min load average: {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        f"({os.cpu_count()} cores); 'cpu s' is this process's CPU time, less sensitive to other jobs"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"efficiency": efficiency, "rows": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
