"""Stage 2: live self-distillation from an EMA teacher on high-resolution crops.

Per step: one student size s; the VFM runs live on the HR image resized to s (student) and on
two s x s crops of the HR image (teacher). The teacher's crop output is mask-refined with the
crop's masks, then resampled onto the student pixels that the crop covers, and the affinity
loss (Gram form, never N x N) compares the two.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from loftup.training import distributed
from loftup.training.data import normalise_float
from loftup.training.run_dir import RunDir, seed_all, set_rng_state
from loftup.storage.errors import LoftupError


@dataclass
class Stage2Config:
    init: str
    store: str
    out: str
    backbone: str = "dinov2_vits14"
    weights: str | None = None
    random_init: bool = False
    geometry: int = 896  # stored HR geometry to read
    hr: int | None = None  # resize the HR image to this (cheaper CPU runs); None = geometry
    sizes: list[int] = field(default_factory=lambda: [224, 336, 448, 518])
    crops: int = 2
    alpha: float = 0.5
    max_masks: int = 150
    ema_decay: float = 0.99
    ema_every: int = 10
    border: float = 0.1
    affinity_weight: float = 20.0
    tv_weight: float = 0.0
    batch_size: int = 8
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    shards: list[int] | None = None
    seed: int = 0
    workers: int = 2
    checkpoint_every: int = 200
    log_every: int = 10
    device: str = "auto"
    resume: bool = False
    progress: bool = True


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student; BatchNorm statistics follow the same rule."""
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        if t.dtype.is_floating_point:
            t.mul_(decay).add_(s.detach(), alpha=1 - decay)
        else:
            t.copy_(s)


def teacher_targets(teacher_out: torch.Tensor, crops: list, n: int) -> torch.Tensor:
    """Resample each crop's teacher output (K,C,s,s) onto its n x n student region.

    Student pixel r0 + i covers crop pixels [off + i*t, off + (i+1)*t); roi_align averages the
    teacher over exactly those bins (t = hr / s is 1.7..4, so this is a downsampling)."""
    from torchvision.ops import roi_align

    boxes = torch.tensor(
        [[k, c.off_x, c.off_y, c.off_x + n * c.t, c.off_y + n * c.t] for k, c in enumerate(crops)],
        dtype=teacher_out.dtype,
        device=teacher_out.device,
    )
    ratio = max(1, int(-(-crops[0].t // 1)))
    return roi_align(teacher_out, boxes, output_size=(n, n), spatial_scale=1.0, sampling_ratio=ratio, aligned=True)


def student_regions(student_out: torch.Tensor, crops: list, per_image: int, n: int) -> torch.Tensor:
    """The n x n student pixels each crop covers, stacked in crop order (K,C,n,n)."""
    return torch.stack(
        [student_out[k // per_image, :, c.r0 : c.r0 + n, c.c0 : c.c0 + n] for k, c in enumerate(crops)]
    )


def load_init(path: str, backbone: str):
    """The Stage 1 model (and its feature projection) to start from; refuses another backbone."""
    from loftup.training.checkpoint import load_model

    model, meta = load_model(path, with_meta=True)
    trained_on = (meta.get("extra") or {}).get("backbone")
    if trained_on and trained_on != backbone:
        raise LoftupError(f"--init {path} was trained on backbone {trained_on!r}, not {backbone!r}")
    return model, meta.get("projection_module")


def train(cfg: Stage2Config) -> dict:
    from loftup.pipeline.backbones import create_backbone
    from loftup.pipeline.devices import autocast
    from loftup.storage import open_store
    from loftup.training.checkpoint import save_model
    from loftup.training.data import (ShardAwareSampler, Stage2BatchSampler, Stage2Dataset, batch_masks, build_index,
                                      collate_stage2)
    from loftup.training.losses import affinity_loss, total_variation
    from loftup.training.progress import TrainProgress
    from loftup.training.pseudo_gt import mask_refine
    from torch.utils.data import DataLoader

    d = distributed.setup(cfg.device)
    distributed.cpu_threads(d, cfg.workers)
    run = RunDir(cfg.out, master=d.master)
    per_rank = distributed.per_rank_batch(cfg.batch_size, d)
    seed_all(cfg.seed)

    # -- models ----------------------------------------------------------------------------
    student, projection = load_init(cfg.init, cfg.backbone)
    vfm = create_backbone(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init, device=d.device)
    vfm.requires_grad_(False)
    bad = [s for s in cfg.sizes if s % vfm.patch]
    if bad:
        raise LoftupError(f"student sizes {bad} are not multiples of {cfg.backbone}'s patch size {vfm.patch}")
    student = student.to(d.device).train()
    if projection is not None:
        projection = projection.to(d.device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # -- data ------------------------------------------------------------------------------
    store = open_store(cfg.store)
    index = build_index(store, ["images", "masks"], cfg.shards)
    hr = cfg.hr or cfg.geometry
    if min(cfg.sizes) > hr or max(cfg.sizes) > hr:
        raise LoftupError(f"student sizes {cfg.sizes} must not exceed the HR size {hr}")
    dataset = Stage2Dataset(store.url, index, geometry=cfg.geometry, hr=hr, crops=cfg.crops, max_masks=cfg.max_masks)
    steps_per_epoch = (len(index) // d.world) // per_rank
    if steps_per_epoch == 0:
        raise LoftupError(f"{len(index)} images are fewer than one global batch of {cfg.batch_size}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    step, epoch, offset = 0, 0, 0
    if cfg.resume:
        state = run.load_state()
        student.load_state_dict(state["model"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, offset = state["step"], state["epoch"], state["offset"]
        set_rng_state(state["rng"])
    run.save_config({"stage": 2, **asdict(cfg), "world_size": d.world, "images": len(index), "total_steps": total_steps})

    def loader_for(epoch, offset, first_step):
        sampler = ShardAwareSampler(index, seed=cfg.seed, epoch=epoch, rank=d.rank, world=d.world, start=offset)
        batches = Stage2BatchSampler(sampler, per_rank, cfg.sizes, seed=cfg.seed * 1009 + d.rank, first_step=first_step)
        return iter(DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate_stage2,
                               pin_memory=d.device.type == "cuda", prefetch_factor=4 if cfg.workers else None))

    ddp = distributed.wrap(student, d)

    def lowres(images_uint8_or_float, size=None):
        """VFM features (projected when Stage 1 used a projection) of [0,1] images."""
        x = images_uint8_or_float
        if size is not None:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad(), autocast(d.device):
            f = vfm(x.clamp(0, 1)).float()
        return projection(f) if projection is not None else f

    # -- loop ------------------------------------------------------------------------------
    loader = loader_for(epoch, offset, step)
    progress = TrainProgress("stage 2", total_steps, start=step, enabled=cfg.progress and d.master)
    timings = {"data": 0.0, "vfm_student": 0.0, "vfm_crops": 0.0, "teacher": 0.0, "student": 0.0, "loss": 0.0, "backward": 0.0}
    last, t_last, seen_last = {}, time.time(), 0
    while step < total_steps:
        t0 = time.perf_counter()
        try:
            batch = next(loader)
        except StopIteration:
            epoch, offset = epoch + 1, 0
            loader = loader_for(epoch, offset, step)
            batch = next(loader)
        offset += per_rank
        s, crops = batch["s"], batch["crops"]
        hr_img = batch["image"].to(d.device, non_blocking=True).float().div_(255)
        t1 = time.perf_counter()

        lr_student = lowres(hr_img, size=s)
        t2 = time.perf_counter()
        crop_imgs = torch.stack(
            [hr_img[k // cfg.crops, :, c.top : c.top + s, c.left : c.left + s] for k, c in enumerate(crops)]
        )
        lr_crops = lowres(crop_imgs)
        t3 = time.perf_counter()
        with torch.no_grad(), autocast(d.device):
            t_out = teacher(lr_crops, normalise_float(crop_imgs)).float()
            t_out = mask_refine(t_out, *batch_masks(batch, d.device), cfg.alpha)
        n = min(c.n for c in crops)
        target = teacher_targets(t_out, crops, n)
        t4 = time.perf_counter()
        with autocast(d.device):
            s_out = ddp(lr_student, normalise_float(F.interpolate(hr_img, size=(s, s), mode="bilinear", antialias=True, align_corners=False)))
        s_out = s_out.float()
        t5 = time.perf_counter()
        pred = student_regions(s_out, crops, cfg.crops, n)
        terms = {"affinity": cfg.affinity_weight * affinity_loss(pred, target, border=cfg.border)}
        if cfg.tv_weight:
            terms["tv"] = cfg.tv_weight * total_variation(s_out)
        loss = sum(terms.values())
        t6 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        optimizer.step()
        step += 1
        if step % cfg.ema_every == 0:
            ema_update(teacher, student, cfg.ema_decay)
        t7 = time.perf_counter()
        for k, v in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
            timings[k] += v

        seen_last += cfg.batch_size
        if step % cfg.log_every == 0 or step == total_steps:
            now = time.time()
            last = {k: distributed.all_mean(v.item(), d) for k, v in terms.items()}
            last |= {"step": step, "epoch": epoch, "s": s, "loss": sum(last.values()), "lr": optimizer.param_groups[0]["lr"],
                     "grad_norm": float(grad_norm), "samples_per_s": seen_last / max(now - t_last, 1e-9)}
            run.log(last)
            t_last, seen_last = now, 0
        progress.update(step, loss=loss.item())
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            _checkpoint(run, student, teacher, optimizer, step, epoch, offset)
    progress.close()

    if d.enabled:
        distributed.broadcast_buffers(student)
        distributed.broadcast_buffers(teacher)
        distributed.write_weights_digest(student, run.path, d)
    if d.master:
        extra = {"stage": 2, "backbone": cfg.backbone, "steps": step, "sizes": cfg.sizes, "alpha": cfg.alpha}
        save_model(student, run.path / "stage2.safetensors", extra=extra, projection=projection)
        save_model(teacher, run.path / "stage2_teacher.safetensors", extra=extra, projection=projection)
        _checkpoint(run, student, teacher, optimizer, step, epoch, offset)
    run.close()
    distributed.cleanup(d)
    return {"steps": step, "images": len(index), "last": last, "timings": timings,
            "checkpoint": str(run.path / "stage2.safetensors")}


def _checkpoint(run, student, teacher, optimizer, step, epoch, offset):
    run.save_state({"model": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "epoch": epoch, "offset": offset})
