"""Stage 1: train LoftUp on mask-refined bicubic pseudo-GT built on the fly from the stores.

Read top to bottom: config -> data -> model -> optimizer -> loop -> checkpoint. Runs as one
process (CPU or one GPU) or under torchrun (DDP; each rank walks its own block of shards).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from loftup.storage.errors import LoftupError
from loftup.training import distributed
from loftup.training.run_dir import RunDir, seed_all, set_rng_state
from loftup.training.target_space import layer_norm_target


@dataclass
class Stage1Config:
    store: str
    out: str
    backbone: str = "dinov2_vits14"
    res: int = 224  # backbone input size of the stored features
    geometry: int = 224  # stored image/mask geometry to read
    size: int = 224  # prediction and pseudo-GT size (smaller = cheaper CPU runs)
    alpha: float = 0.8
    max_masks: int = 150
    pca_dim: int | None = None  # upsample a PCA of the features (CPU runs); None = all channels
    batch_size: int = 8  # global, across ranks
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-4
    lr_schedule: str = "constant"  # released recipe; "cosine" decays to 0 (short runs end on settled weights)
    warmup_steps: int = 0
    decay_steps: int | None = None  # cosine horizon; None = this run's total steps
    bn_recalibrate: int = 0  # batches for precise BatchNorm statistics of the exported weights (0 = off)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    proj_dim: int = 64  # dims of the fresh random projection of the MSE
    tv_weight: float = 0.001
    recon_weight: float = 0.0  # FeatUp multi-view reconstruction (needs the backbone live)
    recon_jitters: int = 4
    weights: str | None = None  # backbone weights, only for the reconstruction term
    random_init: bool = False
    shards: list[int] | None = None
    seed: int = 0
    workers: int = 2
    checkpoint_every: int = 200
    log_every: int = 10
    device: str = "auto"
    resume: bool = False
    progress: bool = True
    model: dict = field(default_factory=dict)  # extra LoftUp constructor arguments


def learning_rate(cfg: Stage1Config, step: int, total_steps: int) -> float:
    """The rate for optimizer step ``step`` (0-based): a pure function of the step, so a resumed
    run continues the schedule exactly."""
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise LoftupError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, (cfg.decay_steps or total_steps) - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


def build_loader(cfg, dataset, index, d, epoch: int, offset: int):
    from torch.utils.data import DataLoader

    from loftup.training.data import ShardAwareSampler, collate

    per_rank = cfg.batch_size // d.world
    sampler = ShardAwareSampler(index, seed=cfg.seed, epoch=epoch, rank=d.rank, world=d.world, start=offset)
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=d.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.workers else None,
    )


def fit_projection(cfg, store, index, n: int = 256):
    from loftup.training.projection import FeatureProjection

    fs = store.features(cfg.backbone, cfg.res)
    ids = index.image_ids[:n]
    feats = torch.from_numpy(fs.get_many(ids)).float()
    return FeatureProjection.fit(feats, cfg.pca_dim)


def train(cfg: Stage1Config) -> dict:
    from loftup.pipeline.devices import autocast
    from loftup.storage import open_store
    from loftup.training.checkpoint import save_model
    from loftup.training.data import Stage1Dataset, batch_masks, build_index, check_features
    from loftup.training.losses import projected_mse, total_variation
    from loftup.training.model import LoftUp
    from loftup.training.pseudo_gt import pseudo_gt
    from loftup.training.progress import TrainProgress

    d = distributed.setup(cfg.device)
    distributed.cpu_threads(d, cfg.workers)
    run = RunDir(cfg.out, master=d.master)
    per_rank = distributed.per_rank_batch(cfg.batch_size, d)
    seed_all(cfg.seed)

    # -- data ------------------------------------------------------------------------------
    store = open_store(cfg.store)
    check_features(store, cfg.backbone, cfg.res)
    index = build_index(store, ["images", "masks", f"features/{cfg.backbone}@{cfg.res}"], cfg.shards)
    dataset = Stage1Dataset(store.url, index, cfg.backbone, cfg.res, geometry=cfg.geometry, size=cfg.size, max_masks=cfg.max_masks)
    steps_per_epoch = (len(index) // d.world) // per_rank
    if steps_per_epoch == 0:
        raise LoftupError(f"{len(index)} images are fewer than one global batch of {cfg.batch_size}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    learning_rate(cfg, 0, total_steps)  # a bad schedule fails before any work

    # -- model -----------------------------------------------------------------------------
    projection = fit_projection(cfg, store, index).to(d.device) if cfg.pca_dim else None
    dim = projection.out_dim if projection is not None else store.features(cfg.backbone, cfg.res).dim
    model = LoftUp(dim, **cfg.model).to(d.device)
    recon = None
    if cfg.recon_weight > 0:
        recon = _build_reconstruction(cfg, dim, d.device, projection)
    params = list(model.parameters()) + (list(recon.parameters()) if recon is not None else [])
    optimizer = torch.optim.NAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    step, epoch, offset = 0, 0, 0
    if cfg.resume:
        state = run.load_state()  # every rank reads the same file; the data order is derived, not stored
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if recon is not None and "recon" in state:
            recon.load_state_dict(state["recon"])
        if projection is not None:
            projection.load_state_dict(state["projection"])
        step, epoch, offset = state["step"], state["epoch"], state["offset"]
        set_rng_state(state["rng"])
    run.save_config({"stage": 1, **asdict(cfg), "world_size": d.world, "dim": dim, "images": len(index), "total_steps": total_steps})

    ddp_model = distributed.wrap(model, d)

    # -- loop ------------------------------------------------------------------------------
    loader = iter(build_loader(cfg, dataset, index, d, epoch, offset))
    progress = TrainProgress("stage 1", total_steps, start=step, enabled=cfg.progress and d.master)
    t_last, seen_last = time.time(), 0
    last = {}
    model.train()
    while step < total_steps:
        try:
            batch = next(loader)
        except StopIteration:
            epoch, offset = epoch + 1, 0
            loader = iter(build_loader(cfg, dataset, index, d, epoch, offset))
            batch = next(loader)
        offset += per_rank
        feats, image = _inputs(batch, d.device, projection)
        masks, valid = batch_masks(batch, d.device)
        with torch.no_grad():
            target = pseudo_gt(layer_norm_target(feats), masks, valid, cfg.size, alpha=cfg.alpha)
        with autocast(d.device):
            pred = ddp_model(feats, image, output_size=(cfg.size, cfg.size))
        pred = pred.float()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        terms = {"mse": projected_mse(pred, target, dim=min(cfg.proj_dim, dim), generator=gen)}
        if cfg.tv_weight:
            terms["tv"] = cfg.tv_weight * total_variation(pred)
        if recon is not None:
            terms["recon"] = cfg.recon_weight * recon(model, feats, image, pred, step=step)
        loss = sum(terms.values())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, total_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        optimizer.step()
        step += 1

        seen_last += cfg.batch_size
        if step % cfg.log_every == 0 or step == total_steps:
            now = time.time()
            last = {k: distributed.all_mean(v.item(), d) for k, v in terms.items()}
            last |= {"step": step, "epoch": epoch, "loss": sum(last.values()), "lr": optimizer.param_groups[0]["lr"],
                     "grad_norm": float(grad_norm), "samples_per_s": seen_last / max(now - t_last, 1e-9)}
            run.log(last)
            t_last, seen_last = now, 0
        progress.update(step, loss=loss.item())
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            _checkpoint(run, model, optimizer, recon, projection, step, epoch, offset)
    progress.close()

    if d.enabled:
        distributed.broadcast_buffers(model)
    if d.master:
        _checkpoint(run, model, optimizer, recon, projection, step, epoch, offset)
    export = model
    if cfg.bn_recalibrate:
        # On a copy: last.pt keeps the training state, so a resumed run stays exact.
        export = copy.deepcopy(model)
        batches = build_loader(cfg, dataset, index, d, epoch=0, offset=0)
        n = recalibrate_batchnorm(export, (_inputs(b, d.device, projection) for b in batches), cfg.bn_recalibrate,
                                  (cfg.size, cfg.size))
        run.log({"step": step, "bn_recalibrated_batches": n})
        if d.enabled:
            distributed.broadcast_buffers(export)
    if d.enabled:
        distributed.write_weights_digest(export, run.path, d)
    if d.master:
        final = run.path / "stage1.safetensors"
        save_model(export, final, extra={"stage": 1, "backbone": cfg.backbone, "res": cfg.res, "size": cfg.size,
                                         "alpha": cfg.alpha, "steps": step, "bn_recalibrate": cfg.bn_recalibrate},
                   projection=projection)
    run.close()
    distributed.cleanup(d)
    return {"steps": step, "epochs": epoch, "images": len(index), "last": last, "checkpoint": str(run.path / "stage1.safetensors")}


def _inputs(batch, device, projection):
    from loftup.training.data import normalise

    feats = batch["feats"].to(device, non_blocking=True).float()
    image = normalise(batch["image"].to(device, non_blocking=True))
    return (projection(feats) if projection is not None else feats), image


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches, limit: int, output_size) -> int:
    """Precise BatchNorm: set every BN layer's running statistics to their plain average over
    up to ``limit`` training batches ((feats, image) pairs), computed with the final weights.

    The running statistics a run ends with are an exponential average (momentum 0.1) over
    its last ~10 small batches, taken while the weights were still moving; at batch 4 they
    swing enough to move held-out scores between neighbouring checkpoints. Returns the
    number of batches used."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    n = 0
    try:
        for feats, image in batches:
            if n >= limit:
                break
            model(feats, image, output_size=output_size)
            n += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return n


def _checkpoint(run, model, optimizer, recon, projection, step, epoch, offset):
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "offset": offset}
    if recon is not None:
        state["recon"] = recon.state_dict()
    if projection is not None:
        state["projection"] = projection.state_dict()
    run.save_state(state)


def _build_reconstruction(cfg, dim, device, projection):
    from loftup.pipeline.backbones import create_backbone
    from loftup.training.losses import MultiViewReconstruction

    backbone = create_backbone(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init, device=device)
    backbone.requires_grad_(False)

    def backbone_fn(img_normalised):
        from loftup.training.data import IMAGENET_MEAN, IMAGENET_STD

        x = img_normalised * IMAGENET_STD.to(img_normalised.device) + IMAGENET_MEAN.to(img_normalised.device)
        with torch.no_grad():
            f = backbone(x.clamp(0, 1))
        f = projection(f) if projection is not None else f
        return layer_norm_target(f)

    return MultiViewReconstruction(dim, n_jitters=cfg.recon_jitters, kernel_size=backbone.patch, backbone_fn=backbone_fn,
                                   seed=cfg.seed).to(device)
