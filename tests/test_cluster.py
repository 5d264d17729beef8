"""The pipeline on a multi-node Ray cluster on this machine, as Ray's own tests build one
(``ray.cluster_utils.Cluster``: a head and worker nodes, each with its own raylet, object store
and resources), driven through the real CLI with ``--ray-address``; then nodes failing mid-job.

Slow by nature (every node is a set of Ray processes): marked ``cluster``. The tests share one
cluster and run in file order; the last one kills its head. Every node is torn down at the end
even when a test fails (and Ray's reaper kills them should pytest itself die).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

SHARDS = "0-3"
N_SHARDS = 4
SIZES = "56"
JOBS = ("images", "masks", "features/dinov2_vits14@56", "implicit/dinov2_vits14@56")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1", "RAY_ACCEPT_CLUSTER_DEFAULTS": "1"}
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter's Ray

# The four jobs, with what each needs; the reference runs the same configs on an embedded instance.
_REFERENCE = """
import sys
from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
from loftup.pipeline.runner import run_job
from loftup.pipeline.shards import resolve_shards
from loftup.storage import open_store
from loftup.training.implicit_job import ImplicitJob

tars, path = sys.argv[1:3]
store = open_store(path, create=True, geometries=(56,))
shards = resolve_shards("0-3", tars)
plain = [(s, None) for s, _ in shards]
for job, todo in (
    (ImagesJob(sizes=(56,)), shards),
    (MasksJob(sizes=(56,)), shards),
    (FeaturesJob(res=56, random_init=True), plain),
    (ImplicitJob(res=56, random_init=True, images_per_shard=1, recipe={"steps": 2, "views": 4}), plain),
):
    assert not run_job(job, store, todo, num_cpus=2).failed
"""
IMPLICIT = ["--res", "56", "--random-init", "--images-per-shard", "1", "--steps", "2", "--views", "4"]


def _report(fault: str, **facts) -> None:
    """With LOFTUP_CLUSTER_REPORT=FILE, append what a fault did (docs/cluster.md's table comes from it)."""
    path = os.environ.get("LOFTUP_CLUSTER_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": fault, **facts}) + "\n")


# Ray's own test clusters shorten the GCS health check so that a killed node is declared dead in
# ~2 s instead of ~30 s; nothing else about the cluster changes.
FAST_HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def _head_args(num_cpus: int) -> dict:
    return dict(num_cpus=num_cpus, gcs_server_port=_free_port(), include_dashboard=False, _system_config=FAST_HEALTH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipeline(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "loftup.cli.pipeline", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    return p


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line, which is also the last line; no traceback. (Ray's C++ core may log
    its own timestamped diagnostics above it; they are not ours to silence.)"""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr[-4000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    return errors[0]


def _store(path):
    from loftup.storage import open_store

    return open_store(path)


def _digests(path, job: str) -> dict[int, dict]:
    """shard -> {file: size and sha256} as each shard's marker recorded it at commit."""
    return {s: m["files"] for s, m in _store(path).done_shards(job).items()}


def _nodes(path, job: str) -> dict[int, str]:
    return {s: m["node"]["ray_node"] for s, m in _store(path).done_shards(job).items()}


def _temps(path) -> list[str]:
    from loftup.storage.commit import is_temp

    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if is_temp(p.name))


def _verify_deep(path) -> list[str]:
    from loftup.storage.verify import verify_store

    return verify_store(_store(path), deep=True)


def _exact(path, reference, job: str) -> None:
    """Every shard committed, each file byte for byte the embedded run's, nothing half-written."""
    assert _digests(path, job) == _digests(reference, job)
    assert sorted(_store(path).done_shards(job)) == list(range(N_SHARDS))
    assert _temps(path) == []
    assert _verify_deep(path) == []


def _wait_for(predicate, what: str, limit: float = 120.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _held(directory: Path) -> dict[int, str]:
    """pid -> Ray node id of each worker the hold hook stopped mid-shard."""
    out = {}
    for f in glob.glob(str(directory / "held.*")):
        node = Path(f).read_text()
        if node:
            out[int(f.rsplit(".", 1)[1])] = node
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _cluster_processes_left(cluster) -> bool:
    return any(n.any_processes_alive() for n in cluster.list_all_nodes())


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    from loftup.sample_data import write_sample_shards

    out = tmp_path_factory.mktemp("sa1b")
    write_sample_shards(out, tars=N_SHARDS, images_per_tar=4, short_side=64, seed=3)
    return out


@pytest.fixture(scope="module")
def _reference_run(tars, tmp_path_factory):
    """Started before the cluster, so that the two start up side by side."""
    path = tmp_path_factory.mktemp("ref") / "store"
    cmd = [sys.executable, "-c", _REFERENCE, str(tars), str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    yield path, proc
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def reference(_reference_run):
    """The four jobs on the embedded local Ray instance (the default without --ray-address)."""
    path, proc = _reference_run
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return path


@pytest.fixture(scope="module")
def cluster(_reference_run):
    """A head and two workers, one CPU each; ``gpu`` also declares one GPU (Ray schedules on the
    declared resource; this machine has no CUDA, so the job itself runs on the CPU)."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ACCEPT_CLUSTER_DEFAULTS", "1")
    c = Cluster(initialize_head=True, head_node_args=_head_args(1))
    try:
        c.w1 = c.add_node(num_cpus=1)
        c.gpu = c.add_node(num_cpus=1, num_gpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        assert not _cluster_processes_left(c)


def _args(job: str, store, tars, address, *extra) -> list:
    """CLI arguments of ``job`` over the four shards on the cluster at ``address``."""
    args = [job, "--shards", SHARDS, "--store", store, "--ray-address", address, *extra]
    if job in ("images", "masks"):
        return [*args, "--sa1b-root", tars, "--sizes", SIZES]
    if job == "features":
        return [*args, "--res", "56", "--random-init"]
    return [*args, *IMPLICIT]


def _start(args, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loftup.cli.pipeline", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **(env or {})})


def _outcome(proc: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)  # a hang fails here
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _all_held(hold: Path, n: int):
    return _wait_for(lambda: (h := _held(hold)) and len(h) == n and h, f"{n} shards in flight")


@pytest.mark.timeout(600)
def test_four_jobs_on_three_nodes_equal_the_embedded_run_and_gpu_tasks_land_on_the_gpu_node(
    cluster, reference, tars, tmp_path
):
    store, address = tmp_path / "store", cluster.address
    for job in ("images", "masks", "features"):
        _ok(_pipeline(*_args(job, store, tars, address)))
    _ok(_pipeline(*_args("implicit", store, tars, address, "--gpus-per-task", "0")))
    for job in JOBS:
        _exact(store, reference, job)

    nodes = {cluster.head_node.node_id, cluster.w1.node_id, cluster.gpu.node_id}
    for job in ("images", "masks", JOBS[3]):
        ran_on = set(_nodes(store, job).values())
        assert ran_on <= nodes and len(ran_on) >= 2, (job, ran_on)  # the shards spread over the nodes
    # features want a GPU and the cluster has one: 1 GPU per task, so only the GPU node runs them
    assert set(_nodes(store, JOBS[2]).values()) == {cluster.gpu.node_id}

    # more GPUs per task than any node has: one line before any work, not a task waiting forever
    p = _pipeline(*_args("features", store, tars, address, "--overwrite", "--gpus-per-task", "2"))
    assert p.returncode == 2
    line = _one_error_line(p)
    assert "--gpus-per-task 2: no live Ray node has 2 GPU" in line and "is 1" in line, line
    assert _digests(store, JOBS[2]) == _digests(reference, JOBS[2])  # nothing was touched


@pytest.mark.timeout(300)
def test_worker_node_killed_mid_shard_job_finishes_on_the_others_store_exact(cluster, reference, tars, tmp_path):
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    hold, store = tmp_path / "hold", tmp_path / "store"
    proc = _start(_args("masks", store, tars, cluster.address), env={"LOFTUP_CHAOS_HOLD": f"2:{hold}"})
    try:
        held = _all_held(hold, N_SHARDS)  # one shard on each of the four nodes
        assert doomed.node_id in held.values()
        in_flight = _temps(store)
        assert any(t.startswith("masks/") for t in in_flight), in_flight  # killed mid-write
        victim = next(pid for pid, node in held.items() if node == doomed.node_id)
        t0 = time.monotonic()
        cluster.remove_node(doomed, allow_graceful=False)
        _wait_for(lambda: not _pid_alive(victim), "the killed node's worker to be gone", 30)
        (hold / "release").touch()
        _ok(_outcome(proc))
        took = time.monotonic() - t0
    finally:
        proc.kill()
    _exact(store, reference, "masks")
    ran_on = set(_nodes(store, "masks").values())
    assert doomed.node_id not in ran_on and len(ran_on) >= 2
    table = _store(store).masks_dataset().to_table(columns=["image_id", "ann_id"])
    ref = _store(reference).masks_dataset().to_table(columns=["image_id", "ann_id"])
    assert table.num_rows == ref.num_rows and len(set(zip(*table.to_pydict().values()))) == ref.num_rows
    before = _store(store).done_shards("masks")
    _ok(_pipeline(*_args("masks", store, tars, cluster.address)))  # the next run: nothing to redo or clean
    assert _store(store).done_shards("masks") == before and _temps(store) == []
    _report(
        "worker node killed (masks)",
        temps_at_kill=len(in_flight),
        seconds_kill_to_exit=round(took, 1),
        exit_code=0,
        shards_committed=len(before),
        nodes_used=len(ran_on),
        mask_rows=table.num_rows,
        rows_in_reference=ref.num_rows,
        temps_after=0,
        verify_deep_problems=0,
    )


@pytest.mark.timeout(300)
def test_drained_node_is_preempted_mid_write_and_leaves_no_partial_shard(cluster, reference, tars, tmp_path):
    spot = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    hold, store = tmp_path / "hold", tmp_path / "store"
    proc = _start(_args("images", store, tars, cluster.address), env={"LOFTUP_CHAOS_HOLD": f"2:{hold}"})
    try:
        held = _all_held(hold, N_SHARDS)
        assert spot.node_id in held.values()
        in_flight = _temps(store)
        assert any(t.startswith("images/") for t in in_flight), in_flight  # drained mid-write
        t0 = time.monotonic()
        # The spot notice: Ray stops scheduling on the node; the cloud kills it at the deadline.
        drain = [*RAY, "drain-node", "--address", cluster.address, "--node-id", spot.node_id]
        drain += ["--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot preemption (test)"]
        drain += ["--deadline-remaining-seconds", "1"]
        p = subprocess.run(drain, capture_output=True, text=True, env=ENV, timeout=60)
        assert p.returncode == 0, p.stderr[-2000:]
        time.sleep(1.0)  # the deadline passes with the shard still writing
        victim = next(pid for pid, node in held.items() if node == spot.node_id)
        cluster.remove_node(spot, allow_graceful=False)
        _wait_for(lambda: not _pid_alive(victim), "the preempted node's worker to be gone", 30)
        (hold / "release").touch()
        _ok(_outcome(proc))
        took = time.monotonic() - t0
    finally:
        proc.kill()
    _exact(store, reference, "images")
    assert spot.node_id not in set(_nodes(store, "images").values())
    ids = _store(store).images_dataset().to_table(columns=["image_id"])["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 4 * N_SHARDS
    _report(
        "node drained (spot preemption, images)",
        temps_at_drain=len(in_flight),
        seconds_drain_to_exit=round(took, 1),
        exit_code=0,
        shards_committed=N_SHARDS,
        images=len(ids),
        distinct_images=len(set(ids)),
        temps_after=0,
        verify_deep_problems=0,
    )


@pytest.mark.timeout(450)
def test_lost_gpu_node_and_head_each_end_the_job_in_one_line_and_a_new_cluster_completes_the_store(
    cluster, reference, tars, tmp_path
):
    from ray.cluster_utils import Cluster

    store, address = tmp_path / "store", cluster.address
    _ok(_pipeline(*_args("images", store, tars, address)))
    # The only GPU node dies under a GPU job: its tasks have nowhere left to run.
    hold = tmp_path / "hold_gpu"
    proc = _start(
        _args("features", store, tars, address), env={"LOFTUP_CHAOS_HOLD": f"4:{hold}", "LOFTUP_RAY_NODE_WAIT": "3"}
    )
    try:
        (victim,) = _all_held(hold, 1)
        t0 = time.monotonic()
        cluster.remove_node(cluster.gpu, allow_graceful=False)
        _wait_for(lambda: not _pid_alive(victim), "the GPU node's worker to be gone", 30)
        (hold / "release").touch()
        p = _outcome(proc)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert p.returncode == 1, p.stderr[-3000:]
    line = _one_error_line(p)
    assert f"no live Ray node can run the {N_SHARDS} remaining shard task(s)" in line and "1 GPU" in line, line
    assert _store(store).done_shards(JOBS[2]) == {}  # nothing half-done is committed
    cut = _temps(store)
    assert cut and all(t.startswith(f"{JOBS[2]}/") for t in cut)  # the cut write; the job's next run clears it
    _report(
        "only GPU node killed (features, LOFTUP_RAY_NODE_WAIT=3)",
        exit_code=p.returncode,
        seconds_kill_to_exit=round(took, 1),
        shards_committed=0,
        temps_left_for_next_run=len(cut),
    )
    # Now no node has a GPU at all: a job asking for one is refused in one line, before any work.
    cluster.wait_for_nodes()
    p = _pipeline(*_args("features", store, tars, address, "--gpus-per-task", "1"))
    assert p.returncode == 2 and "--gpus-per-task 1: no live Ray node has 1 GPU" in _one_error_line(p)

    hold = tmp_path / "hold_head"
    proc = _start(
        _args("masks", store, tars, address), env={"LOFTUP_CHAOS_HOLD": f"2:{hold}", "LOFTUP_RAY_HEAD_TIMEOUT": "3"}
    )
    try:
        old_workers = _all_held(hold, 2)  # a shard on the head and one on the worker
        t0 = time.monotonic()
        cluster.remove_node(cluster.head_node, allow_graceful=False)
        (hold / "release").touch()
        p = _outcome(proc, timeout=120)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert p.returncode == 1, p.stderr[-3000:]
    assert _one_error_line(p).startswith("error: lost the Ray head node at ")
    assert took < 60, took  # Ray's own limit is 60 s, and then a crash without our line
    for node in list(cluster.worker_nodes):  # the old cluster is gone for good
        cluster.remove_node(node, allow_graceful=False)
    assert not _cluster_processes_left(cluster)
    # Its workers too (they outlive their raylet for a moment): never two writers on one shard.
    _wait_for(lambda: not any(_pid_alive(pid) for pid in old_workers), "the old cluster's workers to stop", 60)
    committed_by_old = len(_store(store).done_shards("masks"))

    # Whatever the old cluster committed stays; a new cluster finishes the rest exactly.
    fresh = Cluster(initialize_head=True, head_node_args=_head_args(2))
    try:
        _ok(_pipeline(*_args("masks", store, tars, fresh.address)))
        _ok(_pipeline(*_args("features", store, tars, fresh.address)))  # also clears the cut GPU-node write
    finally:
        fresh.shutdown()
        assert not _cluster_processes_left(fresh)
    for job in JOBS[:3]:
        _exact(store, reference, job)
    _report(
        "head node killed (masks, LOFTUP_RAY_HEAD_TIMEOUT=3)",
        exit_code=1,
        seconds_kill_to_exit=round(took, 1),
        shards_committed_by_old_cluster=committed_by_old,
        shards_done_by_new_cluster=N_SHARDS - committed_by_old,
        temps_after=0,
        verify_deep_problems=0,
    )
