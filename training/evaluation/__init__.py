"""Evaluation: the paper's probes (linear-probe segmentation, DAVIS label propagation) on the
official dataset layouts and the store's prototype proxy, every upsampler under one pinned
protocol. ``evaluate`` is the one entry point."""

from loftup.training.evaluation.api import TASKS, evaluate
from loftup.training.evaluation.davis import DavisProtocol
from loftup.training.evaluation.masks import MasksProtocol
from loftup.training.evaluation.probe import SegProtocol
from loftup.training.evaluation.upsamplers import (
    BASELINES,
    EvalUpsampler,
    baseline,
    build_upsamplers,
    resolve_checkpoint,
    with_projection,
)

__all__ = [
    "BASELINES",
    "TASKS",
    "DavisProtocol",
    "EvalUpsampler",
    "MasksProtocol",
    "SegProtocol",
    "baseline",
    "build_upsamplers",
    "evaluate",
    "resolve_checkpoint",
    "with_projection",
]
