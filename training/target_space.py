"""The feature space LoftUp is trained, evaluated and pictured in.

LoftUp's released output ends with a channel LayerNorm, so its targets (pseudo-GT), the baselines it is
compared with and the pictures of its output live in per-pixel layer-normalised features
(``layer_norm``). The convex head (training/heads.py) outputs combinations of the backbone's own
vectors, so everything about it lives in the raw space (``raw``, after the run's PCA if any).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TARGET_SPACES", "LossSpace", "feature_rms", "layer_norm_target", "to_target_space"]


def layer_norm_target(lr_feats: torch.Tensor) -> torch.Tensor:
    """Per-pixel LayerNorm over channels of (B, C, h, w) features, without affine parameters.
    A fixed (non-learnable) norm keeps the target from collapsing with the student's own input norm."""
    return F.layer_norm(lr_feats.permute(0, 2, 3, 1), lr_feats.shape[1:2]).permute(0, 3, 1, 2)


TARGET_SPACES = ("layer_norm", "raw")
DEFAULT_SPACE = "layer_norm"  # LoftUp's released head, and the space the pseudo-GT job materialises


def to_target_space(feats: torch.Tensor, space: str) -> torch.Tensor:
    """``feats`` mapped into ``space``: ``layer_norm`` (LoftUp's) or ``raw`` (the backbone's own)."""
    if space == "layer_norm":
        return layer_norm_target(feats)
    if space == "raw":
        return feats
    raise ValueError(f"unknown target space {space!r}; choose from {', '.join(TARGET_SPACES)}")


def feature_rms(feats: torch.Tensor) -> float:
    """Root mean square of (N, C, h, w) features over every pixel and channel."""
    return float(feats.double().square().mean().sqrt())


class LossSpace:
    """The space a run's targets and losses live in: ``space`` (``to_target_space``), divided by
    ``scale`` (one constant for the whole run).

    A head's output space is fixed by the head (LoftUp's released head ends in a LayerNorm; the
    convex head outputs the backbone's raw vectors), but the loss weights (TV, reconstruction,
    the uncertainty's clamp at 0) were set for one feature scale. In the raw space ``scale`` is
    the RMS of the training features, so every term sees values of the layer-normalised space's
    size (RMS 1); a constant scale commutes with every linear map and every convex combination,
    so targets stay what they are up to that constant. ``scale=1``: the raw scale itself.
    """

    def __init__(self, space: str = DEFAULT_SPACE, scale: float = 1.0):
        if space not in TARGET_SPACES:
            raise ValueError(f"unknown target space {space!r}; choose from {', '.join(TARGET_SPACES)}")
        if not scale > 0:
            raise ValueError(f"the feature scale must be positive, got {scale}")
        self.space, self.scale = space, float(scale)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """Low-res (or any) backbone features, in this space, scaled."""
        return self.output(to_target_space(feats, self.space))

    def output(self, pred: torch.Tensor) -> torch.Tensor:
        """A model's output (already in ``space``), scaled like the targets."""
        return pred if self.scale == 1.0 else pred / self.scale

    def describe(self) -> dict:
        return {"target_space": self.space, "feature_scale": self.scale}

    def __repr__(self) -> str:
        return f"LossSpace({self.space!r}, scale={self.scale:.4g})"
