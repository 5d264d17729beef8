"""Timing helpers shared by the benches: the best of repeated runs, and the header line that says
what the figures were measured under (torch, threads, cores, load)."""

from __future__ import annotations

import os
import time


def best_seconds(fn, repeats: int, warmup: bool = False) -> float:
    """The fastest of ``repeats`` calls of ``fn`` (after one untimed call with ``warmup``: codec
    pipelines, page cache)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_header(console, work, threads: str) -> tuple[float, float]:
    """Print what a bench runs under; returns its start time and the load average then."""
    import torch

    t_run, load0 = time.perf_counter(), os.getloadavg()[0]
    console.print(
        f"torch {torch.__version__}, {threads} torch threads, {os.cpu_count()} cores, "
        f"load average {load0:.1f} at start; workdir {work}"
    )
    return t_run, load0
