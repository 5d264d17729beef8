"""Run a job over shards: Ray by default (embedded local instance, or a cluster address), with
exact resume by markers, per-shard failure isolation, one live progress view and a summary.

The task builds the shard beside its committed version (``Store.build_shard``) and swaps it in
with the marker last, so a driver that dies after a task finished loses nothing, a task that
fails or dies leaves the committed version (if any) in place, byte for byte, and the next run
finishes any swap a killed task left half done (``Store.recover``) before planning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tarfile
import threading
import time
from dataclasses import dataclass, field

from loftup import chaos
from loftup.pipeline.jobs import Job, run_and_time, upstream_state
from loftup.pipeline.options import SKIP_CHECKS, RunOptions
from loftup.storage.errors import LoftupError, error_line


@dataclass
class RunSummary:
    job: str
    planned: int = 0
    skipped: list[int] = field(default_factory=list)
    done: dict[int, dict] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    damaged: dict[int, str] = field(default_factory=dict)  # committed shards found damaged, redone
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return sum(m.get("images", 0) for m in self.done.values())

    @property
    def errors(self) -> int:
        return sum(m.get("errors", 0) for m in self.done.values())

    @property
    def bytes(self) -> int:
        return sum(m.get("bytes", 0) for m in self.done.values())


class _Throttle:
    """Accumulates per-image progress and forwards it at most every ``period`` seconds."""

    def __init__(self, send, period: float = 0.5):
        self.send, self.period = send, period
        self.ok = self.err = 0
        self.last = time.monotonic()

    def __call__(self, ok: int, err: int) -> None:
        self.ok += ok
        self.err += err
        chaos.images_read(ok, err)
        if time.monotonic() - self.last >= self.period:
            self.flush()

    def flush(self) -> None:
        if self.ok or self.err:
            self.send(self.ok, self.err)
            self.ok = self.err = 0
        self.last = time.monotonic()


def process_shard(job: Job, store_url: str, shard: int, tar_path: str | None, send) -> dict:
    """One unit of work, identical under Ray and inline: build the shard beside its committed
    version, then swap it in (marker last); on any failure the committed version stays."""
    from loftup.storage import open_store

    store = open_store(store_url)
    throttle = _Throttle(send)
    with store.build_shard(job.name, shard) as build:
        marker = run_and_time(job, store, shard, tar_path, throttle)
        throttle.flush()
        build.commit(marker)
    return marker


def plan_shards(
    job: Job,
    store,
    shards: list[tuple[int, str | None]],
    overwrite: bool,
    damaged: dict | None = None,
    check: str = "checksums",
):
    """Split shards into (todo, skipped): a shard is skipped only if its marker matches the
    config and the upstream runs it was built from (a rebuilt input makes it stale), and its
    files are still those it committed: present, same sizes and, with ``check="checksums"``,
    the same sha256. Damaged shards, with what is wrong, go into ``damaged`` and are redone."""
    if check not in SKIP_CHECKS:
        raise LoftupError(f"unknown --check-skipped {check!r}; choose from {', '.join(SKIP_CHECKS)}")
    want = job.config_hash()
    done = store.done_shards(job.name)
    todo, skipped = [], []
    for shard, path in shards:
        marker = done.get(shard)
        if marker is not None and "invalid" in marker and damaged is not None:
            damaged[shard] = marker["invalid"]
        fresh = (
            marker is not None
            and marker.get("config_hash") == want
            and marker.get("upstream", {}) == upstream_state(job, store, shard)
        )
        if fresh and not overwrite:
            problems = store.shard_problems(job.name, shard, marker, deep=check == "checksums")
            if problems:
                fresh = False
                if damaged is not None:
                    damaged[shard] = "; ".join(problems[:3])
        if not overwrite and fresh:
            skipped.append(shard)
        else:
            todo.append((shard, path))
    return todo, skipped


def estimate_images(store, shard: int, tar_path: str | None) -> int:
    for job in ("images", "masks"):
        marker = store.marker(job, shard)
        if marker:
            return int(marker.get("images", 0)) + int(marker.get("errors", 0))
    if tar_path and os.path.isfile(tar_path):
        try:
            # Seeking through headers only: cheap even for a 10 GB tar on local disk.
            with tarfile.open(tar_path, "r:") as tf:
                return sum(1 for m in tf if m.name.endswith(".jpg"))
        except (tarfile.TarError, OSError, EOFError):
            return 0
    return 0


def run_job(
    job: Job,
    store,
    shards: list[tuple[int, str | None]],
    options: RunOptions | None = None,
    *,
    console=None,
    **fields,
) -> RunSummary:
    """Run ``job`` over ``shards`` [(shard, tar path or None)] and return a summary.

    ``options`` (:class:`RunOptions`; or its fields as keywords, e.g. ``executor="inline"``): the
    executor, Ray and its resources, and what to redo. ``memory_per_task``: GiB of host memory Ray
    reserves per shard task (default: the job's own estimate, :meth:`Job.memory_bytes`; 0: reserve
    none), so a node is packed without oversubscribing it. ``check_skipped``: how done shards are
    checked before being skipped (:func:`plan_shards`). Holds the job's lease on the store
    throughout: a second run of the same job refuses.
    """
    opts = dataclasses.replace(options or RunOptions(), **fields)
    opts.check()
    job.check(store)
    with store.lease(job.name):
        return _run_leased(job, store, shards, opts, console)


def _run_leased(job, store, shards, opts: RunOptions, console) -> RunSummary:
    from loftup.pipeline.progress import ShardProgress

    store.update_manifest(job.record)
    t0 = time.time()
    for shard, ok in sorted(store.recover(job.name).items()):
        if console is not None:
            done = "its new version is committed" if ok else "it will be redone"
            console.print(f"[yellow]shard {shard:06d}: finished the commit a killed run left half done; {done}")
    damaged: dict[int, str] = {}
    todo, skipped = plan_shards(job, store, shards, opts.overwrite, damaged, opts.check_skipped)
    summary = RunSummary(job=job.name, planned=len(shards), skipped=skipped, damaged=damaged)
    if damaged and console is not None:
        for shard, why in sorted(damaged.items()):
            console.print(f"[yellow]shard {shard:06d} was damaged since its commit ({why}); redoing it")
    totals = {s: estimate_images(store, s, p) for s, p in todo}
    with ShardProgress(job.name, totals, console=console) as view:
        if not todo:
            pass
        elif opts.executor == "inline":
            for shard, path in todo:
                try:
                    info = process_shard(job, store.url, shard, path, lambda ok, err, s=shard: view.advance(s, ok, err))
                    _shard_done(summary, view, shard, info)
                except Exception as exc:  # as under Ray: one shard's failure never stops the others
                    _shard_failed(summary, view, shard, exc)
        elif opts.executor == "ray":
            _run_ray(job, store, todo, summary, view, opts)
        else:
            raise LoftupError(f"unknown executor {opts.executor!r}; use 'ray' or 'inline'")
    for shard, reason in summary.failed.items():
        # After the view closed, so that a store that cannot take the record fails loudly but late.
        if store.record_failed_shard(job.name, shard, reason) == 0:
            summary.failed[shard] = f"{reason} (its committed version is kept)"
    summary.seconds = time.time() - t0
    return summary


# A shard's outcome goes to the summary and the progress view alike, whichever executor ran it.
def _shard_done(summary: RunSummary, view, shard: int, info: dict) -> None:
    summary.done[shard] = info
    view.finish(shard, info)


def _shard_failed(summary: RunSummary, view, shard: int, exc: BaseException) -> None:
    summary.failed[shard] = error_line(exc)
    view.fail(shard, summary.failed[shard])


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to a cluster (``address``: ``auto`` or ``HOST:PORT``) or start an embedded one."""
    import ray

    if ray.is_initialized():
        return ray
    # Workers must import this very checkout/installation; the driver's env vars carry the hook.
    env = {k: v for k, v in os.environ.items() if k.startswith("LOFTUP_") or k == "HF_HUB_OFFLINE"}
    kwargs = dict(ignore_reinit_error=True, log_to_driver=False, runtime_env={"env_vars": env} if env else None)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise LoftupError(f"cannot connect to Ray at {address}: {error_line(exc)}") from None
    else:
        # address="local": embedded means embedded, even when another Ray instance runs on this host
        # (without it ray.init attaches to that instance and refuses num_cpus).
        # Ray turns token auth on for a new local instance and says so in a WARNING on every job;
        # that, and its "Started a local Ray instance" INFO line, are not news on an embedded run.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            **kwargs,
        )
    return ray


def task_memory(job: Job, memory_per_task: float | None, node_memory: list[float], embedded: bool) -> int:
    """Bytes of Ray ``memory`` to reserve per task of ``job``.

    The job's estimate is capped at the largest node's memory resource on an embedded instance
    (it is only a fraction of this machine's RAM, and a request above it would never schedule);
    an explicit request that no node can hold is a clear error.
    """
    if memory_per_task is not None:
        want = int(memory_per_task * (1 << 30))
        if want and node_memory and want > max(node_memory):
            raise LoftupError(
                f"--memory-per-task {memory_per_task:g} GiB: no Ray node offers that much "
                f"(largest: {max(node_memory) / 2**30:.1f} GiB)"
            )
        return want
    want = job.memory_bytes()
    if node_memory and want > max(node_memory):
        if not embedded:
            raise LoftupError(
                f"{job.name} tasks need ~{want / 2**30:.1f} GiB of memory but the largest Ray node offers "
                f"{max(node_memory) / 2**30:.1f} GiB; pass --memory-per-task to override"
            )
        want = int(max(node_memory))
    return want


def _node_memory(ray) -> list[float]:
    return [float(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")]


def _run_ray(job, store, todo, summary, view, opts: RunOptions):
    address, gpus_per_task = opts.ray_address, opts.gpus_per_task
    ray = init_ray(address, opts.num_cpus)
    from ray.exceptions import RayError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from loftup.pipeline import cluster

    if gpus_per_task is None:
        gpus_per_task = 1.0 if (job.num_gpus_wanted and ray.cluster_resources().get("GPU", 0) > 0) else 0.0
    memory = task_memory(job, opts.memory_per_task, _node_memory(ray), embedded=not address)
    demand = {"CPU": opts.cpus_per_task, "GPU": gpus_per_task, "memory": float(memory)}
    cluster.check_fits(ray, demand)
    watch = cluster.Watch(ray, demand, remote_cluster=bool(address))

    # On the driver's own node, holding no CPU: progress survives the loss of any worker node.
    @ray.remote(
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
    )
    class Counter:
        def __init__(self):
            self.counts = {}

        def add(self, shard, ok, err):
            a, b = self.counts.get(shard, (0, 0))
            self.counts[shard] = (a + ok, b + err)

        def take(self):
            out, self.counts = self.counts, {}
            return out

    counter = Counter.remote()

    def task(job, url, shard, path, counter):
        return process_shard(job, url, shard, path, lambda ok, err: counter.add.remote(shard, ok, err))

    remote = ray.remote(task).options(
        num_cpus=opts.cpus_per_task,
        num_gpus=gpus_per_task,
        memory=memory or None,
        max_retries=opts.max_retries,
        retry_exceptions=False,
    )
    pending = {}
    for shard, path in todo:
        pending[remote.remote(job, store.url, shard, path, counter)] = shard
    stop = threading.Event()

    def poll():
        while not stop.wait(0.5):
            try:
                counts = ray.get(counter.take.remote(), timeout=10)
            except Exception:  # the cluster is failing: the wait loop below reports it
                return
            for shard, (ok, err) in counts.items():
                view.advance(shard, ok, err)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                shard = pending.pop(ref)
                try:
                    _shard_done(summary, view, shard, ray.get(ref))
                except RayTaskError as exc:
                    _shard_failed(summary, view, shard, exc.cause if getattr(exc, "cause", None) is not None else exc)
                except RayError as exc:
                    _shard_failed(summary, view, shard, exc)
            if pending:
                watch.check(len(pending))
    finally:
        stop.set()
        poller.join(timeout=2)
