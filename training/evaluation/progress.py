"""Progress of an evaluation: a rich bar on a terminal, otherwise one log line every <= 30 s."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class EvalProgress:
    def __init__(
        self,
        title: str,
        total: int,
        unit: str = "img",
        enabled: bool = True,
        console: Console | None = None,
        log_every_s: float = 30.0,
    ):
        self.title, self.total, self.unit, self.enabled = title, total, unit, enabled
        self.console = console or Console(stderr=True)
        self.done = 0
        self.t0 = self.t_log = time.time()
        self.log_every_s = log_every_s
        self.bar = None
        if enabled and self.console.is_terminal:
            self.bar = Progress(
                TextColumn(f"[bold]{title}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task(title, total=total, rate="")

    def rate(self) -> float:
        return self.done / max(time.time() - self.t0, 1e-9)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{self.rate():.2f} {self.unit}/s")
        elif time.time() - self.t_log >= self.log_every_s:
            self.t_log = time.time()
            rate = self.rate()
            eta = (self.total - self.done) / rate if rate else float("inf")
            self.console.print(
                f"{self.title}: {self.done}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s, ETA {eta:.0f} s)"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.enabled:
            self.console.print(
                f"{self.title}: {self.done} {self.unit} in {time.time() - self.t0:.1f} s "
                f"({self.rate():.2f} {self.unit}/s)"
            )
