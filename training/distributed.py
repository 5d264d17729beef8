"""torchrun/DDP set-up shared by both stages: the same code path runs 1 CPU process or N GPUs.

Launch with ``torchrun --nproc_per_node N -m loftup.cli.train stage1 ...`` (or the
``loftup-train`` script path); torchrun sets RANK / WORLD_SIZE / LOCAL_RANK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from loftup.pipeline.devices import pick_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist(device=pick_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def per_rank_batch(global_batch: int, d: Dist) -> int:
    """This rank's share of the global batch; the split must be exact so every step sees it."""
    if global_batch % d.world:
        from loftup.storage.errors import LoftupError

        raise LoftupError(f"global batch {global_batch} is not divisible by {d.world} ranks")
    return global_batch // d.world


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP around ``model`` when there is more than one rank, the model itself otherwise."""
    if not d.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.device.index] if d.device.type == "cuda" else None
    )


def cpu_threads(d: Dist, workers: int) -> None:
    """On CPU, leave one core per DataLoader worker (and per rank): oversubscribed cores make
    PyTorch's many small ops wait for a busy second thread (mask refinement ran 16x slower).
    Only ever lowers the count: a caller that already chose fewer threads (``OMP_NUM_THREADS``,
    ``torch.set_num_threads``, e.g. one thread per process of a pool) keeps its choice."""
    if d.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(min(torch.get_num_threads(), max(1, cores // d.world - workers)))


def lost_peer(exc: BaseException):
    """The one-line ClusterError for a collective that failed because another rank's process or
    node is gone (gloo/NCCL raise RuntimeErrors that say so), else None."""
    from loftup.storage.errors import ClusterError, error_line

    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return None
    text = str(exc)
    if not (isinstance(exc, getattr(dist, "DistError", ())) or "gloo" in text or "NCCL" in text):
        return None
    return ClusterError(
        f"rank {os.environ.get('RANK', '?')} lost contact with the other ranks ({error_line(exc, 200)}): a node "
        f"failed or was stopped; relaunch the same command with --auto-resume to continue from last.pt"
    )


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_mean(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / d.world


def broadcast_flag(value: bool, d: Dist) -> bool:
    """Rank 0's ``value``, on every rank."""
    if not d.enabled:
        return value
    t = torch.tensor([int(value)], device=d.device if d.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_buffers(model: torch.nn.Module) -> None:
    """BatchNorm running stats are per rank under DDP; rank 0's become everyone's."""
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def write_weights_digest(model: torch.nn.Module, run_path, d: Dist) -> str:
    """Every rank writes a digest of its final weights: equal files prove the ranks agree."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()
    Path(run_path).mkdir(parents=True, exist_ok=True)
    (Path(run_path) / f"weights_rank{d.rank}.sha256").write_text(digest + "\n")
    return digest
