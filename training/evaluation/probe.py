"""Linear-probe semantic segmentation, as LoftUp's ``eval_seg`` (itself FeatUp's protocol).

Frozen backbone and upsamplers; images Resize(size, bilinear) + CenterCrop(size), labels the same
with nearest sampling; one 1x1 convolution per upsampler on its features, trained with
cross-entropy over labelled pixels (NAdam, batch 8, 10 epochs, seed 0); a confusion matrix over
the whole val split. Features coarser than the labels (``lowres``) train against labels
nearest-resized to the feature grid and their argmax is nearest-resized back for scoring, as in
the released script.

Every upsampler sees the same batches in the same order: one pass over the data per epoch runs
the backbone once and then each upsampler and its own probe.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from loftup.training.evaluation.metrics import confusion_matrix, seg_scores
from loftup.training.evaluation.protocols import SegProtocol

__all__ = ["SegProtocol", "SegTorchDataset", "run_probes"]


def _resize_crop(img: Image.Image, size: int, resample) -> Image.Image:
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class SegTorchDataset(Dataset):
    """(image (3, S, S) float in [0, 1] with S = ``image_size`` or ``size``, label (size, size)
    int64 with -1 = ignore, index)."""

    def __init__(self, seg, size: int, image_size: int | None = None):
        self.seg, self.size, self.image_size = seg, size, image_size or size

    def __len__(self) -> int:
        return len(self.seg)

    def __getitem__(self, i: int):
        image, label = self.seg.read(i)
        image = _resize_crop(image, self.image_size, Image.BILINEAR)
        # Labels go through PIL as int32 so nearest sampling never invents ids.
        label = np.asarray(_resize_crop(Image.fromarray(label.astype(np.int32)), self.size, Image.NEAREST))
        x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return x, torch.from_numpy(label.astype(np.int64)), i


def resize_square(x: torch.Tensor, res: int) -> torch.Tensor:
    """(B, 3, S, S) images in [0, 1] resized to ``res`` (bicubic, antialiased when shrinking)."""
    if x.shape[-1] == res:
        return x
    return F.interpolate(x, size=(res, res), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def run_probes(
    train,
    val,
    backbone,
    upsamplers,
    protocol: SegProtocol,
    device="cpu",
    workers: int = 0,
    progress: bool = True,
    keep_predictions: int = 4,
    cache_bytes: int = 2 << 30,
) -> tuple[dict, list]:
    """Train one probe per upsampler on ``train`` and score it on ``val`` (``SegDataset`` splits).

    Returns ``(results, examples)``: results per upsampler name (``seg_scores`` plus the final
    training loss) and, for the first ``keep_predictions`` val images, (image, label,
    {name: prediction}) for pictures. When every training image's features of every upsampler fit
    in ``cache_bytes``, they are computed once and reused by later epochs (the backbone and the
    upsamplers are frozen and in eval mode, so this changes nothing but the time).
    """
    from loftup.training.data import normalise_float
    from loftup.training.evaluation.progress import EvalProgress

    device = torch.device(device)
    size = protocol.size
    res = protocol.backbone_res or size
    if res % backbone.patch:
        raise ValueError(f"backbone input {res} is not a multiple of {backbone.name}'s patch size {backbone.patch}")
    n_classes = len(train.classes)
    if list(val.classes) != list(train.classes):
        raise ValueError("train and val splits have different class lists")
    for u in upsamplers:
        u.to(device).freeze()

    probes, optims = {}, {}
    for u in upsamplers:
        torch.manual_seed(protocol.seed)  # every probe starts from the same seeded init
        probes[u.name] = torch.nn.Conv2d(u.out_dim(backbone.dim), n_classes, 1).to(device)
        optims[u.name] = torch.optim.NAdam(probes[u.name].parameters(), lr=protocol.lr)

    def features(x):
        lr_feats = backbone(resize_square(x, res))
        guide = normalise_float(resize_square(x, size))
        return {u.name: u.features(lr_feats, guide, (size, size)).float() for u in upsamplers}

    grid = res // backbone.patch
    per_image = sum(
        4 * u.out_dim(backbone.dim) * (grid * grid if u.kind == "lowres" else size * size) for u in upsamplers
    )
    cache = {} if per_image * len(train) <= cache_bytes else None

    def train_features(x, idx):
        if cache is not None and all(int(i) in cache for i in idx):
            return {u.name: torch.stack([cache[int(i)][u.name] for i in idx]) for u in upsamplers}
        feats = features(x)
        if cache is not None:
            for b, i in enumerate(idx):
                cache[int(i)] = {name: f[b] for name, f in feats.items()}
        return feats

    load = max(size, res)  # images are read once at the larger of the two sizes
    loader = DataLoader(
        SegTorchDataset(train, size, load),
        batch_size=protocol.batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(protocol.seed),
        drop_last=False,
    )
    bar = EvalProgress(f"probe training ({len(upsamplers)} upsamplers)", protocol.epochs * len(train), enabled=progress)
    last_loss = {}
    for _ in range(protocol.epochs):
        for x, label, idx in loader:
            x, label = x.to(device), label.to(device)
            feats = train_features(x, idx)
            for u in upsamplers:
                loss = _probe_step(probes[u.name], optims[u.name], feats[u.name], label)
                if loss is not None:
                    last_loss[u.name] = loss
            bar.advance(len(x))
    bar.close()

    cms = {u.name: torch.zeros(n_classes, n_classes, dtype=torch.int64) for u in upsamplers}
    examples = []
    val_loader = DataLoader(
        SegTorchDataset(val, size, load), batch_size=protocol.batch_size, shuffle=False, num_workers=workers
    )
    bar = EvalProgress("probe scoring", len(val), enabled=progress)
    with torch.no_grad():
        for x, label, _idx in val_loader:
            x, label = x.to(device), label.to(device)
            preds = {}
            for name, f in features(x).items():
                pred = _predict(probes[name], f, label.shape[-2:])
                cms[name] += confusion_matrix(pred, label, n_classes)
                preds[name] = pred.cpu()
            for b in range(min(len(x), keep_predictions - len(examples))):
                examples.append(_example(x[b : b + 1], label[b], {k: v[b] for k, v in preds.items()}, size))
            bar.advance(len(x))
    bar.close()
    results = {}
    for u in upsamplers:
        results[u.name] = {**seg_scores(cms[u.name], train.classes), "final_train_loss": last_loss.get(u.name)}
    return results, examples


def _probe_step(probe, optim, feats: torch.Tensor, label: torch.Tensor) -> float | None:
    """One NAdam step of a linear probe on (B, C, h, w) features; labels are resized to the
    logits (nearest). None when the batch has no labelled pixel there."""
    logits = probe(feats)
    target = label
    if logits.shape[-2:] != label.shape[-2:]:
        target = F.interpolate(label[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
    if not (target >= 0).any():
        return None
    loss = F.cross_entropy(logits, target, ignore_index=-1)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return float(loss.detach())


def _predict(probe, feats: torch.Tensor, size) -> torch.Tensor:
    """The probe's class per pixel, resized to the label's ``size`` (nearest)."""
    pred = probe(feats).argmax(1, keepdim=True).float()
    if pred.shape[-2:] != size:
        pred = F.interpolate(pred, size=size, mode="nearest")
    return pred[:, 0].long()


def _example(x: torch.Tensor, label: torch.Tensor, preds: dict, size: int) -> tuple:
    """(image as uint8 HWC at ``size``, label, {name: prediction}) for the pictures."""
    image = (resize_square(x, size)[0].cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return image, label.cpu().numpy(), {k: v.numpy() for k, v in preds.items()}
