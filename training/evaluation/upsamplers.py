"""The upsamplers an evaluation compares, each carrying its own feature projection and target space.

``EvalUpsampler.features(lr_feats, guide, size)`` takes the backbone's raw low-res features and
the ImageNet-normalised guidance image and returns the features the probes see:

- a LoftUp checkpoint applies the projection it was trained with (if any) and upsamples; its
  output is already in its own space (layer-normalised for the released head, the backbone's raw
  space for the convex head: ``target_space`` records which);
- an interpolation baseline (``bilinear``, ``bicubic``, ``nearest``) applies its projection (none
  unless asked for), maps the low-res features into its target space (``layer_norm`` by default,
  LoftUp's, or ``raw``) and interpolates;
- ``lowres`` does the same without upsampling: the probe runs at the feature grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from loftup.storage.errors import LoftupError
from loftup.training.target_space import TARGET_SPACES, to_target_space

__all__ = ["BASELINES", "EvalUpsampler", "baseline", "build_upsamplers", "resolve_checkpoint", "with_projection"]

BASELINES = ("bilinear", "bicubic", "nearest", "lowres")


@dataclass
class EvalUpsampler:
    name: str
    kind: str  # "interpolation" | "lowres" | "loftup"
    module: nn.Module | None = None
    projection: nn.Module | None = None
    target_space: str = "layer_norm"
    source: str = ""  # where it came from (mode, checkpoint path), for the report
    trained_on: str | None = None  # backbone a checkpoint was trained for, when recorded

    def out_dim(self, backbone_dim: int) -> int:
        if self.kind == "loftup":
            return int(self.module.dim)
        return int(self.projection.out_dim) if self.projection is not None else backbone_dim

    def to(self, device) -> EvalUpsampler:
        for m in (self.module, self.projection):
            if m is not None:
                m.to(device)
        return self

    def freeze(self) -> EvalUpsampler:
        """Eval mode and no gradients: BatchNorm keeps its trained statistics while probes train
        (the released probe script leaves the upsampler in train mode, so they drift)."""
        for m in (self.module, self.projection):
            if m is not None:
                m.eval().requires_grad_(False)
        return self

    def describe(self) -> dict:
        proj = (
            None if self.projection is None else f"PCA {int(self.projection.mean.shape[0])}->{self.projection.out_dim}"
        )
        return {
            "kind": self.kind,
            "source": self.source,
            "projection": proj,
            "target_space": self.target_space,
            "trained_on": self.trained_on,
        }

    @torch.no_grad()
    def features(self, lr_feats: torch.Tensor, guide: torch.Tensor, size) -> torch.Tensor:
        f = lr_feats if self.projection is None else self.projection(lr_feats)
        if self.kind == "loftup":
            return self.module(f, guide, output_size=size).float()
        f = to_target_space(f, self.target_space)
        if self.kind == "lowres":
            return f
        return self.module(f, guide, output_size=size)


def baseline(name: str, target_space: str = "layer_norm", projection: nn.Module | None = None) -> EvalUpsampler:
    """``bilinear``, ``bicubic``, ``nearest`` or ``lowres``."""
    if name not in BASELINES:
        raise LoftupError(
            f"unknown upsampler {name!r}; choose from {', '.join(BASELINES)} (LoftUp weights: --checkpoint)"
        )
    if target_space not in TARGET_SPACES:
        raise LoftupError(f"unknown target space {target_space!r}; choose from {', '.join(TARGET_SPACES)}")
    if name == "lowres":
        return EvalUpsampler(name, "lowres", None, projection, target_space, source="no upsampling")
    from loftup.training.baselines import create_upsampler

    return EvalUpsampler(name, "interpolation", create_upsampler(name), projection, target_space, source=name)


def with_projection(up: EvalUpsampler, projection: nn.Module, suffix: str) -> EvalUpsampler:
    """A copy of a baseline that sees the same projected features as a checkpoint does."""
    return replace(up, name=f"{up.name}@{suffix}", projection=projection)


def resolve_checkpoint(spec: str | Path, device="cpu") -> EvalUpsampler:
    """The one place a ``--checkpoint`` value becomes an upsampler, through
    ``training.checkpoint.resolve_upsampler``: our ``.safetensors`` (with its projection and
    recorded backbone), a released LoftUp file, or ``official:NAME`` (a release from the local HF
    cache, named ``loftup_NAME``). Files are named after their stem."""
    from loftup.training.checkpoint import resolve_upsampler
    from loftup.training.heads import output_space
    from loftup.training.releases import find_release

    model, projection, trained_on = resolve_upsampler(spec, device=device)
    release = find_release(str(spec))
    name = release.hub_entry if release is not None else Path(str(spec)).stem
    return EvalUpsampler(
        name, "loftup", model, projection, output_space(model), source=str(spec), trained_on=trained_on
    ).freeze()


def unique_names(ups: list[EvalUpsampler]) -> list[EvalUpsampler]:
    """Distinct names (two checkpoints called stage1.safetensors get their folder prefixed)."""
    seen: dict[str, int] = {}
    out = []
    for u in ups:
        name = u.name
        if name in seen and u.source:
            name = f"{Path(u.source).parent.name}/{u.name}"
        while name in seen:
            seen[name] = seen.get(name, 1) + 1
            name = f"{u.name}#{seen[name]}"
        seen[name] = 1
        out.append(u if name == u.name else replace(u, name=name))
    return out


def build_upsamplers(
    names: list[str], checkpoints: list, target_space: str = "layer_norm", match_projection: bool = True, device="cpu"
) -> list[EvalUpsampler]:
    """The CLI's list: each baseline in ``names``, each checkpoint (through ``resolve_checkpoint``)
    and, with ``match_projection``, each baseline again on the channels of every checkpoint that
    sees other ones than the baselines (its projection, or its output space: the convex head's raw
    space), named ``<baseline>@<checkpoint>``, so a PCA-trained LoftUp also meets bilinear on the
    same channels in the same space."""
    ups = [baseline(n, target_space) for n in names]
    ckpts = [resolve_checkpoint(c, device=device) for c in checkpoints]
    if match_projection:
        seen: list[tuple[nn.Module | None, str]] = [(None, target_space)]
        for ck in ckpts:
            p, space = ck.projection, ck.target_space
            if any(space == s and _same_projection(p, q) for q, s in seen):
                continue
            seen.append((p, space))
            ups += [with_projection(baseline(n, space), p, ck.name) for n in names]
    return ups + ckpts


def _same_projection(a: nn.Module | None, b: nn.Module | None) -> bool:
    if a is None or b is None:
        return a is b
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )
