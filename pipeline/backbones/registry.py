"""The registry (``create_backbone``, ``backbone_info``) and the ``Backbone`` base module."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from loftup.storage.errors import LoftupError

__all__ = [
    "Backbone",
    "BackboneSpec",
    "DEFAULT_BACKBONE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "backbone_info",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]

DEFAULT_BACKBONE = "dinov2_vits14"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """Decorator registering ``builder(spec, weights, random_init, **options) -> Backbone`` under ``name``."""

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

    ``weights``: a file in the publisher's or timm's layout, ``None`` (local caches only; a
    clear ``WeightsError`` saying where to put the file when there is nothing) or
    ``"download"`` (let timm fetch the published weights). ``random_init=True`` skips weights
    entirely (seeded: the same random model every time). ``device="auto"`` takes the GPU
    assigned to this process if any. ``dtype`` casts the parameters; inputs are normalised in
    float32 and outputs are float32. ``options`` go to the builder (``backbone_info(name)``
    names them), e.g. ``pos_interp`` for DINOv2 and CLIP, ``output_norm`` for hed_vgg16.
    """
    spec = _spec(name)
    if random_init and weights is not None:
        raise LoftupError(f"{name}: pass either --weights or --random-init, not both")
    accepted = set(inspect.signature(spec.builder).parameters) - {"spec", "weights", "random_init"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise LoftupError(
            f"{name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(accepted)) or 'none'}"
        )
    # Random weights come from a fixed seed: every worker, rerun and test gets the same model,
    # so stored features stay reproducible, without touching the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.builder(
            spec, weights=None if weights is None else str(weights), random_init=random_init, **options
        )
    from loftup.pipeline.devices import pick_device

    model.eval().requires_grad_(False)
    model.to(pick_device(device))
    if dtype is not None:
        model.to(dtype)
    return model


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


def timm_tokens_to_map(tokens: torch.Tensor, num_prefix: int, h: int, w: int) -> torch.Tensor:
    """(B, prefix + h*w, C) ViT tokens -> (B, C, h, w) patch map (prefix tokens dropped)."""
    b = tokens.shape[0]
    return tokens[:, num_prefix:].reshape(b, h, w, -1).permute(0, 3, 1, 2)
