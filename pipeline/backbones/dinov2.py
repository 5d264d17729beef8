"""DINOv2 ViTs (timm): last-layer normalised patch tokens, the official position-grid resize."""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from loftup.pipeline.backbones.registry import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneSpec, register_backbone
from loftup.pipeline.backbones.timm_vit import build_vit, load_vit_state, patch_map, read_vit_file
from loftup.pipeline.backbones.weights import KNOWN_WEIGHTS
from loftup.storage.errors import LoftupError, WeightsError

__all__ = ["DinoV2", "official_pos_embed"]

_TIMM = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
}
_NATIVE_SIZE = 518  # 37 x 37 position grid of the released DINOv2 weights
_POS_OFFSET = 0.1  # the official resize uses scale factors (n + 0.1) / n0


def official_pos_embed(vit, x: torch.Tensor) -> torch.Tensor:
    """Add position embeddings to NHWC patch tokens the way DINOv2 (and MaskCLIP) resize them:
    bicubic, no antialiasing, scale factors ``(n + 0.1) / n0``, untouched on the native grid.

    Bound onto a timm ViT in place of its own ``_pos_embed``; timm's resize antialiases, which
    blurs the embedding the released LoftUp upsamplers never saw.
    """
    b, gh, gw, c = x.shape
    pos = vit.pos_embed
    n_prefix_pos = 0 if vit.no_embed_class else vit.num_prefix_tokens
    prefix_pos, grid_pos = pos[:, :n_prefix_pos], pos[:, n_prefix_pos:]
    m0, m1 = vit.patch_embed.grid_size
    if (gh, gw) != (m0, m1):
        g = grid_pos.float().reshape(1, m0, m1, c).permute(0, 3, 1, 2)
        scale = ((gh + _POS_OFFSET) / m0, (gw + _POS_OFFSET) / m1)
        g = F.interpolate(g, scale_factor=scale, mode="bicubic", antialias=False)
        if g.shape[-2:] != (gh, gw):
            raise RuntimeError(f"position grid resize gave {tuple(g.shape[-2:])}, wanted {(gh, gw)}")
        grid_pos = g.permute(0, 2, 3, 1).reshape(1, gh * gw, c).to(pos.dtype)
    x = x.reshape(b, gh * gw, c)
    prefix = []
    if vit.cls_token is not None:
        prefix.append(vit.cls_token.expand(b, -1, -1))
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(b, -1, -1))
    if vit.no_embed_class:
        x = torch.cat(prefix + [x + grid_pos], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + torch.cat([prefix_pos, grid_pos], dim=1)
    return vit.pos_drop(x)


def bind_pos_interp(vit, pos_interp: str) -> None:
    if pos_interp not in ("official", "dinov2", "timm"):
        raise LoftupError(f"pos_interp must be 'official' or 'timm', got {pos_interp!r}")
    if pos_interp != "timm":
        vit._pos_embed = types.MethodType(official_pos_embed, vit)


class DinoV2(Backbone):
    """timm DINOv2 ViT returning last-layer normalised patch tokens as a feature map.

    The position embedding of the native 37 x 37 grid (518 px) is resized to the input grid the
    way the official DINOv2 code does it (``pos_interp="dinov2"``), because LoftUp's released
    checkpoints were trained on features of the torch-hub DINOv2 models. ``pos_interp="timm"``
    keeps timm's dynamic resize (bicubic with antialiasing); both agree at 518 px.
    """

    def __init__(self, spec: BackboneSpec, vit: nn.Module, weights: dict, pos_interp: str = "dinov2"):
        bind_pos_interp(vit, pos_interp)
        extra = {
            "timm_model": vit.default_cfg.get("architecture", ""),
            "native_size": _NATIVE_SIZE,
            "num_prefix_tokens": int(vit.num_prefix_tokens),
            "pos_interp": pos_interp,
        }
        super().__init__(spec, IMAGENET_MEAN, IMAGENET_STD, weights, extra)
        self.vit = vit
        self.pos_interp = pos_interp

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return patch_map(self.vit, x, self.patch)


def _load_dinov2_file(vit: nn.Module, path: Path, spec: BackboneSpec) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_vit_file(path)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "dino_head.", "ibot_head."))}
    file_regs = "register_tokens" in state or "reg_token" in state
    if file_regs != (vit.reg_token is not None):
        other = f"{spec.name}_reg" if file_regs else spec.name.removesuffix("_reg")
        has = "has register tokens" if file_regs else "has no register tokens"
        raise WeightsError(f"{path} does not fit {spec.name}: the file {has}; use {other}")
    # The filter converts the facebookresearch layout (mask_token, register_tokens, cls position) to timm's.
    load_vit_state(vit, state, path, spec.name, spec.patch, checkpoint_filter_fn)


def _dinov2_builder(spec, weights=None, random_init=False, pos_interp="dinov2"):
    def load(vit, path):
        _load_dinov2_file(vit, path, spec)

    kwargs = dict(dynamic_img_size=True, img_size=_NATIVE_SIZE, num_classes=0)
    vit, record = build_vit(spec.name, _TIMM[spec.name], None, weights, random_init, load, **kwargs)
    return DinoV2(spec, vit, record, pos_interp)


_NORM = "RGB in [0,1], (x - ImageNet mean) / ImageNet std"
_TOKENS = (
    "last block output after the final LayerNorm; patch tokens only (cls{reg} dropped), "
    "reshaped to (C, H/14, W/14); position grid resized as the official DINOv2"
)

for _name, _dim in (
    ("dinov2_vits14", 384),
    ("dinov2_vitb14", 768),
    ("dinov2_vits14_reg", 384),
    ("dinov2_vitb14_reg", 768),
):
    _loc = KNOWN_WEIGHTS[_name]
    register_backbone(
        _name,
        patch=14,
        dim=_dim,
        normalisation=_NORM,
        tokens=_TOKENS.format(reg=" + 4 registers" if _name.endswith("_reg") else ""),
        weights_hint=f"{_loc.file} ({_loc.publisher}) at {_loc.where()}, or timm/{_TIMM[_name]}.lvd142m in the HF cache",
    )(_dinov2_builder)
