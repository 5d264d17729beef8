"""What the runner needs to know about a Ray cluster: where a task runs, whether any live node
can hold a task's resource request, and whether the head node is still there.

Ray itself waits forever for a task that no node can run (it expects an autoscaler to add one)
and lets a driver whose head node died hang for a minute before killing it with its own log
lines; :class:`Watch` turns both into one clear line instead.
"""

from __future__ import annotations

import os
import socket
import time

from loftup.storage.errors import ClusterError, LoftupError


def _seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise LoftupError(f"{name} must be a number of seconds, got {os.environ[name]!r}") from None


# How long the driver tolerates an unreachable head (GCS) before it gives up; Ray's own limit
# (gcs_rpc_server_reconnect_timeout_s) is 60 s, after which it kills the driver itself.
HEAD_TIMEOUT_S = 30.0
# How long tasks may wait with no live node able to run them (a lost GPU node, say) before the
# job fails; long enough for a restarted node to rejoin.
NODE_WAIT_S = 60.0
CHECK_EVERY_S = 1.0


def where() -> dict:
    """The host and Ray node this code runs on (recorded in each shard's marker)."""
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except Exception:  # inline executor or no Ray installed: the host says it all
        pass
    return {"host": socket.gethostname(), "ray_node": node}


def demand_text(demand: dict[str, float]) -> str:
    parts = []
    for key, value in demand.items():
        if value:
            parts.append(f"{value / 2**30:.1f} GiB memory" if key == "memory" else f"{value:g} {key}")
    return ", ".join(parts) or "nothing"


def fitting_nodes(nodes: list[dict], demand: dict[str, float]) -> list[dict]:
    """The live nodes whose total resources hold one task's ``demand``."""
    out = []
    for n in nodes:
        if not n.get("Alive"):
            continue
        have = n.get("Resources", {})
        if all(have.get(k, 0.0) + 1e-9 >= v for k, v in demand.items() if v):
            out.append(n)
    return out


def check_fits(ray, demand: dict[str, float]) -> None:
    """A clear error now, instead of a task that waits forever, when no live node can run it."""
    nodes = ray.nodes()
    if fitting_nodes(nodes, demand):
        return
    alive = [n for n in nodes if n.get("Alive")]
    for key, flag in (("GPU", "--gpus-per-task"), ("CPU", "--cpus-per-task")):
        want = demand.get(key, 0.0)
        if want and not fitting_nodes(nodes, {key: want}):
            most = max((n.get("Resources", {}).get(key, 0.0) for n in alive), default=0.0)
            what = "GPU" if key == "GPU" else "CPUs"
            raise LoftupError(
                f"{flag} {want:g}: no live Ray node has {want:g} {what} (the most any of the {len(alive)} "
                f"live node(s) has is {most:g}); add such a node or ask for less"
            )
    raise LoftupError(f"no live Ray node can hold a shard task ({demand_text(demand)})")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


class Watch:
    """Checked from the driver's wait loop: raises :class:`ClusterError` when the head has been
    unreachable for ``HEAD_TIMEOUT_S``, or no live node could run the tasks for ``NODE_WAIT_S``.
    Both limits can be changed through ``LOFTUP_RAY_HEAD_TIMEOUT`` / ``LOFTUP_RAY_NODE_WAIT``."""

    def __init__(self, ray, demand: dict[str, float], remote_cluster: bool):
        self.ray, self.demand, self.remote = ray, demand, remote_cluster
        self.head_timeout = _seconds("LOFTUP_RAY_HEAD_TIMEOUT", HEAD_TIMEOUT_S)
        self.node_wait = _seconds("LOFTUP_RAY_NODE_WAIT", NODE_WAIT_S)
        self.gcs = ray.get_runtime_context().gcs_address if remote_cluster else None
        self.last = 0.0
        self.head_lost_at = None
        self.no_node_at = None

    def check(self, pending: int) -> None:
        now = time.monotonic()
        if now - self.last < CHECK_EVERY_S:
            return
        self.last = now
        if self.gcs:  # an embedded instance's head lives and dies with this process
            host, _, port = self.gcs.rpartition(":")
            if not _reachable(host.strip("[]"), int(port)):
                self.head_lost_at = self.head_lost_at or now
                if now - self.head_lost_at >= self.head_timeout:
                    raise ClusterError(
                        f"lost the Ray head node at {self.gcs} (unreachable for {now - self.head_lost_at:.0f} s) "
                        f"with {pending} shard(s) unfinished; finished shards are committed: rerun against a new "
                        f"cluster once the old workers have stopped"
                    )
                return  # without the head there is nothing more to ask
            self.head_lost_at = None
        if fitting_nodes(self.ray.nodes(), self.demand):
            self.no_node_at = None
            return
        self.no_node_at = self.no_node_at or now
        if now - self.no_node_at >= self.node_wait:
            raise ClusterError(
                f"no live Ray node can run the {pending} remaining shard task(s) (each needs "
                f"{demand_text(self.demand)}) for {now - self.no_node_at:.0f} s: the nodes that could were lost"
            )
