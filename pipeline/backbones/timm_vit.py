"""Building the timm ViTs behind the backbones: one place for how a fetch, a weight file that
does not fit, and timm's wasted init are handled, so every backbone reports them alike."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from loftup.pipeline.backbones.registry import timm_tokens_to_map
from loftup.pipeline.backbones.weights import (
    load_state_dict_strict,
    read_state_dict,
    resolve_weights,
    unwrap_state_dict,
    weights_record,
)
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


def read_vit_file(path: Path) -> dict:
    """The tensors of a weight file, unwrapped from the containers releases put them in."""
    return unwrap_state_dict(read_state_dict(path))


def load_vit_state(vit: nn.Module, state: dict, path: Path, name: str, patch: int | None = None, filter_fn=None):
    """Load a file's ``state`` into ``vit``: its patch embedding checked against ``patch`` (when
    given), converted to timm's layout by ``filter_fn`` (when given), every key required."""
    if patch is not None:
        check_patch_embed(state.get("patch_embed.proj.weight"), patch, path, name)
    if filter_fn is not None:
        state = convert_state(filter_fn, state, vit, path, name)
    load_state_dict_strict(vit, state, path, name)


def build_vit(name: str, arch: str, tag: str, weights, random_init: bool, load_file, **kwargs):
    """The timm ViT ``arch`` of backbone ``name`` and the record of its weights: timm's pretrained
    ``arch.tag`` (or ``arch``) for ``weights="download"``, else the file ``resolve_weights`` finds, loaded by
    ``load_file(vit, path)`` (or random weights with ``random_init``)."""
    if weights == "download":
        return download_vit(name, f"{arch}.{tag}" if tag else arch, **kwargs), weights_record("timm-download", None)
    source, path = resolve_weights(name, weights, random_init)
    vit = create_vit(arch, path, **kwargs)
    if path is not None:
        load_file(vit, path)
    return vit, weights_record(source, path)


def patch_map(vit: nn.Module, x: torch.Tensor, patch: int) -> torch.Tensor:
    """The ViT's final (normalised) tokens of ``x`` as a (B, C, H/patch, W/patch) patch map."""
    h, w = x.shape[-2:]
    return timm_tokens_to_map(vit.forward_features(x), vit.num_prefix_tokens, h // patch, w // patch)
