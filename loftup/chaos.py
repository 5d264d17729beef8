"""Fault-injection points for the cluster tests. Every hook is a no-op unless its environment
variable is set (``init_ray`` passes ``LOFTUP_*`` variables on to Ray workers, torchrun passes
the environment to its workers), so production runs pay one dictionary lookup.

- ``LOFTUP_CHAOS_KILL=N:FLAGFILE``: a pipeline worker SIGKILLs itself after N good images, once
  (the flag file records that it happened), to prove that a killed worker loses nothing.
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
_seen: dict[str, int] = {}  # images counted per hook, in this process


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


def _reached(var: str, n: int) -> str | None:
    """Count ``n`` more images for the hook in ``var`` (``N:PATH``): its PATH once N are reached."""
    spec = os.environ.get(var)
    if not spec:
        return None
    _seen[var] = _seen.get(var, 0) + n
    after, path = spec.split(":", 1)
    return path if _seen[var] >= int(after) else None


def images_read(ok: int, failed: int = 0) -> None:
    """Called by a pipeline worker as images are read (``LOFTUP_CHAOS_HOLD`` counts every image,
    ``LOFTUP_CHAOS_KILL`` the good ones)."""
    directory = _reached("LOFTUP_CHAOS_HOLD", ok + failed)
    if directory:
        _hold(directory, _ray_node())
    flag = _reached("LOFTUP_CHAOS_KILL", ok)
    if flag and not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


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
