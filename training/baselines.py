"""Upsamplers behind one call signature, for every comparison against LoftUp.

Each is an ``nn.Module`` called as ``up(lr_feats (B,C,h,w), image (B,3,H,W), output_size=None)``
and returning (B, C, H', W') with (H', W') = ``output_size`` or the image's size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loftup.storage.errors import LoftupError

__all__ = ["InterpolationUpsampler", "create_upsampler", "list_upsamplers", "target_size"]


def target_size(image: torch.Tensor, output_size: int | Sequence[int] | None) -> tuple[int, int]:
    """(H', W') for a call: ``output_size`` (int = square) or the image's own size."""
    if output_size is None:
        return int(image.shape[-2]), int(image.shape[-1])
    if isinstance(output_size, int):
        return output_size, output_size
    h, w = output_size
    return int(h), int(w)


class InterpolationUpsampler(nn.Module):
    """Image-agnostic interpolation of the low-res features (the image only sets the size)."""

    def __init__(self, mode: str):
        super().__init__()
        if mode not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"unknown interpolation mode {mode!r}")
        self.mode = mode

    def forward(
        self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: int | Sequence[int] | None = None
    ) -> torch.Tensor:
        size = target_size(image, output_size)
        if self.mode == "nearest":
            return F.interpolate(lr_feats, size=size, mode="nearest")
        return F.interpolate(lr_feats, size=size, mode=self.mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _loftup(**kwargs) -> nn.Module:
    from loftup.training.model import LoftUp

    if "dim" not in kwargs:
        raise ValueError("create_upsampler('loftup', dim=...) needs the feature dim")
    return LoftUp(**kwargs)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "bilinear": lambda: InterpolationUpsampler("bilinear"),
    "bicubic": lambda: InterpolationUpsampler("bicubic"),
    "nearest": lambda: InterpolationUpsampler("nearest"),
    "loftup": _loftup,
}


def list_upsamplers() -> list[str]:
    """Names accepted by ``create_upsampler``."""
    return sorted(_REGISTRY)


def create_upsampler(name: str, **kwargs) -> nn.Module:
    """Build the upsampler ``name`` (``bilinear``, ``bicubic``, ``nearest`` or ``loftup``).

    ``loftup`` takes ``LoftUp``'s keyword arguments (``dim`` required); the interpolation
    baselines take none.
    """
    if name not in _REGISTRY:
        raise LoftupError(f"unknown upsampler {name!r}; choose from {', '.join(list_upsamplers())}")
    if name != "loftup" and kwargs:
        raise ValueError(f"upsampler {name!r} takes no options, got {sorted(kwargs)}")
    return _REGISTRY[name](**kwargs)
