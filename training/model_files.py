"""LoftUp weights on disk: our safetensors + JSON checkpoints, and the released layout.

Every function that builds a model takes its class first (``model_cls``), so this module
imports no model: ``LoftUp.from_pretrained`` and its kin (training/model.py) call it with
their own class, and training/checkpoint.py binds the functions to ``LoftUp``.

Our checkpoint is two files side by side: ``NAME.safetensors`` (weights) and
``NAME.json`` (the constructor config), so ``load_model(path)`` needs nothing else.
The released checkpoints use the key names ``upsampler.*`` plus ``channelnorm.norm.*`` (hub
models) or ``model.1.norm.*`` (the authors' Lightning training checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from fsspec.implementations.local import LocalFileSystem

from loftup.pipeline.backbones.weights import load_state_dict_strict, read_state_dict, unwrap_state_dict
from loftup.storage.commit import atomic_write
from loftup.storage.errors import LoftupError, WeightsError, error_line
from loftup.training.releases import RELEASES, find_release, release_file

if TYPE_CHECKING:
    from loftup.training.model import LoftUp

FORMAT = "loftup-model"
FORMAT_VERSION = 1
PROJECTION_PREFIX = "projection."
_LOCAL = LocalFileSystem()
OFFICIAL_SOURCE = (
    "the authors' releases (https://github.com/andrehuang/loftup: haiwen/loftup-* on the HF hub, "
    "e.g. haiwen/loftup-dinov2s/pytorch_model.bin; `loftup-train upsample --official NAME` finds "
    "them in the HF cache)"
)


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
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class": type(model).__name__,
        "config": dict(model.config),
        "extra": dict(extra or {}),
        "projection": None,
    }
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
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise WeightsError(f"{config_path} is not a LoftUp model config (format={found!r})")
    if not isinstance(meta.get("config"), dict):
        raise WeightsError(f"{config_path} has no model config (its 'config' is not an object)")
    return meta


def load_model(model_cls, path, device: str | torch.device = "cpu", with_meta: bool = False, **overrides):
    """Rebuild a model saved by ``save_model``, in eval mode.

    ``overrides`` replace config entries (e.g. ``image_scaling``). With ``with_meta=True``
    returns ``(model, meta)``: the JSON config plus ``meta["projection_module"]`` (the saved
    ``FeatureProjection`` or None).
    """
    weights, _ = _paths(path)
    if not weights.exists():
        raise WeightsError(f"checkpoint {weights} not found")
    meta = read_config(weights)
    config = dict(meta["config"])
    config.update(overrides)
    try:
        model = model_cls(**config)
    except (TypeError, ValueError) as exc:
        raise WeightsError(
            f"checkpoint config {weights.with_suffix('.json')} does not build a LoftUp ({error_line(exc, 120)})"
        ) from None
    state = read_state_dict(weights)
    proj_state = {k[len(PROJECTION_PREFIX) :]: state.pop(k) for k in list(state) if k.startswith(PROJECTION_PREFIX)}
    _load_strict(model, state, str(weights))
    model = model.to(device).eval()
    projection = _load_projection(meta.get("projection"), proj_state, weights)
    if not with_meta:
        return model
    return model, {**meta, "projection_module": None if projection is None else projection.to(device).eval()}


def _load_projection(spec, state: dict, weights: Path):
    """The saved FeatureProjection (None without one), loaded as strictly as the model."""
    from loftup.training.projection import FeatureProjection

    if not spec:
        if state:
            raise WeightsError(f"{weights} holds projection.* tensors but its config records no projection")
        return None
    try:
        projection = FeatureProjection(int(spec["in_dim"]), int(spec["out_dim"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"checkpoint config {weights.with_suffix('.json')} has a malformed projection ({error_line(exc, 120)})"
        ) from None
    load_state_dict_strict(
        projection, state, str(weights), f"its FeatureProjection({spec['in_dim']}, {spec['out_dim']})"
    )
    return projection


def to_official_state_dict(model: LoftUp) -> dict[str, torch.Tensor]:
    """The model's weights under the released checkpoint's key names (a copy)."""
    from loftup.training.heads import head_of

    if head_of(model) != "loftup":
        raise WeightsError(f"a LoftUp with the {head_of(model)!r} head has no released layout (only 'loftup' has)")
    # Our module tree is the released one, so the names coincide; copying keeps the
    # result independent of later training steps.
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _normalise_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith("model.1.norm."):
            key = "channelnorm.norm." + key[len("model.1.norm.") :]
        out[key] = value
    return out


def _infer_config(state: Mapping[str, torch.Tensor]) -> dict:
    def need(key):
        if key not in state:
            raise WeightsError(
                f"not a LoftUp state dict in the released layout: missing {key!r} "
                f"(got {len(state)} keys, e.g. {sorted(state)[:3]})"
            )
        return state[key]

    def shaped(key):
        tensor = need(key)
        if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0 or 0 in tensor.shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise WeightsError(f"not a LoftUp state dict in the released layout: {key} has shape {shape}")
        return tensor

    dim = shaped("upsampler.final_conv.0.weight").shape[0]
    img_biases = shaped("upsampler.fourier_feat.1.biases")
    lr_biases = shaped("upsampler.lr_pe.biases")
    blocks = len({k.split(".")[3] for k in state if k.startswith("upsampler.ca_transformer.layers.")})
    return {
        "dim": int(dim),
        "num_freqs_img": int(img_biases.shape[-1]),
        "num_freqs_lr": int(lr_biases.shape[-1]),
        "extra": 4 * int(lr_biases.shape[-1]),
        "blocks": blocks,
    }


def _load_strict(model: LoftUp, state: Mapping[str, torch.Tensor], source: str, assign: bool = False) -> None:
    load_state_dict_strict(model, state, source, f"LoftUp(dim={model.dim})", assign=assign)


def from_official(
    model_cls, state_dict: Mapping[str, torch.Tensor], image_scaling: str = "image", heads: int = 4
) -> LoftUp:
    """A ``LoftUp`` holding a released-layout state dict (dim and widths inferred), in eval mode.

    ``image_scaling="batch"`` reproduces the released module exactly (min/max over the
    batch); the default scales each image on its own. Mismatching keys raise ``WeightsError``.
    """
    state = _normalise_keys(state_dict)
    # Built on the meta device: every tensor comes from the file, so initialising is wasted work.
    config = _infer_config(state)
    try:
        with torch.device("meta"):
            model = model_cls(**config, heads=heads, image_scaling=image_scaling)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:  # shapes that build no LoftUp
        raise WeightsError(
            f"the state dict's shapes ({', '.join(f'{k}={v}' for k, v in config.items())}) build no LoftUp "
            f"({error_line(exc, 120)})"
        ) from None
    _load_strict(model, state, "the official state dict", assign=True)
    return model.eval()


def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
    # Released files are either a bare state dict or a training checkpoint holding one.
    tensors = unwrap_state_dict(obj) if isinstance(obj, Mapping) else {}
    if not tensors:
        raise WeightsError(f"{source} holds no state dict of tensors")
    state = _normalise_keys(tensors)
    ours = {k: v for k, v in state.items() if k.startswith(("upsampler.", "channelnorm."))}
    # A full training checkpoint also carries the backbone and loss modules: keep ours.
    return ours or state


def load_official(
    model_cls, path, image_scaling: str = "image", heads: int = 4, device: str | torch.device = "cpu"
) -> LoftUp:
    """Load a released LoftUp checkpoint (.pth/.pt/.ckpt via ``torch.load(weights_only=True)``,
    or .safetensors) into a ``LoftUp`` in eval mode."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(
            f"official LoftUp checkpoint {path} not found: download it from {OFFICIAL_SOURCE} and pass its path"
        )
    raw = read_state_dict(path)
    model = from_official(model_cls, _unwrap(raw, str(path)), image_scaling=image_scaling, heads=heads)
    return model.to(device)


def load_release(model_cls, spec, device: str | torch.device = "cpu", image_scaling: str = "image"):
    """The released LoftUp named by ``spec`` (see ``find_release``), from the local HF cache, in eval mode.

    ``image_scaling="batch"`` reproduces the released module exactly (image min/max over the
    batch); the default scales each image on its own (identical for one image).
    """
    release = find_release(spec)
    if release is None:
        raise LoftupError(f"unknown LoftUp release {spec!r}; known: {', '.join(RELEASES)}")
    path = release_file(release)
    model = load_official(model_cls, path, image_scaling=image_scaling, device=device)
    if model.dim != release.dim:
        raise WeightsError(f"{path} holds a {model.dim}-d upsampler, but {release.name} is {release.dim}-d")
    return model


def resolve_upsampler(model_cls, spec, device: str | torch.device = "cpu", image_scaling: str = "image"):
    """``(model, projection or None, backbone name or None)`` for any checkpoint spec:

    - ``official:NAME`` / ``NAME`` / ``haiwen/loftup-NAME``: a released upsampler from the local
      HF cache (``NAME`` in ``training.releases.RELEASES``; its backbone is known);
    - a ``.safetensors``/``.json`` checkpoint of ours (``save_model``), with its projection and
      the backbone it was trained for;
    - any other file: a released-layout state dict (.pth/.bin/.pt/.ckpt).
    """
    text = str(spec)
    release = find_release(text)
    if release is not None:
        return load_release(model_cls, release.name, device=device, image_scaling=image_scaling), None, release.backbone
    if text.startswith("official:"):
        path = Path(text[len("official:") :])
        if not path.exists():
            raise LoftupError(f"unknown LoftUp release {text!r}; known: {', '.join('official:' + n for n in RELEASES)}")
        return load_official(model_cls, path, image_scaling=image_scaling, device=device), None, None
    path = Path(text)
    if path.suffix in (".safetensors", ".json") and _paths(path)[1].exists():
        model, meta = load_model(model_cls, path, device=device, with_meta=True)
        return model, meta.get("projection_module"), (meta.get("extra") or {}).get("backbone")
    if not path.exists():
        if path.suffix == "" and (len(path.parts) == 1 or (len(path.parts) == 2 and not text.startswith((".", "/")))):
            raise LoftupError(f"unknown LoftUp release or missing checkpoint {text!r}; releases: {', '.join(RELEASES)}")
        raise WeightsError(f"checkpoint {path} not found")
    return load_official(model_cls, path, image_scaling=image_scaling, device=device), None, None
