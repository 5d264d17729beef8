"""Small stand-ins the inference and API tests share (importable: conftest.py puts tests/ on sys.path)."""

from __future__ import annotations

import torch


class PatchConv(torch.nn.Module):
    """A tiny stand-in backbone: images in [0, 1] -> (B, dim, H/patch, W/patch)."""

    def __init__(self, dim=16, patch=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch, self.dim, self.name = patch, dim, "patchconv"
        self.conv = torch.nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, images):
        return self.conv(images)
