"""CLIP ViT-B/16 patch features the MaskCLIP way, as LoftUp's released ``loftup_clip`` saw them.

MaskCLIP (Zhou et al. 2022) takes dense features from the last block's value path: the
penultimate tokens go through ``ln_1``, the value part of the attention's input projection and
the output projection only (no attention mixing, no residual, no MLP); the class token is
dropped, then ``ln_post`` and the image projection ``proj`` map each patch to the 512-d joint
embedding space. The position grid (14 x 14) is resized like DINOv2's (bicubic, no antialias,
``(n + 0.1) / 14``), as the authors' featurizer does. Built on timm's
``vit_base_patch16_clip_quickgelu_224`` (OpenAI CLIP uses QuickGELU).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from loftup.pipeline.backbones.dinov2 import bind_pos_interp
from loftup.pipeline.backbones.registry import IMAGENET_MEAN, IMAGENET_STD, Backbone, BackboneSpec, register_backbone
from loftup.pipeline.backbones.timm_vit import build_vit, check_patch_embed, load_vit_state, read_vit_file
from loftup.pipeline.backbones.weights import KNOWN_WEIGHTS
from loftup.storage.errors import LoftupError, WeightsError

__all__ = ["MaskClip"]

_TIMM = "vit_base_patch16_clip_quickgelu_224"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The authors feed every backbone but SigLIP ImageNet-normalised images (their ``norm``), and
# ``loftup_clip`` was trained on those features; ``input_norm="clip"`` uses CLIP's own statistics.
_INPUT_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}


class MaskClip(Backbone):
    """OpenAI CLIP ViT-B/16 image tower -> MaskCLIP patch embeddings (B, 512, H/16, W/16)."""

    def __init__(
        self,
        spec: BackboneSpec,
        vit: nn.Module,
        weights: dict,
        pos_interp: str = "official",
        input_norm: str = "imagenet",
    ):
        if input_norm not in _INPUT_NORMS:
            raise LoftupError(f"input_norm must be one of {', '.join(_INPUT_NORMS)}, got {input_norm!r}")
        bind_pos_interp(vit, pos_interp)
        mean, std = _INPUT_NORMS[input_norm]
        extra = {"timm_model": _TIMM, "native_size": 224, "pos_interp": pos_interp, "input_norm": input_norm}
        super().__init__(spec, mean, std, weights, extra)
        self.vit = vit

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        b, _, h, w = x.shape
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block in vit.blocks[:-1]:
            t = block(t)
        last = vit.blocks[-1]
        d = t.shape[-1]
        v = F.linear(last.norm1(t), last.attn.qkv.weight[2 * d :], last.attn.qkv.bias[2 * d :])
        v = last.attn.proj(v)[:, vit.num_prefix_tokens :]
        out = vit.head(vit.norm(v))  # head = CLIP's proj (no bias)
        return out.reshape(b, h // self.patch, w // self.patch, -1).permute(0, 3, 1, 2)


def _load_clip_file(vit: nn.Module, path: Path, name: str) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state, filter_fn = read_vit_file(path), None
    if any(k.startswith("visual.") for k in state):
        # OpenAI layout (the TorchScript release or open_clip's .bin): the image tower only.
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
        if "visual.class_embedding" not in state:
            raise WeightsError(f"{path} does not fit {name}: no visual.class_embedding (not a CLIP ViT)")
        check_patch_embed(state.get("visual.conv1.weight"), 16, path, name)
        filter_fn = checkpoint_filter_fn
    load_vit_state(vit, state, path, name, filter_fn=filter_fn)


@register_backbone(
    "clip_vitb16",
    patch=16,
    dim=512,
    normalisation="RGB in [0,1], (x - ImageNet mean) / ImageNet std as the authors' CLIP featurizer "
    "(input_norm='clip': OpenAI CLIP mean/std)",
    tokens="MaskCLIP: last block's value path (ln_1, v-projection, out-projection; no attention, no residual), "
    "cls dropped, ln_post, @ proj -> 512-d; position grid resized as the official DINOv2",
    weights_hint=f"{KNOWN_WEIGHTS['clip_vitb16'].file} ({KNOWN_WEIGHTS['clip_vitb16'].publisher}) at "
    f"{KNOWN_WEIGHTS['clip_vitb16'].where()}, or timm/vit_base_patch16_clip_224.openai in the HF cache",
)
def _clip_builder(spec, weights=None, random_init=False, pos_interp="official", input_norm="imagenet"):
    def load(vit, path):
        _load_clip_file(vit, path, spec.name)

    vit, record = build_vit(
        spec.name, _TIMM, "openai", weights, random_init, load, num_classes=512, dynamic_img_size=True
    )
    return MaskClip(spec, vit, record, pos_interp, input_norm)
