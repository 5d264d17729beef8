"""Weight files: reading, unwrapping, strict loading with one-line errors, and the local caches.

The one home of this code for backbones, SAM and LoftUp checkpoints alike. Nothing here
touches the network: a cache lookup only finds files that are already on disk.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from loftup.storage.errors import WeightsError, error_line

__all__ = [
    "KNOWN_WEIGHTS",
    "WeightLocation",
    "find_cached",
    "hf_cached",
    "load_state_dict_strict",
    "missing_weights_message",
    "read_state_dict",
    "resolve_weights",
    "sha256_file",
    "unwrap_state_dict",
    "weights_record",
]


# ---------------------------------------------------------------------------------------------
# Where each backbone's published weights live


@dataclass(frozen=True)
class WeightLocation:
    """The publisher's file and the local caches that may already hold a copy of it."""

    file: str  # the publisher's file name, what --weights usually points at
    publisher: str  # who publishes it
    torch_hub: str | None = None  # file name (or glob) under <torch hub dir>/checkpoints
    torch_home: str | None = None  # file name under $TORCH_HOME (OpenAI CLIP's download root)
    hf: tuple[tuple[str, str], ...] = ()  # (repo id, file name) in the Hugging Face hub cache

    def where(self) -> str:
        """Where a downloaded copy goes so that it is found offline."""
        if self.torch_hub:
            return str(Path(torch.hub.get_dir()) / "checkpoints" / self.torch_hub)
        if self.torch_home:
            return str(_torch_home() / self.torch_home)
        repo, name = self.hf[0]
        return f"the HF cache as {repo}/{name} (`huggingface-cli download {repo} {name}`)"


def _dinov2(file: str, timm_name: str) -> WeightLocation:
    repo = f"timm/{timm_name}.lvd142m"
    return WeightLocation(
        file, "the DINOv2 release", torch_hub=file, hf=((repo, "model.safetensors"), (repo, "pytorch_model.bin"))
    )


def _open_clip(repo: str, timm_repo: str) -> tuple[tuple[str, str], ...]:
    return (
        (repo, "open_clip_model.safetensors"),
        (repo, "open_clip_pytorch_model.bin"),
        (timm_repo, "model.safetensors"),
        (timm_repo, "pytorch_model.bin"),
    )


def _dinov3(stem: str, timm_name: str) -> WeightLocation:
    # The release files carry a hash suffix (e.g. ...lvd1689m-08c60483.pth): match any.
    repo = f"timm/{timm_name}.lvd1689m"
    return WeightLocation(
        f"{stem}-<hash>.pth",
        "the DINOv3 release (facebookresearch/dinov3)",
        torch_hub=f"{stem}*.pth",
        hf=((repo, "model.safetensors"),),
    )


KNOWN_WEIGHTS: dict[str, WeightLocation] = {
    "dinov2_vits14": _dinov2("dinov2_vits14_pretrain.pth", "vit_small_patch14_dinov2"),
    "dinov2_vitb14": _dinov2("dinov2_vitb14_pretrain.pth", "vit_base_patch14_dinov2"),
    "dinov2_vits14_reg": _dinov2("dinov2_vits14_reg4_pretrain.pth", "vit_small_patch14_reg4_dinov2"),
    "dinov2_vitb14_reg": _dinov2("dinov2_vitb14_reg4_pretrain.pth", "vit_base_patch14_reg4_dinov2"),
    "clip_vitb16": WeightLocation(
        "ViT-B-16.pt",
        "OpenAI CLIP (clip.load('ViT-B/16'), a TorchScript archive)",
        torch_home="ViT-B-16.pt",
        hf=(
            ("timm/vit_base_patch16_clip_224.openai", "open_clip_pytorch_model.bin"),
            ("timm/vit_base_patch16_clip_224.openai", "model.safetensors"),
        ),
    ),
    "siglip_vitb16": WeightLocation(
        "open_clip_model.safetensors",
        "open_clip hf-hub:timm/ViT-B-16-SigLIP",
        hf=_open_clip("timm/ViT-B-16-SigLIP", "timm/vit_base_patch16_siglip_224.webli"),
    ),
    "siglip2_vitb16": WeightLocation(
        "open_clip_model.safetensors",
        "open_clip hf-hub:timm/ViT-B-16-SigLIP2",
        hf=_open_clip("timm/ViT-B-16-SigLIP2", "timm/vit_base_patch16_siglip_224.v2_webli"),
    ),
    "dinov3_vits16": _dinov3("dinov3_vits16_pretrain_lvd1689m", "vit_small_patch16_dinov3"),
    "dinov3_vits16plus": _dinov3("dinov3_vits16plus_pretrain_lvd1689m", "vit_small_plus_patch16_dinov3"),
    "dinov3_vitb16": _dinov3("dinov3_vitb16_pretrain_lvd1689m", "vit_base_patch16_dinov3"),
}


def _torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))


def hf_cached(repo: str, filename: str) -> Path | None:
    """A file of ``repo`` already in the local Hugging Face cache, or None (never downloads)."""
    try:
        import huggingface_hub.constants as hf_constants
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    # The cache directory is read at call time, so HF_HUB_CACHE changes made after import count.
    hit = try_to_load_from_cache(repo, filename, cache_dir=hf_constants.HF_HUB_CACHE)
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def find_cached(name: str) -> tuple[str, Path] | None:
    """(source, path) of a local copy of ``name``'s published weights, or None."""
    loc = KNOWN_WEIGHTS[name]
    if loc.torch_hub:
        hits = sorted((Path(torch.hub.get_dir()) / "checkpoints").glob(loc.torch_hub))
        if hits:
            return "torch-hub-cache", hits[0]
    if loc.torch_home and (_torch_home() / loc.torch_home).is_file():
        return "torch-home", _torch_home() / loc.torch_home
    for repo, filename in loc.hf:
        hit = hf_cached(repo, filename)
        if hit is not None:
            return "hf-cache", hit
    return None


def missing_weights_message(name: str) -> str:
    loc = KNOWN_WEIGHTS[name]
    return (
        f"no weights for {name}: pass --weights PATH (e.g. {loc.file} from {loc.publisher}), put that file at "
        f"{loc.where()}, or use --random-init for tests"
    )


def resolve_weights(name: str, weights: str | None, random_init: bool) -> tuple[str, Path | None]:
    """(source, path) of the weights a builder should load: a file, a cached copy or none."""
    if random_init:
        return "random-init", None
    if weights is None:
        cached = find_cached(name)
        if cached is None:
            raise WeightsError(missing_weights_message(name))
        return cached
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return "file", path


# ---------------------------------------------------------------------------------------------
# Reading and loading


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_record(source: str, path: str | Path | None) -> dict:
    """What the store manifest records about the weights a model was built from."""
    if path is None:
        return {"source": source, "path": None, "sha256": None}
    return {"source": source, "path": str(Path(path).resolve()), "sha256": sha256_file(path)}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, a torch-pickled state dict or a TorchScript archive
    (OpenAI CLIP's released format), loaded on the CPU. No code in the file runs: pickles go
    through ``torch.load(weights_only=True)``, archives through :func:`read_torchscript`."""
    from loftup.pipeline.backbones.torchscript import is_torchscript, read_torchscript

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        elif is_torchscript(p):
            state = read_torchscript(p)
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot read weights {p}: {error_line(exc)}") from None
    if not isinstance(state, dict):
        raise WeightsError(f"weights {p} hold a {type(state).__name__}, not a state dict")
    return state


_WRAPPERS = ("teacher", "state_dict", "model", "model_state_dict", "weights")


def unwrap_state_dict(state: Mapping) -> dict[str, torch.Tensor]:
    """The model's tensors out of common checkpoint wrappers and whole-model key prefixes."""
    for _ in range(3):  # e.g. {"state_dict": {"model": {...}}}
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping) and state[k]), None)
        if inner is None or not all(isinstance(k, str) for k in inner):
            break
        state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod.", "backbone."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_state_dict_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], source, target: str, assign: bool = False
) -> None:
    """Load every tensor of ``state`` into ``module``, or raise one WeightsError line naming
    the missing, unexpected and wrongly shaped keys, or the first tensor holding NaN or inf.
    ``assign=True`` makes (copies of) the file's tensors the module's own, for a module built
    on the meta device."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_few(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(
            f"wrong shape: {k} file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            + (f" ({len(wrong)} in all)" if len(wrong) > 1 else "")
        )
    if problems:
        raise WeightsError(f"{source} does not fit {target}: {'; '.join(problems)}")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise WeightsError(f"{source} holds non-finite values (NaN or inf) in {bad}: refusing to load it into {target}")
    if assign:
        module.load_state_dict({k: v.to(own[k].dtype, copy=True) for k, v in state.items()}, strict=True, assign=True)
    else:
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
