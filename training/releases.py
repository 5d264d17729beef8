"""The authors' seven released LoftUp upsamplers and how to find them on this machine.

Each release is one ``pytorch_model.bin`` on the Hugging Face hub (``haiwen/loftup-*``) holding
``upsampler.*`` + ``channelnorm.*`` (the layout of ``training.model.LoftUp``). Loading never
touches the network: a release is read from a path the user gives or from the local HF cache
(``training.checkpoint.load_release``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loftup.storage.errors import WeightsError

__all__ = ["RELEASES", "Release", "find_release", "release_file"]


@dataclass(frozen=True)
class Release:
    name: str  # short name: "dinov2s"
    backbone: str  # registry entry whose features it upsamples
    dim: int
    repo_id: str
    filename: str = "pytorch_model.bin"

    @property
    def hub_entry(self) -> str:
        """Its entry point in the authors' (and our) hubconf.py."""
        return f"loftup_{self.name}"


RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        Release("dinov2s", "dinov2_vits14", 384, "haiwen/loftup-dinov2s"),
        Release("dinov2s_reg", "dinov2_vits14_reg", 384, "haiwen/loftup-dinov2s_reg"),
        Release("dinov2b", "dinov2_vitb14", 768, "haiwen/loftup-dinov2b"),
        Release("dinov2b_reg", "dinov2_vitb14_reg", 768, "haiwen/loftup-dinov2b_reg"),
        Release("clip", "clip_vitb16", 512, "haiwen/loftup-clip"),
        Release("siglip", "siglip_vitb16", 768, "haiwen/loftup-siglip"),
        Release("siglip2", "siglip2_vitb16", 768, "haiwen/loftup-siglip2"),
    )
}


def find_release(spec: str) -> Release | None:
    """The release named by ``dinov2s``, ``loftup_dinov2s``, ``haiwen/loftup-dinov2s`` or
    ``official:<any of those>``; None when ``spec`` names none."""
    key = str(spec).removeprefix("official:")
    for r in RELEASES.values():
        if key in (r.name, r.hub_entry, r.repo_id):
            return r
    return None


def release_file(release: Release) -> Path:
    """The release's file in the local HF cache, or a WeightsError saying how to get it there."""
    from loftup.pipeline.backbones.weights import hf_cached

    hit = hf_cached(release.repo_id, release.filename)
    if hit is None:
        raise WeightsError(
            f"{release.repo_id}/{release.filename} is not in the local HF cache: on a machine with network run "
            f"`huggingface-cli download {release.repo_id} {release.filename}` (same HF_HUB_CACHE), "
            f"or download it and pass its path"
        )
    return hit
