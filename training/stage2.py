"""Stage 2: live self-distillation from an EMA teacher on high-resolution crops.

A recipe for the shared loop (training/loop.py). Per step: one student size s; the VFM runs
live on the HR image resized to s (student) and on two s x s crops of the HR image (teacher).
The teacher's crop output is mask-refined with the crop's masks, then resampled onto the
student pixels that the crop covers, and the affinity loss (Gram form, never N x N) compares
the two.

Released recipe (the authors' train_loftup_stage2.py) adds: FeatUp reconstruction of the
student's output on 2 jitters of its input (Gaussian NLL with a learned uncertainty, clamped at
>= 0; the jittered image is resized back to s so DINOv2 sees a multiple of its patch: the
released code feeds it the jittered size, which DINOv2 refuses), TV 0.05 on the raw output,
AdamW's default weight decay 0.01, an EMA whose decay warms up as min(1 - (1 + k)^(-2/3), 0.99)
(ema-pytorch) with floating buffers averaged, a teacher left in train mode (BatchNorm on the crop
batch) and gradients clipped to 1e-4 for the first 10 steps. ``--recipe paper``: the affinity
term alone, a constant-decay EMA, the teacher in eval mode, no weight decay.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loftup.fields import option
from loftup.storage.errors import LoftupError
from loftup.training import distributed, loop
from loftup.training.data import normalise_float

RECIPES = loop.recipe_table(
    tv_weight=(0.05, 0.0),
    recon_jitters=(2, 2),
    weight_decay=(0.01, 0.0),
    ema_warmup=(True, False),
    teacher_train=(True, False),
)


@dataclass(kw_only=True)
class Stage2Config(loop.TrainConfig):
    init: str = option(help="Stage 1 checkpoint (RUN_DIR/stage1.safetensors).")
    geometry: int = option(896, help="Stored HR geometry to read.")
    hr: int | None = option(None, help="Resize the HR image to this size (cheaper CPU runs); default: the geometry.")
    sizes: list[int] = option(
        factory=lambda: [224, 336, 448, 518], help="Student input sizes s (multiples of the patch size).", parse="ints"
    )
    crops: int = option(2, help="Teacher crops per image.")
    alpha: float = option(0.5, help="Mask refinement of the teacher output.")
    ema_decay: float = option(0.99, help="EMA decay of the teacher (the cap of the warm-up).")
    ema_every: int = option(10, help="Update the teacher every N steps.")
    ema_warmup: bool | None = option(None, help="Warm the EMA decay up as 1 - (1 + k)^(-2/3) (ema-pytorch; released).")
    teacher_train: bool | None = option(
        None, help="Run the teacher in train mode (BatchNorm on the crop batch; released)."
    )
    border: float = option(0.1, help="Border fraction dropped by the affinity loss.")
    affinity_weight: float = option(20.0, help="Weight of the affinity loss.")
    lr: float = option(1e-3, help="AdamW learning rate.")
    weight_decay: float | None = option(None, help="AdamW weight decay (released: 0.01, the AdamW default).")


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student; floating buffers (BatchNorm statistics)
    follow the same rule, integer ones (batch counters) are copied."""
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
    return torch.stack([student_out[k // per_image, :, c.r0 : c.r0 + n, c.c0 : c.c0 + n] for k, c in enumerate(crops)])


def load_init(path: str, backbone: str):
    """The Stage 1 model, its feature projection and its loss space (the target space and feature
    scale Stage 1 trained in; older checkpoints: the head's own space) to start from; refuses
    another backbone."""
    from loftup.training.checkpoint import load_model
    from loftup.training.heads import output_space
    from loftup.training.target_space import LossSpace

    model, meta = load_model(path, with_meta=True)
    extra = meta.get("extra") or {}
    trained_on = extra.get("backbone")
    if trained_on and trained_on != backbone:
        raise LoftupError(f"--init {path} was trained on backbone {trained_on!r}, not {backbone!r}")
    space = LossSpace(extra.get("target_space") or output_space(model), extra.get("feature_scale", 1.0))
    return model, meta.get("projection_module"), space


def ema_decay_at(k: int, cap: float) -> float:
    """ema-pytorch's warm-up: the decay of the update made when its counter reads k."""
    return min(1.0 - (1.0 + k) ** (-2.0 / 3.0), cap)


def train(cfg: Stage2Config) -> dict:
    return loop.train(cfg, Stage2, RECIPES)


class Stage2:
    name = "stage2"

    def __init__(self, cfg: Stage2Config, d):
        from loftup.pipeline.backbones import create_backbone
        from loftup.storage import open_store
        from loftup.training.data import Stage2Dataset, build_index
        from loftup.training.losses import AttentionDownsampler, ScaleNet

        self.cfg, self.d = cfg, d
        self.per_rank = distributed.per_rank_batch(cfg.batch_size, d)

        # -- models --------------------------------------------------------------------------
        student, projection, self.space = load_init(cfg.init, cfg.backbone)
        self.vfm = create_backbone(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init, device=d.device)
        self.vfm.requires_grad_(False)
        bad = [s for s in cfg.sizes if s % self.vfm.patch]
        if bad:
            raise LoftupError(f"student sizes {bad} are not multiples of {cfg.backbone}'s patch size {self.vfm.patch}")
        self.student = student.to(d.device).train()
        self.projection = projection.to(d.device) if projection is not None else None
        self.teacher = copy.deepcopy(self.student).train(cfg.teacher_train).requires_grad_(False)
        self.ddp = distributed.wrap(self.student, d)
        self.aux = torch.nn.ModuleDict()
        if cfg.recon_weight:
            self.aux["downsampler"] = AttentionDownsampler(self.student.dim, self.vfm.patch)
            if cfg.recon_uncertainty:
                self.aux["scale_net"] = ScaleNet(self.student.dim)
            self.aux.to(d.device)
        self.synced_params = list(self.aux.parameters())
        self.params = list(self.student.parameters()) + self.synced_params
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        # -- data ----------------------------------------------------------------------------
        store = open_store(cfg.store)
        self.index = build_index(store, ["images", "masks"], cfg.shards)
        self.hr = cfg.hr or cfg.geometry
        if max(cfg.sizes) > self.hr:
            raise LoftupError(f"student sizes {cfg.sizes} must not exceed the HR size {self.hr}")
        self.dataset = Stage2Dataset(
            store.url, self.index, geometry=cfg.geometry, hr=self.hr, crops=cfg.crops, max_masks=cfg.max_masks
        )
        self.steps_per_epoch = (len(self.index) // d.world) // self.per_rank
        if self.steps_per_epoch == 0:
            raise LoftupError(f"{len(self.index)} images are fewer than one global batch of {cfg.batch_size}")
        self.info = {
            "images": len(self.index),
            "images_without_masks": self.index.without_masks,
            **self.space.describe(),
        }
        self.timings = dict.fromkeys(
            ("data", "vfm_student", "vfm_crops", "teacher", "student", "loss", "backward"), 0.0
        )
        from loftup.training.memory import MemoryPlan

        self.plan = MemoryPlan()  # the loop sets the step's plan (training/memory.py)

    def batches(self, epoch: int, offset: int, step: int):
        from torch.utils.data import DataLoader

        from loftup.training.data import ShardAwareSampler, Stage2BatchSampler, collate_stage2

        cfg, d = self.cfg, self.d
        sampler = ShardAwareSampler(self.index, seed=cfg.seed, epoch=epoch, rank=d.rank, world=d.world, start=offset)
        batches = Stage2BatchSampler(sampler, self.per_rank, cfg.sizes, seed=cfg.seed * 1009 + d.rank, first_step=step)
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=cfg.workers,
            collate_fn=collate_stage2,
            pin_memory=d.device.type == "cuda",
            prefetch_factor=4 if cfg.workers else None,
            # its own seed stream: starting a loader must not draw from the global RNG,
            # or a resumed run's dropout draws would shift
            generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
        )
        return self._timed(iter(loader))

    def _timed(self, it):
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.timings["data"] += time.perf_counter() - t
            yield batch

    def lowres(self, images01: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """VFM features (projected when Stage 1 used a projection) of [0,1] images."""
        from loftup.pipeline.devices import autocast

        x = images01
        if size is not None:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with torch.no_grad(), autocast(self.d.device):
            f = self.vfm(x.clamp(0, 1)).float()
        return self.projection(f) if self.projection is not None else f

    # -- one step --------------------------------------------------------------------------
    def step(self, batch, step: int) -> dict[str, torch.Tensor]:
        """The step's loss terms, written per image (``_image_terms``, combined by ``_parts``) so
        that the plain path (the whole batch, or ``--micro-batch`` groups) and the bounded path
        (training/memory.py) compute the same thing. The teacher's BatchNorm (train mode) sees
        the crops of the same images as the student's."""
        from loftup.pipeline.devices import autocast
        from loftup.training.memory import TiledRunner, combine, run_groups
        from loftup.training.pseudo_gt import mask_refine

        cfg, dev, tm = self.cfg, self.d.device, self.timings
        prep = self._prepare(batch, step)
        parts, per = self._parts(), cfg.crops

        def crops_of(g):
            return [k for i in g for k in range(i * per, (i + 1) * per)]

        def refined_targets(t_out, ks):
            from loftup.training.data import unpack_masks

            masks = unpack_masks(batch["mask_bits"][ks].to(dev, non_blocking=True), batch["mask_size"])
            t_out = mask_refine(t_out, masks, batch["valid"][ks].to(dev), cfg.alpha)
            return teacher_targets(t_out, [prep["crops"][k] for k in ks], prep["n"])

        def plain(g):
            ks = crops_of(g)
            t = time.perf_counter()
            with torch.no_grad(), autocast(dev):
                t_out = self.teacher(prep["lr_crops"][ks], normalise_float(prep["crop_imgs"][ks])).float()
                targets = refined_targets(t_out, ks)
            del t_out
            t1 = time.perf_counter()
            with autocast(dev):
                s_out = self.ddp(prep["lr_student"][g], normalise_float(prep["img_s"][g]))
            s_out = s_out.float()
            t2 = time.perf_counter()
            per_image = [
                self._image_terms(prep, i, s_out[j : j + 1], targets=targets[j * per : (j + 1) * per])
                for j, i in enumerate(g)
            ]
            tm["teacher"] += t1 - t
            tm["student"] += t2 - t1
            tm["loss"] += time.perf_counter() - t2
            return combine(per_image, parts)

        def bounded(g):
            ks = crops_of(g)
            amp = lambda: autocast(dev)  # noqa: E731
            t = time.perf_counter()
            teacher = TiledRunner(self.teacher, self.plan.tile, amp=amp)
            with torch.no_grad():
                teacher.begin(prep["lr_crops"][ks], normalise_float(prep["crop_imgs"][ks]))
            tm["teacher"] += time.perf_counter() - t
            student = TiledRunner(self.student, self.plan.tile, amp=amp)
            student.begin(prep["lr_student"][g], normalise_float(prep["img_s"][g]))

            def targets_of(j):
                t = time.perf_counter()
                with torch.no_grad():  # crop by crop: one teacher output at a time
                    out = [
                        refined_targets(teacher.forward(c).float(), ks[c : c + 1])
                        for c in range(j * per, (j + 1) * per)
                    ]
                tm["teacher"] += time.perf_counter() - t
                return torch.cat(out)

            def image_terms(j, out, names):
                return self._image_terms(prep, g[j], out, names, targets_of=lambda: targets_of(j))

            bounds = {k: float(v[g].mean()) for k, v in prep["bounds"].items()}
            return student, image_terms, bounds

        t = time.perf_counter()
        teacher_before = tm["teacher"]
        terms = run_groups(self.plan, prep["img_s"].shape[0], parts, plain, bounded, self.ddp, self.d)
        if self.plan.path == "bounded":  # the student's forward, loss and backward run interleaved
            tm["student"] += time.perf_counter() - t - (tm["teacher"] - teacher_before)
        return terms

    def _parts(self) -> dict:
        from loftup.training.memory import Part

        cfg = self.cfg
        parts = {"affinity": Part("affinity", cfg.affinity_weight)}
        if cfg.tv_weight:
            parts["tv"] = Part("tv", cfg.tv_weight)
        if cfg.recon_weight:
            for j in range(cfg.recon_jitters):
                parts[f"recon{j}"] = Part("recon", cfg.recon_weight / cfg.recon_jitters, clamp=True)
        return parts

    def _prepare(self, batch, step: int) -> dict:
        """The live backbone on the student images and the HR crops, and (one stream per
        (seed, step)) the reconstruction's jitters and projections, for the whole batch."""
        from loftup.training.losses import apply_jitter, draw_jitter, random_projection

        cfg, dev, tm = self.cfg, self.d.device, self.timings
        t0 = time.perf_counter()
        s, crops = batch["s"], batch["crops"]
        hr_img = batch["image"].to(dev, non_blocking=True).float().div_(255)
        lr_student = self.lowres(hr_img, size=s)
        t1 = time.perf_counter()
        crop_imgs = torch.stack(
            [hr_img[k // cfg.crops, :, c.top : c.top + s, c.left : c.left + s] for k, c in enumerate(crops)]
        )
        lr_crops = self.lowres(crop_imgs)
        tm["vfm_student"] += t1 - t0
        tm["vfm_crops"] += time.perf_counter() - t1
        img_s = F.interpolate(hr_img, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        b, c = img_s.shape[0], self.student.dim
        prep = {
            "s": s,
            "crops": crops,
            "n": min(cr.n for cr in crops),
            "img_s": img_s,
            "lr_student": lr_student,
            "crop_imgs": crop_imgs,
            "lr_crops": lr_crops,
            "views": [],
            "bounds": {},
        }
        if cfg.recon_weight:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            for j in range(cfg.recon_jitters):
                jit = draw_jitter(gen, cfg.max_pad, cfg.max_zoom)
                lr_jit = self.space(self.lowres(apply_jitter(img_s, jit, s)))
                proj = random_projection(b, c, min(cfg.proj_dim, c), generator=gen, unit=cfg.proj_unit, device=dev)
                base = ((cfg.seed * 1_000_003 + step) * 131 + self.d.rank) * 64 + j
                prep["views"].append(
                    {"jit": jit, "lr": lr_jit, "proj": proj, "seeds": [base * 4096 + i for i in range(b)]}
                )
                bound = torch.zeros(b, device=dev)
                if "scale_net" in self.aux:  # err^2 / (2 s^2) >= 0: the NLL is at least mean(log s)
                    with torch.no_grad():
                        bound = self.aux["scale_net"](lr_jit).log().flatten(1).mean(1)
                prep["bounds"][f"recon{j}"] = bound
        return prep

    def _image_terms(self, prep, i: int, pred, names=None, targets=None, targets_of=None) -> dict:
        """Image i's loss values from its student output ``pred`` (1, C, s, s): the affinity of its
        crops' regions to the teacher's ``targets`` (or ``targets_of()``), TV, reconstruction."""
        from torch.utils.checkpoint import checkpoint

        from loftup.training.losses import affinity_loss, apply_jitter, reconstruction_nll, total_variation

        cfg, per, n, s = self.cfg, self.cfg.crops, prep["n"], prep["s"]
        bounded = self.plan.path == "bounded"
        values = {}
        if names is None or "affinity" in names:
            crops = prep["crops"][i * per : (i + 1) * per]
            region = torch.stack([pred[0, :, c.r0 : c.r0 + n, c.c0 : c.c0 + n] for c in crops])
            target = targets if targets is not None else targets_of()
            values["affinity"] = affinity_loss(region, target, border=cfg.border)
        pred = self.space.output(pred)  # the affinity is scale-free; TV and reconstruction are not
        if cfg.tv_weight and (names is None or "tv" in names):
            values["tv"] = total_variation(pred)
        for j, view in enumerate(prep["views"]):
            if names is not None and f"recon{j}" not in names:
                continue
            lr = view["lr"][i : i + 1]

            def recon(p, view=view, lr=lr):
                down = self.aux["downsampler"](
                    apply_jitter(p, view["jit"], s),
                    lr.shape[-2:],
                    seeds=view["seeds"][i : i + 1],
                    rows_per_chunk=2 if bounded else 0,
                )
                scales = self.aux["scale_net"](lr) if "scale_net" in self.aux else None
                return reconstruction_nll(down, lr, view["proj"][i : i + 1], scales)

            # bounded: keep only the prediction; the view is recomputed in backward
            values[f"recon{j}"] = checkpoint(recon, pred, use_reentrant=False) if bounded else recon(pred)
        return values

    @property
    def memory_side(self) -> int:
        return max(self.cfg.sizes)

    def memory_estimates(self, batch: int, tile: int) -> dict:
        """Bytes of a step of ``batch`` images at the largest student size, on each path."""
        from loftup.training.memory import estimate_stage2, model_dims

        cfg = self.cfg
        return estimate_stage2(
            batch=batch,
            s=max(cfg.sizes),
            hr=self.hr,
            crops=cfg.crops,
            jitters=cfg.recon_jitters if cfg.recon_weight else 0,
            max_masks=cfg.max_masks,
            tile=tile,
            params=sum(p.numel() for p in self.params),
            vfm_dim=self.vfm.dim,
            patch=self.vfm.patch,
            dims=model_dims(self.student),
        )

    def after_step(self, step: int) -> None:
        """The teacher follows the student (``step`` optimizer steps done)."""
        cfg = self.cfg
        if cfg.ema_warmup:
            k = step - 1  # ema-pytorch's counter at this update
            if k % cfg.ema_every:
                return
            if k == 0:
                ema_update(self.teacher, self.student, 0.0)  # ema-pytorch copies the student on its first update
            else:
                ema_update(self.teacher, self.student, ema_decay_at(k, cfg.ema_decay))
        elif step % cfg.ema_every == 0:
            ema_update(self.teacher, self.student, cfg.ema_decay)

    # -- state and export ------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "aux": self.aux.state_dict(),
        }

    def load_state(self, state: dict) -> None:
        self.student.load_state_dict(state["model"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.aux.load_state_dict(state["aux"])

    def export(self, run, step: int) -> str:
        from loftup.training.checkpoint import save_model

        cfg, d = self.cfg, self.d
        if d.enabled:
            distributed.broadcast_buffers(self.student)
            distributed.broadcast_buffers(self.teacher)
            distributed.write_weights_digest(self.student, run.path, d)
        self.info["timings"] = dict(self.timings)
        path = run.path / "stage2.safetensors"
        if d.master:
            extra = {
                "stage": 2,
                "backbone": cfg.backbone,
                "steps": step,
                "sizes": cfg.sizes,
                "alpha": cfg.alpha,
                "recipe": cfg.recipe,
                **self.space.describe(),
            }
            save_model(self.student, path, extra=extra, projection=self.projection)
            save_model(self.teacher, run.path / "stage2_teacher.safetensors", extra=extra, projection=self.projection)
        return str(path)
