"""LoftUp weights on disk: our safetensors + JSON checkpoints, and the released layout.

Our checkpoint is two files side by side: ``NAME.safetensors`` (weights) and
``NAME.json`` (the constructor config), so ``load_model(path)`` needs nothing else.
The released checkpoints use the key names ``upsampler.*`` plus ``channelnorm.norm.*`` (hub
models) or ``model.1.norm.*`` (the authors' Lightning training checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from fsspec.implementations.local import LocalFileSystem

from loftup.storage.commit import atomic_write
from loftup.storage.errors import WeightsError, error_line
from loftup.training.model import LoftUp

__all__ = ["save_model", "load_model", "read_config", "from_official", "to_official_state_dict", "load_official",
           "OFFICIAL_SOURCE"]

FORMAT = "loftup-model"
FORMAT_VERSION = 1
PROJECTION_PREFIX = "projection."
_LOCAL = LocalFileSystem()
OFFICIAL_SOURCE = ("the authors' releases linked from the README of https://github.com/andrehuang/loftup "
                   "(e.g. the DINOv2-S/14 upsampler .pth)")


def _paths(path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    return path, path.with_suffix(".json")


def save_model(model: LoftUp, path, extra: Mapping | None = None, projection=None) -> Path:
    """Write ``model``'s weights to ``path`` (safetensors) and its config beside it (``.json``).

    ``extra`` (JSON-serialisable) is stored under ``"extra"`` in the config, e.g. the backbone
    the model was trained for. ``projection`` (a ``FeatureProjection`` applied to backbone
    features before the model) is saved with the weights under ``projection.*``, since
    inference must apply the same one. Returns the weights path.
    """
    from safetensors.torch import save

    weights, config_path = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "class": type(model).__name__,
            "config": dict(model.config), "extra": dict(extra or {}), "projection": None}
    if projection is not None:
        for key, value in projection.state_dict().items():
            state[f"{PROJECTION_PREFIX}{key}"] = value.detach().to("cpu").contiguous()
        meta["projection"] = {"in_dim": int(projection.mean.shape[0]), "out_dim": int(projection.out_dim)}
    # Each file is replaced whole (never half-written). A crash between the two leaves new weights
    # beside the previous config; load_model's strict load refuses them when they do not fit.
    atomic_write(_LOCAL, str(weights), save(state, metadata={"format": FORMAT}))
    atomic_write(_LOCAL, str(config_path), json.dumps(meta, indent=2).encode())
    return weights


def read_config(path) -> dict:
    """The JSON config written by ``save_model`` for the checkpoint at ``path``."""
    weights, config_path = _paths(path)
    if not config_path.exists():
        raise WeightsError(f"no config {config_path} beside {weights}: not a checkpoint written by save_model")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read checkpoint config {config_path} ({error_line(exc, 120)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightsError(f"{config_path} is not a LoftUp model config (format={meta.get('format')!r})")
    return meta


def load_model(path, device: str | torch.device = "cpu", with_meta: bool = False, **overrides):
    """Rebuild a model saved by ``save_model``, in eval mode.

    ``overrides`` replace config entries (e.g. ``image_scaling``). With ``with_meta=True``
    returns ``(model, meta)``: the JSON config plus ``meta["projection_module"]`` (the saved
    ``FeatureProjection`` or None).
    """
    from safetensors.torch import load_file

    weights, _ = _paths(path)
    if not weights.exists():
        raise WeightsError(f"checkpoint {weights} not found")
    meta = read_config(weights)
    config = dict(meta["config"])
    config.update(overrides)
    try:
        model = LoftUp(**config)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"checkpoint config {weights.with_suffix('.json')} does not build a LoftUp ({error_line(exc, 120)})") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for truncated/garbage files
        raise WeightsError(f"cannot read checkpoint {weights} ({error_line(exc, 120)})") from None
    proj_state = {k[len(PROJECTION_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(PROJECTION_PREFIX)}
    _load_strict(model, state, str(weights))
    model = model.to(device).eval()
    if not with_meta:
        return model
    projection = None
    if meta.get("projection"):
        from loftup.training.projection import FeatureProjection

        projection = FeatureProjection(meta["projection"]["in_dim"], meta["projection"]["out_dim"])
        projection.load_state_dict(proj_state)
        projection = projection.to(device).eval()
    return model, {**meta, "projection_module": projection}


def to_official_state_dict(model: LoftUp) -> dict[str, torch.Tensor]:
    """The model's weights under the released checkpoint's key names (a copy)."""
    # Our module tree is the released one, so the names coincide; copying keeps the
    # result independent of later training steps.
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _normalise_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("model.1.norm."):
            key = "channelnorm.norm." + key[len("model.1.norm."):]
        out[key] = value
    return out


def _infer_config(state: Mapping[str, torch.Tensor]) -> dict:
    def need(key):
        if key not in state:
            raise WeightsError(f"not a LoftUp state dict in the released layout: missing {key!r} "
                               f"(got {len(state)} keys, e.g. {sorted(state)[:3]})")
        return state[key]

    dim = need("upsampler.final_conv.0.weight").shape[0]
    img_biases = need("upsampler.fourier_feat.1.biases")
    lr_biases = need("upsampler.lr_pe.biases")
    blocks = len({k.split(".")[3] for k in state if k.startswith("upsampler.ca_transformer.layers.")})
    return {"dim": int(dim), "num_freqs_img": int(img_biases.shape[-1]), "num_freqs_lr": int(lr_biases.shape[-1]),
            "extra": 4 * int(lr_biases.shape[-1]), "blocks": blocks}


def _load_strict(model: LoftUp, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsError(f"weights from {source} do not match LoftUp(dim={model.dim}): " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)


def from_official(state_dict: Mapping[str, torch.Tensor], image_scaling: str = "image", heads: int = 4) -> LoftUp:
    """A ``LoftUp`` holding a released-layout state dict (dim and widths inferred), in eval mode.

    ``image_scaling="batch"`` reproduces the released module exactly (min/max over the
    batch); the default scales each image on its own. Mismatching keys raise ``WeightsError``.
    """
    state = _normalise_keys(state_dict)
    model = LoftUp(**_infer_config(state), heads=heads, image_scaling=image_scaling)
    _load_strict(model, state, "the official state dict")
    return model.eval()


def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    # Released files are either a bare state dict or a training checkpoint holding one.
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict", "weights")
                      if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, Mapping) else {}
    if not tensors:
        raise WeightsError(f"{source} holds no state dict of tensors")
    state = _normalise_keys(tensors)
    ours = {k: v for k, v in state.items() if k.startswith(("upsampler.", "channelnorm."))}
    # A full training checkpoint also carries the backbone and loss modules: keep ours.
    return ours or state


def load_official(path, image_scaling: str = "image", heads: int = 4, device: str | torch.device = "cpu") -> LoftUp:
    """Load a released LoftUp checkpoint (.pth/.pt/.ckpt via ``torch.load(weights_only=True)``,
    or .safetensors) into a ``LoftUp`` in eval mode."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"official LoftUp checkpoint {path} not found: download it from {OFFICIAL_SOURCE} "
                           f"and pass its path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"cannot read {path} as safetensors ({error_line(exc, 120)})") from None
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise WeightsError(f"cannot read {path} as a PyTorch checkpoint ({error_line(exc, 120)})") from None
    model = from_official(_unwrap(raw, str(path)), image_scaling=image_scaling, heads=heads)
    return model.to(device)
