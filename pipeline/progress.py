"""One live view across shards: images/s, ETA, failures; and the end-of-job summary table.

On a terminal the view is a rich progress bar. When output goes to a file (batch jobs), a plain
line is logged at least every ``log_period()`` seconds (30 by default) instead, with true rates:
work done divided by wall time, over the whole run and over the last period.
"""

from __future__ import annotations

import os
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class ShardProgress:
    def __init__(self, job: str, totals: dict[int, int], console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.totals = totals
        self.lock = threading.Lock()
        self.errors = 0
        self.shards_done = 0
        self.shards_failed = 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("shards {task.fields[shards]}"),
            TextColumn("[red]{task.fields[errors]} errors"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal and not _force(),
        )
        self.job = job
        self.n_shards = len(totals)
        self.task = self.progress.add_task(
            job, total=sum(totals.values()) or None, rate="", shards=f"0/{self.n_shards}", errors=0
        )

        self.done = 0
        self.ticker = PeriodicLog(self.console, self._line) if self.progress.disable else None

    def _line(self, elapsed: float, window_rate) -> str:
        total = sum(self.totals.values())
        rate = self.done / elapsed if elapsed > 0 else 0.0
        recent = window_rate(self.done)
        eta = _eta((total - self.done) / recent) if total and recent > 0 and self.done < total else "-"
        failed = f" ({self.shards_failed} failed)" if self.shards_failed else ""
        return (
            f"{self.job}: {self.done}/{total or '?'} images, {recent:.2f} img/s now, {rate:.2f} img/s overall, "
            f"shards {self.shards_done}/{self.n_shards}{failed}, {self.errors} errors, elapsed {_eta(elapsed)}, ETA {eta}"
        )

    def __enter__(self):
        self.progress.__enter__()
        if self.ticker is not None:
            self.ticker.start()
        return self

    def __exit__(self, *exc):
        if self.ticker is not None:
            self.ticker.stop()
        self.progress.__exit__(*exc)

    def _refresh(self):
        task = self.progress.tasks[0]
        speed = task.speed or 0.0
        self.progress.update(
            self.task,
            rate=f"{speed:6.1f} img/s",
            shards=f"{self.shards_done}/{self.n_shards}"
            + (f" ({self.shards_failed} failed)" if self.shards_failed else ""),
            errors=self.errors,
        )

    def advance(self, shard: int, ok: int, err: int) -> None:
        with self.lock:
            self.errors += err
            self.done += ok + err
            self.progress.advance(self.task, ok + err)
            self._refresh()

    def finish(self, shard: int, marker: dict) -> None:
        with self.lock:
            self.shards_done += 1
            # Estimates can be off (counts are never assumed): fix the total as shards complete.
            seen = marker.get("images", 0) + marker.get("errors", 0)
            est = self.totals.get(shard, 0)
            task = self.progress.tasks[0]
            if task.total is not None and seen != est:
                self.progress.update(self.task, total=task.total + seen - est)
            self._refresh()

    def fail(self, shard: int, message: str) -> None:
        with self.lock:
            self.shards_failed += 1
            self.console.print(f"[red]shard {shard:06d} failed:[/red] {message}")
            self._refresh()


def _force() -> bool:
    return os.environ.get("LOFTUP_PROGRESS") == "1"


def log_period() -> float:
    """Seconds between plain progress lines when output is not a terminal (``LOFTUP_LOG_EVERY``)."""
    try:
        return max(0.05, float(os.environ.get("LOFTUP_LOG_EVERY", "30")))
    except ValueError:
        return 30.0


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


class PeriodicLog:
    """A thread printing ``line(elapsed, window_rate)`` every ``log_period()`` seconds (one home for
    the plain progress lines of pipeline jobs and training). ``window_rate(count)`` gives the
    rate of ``count`` since the previous line: true rates, not a smoothed estimate."""

    def __init__(self, console, line, period: float | None = None):
        self.console, self.line = console, line
        self.period = log_period() if period is None else period
        self.t0 = time.monotonic()
        self._last = (self.t0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def window_rate(self, count: float) -> float:
        now = time.monotonic()
        t, c = self._last
        self._last = (now, count)
        return (count - c) / (now - t) if now > t else 0.0

    def emit(self) -> None:
        self.console.print(self.line(time.monotonic() - self.t0, self.window_rate), highlight=False, soft_wrap=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.emit()

    def start(self, count: float = 0) -> None:
        self.t0 = time.monotonic()
        self._last = (self.t0, count)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


# What "seconds" means here: this run's wall clock (`loftup-store status` sums each shard's own time).
WALL_SECONDS = "wall s: wall-clock seconds of this run"


def summary_table(summary) -> Table:
    t = Table(title=f"{summary.job}: summary (shards)", caption=WALL_SECONDS, show_header=True)
    for col in ("done", "skipped", "failed", "images", "errors", "bytes", "wall s", "images/s"):
        t.add_column(col, justify="right")
    rate = summary.images / summary.seconds if summary.seconds else 0.0
    t.add_row(
        str(len(summary.done)),
        str(len(summary.skipped)),
        str(len(summary.failed)),
        str(summary.images),
        str(summary.errors),
        _human(summary.bytes),
        f"{summary.seconds:.1f}",
        f"{rate:.2f}",
    )
    return t


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
