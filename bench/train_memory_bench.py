"""Training memory (issue 22): a step's peak memory and time against the batch size, for both
stages, the plain and the bounded path side by side, each beside the planner's estimate.

Every cell is one optimizer step (``loop.train_step``: forward, every loss term of the released
recipe, backward, clip, optimizer) in a fresh process, so its peak is its own: on a GPU
``torch.cuda.max_memory_allocated``, on a CPU the process's peak resident set (VmHWM, reset
just before the step; the baseline is what the process held then: Python, torch, the models,
the store). A plain cell whose estimate is above ``--plain-cap`` GiB is not run (it would be
killed, or take the machine with it); its estimate is printed.

``--breakdown``: where a plain step's memory goes, per image: bytes autograd keeps for
backward, attributed to the module that saved them (saved-tensor hooks), beside the
estimator's figure for each part; the backbone on the jittered views and the loader
(bytes per batch, the workers' proportional set sizes) are measured apart, as they keep nothing for backward.

Defaults are small (dim 384, Stage 1 at 112 px, Stage 2 at s = 112 from HR 224) so the run
takes a few minutes on 2 cores; ``--full`` takes the released sizes (224; s = 518, HR 896).

    python bench/train_memory_bench.py [--workdir DIR] [--full] [--breakdown] [--batches 1,2,4]
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
sys.path.insert(0, str(Path(__file__).parent))

GIB = 1 << 30


# --------------------------------------------------------------------------- one cell (child process)
def _recipe(spec: dict):
    import torch

    from loftup.training.distributed import Dist
    from loftup.training.loop import resolve

    torch.manual_seed(0)
    common = dict(
        store=spec["store"],
        out=tempfile.mkdtemp(),
        random_init=True,
        batch_size=spec["batch"],
        workers=0,
        progress=False,
        device=spec["device"],
    )
    if spec["stage"] == 1:
        from loftup.training.stage1 import RECIPES, Stage1, Stage1Config

        return Stage1(
            resolve(Stage1Config(**common, size=spec["size"]), RECIPES), Dist(device=torch.device(spec["device"]))
        )
    from loftup.training.stage2 import RECIPES, Stage2, Stage2Config

    cfg = Stage2Config(**common, init=spec["init"], sizes=[spec["size"]], hr=spec["hr"])
    return Stage2(resolve(cfg, RECIPES), Dist(device=torch.device(spec["device"])))


def one_cell(spec: dict) -> dict:
    """Build the stage, plan it (estimates), run one step on ``spec['path']``; peak and time."""
    import torch

    from loftup.training import memory
    from loftup.training.distributed import Dist
    from loftup.training.loop import train_step

    torch.set_num_threads(spec["threads"])
    r = _recipe(spec)
    dev = torch.device(spec["device"])
    batch = next(r.batches(0, 0, 0))
    base = memory.current_bytes(dev)
    dims = memory.model_dims(getattr(r, "student", None) or r.model)
    tile = memory.choose_tile(
        dev, 4 * (sum(memory.model_floats(**dims).values()) + 3 * dims["width"]), 8 * GIB, r.memory_side
    )
    est = r.memory_estimates(spec["batch"], tile)
    out = {**spec, "base": base, "estimate": base + sum(est[spec["path"]].values())}
    if spec["path"] == "plain" and out["estimate"] > spec["plain_cap"] * GIB:
        return {**out, "skipped": True}
    r.plan = memory.MemoryPlan(path=spec["path"], tile=tile)
    meter = memory.PeakMeter(dev)
    t0 = time.perf_counter()
    train_step(r, r.cfg, batch, 0, Dist(device=dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {**out, "seconds": time.perf_counter() - t0, "peak": meter.peak(), "skipped": False}


# --------------------------------------------------------------------------- breakdown (child process)
def breakdown(spec: dict) -> dict:
    """Saved-for-backward bytes per image by part for one plain step (batch 1), the live
    backbone's transient peak, and the estimator's figures."""
    import collections

    import torch

    from loftup.training import memory
    from loftup.training.loop import train_step  # noqa: F401  (imports the recipes' dependencies)

    torch.set_num_threads(spec["threads"])
    r = _recipe({**spec, "batch": 1})
    batch = next(r.batches(0, 0, 0))
    model = getattr(r, "student", None) or r.model
    core = model.upsampler
    label = ["loss terms (projections, jitter, TV, affinity)"]
    parts = {
        "fourier features + full-res convs": [core.fourier_feat, core.first_conv],
        "cross-attention blocks": [m for pair in core.ca_transformer.layers for m in pair] + [model.channelnorm],
        "output head": [core.ca_transformer.norm, core.final_conv],
        "reconstruction views (downsampler windows)": [r.aux["downsampler"]] if "downsampler" in r.aux else [],
    }

    def enter(name):
        def pre(module, args):
            label.append(name)

        def post(module, args, output):  # returns None: a hook's return value would replace the output
            label.pop()

        return pre, post

    for name, mods in parts.items():
        for m in mods:
            pre, post = enter(name)
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    seen, saved = set(), collections.Counter()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            saved[label[-1]] += st.nbytes()
        return t

    dev = torch.device(spec["device"])
    meter = memory.PeakMeter(dev)
    transient = {}  # modules run without a graph: their peak above what was held before them
    watched = {"live backbone": getattr(r, "backbone", None) or getattr(r, "vfm", None)}
    if getattr(r, "teacher", None) is not None:
        watched["teacher on the crops"] = r.teacher
    for name, m in watched.items():
        transient[name] = 0

        def before(m, a, name=name):
            transient[name + ".base"] = memory.current_bytes(dev)
            meter.reset()

        def after(m, a, o, name=name):
            transient[name] = max(transient[name], meter.peak() - transient[name + ".base"])

        m.register_forward_pre_hook(before)
        m.register_forward_hook(after)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r.step(batch, 0)
    dims = memory.model_dims(model)
    est = r.memory_estimates(1, memory.CPU_TILE)["plain"]
    return {
        "saved": dict(saved),
        "estimate": est,
        "transient": {k: v for k, v in transient.items() if not k.endswith(".base")},
        "dims": dims,
    }


def _batch_bytes(batch) -> int:
    import torch

    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def loader_rss(spec: dict) -> dict:
    """The loader at its training settings (2 workers, prefetch 4): bytes per batch and the
    workers' proportional set sizes while it streams."""
    r = _recipe(spec)
    r.cfg.workers = 2
    it = r.batches(0, 0, 0)
    sizes = [_batch_bytes(next(it)) for _ in range(2)]
    return {"batch_bytes": max(sizes), "workers": [_pss(p) for p in _children(os.getpid())]}


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except OSError:
                pass
    return out


def _pss(pid: int) -> int:
    """Proportional set size: the pages a forked worker shares with the trainer count once."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss:"))


# --------------------------------------------------------------------------- parent
def _child(kind: str, spec: dict) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, f"--{kind}", json.dumps(spec)], capture_output=True, text=True, timeout=7200
    )
    if p.returncode:
        raise SystemExit(f"{kind} {spec} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _init_checkpoint(work: Path) -> str:
    """A Stage 1 checkpoint of the 384-d model (random weights: memory and time do not depend on them)."""
    path = work / "init" / "stage1.safetensors"
    if not path.exists():
        import torch

        from loftup.training.checkpoint import save_model
        from loftup.training.model import LoftUp

        torch.manual_seed(0)
        save_model(LoftUp(384), path, extra={"backbone": "dinov2_vits14", "stage": 1})
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="Store and Stage 1 init go here (reused).")
    ap.add_argument("--full", action="store_true", help="Released sizes: Stage 1 at 224, Stage 2 s = 518 from HR 896.")
    ap.add_argument("--size", type=int, default=None, help="Stage 1 output size (default 112; --full 224).")
    ap.add_argument("--s", type=int, default=None, help="Stage 2 student size (default 112; --full 518).")
    ap.add_argument("--hr", type=int, default=None, help="Stage 2 HR size (default 224; --full 896).")
    ap.add_argument("--batches", default=None, help="Batch sizes (default 1,2,4; --full 1,2,8).")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--plain-cap", type=float, default=8.0, help="Run a plain cell only if estimated below N GiB.")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true", help="Also: where a plain step's memory goes, per image.")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--breakdown-cell", help=argparse.SUPPRESS)
    ap.add_argument("--loader-cell", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for flag, fn in (("cell", one_cell), ("breakdown_cell", breakdown), ("loader_cell", loader_rss)):
        if getattr(args, flag):
            print(json.dumps(fn(json.loads(getattr(args, flag)))))
            return

    from train_bench import build_store

    work = Path(args.workdir or tempfile.mkdtemp(prefix="train_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    store = build_store(work, tars=1, per_tar=16)
    init = _init_checkpoint(work)
    size = args.size or (224 if args.full else 112)
    s, hr = args.s or (518 if args.full else 112), args.hr or (896 if args.full else 224)
    batches = [int(b) for b in (args.batches or ("1,2,8" if args.full else "1,2,4")).split(",")]
    base = {"store": store, "init": init, "device": args.device, "threads": args.threads, "plain_cap": args.plain_cap}
    stages = {1: {"stage": 1, "size": size}, 2: {"stage": 2, "size": s, "hr": hr}}
    print(f"device {args.device}, {args.threads} threads, load {os.getloadavg()[0]:.1f}; dim 384, released recipe")
    rows = []
    for st in (int(x) for x in args.stages.split(",")):
        for b in batches:
            for path in ("plain", "bounded"):
                cell = _child("cell", {**base, **stages[st], "batch": b, "path": path})
                rows.append(cell)
                print(_row(cell), flush=True)
    print()
    print(_table(rows))
    if args.breakdown:
        for st in (int(x) for x in args.stages.split(",")):
            spec = {**base, **stages[st], "path": "plain"}
            print()
            loader = _child("loader-cell", {**spec, "batch": 8})  # the released batch
            print(_breakdown_table(st, spec, _child("breakdown-cell", spec), loader))
    print(f"\nload at the end {os.getloadavg()[0]:.1f}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _what(c: dict) -> str:
    return f"stage {c['stage']} " + (f"{c['size']} px" if c["stage"] == 1 else f"s {c['size']}, HR {c['hr']}")


def _row(c: dict) -> str:
    gib = lambda x: f"{x / GIB:.2f}"  # noqa: E731
    if c["skipped"]:
        return f"{_what(c)}, batch {c['batch']}, {c['path']}: estimated {gib(c['estimate'])} GiB, not run (over --plain-cap)"
    return (
        f"{_what(c)}, batch {c['batch']}, {c['path']}: peak {gib(c['peak'])} GiB (baseline {gib(c['base'])}, "
        f"estimated {gib(c['estimate'])}), step {c['seconds']:.1f} s"
    )


def _table(rows: list[dict]) -> str:
    out = [
        "| stage | batch | plain peak (GiB) | plain estimate | plain step (s) | bounded peak (GiB) | bounded estimate | bounded step (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["stage"], r["batch"], r["path"]): r for r in rows}
    for st, b in dict.fromkeys((r["stage"], r["batch"]) for r in rows):
        cells = []
        for path in ("plain", "bounded"):
            c = by[(st, b, path)]
            if c["skipped"]:
                cells += ["not run", f"{c['estimate'] / GIB:.2f}", "-"]
            else:
                cells += [f"{c['peak'] / GIB:.2f}", f"{c['estimate'] / GIB:.2f}", f"{c['seconds']:.1f}"]
        out.append(f"| {_what(by[(st, b, 'plain')])} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _breakdown_table(stage: int, spec: dict, b: dict, loader: dict) -> str:
    mib = lambda x: f"{x / 2**20:.0f}"  # noqa: E731
    out = [
        f"Where a plain step's memory goes, {_what(spec)}, per image (saved for backward, MiB):",
        "",
        "| part | measured (saved tensors) | estimated |",
        "|---|---|---|",
    ]
    est = dict(b["estimate"])
    recon_est = sum(v for k, v in est.items() if k.startswith("reconstruction"))
    for name, v in sorted(b["saved"].items(), key=lambda kv: -kv[1]):
        e = recon_est if name.startswith("reconstruction") else est.get(name)
        out.append(f"| {name} | {mib(v)} | {mib(e) if e is not None else '-'} |")
    out.append(f"| all saved tensors | {mib(sum(b['saved'].values()))} | - |")
    for name, v in b["transient"].items():
        out.append(f"| {name} (no graph: its transient peak) | {mib(v)} | - |")
    out.append(f"| loader: one batch of 8 as handed to the step (whole batch) | {mib(loader['batch_bytes'])} | - |")
    workers = ", ".join(mib(x) for x in loader["workers"])
    out.append(f"| loader: 2 workers (separate processes; proportional set size each) | {workers} | - |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
