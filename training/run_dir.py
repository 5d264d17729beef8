"""A training run's directory: resolved config, JSON-lines metrics, checkpoints, exact resume.

``last.pt`` holds everything needed to continue bit-exactly on the same hardware: weights,
optimizer, EMA teacher, step, the data position and every RNG state. The deliverable weights
are written beside it as safetensors + JSON config (``<stage>.safetensors``), so a checkpoint
alone rebuilds its model.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from loftup.storage.errors import LoftupError


class RunDir:
    def __init__(self, path: str | Path, master: bool = True):
        self.path = Path(path)
        self.master = master
        if master:
            self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = None
        self._tb = None

    # -- config ----------------------------------------------------------------------------
    def save_config(self, config: dict, name: str = "config.json") -> None:
        if self.master:
            _atomic_write(self.path / name, json.dumps(config, indent=2, sort_keys=True, default=str).encode())

    def load_config(self, name: str = "config.json") -> dict:
        path = self.path / name
        if not path.is_file():
            raise LoftupError(f"--resume: no run at {self.path} (no {name})")
        return json.loads(path.read_text())

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
        self._metrics.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
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
        tmp = self.state_path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)

    def load_state(self) -> dict:
        if not self.state_path.is_file():
            raise LoftupError(f"--resume: no checkpoint at {self.state_path}")
        return torch.load(self.state_path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
