"""The trainer over two torchrun nodes on this machine (``--nnodes 2``, one process per node, c10d
rendezvous on localhost, gloo), and one node dying mid-run.

Each "node" is its own torchrun agent in its own process group, as on two machines; node 0 is
started first and hosts the rendezvous store (c10d's store lives in the first agent that binds
the endpoint: losing that node ends the job, see docs/cluster.md), so node 1 is the one killed.
Marked ``cluster``; every process group a test starts is killed when it ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.cluster

# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the shared store (torch's default) a surviving agent
# keeps the previous round's bootstrap store, and a replacement node that joins as a non-zero rank
# waits forever for the master address (pytorch#135712); docs/cluster.md says to set it.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1"}
ENV["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
STEPS = 4  # 2 epochs of the 8 images at a global batch of 4
STAGE1 = ["--pca-dim", "16", "--size", "56", "--max-masks", "10", "--recipe", "paper"]
STAGE2 = ["--random-init", "--geometry", "224", "--hr", "112", "--sizes", "56", "--max-masks", "10"]
STAGE2 += ["--ema-every", "2", "--recipe", "paper"]
COMMON = ["--batch-size", "4", "--max-steps", str(STEPS), "--workers", "0", "--device", "cpu", "--log-every", "1"]
COMMON += ["--checkpoint-every", "2", "--random-init", "--auto-resume"]


def _report(fault: str, **facts) -> None:
    """With LOFTUP_CLUSTER_REPORT=FILE, append what a fault did (docs/cluster.md's table comes from it)."""
    path = os.environ.get("LOFTUP_CLUSTER_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": fault, **facts}) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children first found, grandchildren after)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, parent in parents.items() if parent in frontier]
        out += kids
        frontier = kids
    return out


class Launcher:
    """torchrun agents, each in its own session so that a node can be killed whole."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs, self.n = tmp, [], 0

    def node(self, args, *, port: int, nnodes: int = 2, nproc: int = 1, restarts: int = 0, env=None):
        self.n += 1
        log = open(self.tmp / f"node{self.n}.log", "w")
        rdzv = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"job{port}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc)]
        cmd += [*rdzv, "--max_restarts", str(restarts), "-m", "loftup.cli.train", *map(str, args)]
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**ENV, **(env or {})}, start_new_session=True
        )
        p.log = log.name
        self.procs.append(p)
        return p

    def cluster(self, args, *, port: int | None = None, env=None, restarts: int = 0):
        """Two nodes: node 0 first (it hosts the rendezvous store), then node 1."""
        port = port or _free_port()
        first = self.node(args, port=port, env=env, restarts=restarts)
        _wait(lambda: _listening(port) or first.poll() is not None, "node 0 to open the rendezvous", 60)
        return first, self.node(args, port=port, env=env, restarts=restarts), port

    def kill(self, p) -> None:
        """The whole node: the agent and its workers (torchrun starts each worker in its own session)."""
        for pid in [p.pid, *_descendants(p.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait(timeout=30)

    def close(self) -> None:
        for p in self.procs:
            self.kill(p)


@pytest.fixture
def launcher(tmp_path):
    lau = Launcher(tmp_path)
    try:
        yield lau
    finally:
        lau.close()


def _wait(predicate, what: str, limit: float = 120.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _finish(*procs, timeout: float = 300) -> None:
    for p in procs:
        rc = p.wait(timeout=timeout)
        assert rc == 0, f"torchrun exited {rc}:\n" + Path(p.log).read_text()[-4000:]


def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _trace(directory: Path) -> dict[int, dict[int, list[int]]]:
    """rank -> step -> image ids it trained on (a step redone after a restart: its last record)."""
    out = {}
    for f in sorted(directory.glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rank, {})[rec["step"]] = rec["ids"]
    return out


def _metric_steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in ln]


@pytest.fixture(scope="module")
def train_store(tmp_path_factory):
    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.sample_data import write_sample_shards
    from loftup.storage import open_store

    root = tmp_path_factory.mktemp("torchrun")
    write_sample_shards(root / "sa1b", tars=2, images_per_tar=4, short_side=240, seed=5)
    store = open_store(root / "store", create=True, geometries=(224,))
    shards = resolve_shards("0-1", root / "sa1b")
    for job in (ImagesJob(sizes=(224,)), MasksJob(sizes=(224,), source_options={"max_masks": 10})):
        assert not run_job(job, store, shards, executor="inline").failed
    assert not run_job(FeaturesJob(random_init=True), store, [(0, None), (1, None)], executor="inline").failed
    return store


@pytest.fixture(scope="module")
def two_node_stage1(train_store, tmp_path_factory):
    """Stage 1 over two nodes, uninterrupted, with the image ids each rank trained on."""
    tmp = tmp_path_factory.mktemp("s1_2n")
    run, trace = tmp / "run", tmp / "trace"
    trace.mkdir()
    lau = Launcher(tmp)
    try:
        n0, n1, _ = lau.cluster(
            ["stage1", "--store", train_store.url, "--out", run, *STAGE1, *COMMON],
            env={"LOFTUP_TRACE_SAMPLES": str(trace)},
        )
        _finish(n0, n1)
    finally:
        lau.close()
    return run, trace


@pytest.mark.timeout(600)
def test_two_nodes_train_exactly_as_one_node_with_two_processes(train_store, two_node_stage1, launcher, tmp_path):
    run2, trace2 = two_node_stage1
    cfg = json.loads((run2 / "config.json").read_text())
    assert cfg["world_size"] == 2 and _metric_steps(run2) == list(range(1, STEPS + 1))

    # Every rank reads its own part of the store: in each epoch the two ranks' image ids are
    # disjoint and together are every image of the store, each exactly once.
    every = sorted(int(i) for s in (0, 1) for i in train_store.image_ids(s))
    assert len(every) == 8
    steps = _trace(trace2)
    assert sorted(steps) == [0, 1] and all(sorted(steps[r]) == list(range(STEPS)) for r in (0, 1))
    for epoch in range(STEPS // 2):
        seen = {r: [i for st in (2 * epoch, 2 * epoch + 1) for i in steps[r][st]] for r in (0, 1)}
        assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == every, epoch
    assert steps[0][0] + steps[0][1] != steps[0][2] + steps[0][3]  # a new order each epoch

    # One node running both processes: the same ranks, the same global batch of 4, the same gloo
    # all-reduce over two processes, so the same floats in the same order: bitwise equal.
    run1, trace1 = tmp_path / "one_node", tmp_path / "trace1"
    trace1.mkdir()
    one = launcher.node(
        ["stage1", "--store", train_store.url, "--out", run1, *STAGE1, *COMMON],
        port=_free_port(),
        nnodes=1,
        nproc=2,
        env={"LOFTUP_TRACE_SAMPLES": str(trace1)},
    )
    _finish(one)
    _same_weights(run2 / "stage1.safetensors", run1 / "stage1.safetensors")
    assert _trace(trace1) == steps

    # Stage 2 from that Stage 1: two nodes and one node again agree bit for bit.
    init = run2 / "stage1.safetensors"
    s2 = ["stage2", "--init", init, "--store", train_store.url, *STAGE2, *COMMON]
    n0, n1, _ = launcher.cluster([*s2, "--out", tmp_path / "s2_two"])
    _finish(n0, n1)
    _finish(launcher.node([*s2, "--out", tmp_path / "s2_one"], port=_free_port(), nnodes=1, nproc=2))
    for name in ("stage2.safetensors", "stage2_teacher.safetensors"):
        _same_weights(tmp_path / "s2_two" / name, tmp_path / "s2_one" / name)


@pytest.mark.timeout(600)
def test_node_killed_mid_run_restarts_from_last_pt_to_the_uninterrupted_weights(
    train_store, two_node_stage1, launcher, tmp_path
):
    ref, ref_trace = two_node_stage1
    run, hold, trace = tmp_path / "run", tmp_path / "hold", tmp_path / "trace"
    trace.mkdir()
    # Rank 0 stops right after last.pt of step 2 is in place; node 1 is then killed whole.
    env = {"LOFTUP_CHAOS_AT": f"saved:2:hold:{hold}", "LOFTUP_TRACE_SAMPLES": str(trace)}
    args = ["stage1", "--store", train_store.url, "--out", run, *STAGE1, *COMMON]
    n0, n1, port = launcher.cluster(args, env=env, restarts=1)
    _wait(lambda: any(hold.glob("held.*")), "step 2's checkpoint")
    t0 = time.monotonic()
    launcher.kill(n1)
    at_kill = torch.load(run / "last.pt", weights_only=True)["step"]
    (hold / "release").touch()
    # node 0's worker loses its peer and fails; its agent (--max-restarts 1) restarts it into a
    # new rendezvous round, which the replacement for node 1 joins; both resume from last.pt.
    replacement = launcher.node(args, port=port, env=env, restarts=1)
    _finish(n0, replacement)
    took = time.monotonic() - t0
    _same_weights(run / "stage1.safetensors", ref / "stage1.safetensors")
    assert _metric_steps(run) == list(range(1, STEPS + 1))  # each step logged once
    assert _trace(trace) == _trace(ref_trace)  # the same samples at the same steps
    log = Path(n0.log).read_text()
    # node 0's worker failed and its agent restarted it: the same torchrun then finished with 0
    assert "failed (exitcode: 1)" in log and log.rindex("failed (exitcode: 1)") < log.rindex(f"step {STEPS}/{STEPS}"), (
        log[-3000:]
    )
    # and the worker that lost its peer said so in one line, not a traceback
    lost = [ln for ln in log.splitlines() if ln.startswith("error: rank ")]
    assert len(lost) == 1 and "lost contact with the other ranks" in lost[0], log[-3000:]
    assert "Traceback" not in log and "╭" not in log, log[-3000:]
    _report(
        "torchrun node 1 killed (stage 1, --max-restarts 1, replacement node)",
        last_pt_step_at_kill=at_kill,
        steps=STEPS,
        seconds_kill_to_finish=round(took, 1),
        final_weights_equal_uninterrupted=True,
        samples_per_step_equal_uninterrupted=True,
    )


@pytest.mark.timeout(600)
def test_checkpoint_write_killed_is_never_read_and_a_plain_relaunch_finishes_exactly(
    train_store, two_node_stage1, launcher, tmp_path
):
    ref, _ = two_node_stage1
    run, flag = tmp_path / "run", tmp_path / "killed"
    args = ["stage1", "--store", train_store.url, "--out", run, *STAGE1, *COMMON]
    # Rank 0 is SIGKILLed while step 4's checkpoint is in its temp file, before the rename.
    n0, n1, _ = launcher.cluster(args, env={"LOFTUP_CHAOS_AT": f"save:4:kill:{flag}"})
    for p in (n0, n1):
        assert p.wait(timeout=300) != 0  # no restarts allowed: the job fails
    assert flag.read_text() == "save:4"
    temps = [p.name for p in run.iterdir() if p.name.startswith(".last.pt.")]
    assert len(temps) == 1, sorted(p.name for p in run.iterdir())  # the cut write, under its temp name
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 2  # last.pt is still the previous, whole checkpoint

    # A plain relaunch of the same command (--auto-resume) continues from step 2.
    n0, n1, _ = launcher.cluster(args)
    _finish(n0, n1)
    _same_weights(run / "stage1.safetensors", ref / "stage1.safetensors")
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # the temp was cleared
    assert _metric_steps(run) == list(range(1, STEPS + 1))
    _report(
        "checkpoint write killed (rank 0 SIGKILLed inside step 4's save, no restarts)",
        exit_codes_nonzero=True,
        temp_files_left=len(temps),
        last_pt_step=int(state["step"]),
        relaunch_final_weights_equal_uninterrupted=True,
        temps_after_relaunch=0,
    )
