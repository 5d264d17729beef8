"""DAVIS label propagation at the paper's sizes: time and peak memory of our tiled affinity against
what the dense formulation (every context's N x N matrix, as DINO's script builds it) needs.

    python bench/davis_propagation_bench.py [--grid 112 --dim 384 --contexts 8 --objects 4]

The dense figure is computed (N^2 x contexts x 4 bytes, plus the N^2 neighbourhood mask), not
run: at the paper's 112 x 112 grid it does not fit this machine. Peak memory is the process's
peak RSS growth over the inputs, measured in a fresh subprocess per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
grid, dim, m, k, tile, threads = (int(a) for a in sys.argv[1:7])
torch.set_num_threads(threads)
from loftup.training.evaluation.davis import propagate
g = torch.Generator().manual_seed(0)
target = torch.randn(dim, grid, grid, generator=g)
sources = [torch.randn(dim, grid, grid, generator=g) for _ in range(m)]
segs = [torch.softmax(torch.randn(k, grid, grid, generator=g), 0) for _ in range(m)]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
propagate(target, sources, segs, temperature=0.1, radius=12, topk=5, tile=tile)
sec = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": sec, "peak_mb": (peak - base) / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, default=112, help="feature grid (the paper: 224 frames, features at 112)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--contexts", type=int, default=8, help="first frame + 7 previous")
    ap.add_argument("--objects", type=int, default=4, help="label channels (objects + background)")
    ap.add_argument("--tiles", default="8,16,32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    n = args.grid * args.grid
    dense_mb = (args.contexts + 1) * n * n * 4 / 2**20
    table = Table(
        title=f"one target frame: {args.grid}x{args.grid} grid, C={args.dim}, {args.contexts} contexts, "
        f"radius 12, top-5, {args.threads} thread(s)"
    )
    for col in ("method", "seconds", "peak memory"):
        table.add_column(col, justify="right")
    table.add_row("dense N x N per context (computed)", "-", f"{dense_mb:,.0f} MB")
    for tile in (int(t) for t in args.tiles.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(args.grid),
                str(args.dim),
                str(args.contexts),
                str(args.objects),
                str(tile),
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        table.add_row(f"tiled, tile {tile}", f"{r['seconds']:.2f}", f"{r['peak_mb']:,.0f} MB")
    Console().print(table)


if __name__ == "__main__":
    main()
