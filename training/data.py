"""Training data straight from the stores: images, stored low-res features and stored masks.

Nothing is materialised: pseudo-GT is built on the training device from these factors.
Sampling is shard-aware (each rank walks whole shards in a seeded order, so reads stay
within a few Zarr shards and Parquet files) and exactly reproducible from (seed, epoch, offset).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from loftup.pipeline.backbones import registry
from loftup.storage.errors import LoftupError, StoreError, error_line
from loftup.storage.geometry import nearest_index
from loftup.storage.layout import feature_set, job_key

log = logging.getLogger(__name__)

IMAGENET_MEAN = torch.tensor(registry.IMAGENET_MEAN).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor(registry.IMAGENET_STD).view(1, 3, 1, 1)


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) uint8 -> ImageNet-normalised float, on the tensor's device."""
    return normalise_float(images_uint8.float().div_(255))


def normalise_float(x01: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) float in [0, 1] -> ImageNet-normalised, on the tensor's device."""
    return (x01 - IMAGENET_MEAN.to(x01.device)) / IMAGENET_STD.to(x01.device)


def hue_rotate(x01: torch.Tensor, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """(B,3,H,W) [0, 1] images, each with its hue rotated by an angle drawn uniformly in
    +/- ``max_degrees``: a rotation of RGB about the grey axis, which keeps brightness and
    every edge but changes which colour a surface has."""
    theta = (torch.rand(x01.shape[0], generator=generator) * 2 - 1) * math.radians(max_degrees)
    return torch.einsum("bij,bjhw->bihw", hue_rotation(theta).to(x01), x01)


def hue_rotation(theta: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotations of RGB by ``theta`` (N,) radians about the grey axis (Rodrigues)."""
    u = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    c, s = theta.cos()[:, None, None], theta.sin()[:, None, None]
    return c * torch.eye(3) + s * cross + (1 - c) * torch.outer(u, u)


@dataclass
class StoreIndex:
    """Rows usable for training: images present in every store the stage needs."""

    image_ids: np.ndarray
    shards: np.ndarray
    without_masks: int = 0  # images of the chosen shards left out because they have no mask

    def __len__(self) -> int:
        return len(self.image_ids)


def build_index(store, jobs: list[str], shards: list[int] | None = None) -> StoreIndex:
    """Image ids of the shards that every job in ``jobs`` has finished, in (shard, id) order.

    A job that has no finished shard at all is a clear error naming the command to run; a
    damaged shard (its marker or files, footers included) stops here, before any step reads it.
    With ``masks`` among the jobs, images without a single stored mask (every mask refused, or
    none found) are left out, and their number logged: they would train on no mask at all.
    """
    done = None
    for job in jobs:
        d = set(store.done_shards(job))
        if not d:
            hint = "loftup-pipeline " + job.split("/")[0]
            raise StoreError(f"store {store.url} has no finished shard of job {job!r}; run `{hint}` first")
        done = d if done is None else done & d
    if shards is not None:
        missing = sorted(set(shards) - done)
        if missing:
            shown = ", ".join(str(m) for m in missing[:20]) + (
                f" ... ({len(missing)} in all)" if len(missing) > 20 else ""
            )
            raise StoreError(
                f"--shards names shards that {store.url} has not finished for {', '.join(jobs)}: {shown} "
                f"(finish them, or pass --allow-missing to train without them)"
            )
    chosen = sorted(done if shards is None else done & set(shards))
    if not chosen:
        raise StoreError(
            f"no shard is finished for all of {jobs} in {store.url}" + (f" among {shards}" if shards else "")
        )
    for s in chosen:  # a damaged shard stops training here, named, instead of deep inside a batch
        for job in jobs:
            problems = store.shard_problems(job, s)
            if problems:
                raise StoreError(
                    f"shard {s} of {job} in {store.url} is damaged ({'; '.join(problems[:2])}); "
                    f"rerun `loftup-pipeline {job.split('/')[0]}` on it to redo it"
                )
    ids, shard_of, without = [], [], 0
    for s in chosen:
        sid = np.asarray(store.image_ids(s), dtype=np.int64)
        if "masks" in jobs:
            with_masks = store.masks_table(s, ["image_id"]).column(0).to_numpy()
            keep = np.isin(sid, with_masks)
            without += int((~keep).sum())
            sid = sid[keep]
        ids.append(sid)
        shard_of.append(np.full(len(sid), s, dtype=np.int64))
    if without:
        log.warning("left out %d image(s) without any stored mask (see `loftup-store errors`)", without)
    return StoreIndex(np.concatenate(ids), np.concatenate(shard_of), without_masks=without)


@contextlib.contextmanager
def _naming_damage(store_url: str, index: StoreIndex, row: int):
    """A read that fails (a checksum mismatch, a cut file) becomes one line naming the shard."""
    try:
        yield
    except LoftupError:
        raise
    except Exception as exc:
        shard, image_id = int(index.shards[row]), int(index.image_ids[row])
        raise StoreError(
            f"cannot read image {image_id} of shard {shard} in {store_url} ({error_line(exc, 160)}); "
            f"`loftup-store verify --deep` lists the damage, a rerun of the pipeline job repairs it"
        ) from None


def present_shards(store_url: str, shards: list[int], jobs: list[str]) -> tuple[list[int], list[int]]:
    """(shards every job in ``jobs`` has finished, the others): for ``--allow-missing``."""
    from loftup.storage import open_store

    store = open_store(store_url)
    done = None
    for job in jobs:
        d = set(store.done_shards(job))
        done = d if done is None else done & d
    return [s for s in shards if s in done], [s for s in shards if s not in done]


def check_features(store, backbone: str, res: int):
    key = feature_set(backbone, res)
    known = store.manifest.get("backbones", {})
    if key not in known and not store.done_shards(job_key("features", backbone, res)):
        have = ", ".join(sorted(known)) or "none"
        raise StoreError(
            f"store {store.url} has no features for {key} (has: {have}); run `loftup-pipeline features --backbone {backbone} --res {res}`"
        )


class ShardAwareSampler(Sampler[int]):
    """Seeded shard order, shuffled within shards, split into equal contiguous blocks per rank.

    ``start`` skips that many of this rank's samples (exact resume mid-epoch).
    """

    def __init__(
        self,
        index: StoreIndex,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ):
        self.index, self.seed, self.epoch, self.rank, self.world, self.start, self.shuffle = (
            index,
            seed,
            epoch,
            rank,
            world,
            start,
            shuffle,
        )

    def order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        shards = np.unique(self.index.shards)
        if self.shuffle:
            shards = rng.permutation(shards)
        parts = []
        for s in shards:
            rows = np.flatnonzero(self.index.shards == s)
            parts.append(rng.permutation(rows) if self.shuffle else rows)
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        per_rank = len(order) // self.world
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return max(0, len(self.index) // self.world - self.start)

    def __iter__(self):
        return iter(self.order()[self.start :].tolist())


class Stage1Dataset(Dataset):
    """Per image: the training image, its stored low-res features and its stored masks.

    Masks come out in annotation order, at most ``max_masks``, at ``size`` (the stored
    geometry, or a smaller size by nearest-exact subsampling for cheap CPU runs). With
    ``full_image`` the image at the stored geometry comes too (``image_full``: the
    reconstruction term runs the backbone on it).
    """

    def __init__(
        self,
        store_url: str,
        index: StoreIndex,
        backbone: str,
        res: int,
        geometry: int = 224,
        size: int | None = None,
        max_masks: int = 150,
        full_image: bool = False,
    ):
        self.store_url, self.index, self.backbone, self.res = store_url, index, backbone, res
        self.geometry, self.size, self.max_masks, self.full_image = geometry, size or geometry, max_masks, full_image
        self._store = None
        self._features = None

    def __len__(self) -> int:
        return len(self.index)

    def _open(self):
        if self._store is None:
            from loftup.storage import open_store

            self._store = open_store(self.store_url)
            self._features = self._store.features(self.backbone, self.res)
        return self._store

    def __getitem__(self, i: int) -> dict:
        with _naming_damage(self.store_url, self.index, i):
            return self._item(i)

    def _item(self, i: int) -> dict:
        from PIL import Image

        from loftup.storage import rle

        store = self._open()
        image_id = int(self.index.image_ids[i])
        img = Image.open(io.BytesIO(store.image_bytes(image_id, self.geometry))).convert("RGB")
        rles = store.masks_for(image_id, size=self.geometry)[: self.max_masks]
        full = img
        if self.size != self.geometry:
            img = img.resize((self.size, self.size), Image.BICUBIC)
            idx = _subsample_index(self.geometry, self.size)
            rles = [rle.resample(r, idx, idx) for r in rles]
        bits = _packed_masks(rles, self.size, self.size)
        item = {
            "image_id": image_id,
            "image": torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(),
            "feats": torch.from_numpy(np.asarray(self._features.get(image_id))),
            "mask_bits": torch.from_numpy(bits),
        }
        if self.full_image:
            item["image_full"] = torch.from_numpy(np.array(full)).permute(2, 0, 1).contiguous()
        return item


_subsample_index = nearest_index  # the name evaluation and benches import


def _packed_len(h: int, w: int) -> int:
    return (h * w + 7) // 8


def _packed_masks(rles: list[dict], h: int, w: int) -> np.ndarray:
    """``rle.decode_packed`` of an image's masks, or an empty (0, bytes) array when it has none."""
    from loftup.storage import rle

    return rle.decode_packed(rles)[0] if rles else np.zeros((0, _packed_len(h, w)), np.uint8)


def collate(samples: list[dict]) -> dict:
    """Stack, padding the packed masks to the largest count in the batch with a validity mask.

    Masks stay bit-packed (``mask_bits``: (B, M, ceil(H*W/8)) uint8, column-major, see
    ``rle.decode_packed``) until :func:`unpack_masks` on the training device: at 224 with
    150 masks that is 0.94 MB per image instead of 7.5 MB through the worker queues.
    """
    h, w = samples[0]["image"].shape[-2:]
    bits, valid = _pad_bits([s["mask_bits"] for s in samples], _packed_len(h, w))
    batch = {
        "image_id": torch.tensor([s["image_id"] for s in samples]),
        "image": torch.stack([s["image"] for s in samples]),
        "feats": torch.stack([s["feats"] for s in samples]),
        "mask_bits": bits,
        "mask_size": (int(h), int(w)),
        "valid": valid,
    }
    if "image_full" in samples[0]:
        batch["image_full"] = torch.stack([s["image_full"] for s in samples])
    return batch


def _pad_bits(per_image: list[torch.Tensor], nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = max((x.shape[0] for x in per_image), default=0)
    bits = torch.zeros((len(per_image), m, nbytes), dtype=torch.uint8)
    valid = torch.zeros((len(per_image), m), dtype=torch.bool)
    for j, x in enumerate(per_image):
        bits[j, : x.shape[0]] = x
        valid[j, : x.shape[0]] = True
    return bits, valid


def unpack_masks(bits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., ceil(H*W/8)) uint8 packed column-major masks -> (..., H, W) bool, on bits' device."""
    h, w = size
    shifts = torch.arange(7, -1, -1, device=bits.device, dtype=torch.uint8)
    flat = (bits.unsqueeze(-1) >> shifts).bitwise_and_(1).flatten(-2)[..., : h * w].bool()
    return flat.unflatten(-1, (w, h)).transpose(-1, -2).contiguous()


def batch_masks(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (B,M,H,W) bool, valid (B,M)) of a collated batch, unpacked on ``device``."""
    bits = batch["mask_bits"].to(device, non_blocking=True)
    return unpack_masks(bits, batch["mask_size"]), batch["valid"].to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Stage 2: high-resolution images with crops chosen per sample, crop masks decoded in workers.
@dataclass(frozen=True)
class Crop:
    """An s x s crop of the HR image at (top, left), and the student-output pixels it covers:
    rows/cols [r0, r0 + n) of the s x s student output, which span crop pixels
    [off, off + n * t) with t = hr / s (``off`` in [0, 1) so the region lies inside the crop)."""

    top: int
    left: int
    r0: int
    c0: int
    n: int
    off_y: float
    off_x: float
    t: float


def plan_crop(hr: int, s: int, rng: np.random.Generator) -> Crop:
    t = hr / s
    n_max = int(np.floor(s / t))
    # Pick the region on the student grid first, then the crop that starts at or just before it,
    # so both sides agree to sub-pixel precision for every s (518 does not divide 896).
    r0 = int(rng.integers(0, s - n_max + 1))
    c0 = int(rng.integers(0, s - n_max + 1))
    top = min(int(np.floor(r0 * t)), hr - s)
    left = min(int(np.floor(c0 * t)), hr - s)
    n = min(int(np.floor((top + s) / t)) - r0, int(np.floor((left + s) / t)) - c0)
    return Crop(top, left, r0, c0, n, r0 * t - top, c0 * t - left, t)


class Stage2BatchSampler(Sampler[list]):
    """Batches of (row, s, seed): one student size s per step, drawn from a seeded stream, so a
    resumed run draws the same sizes and crops as an uninterrupted one."""

    def __init__(self, sampler: ShardAwareSampler, batch_size: int, sizes: list[int], seed: int, first_step: int = 0):
        self.sampler, self.batch_size, self.sizes, self.seed, self.first_step = (
            sampler,
            batch_size,
            sizes,
            seed,
            first_step,
        )

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        rows = list(self.sampler)
        step = self.first_step
        for b in range(len(self)):
            rng = np.random.default_rng([self.seed, 7, step])
            s = int(self.sizes[rng.integers(len(self.sizes))])
            yield [(r, s, int(rng.integers(2**31))) for r in rows[b * self.batch_size : (b + 1) * self.batch_size]]
            step += 1


class Stage2Dataset(Dataset):
    """Per (row, s, seed): the HR image and, for each crop, its position and its masks at s x s."""

    def __init__(
        self,
        store_url: str,
        index: StoreIndex,
        geometry: int = 896,
        hr: int | None = None,
        crops: int = 2,
        max_masks: int = 150,
    ):
        self.store_url, self.index, self.geometry, self.hr = store_url, index, geometry, hr or geometry
        self.crops, self.max_masks = crops, max_masks
        self._store = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item) -> dict:
        with _naming_damage(self.store_url, self.index, item[0]):
            return self._item(item)

    def _item(self, item) -> dict:
        from PIL import Image

        from loftup.storage import open_store, rle

        row, s, seed = item
        if self._store is None:
            self._store = open_store(self.store_url)
        image_id = int(self.index.image_ids[row])
        img = Image.open(io.BytesIO(self._store.image_bytes(image_id, self.geometry))).convert("RGB")
        if self.hr != self.geometry:
            img = img.resize((self.hr, self.hr), Image.BICUBIC)
        rles = self._store.masks_for(image_id, size=self.geometry)[: self.max_masks]
        base = _subsample_index(self.geometry, self.hr)
        rng = np.random.default_rng(seed)
        crops, masks = [], []
        for _ in range(self.crops):
            c = plan_crop(self.hr, s, rng)
            rows, cols = base[c.top : c.top + s], base[c.left : c.left + s]
            bits = _packed_masks([rle.resample(r, rows, cols) for r in rles], s, s)
            crops.append(c)
            masks.append(torch.from_numpy(bits))
        return {
            "image_id": image_id,
            "image": torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(),
            "s": s,
            "crops": crops,
            "mask_bits": masks,
        }


def collate_stage2(samples: list[dict]) -> dict:
    """Images (B,3,HR,HR); crops flattened to (B*crops) with packed masks padded to
    (B*crops, M, ceil(s*s/8)) (unpack with :func:`batch_masks`)."""
    s = samples[0]["s"]
    bits, valid = _pad_bits([m for smp in samples for m in smp["mask_bits"]], _packed_len(s, s))
    return {
        "image_id": torch.tensor([smp["image_id"] for smp in samples]),
        "image": torch.stack([smp["image"] for smp in samples]),
        "s": s,
        "crops": [c for smp in samples for c in smp["crops"]],
        "mask_bits": bits,
        "mask_size": (s, s),
        "valid": valid,
    }
