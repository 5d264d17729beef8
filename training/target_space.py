"""The feature space LoftUp is trained, evaluated and pictured in.

LoftUp's output ends with a channel LayerNorm, so its targets (pseudo-GT), the baselines it is
compared with and the pictures of its output all live in per-pixel layer-normalised features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TARGET_SPACES", "layer_norm_target", "to_target_space"]


def layer_norm_target(lr_feats: torch.Tensor) -> torch.Tensor:
    """Per-pixel LayerNorm over channels of (B, C, h, w) features, without affine parameters.
    A fixed (non-learnable) norm keeps the target from collapsing with the student's own input norm."""
    return F.layer_norm(lr_feats.permute(0, 2, 3, 1), lr_feats.shape[1:2]).permute(0, 3, 1, 2)


TARGET_SPACES = ("layer_norm", "raw")


def to_target_space(feats: torch.Tensor, space: str) -> torch.Tensor:
    """``feats`` mapped into ``space``: ``layer_norm`` (LoftUp's) or ``raw`` (the backbone's own)."""
    if space == "layer_norm":
        return layer_norm_target(feats)
    if space == "raw":
        return feats
    raise ValueError(f"unknown target space {space!r}; choose from {', '.join(TARGET_SPACES)}")
