"""Fault-injection points for the cluster tests. Every hook is a no-op unless its environment
variable is set (``init_ray`` passes ``LOFTUP_*`` variables on to Ray workers, torchrun passes
the environment to its workers), so production runs pay one dictionary lookup.

- ``LOFTUP_CHAOS_HOLD=N:DIR``: a pipeline worker that has read N images creates
  ``DIR/held.<pid>`` (holding its Ray node id) and waits until ``DIR/release`` exists, so that a
  test can kill a node while it is known to be mid-shard. Once released, nothing holds again.
- ``LOFTUP_CHAOS_AT=POINT:STEP:ACTION:PATH``: at checkpoint ``POINT`` (``save`` = the training
  state is written to its temp file but not yet renamed; ``saved`` = just renamed into place) of
  step ``STEP``, ``ACTION`` is ``kill`` (SIGKILL this process once; ``PATH`` is the flag file
  that says it happened) or ``hold`` (create ``PATH/held.<pid>``, wait for ``PATH/release``).
- ``LOFTUP_TRACE_SAMPLES=DIR``: every training rank appends the image ids of each batch it
  trains on to ``DIR/rank<r>.jsonl`` (to check how ranks split the store).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

HOLD_LIMIT_S = 300.0  # a forgotten release never hangs a test run for longer than this
_seen = 0


def _hold(directory: str, note: str) -> None:
    d = Path(directory)
    release = d / "release"
    if release.exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    (d / f"held.{os.getpid()}").write_text(note)
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _ray_node() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # not under Ray: the host is all there is to say
        pass
    return ""


def images_read(n: int) -> None:
    """Called by a pipeline worker as images are read (``LOFTUP_CHAOS_HOLD``)."""
    global _seen
    spec = os.environ.get("LOFTUP_CHAOS_HOLD")
    if not spec:
        return
    _seen += n
    after, directory = spec.split(":", 1)
    if _seen >= int(after):
        _hold(directory, _ray_node())


def checkpoint(point: str, step: int) -> None:
    """Called by the trainer around a checkpoint write (``LOFTUP_CHAOS_AT``)."""
    spec = os.environ.get("LOFTUP_CHAOS_AT")
    if not spec:
        return
    where, at, action, path = spec.split(":", 3)
    if where != point or int(at) != int(step):
        return
    if action == "hold":
        _hold(path, f"{point}:{step}")
    elif action == "kill" and not os.path.exists(path):
        Path(path).write_text(f"{point}:{step}")
        os.kill(os.getpid(), signal.SIGKILL)


def trace_samples(batch: dict, step: int, epoch: int, rank: int) -> None:
    """Called by the trainer with each batch before it trains on it (``LOFTUP_TRACE_SAMPLES``)."""
    directory = os.environ.get("LOFTUP_TRACE_SAMPLES")
    if not directory:
        return
    record = {"step": int(step), "epoch": int(epoch), "ids": [int(i) for i in batch["image_id"].tolist()]}
    with open(Path(directory) / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
