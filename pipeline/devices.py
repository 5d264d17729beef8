"""Device selection and mixed precision, shared by the pipeline and the trainer.

The same code runs on the CPU here and on GPUs in production: ``pick_device("auto")`` takes
the GPU Ray (or torchrun) assigned to this process when there is one.
"""

from __future__ import annotations

import contextlib
import os

import torch


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            from loftup.storage.errors import LoftupError

            raise LoftupError(f"device {device!r} requested but CUDA is not available on this machine")
        return torch.device(device)
    if torch.cuda.is_available():
        # Ray sets CUDA_VISIBLE_DEVICES per task and torchrun sets LOCAL_RANK per process.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on the CPU, where bf16 matmuls are slower than fp32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
