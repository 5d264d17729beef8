"""How a pipeline job runs (executor, Ray, resources, what to redo): one object from the command
line to :func:`loftup.pipeline.runner.run_job`, each option declared once with its help. No
dependencies, so that ``--help`` needs neither Ray nor torch."""

from __future__ import annotations

from dataclasses import dataclass

from loftup.fields import option
from loftup.storage.errors import LoftupError

EXECUTORS = ("ray", "inline")
SKIP_CHECKS = ("checksums", "sizes")


@dataclass(frozen=True)
class RunOptions:
    ray_address: str | None = option(
        None, "Ray cluster to use ('auto' or HOST:PORT). Default: start an embedded local instance."
    )
    executor: str = option("ray", "'ray' (default) or 'inline' (single process, for debugging).")
    num_cpus: int | None = option(None, "CPUs of the embedded local Ray instance (default: all).")
    cpus_per_task: float = option(1.0, "CPUs Ray reserves for each shard task.")
    gpus_per_task: float | None = option(
        None, "GPUs per shard task. Default: 1 for GPU jobs when the cluster has GPUs, else 0."
    )
    max_retries: int = option(3, "Retries of a shard task whose worker died (crash, OOM kill, preemption).")
    overwrite: bool = option(False, "Redo shards that are already done with the same config.", flag="--overwrite")
    check_skipped: str = option(
        "checksums",
        "How a done shard is checked before it is skipped: 'checksums' (every file re-hashed against its marker) "
        "or 'sizes' (presence and sizes only, for very large stores). Damaged shards are redone.",
    )
    memory_per_task: float | None = option(
        None, "GiB of host memory Ray reserves per shard task (default: sized from the job and its settings; 0: none)."
    )

    def check(self) -> None:
        """One line for an option no run could use, before anything starts."""
        if self.memory_per_task is not None and self.memory_per_task < 0:
            raise LoftupError(f"--memory-per-task must be >= 0 GiB, got {self.memory_per_task}")
        if self.executor not in EXECUTORS:
            raise LoftupError(f"unknown executor {self.executor!r}; use 'ray' or 'inline'")
        if self.max_retries < 0:
            raise LoftupError(f"--max-retries must be >= 0, got {self.max_retries} (Ray reads -1 as retry forever)")
        if self.check_skipped not in SKIP_CHECKS:
            raise LoftupError(f"unknown --check-skipped {self.check_skipped!r}; choose from {', '.join(SKIP_CHECKS)}")
