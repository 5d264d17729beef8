"""Building the timm ViTs behind the backbones: one place for how a fetch, a weight file that
does not fit, and timm's wasted init are handled, so every backbone reports them alike."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from loftup.pipeline.backbones.registry import timm_tokens_to_map
from loftup.storage.errors import WeightsError, error_line


def download_vit(name: str, arch: str, **kwargs) -> nn.Module:
    """timm's pretrained ``arch`` (a tagged model name) for backbone ``name``.

    A WeightsError when it cannot be fetched (offline, no such tag)."""
    import timm

    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as exc:
        raise WeightsError(f"cannot fetch weights for {name} through timm: {error_line(exc)}") from None


def create_vit(arch: str, path: Path | None, **kwargs) -> nn.Module:
    """An untrained ``arch`` for the weights of ``path`` (or random weights when it is None).

    With a file, timm's init (trunc_normal_ over every weight) is wasted work, so it is skipped;
    never without one: "skip" leaves pos_embed and cls_token as uninitialised memory, and random
    init must stay what existing stores hold.
    """
    import timm

    return timm.create_model(arch, pretrained=False, **kwargs, **({} if path is None else {"weight_init": "skip"}))


def check_patch_embed(weight, patch: int, path: Path, name: str) -> None:
    """Refuse a file whose patch embedding has another kernel: timm would silently resample it,
    and that is a different model."""
    if weight is not None and tuple(weight.shape[-2:]) != (patch, patch):
        raise WeightsError(f"{path} does not fit {name}: patch embedding {tuple(weight.shape)} is not {patch}x{patch}")


def convert_state(filter_fn, state: dict, vit: nn.Module, path: Path, name: str) -> dict:
    """``state`` in timm's layout through ``filter_fn`` (a timm ``checkpoint_filter_fn``); its
    failure becomes one WeightsError line."""
    try:
        return filter_fn(state, vit)
    except Exception as exc:
        raise WeightsError(f"{path} does not fit {name}: {error_line(exc)}") from None


def patch_map(vit: nn.Module, x: torch.Tensor, patch: int) -> torch.Tensor:
    """The ViT's final (normalised) tokens of ``x`` as a (B, C, H/patch, W/patch) patch map."""
    h, w = x.shape[-2:]
    return timm_tokens_to_map(vit.forward_features(x), vit.num_prefix_tokens, h // patch, w // patch)
