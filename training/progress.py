"""Progress for training (rank 0 only): a rich bar on a terminal, else a plain line at least every
30 s (``LOFTUP_LOG_EVERY``). Rates are true: steps done in this process over wall time (a
resumed run's earlier steps are not counted as done in no time)."""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loftup.pipeline.progress import PeriodicLog, _eta


class TrainProgress:
    def __init__(self, title: str, total: int, start: int = 0, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        if not enabled:
            return
        self.console = console or Console(stderr=True)
        self.title, self.total, self.start_step = title, total, start
        self.step, self.loss = start, float("nan")
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.live = self.console.is_terminal
        if self.live:
            self.progress = Progress(
                TextColumn(f"[bold]{title}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(title, total=total, completed=start, rate="", loss="-", eta="-")
        else:
            self.ticker = PeriodicLog(self.console, self._line)
            self.ticker.start(count=start)

    def rate(self) -> float:
        """Steps per second of this process since it started (true, not smoothed)."""
        elapsed = time.monotonic() - self.t0
        return (self.step - self.start_step) / elapsed if elapsed > 0 else 0.0

    def _eta(self, rate: float) -> str:
        return _eta((self.total - self.step) / rate) if rate > 0 else "-"

    def _line(self, elapsed: float, window_rate) -> str:
        with self.lock:
            step, loss = self.step, self.loss
        now = window_rate(step)
        return (
            f"{self.title}: step {step}/{self.total}, {now:.3f} step/s now, {self.rate():.3f} step/s overall, "
            f"loss {loss:.4f}, elapsed {_eta(elapsed)}, ETA {self._eta(now or self.rate())}"
        )

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.step, self.loss = step, float(loss)
        if self.live:
            rate = self.rate()
            self.progress.update(
                self.task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:5.2f} step/s", eta=self._eta(rate)
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self.live:
            self.progress.stop()
        else:
            self.ticker.stop()
            self.ticker.emit()  # the final line: where the run ended and its true rate
