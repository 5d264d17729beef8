"""A training run's directory: resolved config, JSON-lines metrics, checkpoints, exact resume.

``last.pt`` holds everything needed to continue bit-exactly on the same hardware: weights,
optimizer, EMA teacher, step, the data position and every RNG state. The deliverable weights
are written beside it as safetensors + JSON config (``<stage>.safetensors``), so a checkpoint
alone rebuilds its model.

Every file is written under a hidden temporary name and renamed into place (one helper:
``loftup.storage.commit.atomic_writer``), with the user's umask; leftovers of a killed write
are removed when the run directory is opened. ``last.pt`` is loaded with
``torch.load(weights_only=True)``: RNG states are stored as tensors and plain values, so a
checkpoint in a shared directory cannot run code as the user who resumes it.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from loftup import chaos
from loftup.storage.commit import atomic_write, atomic_writer, remove_temps
from loftup.storage.errors import LoftupError, error_line
from loftup.storage.redact import redact

_LOCAL = LocalFileSystem()
# Temp names of earlier versions (``last.tmp<pid>``, ``config.json.tmp<pid>``).
_OLD_TEMP = re.compile(r"^[\w.-]+\.tmp\d+$")


class RunDir:
    def __init__(self, path: str | Path, master: bool = True):
        self.path = Path(path)
        self.master = master
        if master:
            self.path.mkdir(parents=True, exist_ok=True)
            self.remove_temps()
        self._metrics = None
        self._tb = None

    def remove_temps(self) -> list[str]:
        """Delete what killed writes left behind; returns the names removed."""
        removed = remove_temps(_LOCAL, str(self.path))
        for p in self.path.iterdir():
            if _OLD_TEMP.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def start_fresh(self, discard: bool = False) -> None:
        """Before a run that does not resume: refuse a directory that holds a run (its
        ``last.pt`` or ``metrics.jsonl``) unless ``discard``, which removes them first."""
        held = [name for name in ("last.pt", "metrics.jsonl") if (self.path / name).exists()]
        if not held:
            return
        if not discard:
            raise LoftupError(
                f"{self.path} holds a run ({', '.join(held)}): pass --resume to continue it, "
                f"or --overwrite to start afresh there"
            )
        if self.master:
            for name in held:
                (self.path / name).unlink(missing_ok=True)

    # -- config ----------------------------------------------------------------------------
    def save_config(self, config: dict, name: str = "config.json") -> None:
        if self.master:
            blob = json.dumps(redact(config), indent=2, sort_keys=True, default=str).encode()
            atomic_write(_LOCAL, str(self.path / name), blob)

    def load_config(self, name: str = "config.json") -> dict:
        return self.read_config(self.path, name)

    @staticmethod
    def read_config(path: str | Path, name: str = "config.json") -> dict:
        """A run's saved config, read without opening (creating) the run directory."""
        file = Path(path) / name
        if not file.is_file():
            raise LoftupError(f"--resume: no run at {path} (no {name})")
        return json.loads(file.read_text())

    # -- metrics ---------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if not self.master:
            return
        if self._metrics is None:
            self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path / "tb"))
            except Exception:  # tensorboard is optional
                self._tb = None
        self._metrics.write(json.dumps(redact({"time": round(time.time(), 3), **record})) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()

    # -- trainer state ---------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.path / "last.pt"

    def save_state(self, state: dict) -> None:
        if not self.master:
            return
        state = {**state, "rng": rng_state()}
        with atomic_writer(_LOCAL, str(self.state_path)) as f:
            torch.save(state, f)
            chaos.checkpoint("save", state.get("step", -1))  # written, not yet renamed into place
        chaos.checkpoint("saved", state.get("step", -1))

    def load_state(self) -> dict:
        """``last.pt`` (weights_only); metrics logged after its step are dropped, so a resumed
        run's ``metrics.jsonl`` has each step once."""
        if not self.state_path.is_file():
            raise LoftupError(f"--resume: no checkpoint at {self.state_path}")
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, garbage, or pickled objects that are not plain data
            raise LoftupError(f"--resume: cannot load {self.state_path} ({error_line(exc, 160)})") from None
        if not isinstance(state, dict) or "step" not in state or "rng" not in state:
            raise LoftupError(f"--resume: {self.state_path} is not a loftup training state")
        if self.master:
            self.truncate_metrics(int(state["step"]))
        return state

    def truncate_metrics(self, step: int) -> int:
        """Drop metric records of steps after ``step`` (written after the checkpoint); returns how many."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return 0
        keep, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                dropped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                dropped += 1
                continue
            keep.append(line)
        if dropped:
            atomic_write(_LOCAL, str(path), "".join(ln + "\n" for ln in keep).encode())
        return dropped


def rng_state() -> dict:
    """Every RNG state as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
