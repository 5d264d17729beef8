"""One live view across shards: images/s, ETA, failures; and the end-of-job summary table."""

from __future__ import annotations

import threading

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
        self.n_shards = len(totals)
        self.task = self.progress.add_task(
            job, total=sum(totals.values()) or None, rate="", shards=f"0/{self.n_shards}", errors=0
        )

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def _refresh(self):
        task = self.progress.tasks[0]
        speed = task.speed or 0.0
        self.progress.update(
            self.task,
            rate=f"{speed:6.1f} img/s",
            shards=f"{self.shards_done}/{self.n_shards}" + (f" ({self.shards_failed} failed)" if self.shards_failed else ""),
            errors=self.errors,
        )

    def advance(self, shard: int, ok: int, err: int) -> None:
        with self.lock:
            self.errors += err
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
    import os

    return os.environ.get("LOFTUP_PROGRESS") == "1"


def summary_table(summary) -> Table:
    t = Table(title=f"{summary.job}: summary", show_header=True)
    for col in ("shards done", "skipped", "failed", "images", "errors", "bytes", "seconds", "images/s"):
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
