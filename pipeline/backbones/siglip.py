"""SigLIP and SigLIP 2 ViT-B/16 (timm trunks): the trunk's 768-d patch tokens.

As the authors' featurizer: open_clip's ``visual.trunk.forward_features`` (all tokens after the
final LayerNorm; SigLIP has no class token), reshaped to the patch grid, with the SigLIP input
normalisation (mean = std = 0.5). The attention-pooling head is not part of the features and is
not built. The position grid is native at 224 px; other sizes use timm's dynamic resize.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from loftup.pipeline.backbones.registry import Backbone, BackboneSpec, register_backbone
from loftup.pipeline.backbones.timm_vit import build_vit, load_vit_state, patch_map, read_vit_file
from loftup.pipeline.backbones.weights import KNOWN_WEIGHTS

__all__ = ["SigLip"]

_TIMM = "vit_base_patch16_siglip_224"
_TAGS = {"siglip_vitb16": "webli", "siglip2_vitb16": "v2_webli"}


class SigLip(Backbone):
    def __init__(self, spec: BackboneSpec, vit: nn.Module, weights: dict):
        extra = {"timm_model": f"{_TIMM}.{_TAGS[spec.name]}", "native_size": 224, "pos_interp": "timm"}
        super().__init__(spec, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), weights, extra)
        self.vit = vit

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return patch_map(self.vit, x, self.patch)


def _load_siglip_file(vit: nn.Module, path: Path, name: str) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_vit_file(path)
    if any(k.startswith("visual.trunk.") for k in state):  # open_clip: keep the image trunk
        state = {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    # The attention-pooling head (and any classifier) is not used for patch features.
    state = {k: v for k, v in state.items() if not k.startswith(("attn_pool.", "head.", "fc_norm."))}
    load_vit_state(vit, state, path, name, 16, checkpoint_filter_fn)


def _siglip_builder(spec, weights=None, random_init=False):
    def load(vit, path):
        _load_siglip_file(vit, path, spec.name)

    kwargs = dict(num_classes=0, global_pool="", dynamic_img_size=True)
    vit, record = build_vit(spec.name, _TIMM, _TAGS[spec.name], weights, random_init, load, **kwargs)
    return SigLip(spec, vit, record)


for _name, _repo in (("siglip_vitb16", "ViT-B-16-SigLIP"), ("siglip2_vitb16", "ViT-B-16-SigLIP2")):
    _loc = KNOWN_WEIGHTS[_name]
    register_backbone(
        _name,
        patch=16,
        dim=768,
        normalisation="RGB in [0,1], (x - 0.5) / 0.5 (SigLIP)",
        tokens="trunk forward_features: all tokens after the final LayerNorm (no class token), "
        "reshaped to (C, H/16, W/16); attention-pool head unused",
        weights_hint=f"{_loc.file} of open_clip hf-hub:timm/{_repo} in the HF cache, or timm/{_TIMM}.{_TAGS[_name]}",
    )(_siglip_builder)
