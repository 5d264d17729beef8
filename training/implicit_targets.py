"""Stage 1's ``--target implicit``: the stored per-image-optimised maps (training/implicit.py)
as the trainer's targets."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from loftup.storage.layout import feature_set
from loftup.training.implicit import from_compact, render


class ImplicitTargets:
    """Stage 1's ``--target implicit``: the stored per-image-optimised maps of a batch's images,
    resampled to the training size, in the trainer's target space (the channel LayerNorm of
    the features, after the run's PCA projection when it has one).

    Dense maps are read when the shard has them; otherwise the compact network is re-evaluated
    on the stored image (both give the same map up to fp16 rounding).
    """

    def __init__(self, store, backbone: str, res: int, device="cpu"):
        from loftup.storage.implicit import implicit_store

        self.store, self.backbone, self.res = store, backbone, int(res)
        self.istore = implicit_store(store, backbone, res)
        self.device = torch.device(device)
        self._dense_ids = None

    def image_ids(self) -> np.ndarray:
        return self.istore.image_ids()

    def _dense(self) -> set[int]:
        if self._dense_ids is None:
            self._dense_ids = set()
            for s in self.istore.shards():
                if self.istore.has_dense(s):
                    self._dense_ids |= set(self.istore.dense.shard_image_ids(s).tolist())
        return self._dense_ids

    @torch.no_grad()
    def maps(self, image_ids) -> torch.Tensor:
        """(B, C, res, res) float32 maps of ``image_ids`` on the device."""
        ids = [int(i) for i in image_ids]
        dense = self._dense()
        out: list[torch.Tensor | None] = [None] * len(ids)
        if any(i in dense for i in ids):
            sel = [k for k, i in enumerate(ids) if i in dense]
            arr = self.istore.dense.get_many([ids[k] for k in sel])
            for k, a in zip(sel, arr):
                out[k] = torch.from_numpy(np.asarray(a, np.float32)).to(self.device)
        rest = [k for k, i in enumerate(ids) if out[k] is None]
        if rest:
            src = min(s for s in self.store.geometries if s >= self.res)
            for k, blob in zip(rest, self.istore.blobs([ids[k] for k in rest])):
                net, unproj, _ = from_compact(blob, self.device)
                img = self.store.image(ids[k], src).convert("RGB")
                if img.size != (self.res, self.res):
                    from PIL import Image

                    img = img.resize((self.res, self.res), Image.BICUBIC)
                x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div(255)
                # The fp16 round trip makes re-evaluated and dense targets identical.
                out[k] = render(net, unproj, x).half().float()
        return torch.stack(out)

    @torch.no_grad()
    def __call__(self, image_ids, size: int, projection=None, space: str = "layer_norm") -> torch.Tensor:
        hr = self.maps(image_ids)
        if hr.shape[-1] != size:
            hr = F.interpolate(
                hr, size=(size, size), mode="bilinear", align_corners=False, antialias=size < hr.shape[-1]
            )
        if projection is not None:
            hr = projection(hr)
        from loftup.training.target_space import to_target_space

        return to_target_space(hr, space)


def restrict_index(index, targets: ImplicitTargets):
    """Stage 1's index limited to the images that have a stored per-image-optimised map."""
    from loftup.storage.errors import StoreError
    from loftup.training.data import StoreIndex

    keep = np.isin(index.image_ids, targets.image_ids())
    if not keep.any():
        raise StoreError(
            f"no per-image-optimised features of {feature_set(targets.backbone, targets.res)} for the chosen images; "
            f"run `loftup-pipeline implicit --backbone {targets.backbone} --res {targets.res}` first"
        )
    return StoreIndex(index.image_ids[keep], index.shards[keep], without_masks=index.without_masks)
