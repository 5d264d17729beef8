"""Rich progress for training: steps/s, samples/s, ETA and the latest loss (rank 0 only)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, title: str, total: int, start: int = 0, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn(f"[bold]{title}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(title, total=total, completed=start, rate="", loss="-")

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        speed = self.progress.tasks[0].speed or 0.0
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", rate=f"{speed:5.2f} step/s")

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
