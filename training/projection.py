"""Optional PCA of the backbone's channels, fitted on stored features.

The full recipe upsamples all C channels. On a CPU a 384-d LoftUp forward at 224 costs ~2.7 s,
so short runs (tests, the README demo) upsample a K-channel PCA of the features instead. The
projection is part of the trained model: inference applies the same one.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureProjection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("components", torch.eye(out_dim, in_dim))

    @property
    def out_dim(self) -> int:
        return self.components.shape[0]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.float() - self.mean.view(1, -1, 1, 1)
        return torch.einsum("bchw,kc->bkhw", x, self.components)

    @classmethod
    def fit(cls, feats: torch.Tensor, out_dim: int, max_pixels: int = 32768) -> "FeatureProjection":
        """PCA over all pixels of ``feats`` (N,C,h,w); deterministic (eigh of the C x C
        covariance in float64, signs fixed so two fits on the same data agree)."""
        c = feats.shape[1]
        x = feats.float().permute(0, 2, 3, 1).reshape(-1, c)
        if x.shape[0] > max_pixels:
            # A fixed-seed pixel subset: the leading components are stable, the fit stays cheap.
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_pixels]]
        mean = x.double().mean(0)
        xc = x - mean.float()
        _, vecs = torch.linalg.eigh((xc.T @ xc).double())
        comps = vecs.flip(1).T[:out_dim]
        signs = torch.sign(comps[torch.arange(comps.shape[0]), comps.abs().argmax(1)])
        comps = comps * signs[:, None]
        proj = cls(c, out_dim)
        proj.mean.copy_(mean.float())
        proj.components.copy_(comps.float())
        return proj
