"""DINOv3 ViTs (timm Eva): patch 16, RoPE (any grid, no position resize), 1 class + 4 register tokens.

Features: the last block's tokens after the final LayerNorm, class and register ("storage")
tokens dropped, reshaped to (C, H/16, W/16). Input: ImageNet mean/std (the LVD-1689M models).
Weights: Meta's release files (``dinov3_vits16_pretrain_lvd1689m-*.pth``, converted by timm's
filter: storage_tokens -> reg_token, ls1/ls2 -> gamma_1/gamma_2, SwiGLU w1/w2/w3, qkv bias
split) or timm's own ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from loftup.pipeline.backbones.registry import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneSpec, register_backbone
from loftup.pipeline.backbones.timm_vit import check_patch_embed, download_vit, load_vit_state, patch_map, read_vit_file
from loftup.pipeline.backbones.weights import KNOWN_WEIGHTS, resolve_weights, weights_record
from loftup.storage.errors import WeightsError

__all__ = ["DinoV3"]

_TIMM = {
    "dinov3_vits16": "vit_small_patch16_dinov3",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3",
    "dinov3_vitb16": "vit_base_patch16_dinov3",
}


class DinoV3(Backbone):
    def __init__(self, spec: BackboneSpec, vit: nn.Module, weights: dict, timm_name: str):
        extra = {
            "timm_model": f"{timm_name}.lvd1689m",
            "num_prefix_tokens": int(vit.num_prefix_tokens),
            "pos_interp": "rope",
        }
        super().__init__(spec, IMAGENET_MEAN, IMAGENET_STD, weights, extra)
        self.vit = vit

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return patch_map(self.vit, x, self.patch)


def _read_dinov3_file(path: Path, name: str) -> tuple[dict, bool]:
    """The file's tensors and whether its attention carries non-zero q/v biases."""
    state = read_vit_file(path)
    # Meta's qkv bias carries a k part that its bias_mask zeroes: only q and v count.
    biases = [b for k, v in state.items() if k.endswith("attn.qkv.bias") for b in v.chunk(3)[::2]]
    biases += [v for k, v in state.items() if k.endswith(("attn.q_bias", "attn.v_bias"))]
    check_patch_embed(state.get("patch_embed.proj.weight"), 16, path, name)
    if "storage_tokens" not in state and "reg_token" not in state:
        raise WeightsError(
            f"{path} does not fit {name}: no register tokens (storage_tokens / reg_token), not a DINOv3 ViT"
        )
    return state, any(bool(b.abs().max() > 0) for b in biases)


def _dinov3_builder(spec, weights=None, random_init=False):
    import timm
    from timm.models.eva import checkpoint_filter_fn

    timm_name = _TIMM[spec.name]
    if weights == "download":
        vit = download_vit(spec.name, f"{timm_name}.lvd1689m", num_classes=0)
        return DinoV3(spec, vit, weights_record("timm-download", None), timm_name)
    source, path = resolve_weights(spec.name, weights, random_init)
    state, qkv_bias = (None, False) if path is None else _read_dinov3_file(path, spec.name)
    # The distilled releases have all-zero q/v biases, which timm's default variant leaves out;
    # a file with real biases gets the variant that keeps them (same function otherwise).
    arch = f"{timm_name}_qkvb" if qkv_bias else timm_name
    vit = timm.create_model(arch, pretrained=False, num_classes=0)
    if state is not None:
        load_vit_state(vit, state, path, spec.name, filter_fn=checkpoint_filter_fn)
    return DinoV3(spec, vit, weights_record(source, path), arch)


for _name, _dim in (("dinov3_vits16", 384), ("dinov3_vits16plus", 384), ("dinov3_vitb16", 768)):
    _loc = KNOWN_WEIGHTS[_name]
    register_backbone(
        _name,
        patch=16,
        dim=_dim,
        normalisation="RGB in [0,1], (x - ImageNet mean) / ImageNet std (DINOv3 LVD-1689M)",
        tokens="last block output after the final LayerNorm; patch tokens only (cls + 4 registers dropped), "
        "reshaped to (C, H/16, W/16); RoPE, so any grid without position resizing",
        weights_hint=f"{_loc.file} ({_loc.publisher}) at {_loc.where()}, "
        f"or timm/{_TIMM[_name]}.lvd1689m in the HF cache",
    )(_dinov3_builder)
