"""Stage 1: train LoftUp on mask-refined bicubic pseudo-GT built on the fly from the stores.

A recipe for the shared loop (training/loop.py): build (data, projection, model, the
reconstruction parts, NAdam), step (the loss terms of one batch), state, export. Runs as one
process (CPU or one GPU) or under torchrun (DDP; each rank walks its own block of shards).

Released recipe (the authors' train_loftup_stage1.py), per step:
  mse   = mean((P pred - P target)^2), P a fresh Gaussian (B, C, 64) with unit-norm columns,
          target = the pseudo-GT (Eq. 1);
  recon = FeatUp multi-view reconstruction: for 4 jitters, the jittered prediction through the
          attention downsampler against the backbone's features of the jittered image, in a
          fresh projection, as a Gaussian NLL with a learned uncertainty, clamped at >= 0;
  tv    = 0.001 * FeatUp TV of |P jitter_0(pred)|^2;
  gradients clipped to norm 1e-4 for the first 10 steps only.
``--recipe paper`` keeps the main term alone (Eq. 2, projection entries N(0, 1/64)).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loftup.fields import option
from loftup.storage.errors import LoftupError
from loftup.training import distributed, loop
from loftup.training.target_space import LossSpace, feature_rms

RECIPES = loop.recipe_table(tv_weight=(0.001, 0.0), recon_jitters=(4, 4))
TARGETS = ("mask-bicubic", "bicubic", "implicit")


@dataclass(kw_only=True)
class Stage1Config(loop.TrainConfig):
    res: int = option(224, help="Backbone input size of the stored features.")
    geometry: int = option(224, help="Stored image/mask geometry to read.")
    size: int = option(224, help="Prediction and pseudo-GT size (56 or 112 for cheap CPU runs).")
    target: str = option(
        "mask-bicubic",
        help="Pseudo-GT: mask-bicubic (Eq. 1), bicubic (no masks) or implicit (the stored "
        "per-image-optimised maps of `loftup-pipeline implicit`).",
    )
    alpha: float = option(0.8, help="Mask refinement strength (Eq. 1).")
    pca_dim: int | None = option(None, help="Upsample a PCA of the features with this many channels (CPU runs).")
    lr: float = option(1e-4, help="NAdam learning rate.")
    weight_decay: float = option(0.0, help="NAdam weight decay (released: 0).")
    hue_jitter: float = option(
        0.0,
        help="Rotate the guidance image's hue by up to +/- N degrees per image and step (0 = off, as released). The "
        "features and the target stay the original image's, so a colour cannot stand in for what the features say.",
    )
    bn_recalibrate: int = option(
        0, help="Recompute BatchNorm statistics of the exported weights over N batches (0 = off)."
    )
    consistency_weight: float = option(
        0.0,
        help="Weight of the pooled-consistency term: mean squared error between the prediction average-pooled "
        "onto the feature grid and the low-res features, in the loss space (FeatUp's reconstruction with a fixed "
        "average-pooling downsampler; no backbone pass). It ties each cell's mean output to the backbone's vector "
        "(off by default: at weight 1 it buys retention at S with the convex head's boundaries, docs/results.md).",
    )
    head: str = option(
        "loftup",
        help="Output head: loftup (the released one) or convex (each pixel a convex combination of the raw "
        "low-res feature vectors; training/heads.py).",
    )
    target_space: str | None = option(
        None,
        help="Space of the targets and losses: layer_norm or raw (default: the head's own output space, "
        "layer_norm for loftup, raw for convex; the released scripts use raw tokens).",
    )
    feature_norm: bool = option(
        True,
        help="In the raw space, divide targets and predictions by the training features' RMS (one constant), so "
        "the loss weights see the layer-normalised space's scale; --no-feature-norm keeps the raw scale.",
    )
    model: dict = option(factory=dict, help="Extra LoftUp constructor arguments.", cli=False)


def stage1_target(kind: str, lr_feats: torch.Tensor, masks, valid, size: int, alpha: float) -> torch.Tensor:
    """What the student learns to output from (B,C,h,w) features already in the target space."""
    from loftup.training.pseudo_gt import bicubic_upsample, pseudo_gt

    if kind == "mask-bicubic":
        return pseudo_gt(lr_feats, masks, valid, size, alpha=alpha)
    if kind == "bicubic":
        return bicubic_upsample(lr_feats, size)
    raise LoftupError(f"unknown Stage 1 target {kind!r}; choose from {', '.join(TARGETS)}")


def train(cfg: Stage1Config) -> dict:
    return loop.train(cfg, Stage1, RECIPES)


class Stage1:
    name = "stage1"

    def __init__(self, cfg: Stage1Config, d):
        from loftup.storage import open_store
        from loftup.storage.layout import job_key
        from loftup.training.data import Stage1Dataset, build_index, check_features
        from loftup.training.losses import AttentionDownsampler, ScaleNet
        from loftup.training.model import LoftUp

        if cfg.target not in TARGETS:
            raise LoftupError(f"unknown Stage 1 target {cfg.target!r}; choose from {', '.join(TARGETS)}")
        self.cfg, self.d = cfg, d
        self.per_rank = distributed.per_rank_batch(cfg.batch_size, d)

        # -- data --------------------------------------------------------------------------
        store = open_store(cfg.store)
        check_features(store, cfg.backbone, cfg.res)
        fs = store.features(cfg.backbone, cfg.res)
        self.index = build_index(store, ["images", "masks", job_key("features", cfg.backbone, cfg.res)], cfg.shards)
        self.implicit = None
        if cfg.target == "implicit":
            from loftup.training.implicit_targets import ImplicitTargets, restrict_index

            self.implicit = ImplicitTargets(store, cfg.backbone, cfg.res, d.device)
            self.index = restrict_index(self.index, self.implicit)
        self.dataset = Stage1Dataset(
            store.url,
            self.index,
            cfg.backbone,
            cfg.res,
            geometry=cfg.geometry,
            size=cfg.size,
            max_masks=cfg.max_masks,
            full_image=cfg.recon_weight > 0,
        )
        self.steps_per_epoch = (len(self.index) // d.world) // self.per_rank
        if self.steps_per_epoch == 0:
            raise LoftupError(f"{len(self.index)} images are fewer than one global batch of {cfg.batch_size}")

        # -- model -------------------------------------------------------------------------
        from loftup.training.heads import output_space

        sample = sample_features(cfg, store, self.index)
        self.projection = fit_projection(cfg, sample).to(d.device) if cfg.pca_dim else None
        dim = self.projection.out_dim if self.projection is not None else fs.dim
        self.model = LoftUp(dim, **{"head": cfg.head, **cfg.model}).to(d.device).train()
        space = cfg.target_space or output_space(self.model)
        scale = 1.0
        if space == "raw" and cfg.feature_norm:
            scale = feature_rms(self.projection(sample) if self.projection is not None else sample)
        self.space = LossSpace(space, scale)
        self.ddp = distributed.wrap(self.model, d)
        self.aux = torch.nn.ModuleDict()
        self.backbone = None
        if cfg.recon_weight:
            from loftup.pipeline.backbones import create_backbone

            self.backbone = create_backbone(
                cfg.backbone, weights=cfg.weights, random_init=cfg.random_init, device=d.device
            )
            self.backbone.requires_grad_(False)
            h = int(fs.get(int(self.index.image_ids[0])).shape[-2])  # the backbone's grid at res
            if cfg.size < h:
                raise LoftupError(
                    f"--size {cfg.size} is below the feature grid {h}: nothing to downsample for the reconstruction"
                )
            self.aux["downsampler"] = AttentionDownsampler(dim, max(1, round(cfg.size / h)))
            if cfg.recon_uncertainty:
                self.aux["scale_net"] = ScaleNet(dim)
            self.aux.to(d.device)
        self.synced_params = list(self.aux.parameters())
        self.params = list(self.model.parameters()) + self.synced_params
        self.optimizer = torch.optim.NAdam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.info = {
            "dim": dim,
            "images": len(self.index),
            "images_without_masks": self.index.without_masks,
            **self.space.describe(),
        }
        from loftup.training.memory import MemoryPlan

        self.plan = MemoryPlan()  # the loop sets the step's plan (training/memory.py)

    # -- data ------------------------------------------------------------------------------
    def loader(self, epoch: int, offset: int):
        from torch.utils.data import DataLoader

        from loftup.training.data import ShardAwareSampler, collate

        cfg, d = self.cfg, self.d
        sampler = ShardAwareSampler(self.index, seed=cfg.seed, epoch=epoch, rank=d.rank, world=d.world, start=offset)
        return DataLoader(
            self.dataset,
            batch_size=self.per_rank,
            sampler=sampler,
            num_workers=cfg.workers,
            collate_fn=collate,
            drop_last=True,
            pin_memory=d.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if cfg.workers else None,
            # its own seed stream: starting a loader must not draw from the global RNG,
            # or a resumed run's dropout draws would shift
            generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
        )

    def batches(self, epoch: int, offset: int, step: int):
        return iter(self.loader(epoch, offset))

    def inputs(self, batch, step: int | None = None):
        """(features in the model's input space, ImageNet-normalised guidance image); with a
        training ``step``, the image gets that step's augmentation."""
        from loftup.training.data import hue_rotate, normalise_float

        feats = batch["feats"].to(self.d.device, non_blocking=True).float()
        image = batch["image"].to(self.d.device, non_blocking=True).float().div_(255)
        if step is not None and self.cfg.hue_jitter:
            # Its own stream, so the projections and jitters of the step draw what they always did.
            gen = torch.Generator().manual_seed(self.cfg.seed * 2_000_029 + step)
            image = hue_rotate(image, self.cfg.hue_jitter, gen)
        image = normalise_float(image)
        return (self.projection(feats) if self.projection is not None else feats), image

    def lowres(self, images01: torch.Tensor) -> torch.Tensor:
        """The backbone's features of [0, 1] images, in the loss space."""
        with torch.no_grad():
            f = self.backbone(images01.clamp(0, 1)).float()
            return self.space(self.projection(f) if self.projection is not None else f)

    # -- one step --------------------------------------------------------------------------
    def step(self, batch, step: int) -> dict[str, torch.Tensor]:
        """The step's loss terms. Written per image (``_image_terms``, combined by ``_parts``) so
        that the plain path (the whole batch at once, or ``--micro-batch`` groups) and the
        bounded path (training/memory.py) compute the same thing."""
        from loftup.pipeline.devices import autocast
        from loftup.training.memory import TiledRunner, combine, run_groups

        cfg, dev = self.cfg, self.d.device
        prep = self._prepare(batch, step)
        parts = self._parts()
        size = (cfg.size, cfg.size)

        def plain(g):
            with autocast(dev):
                pred = self.ddp(prep["feats"][g], prep["image"][g], output_size=size)
            pred = pred.float()
            return combine([self._image_terms(prep, i, pred[j : j + 1]) for j, i in enumerate(g)], parts)

        def bounded(g):
            runner = TiledRunner(self.model, self.plan.tile, amp=lambda: autocast(dev))
            runner.begin(prep["feats"][g], prep["image"][g], output_size=size)
            bounds = {k: float(v[g].mean()) for k, v in prep["bounds"].items()}
            return runner, (lambda j, out, names: self._image_terms(prep, g[j], out, names)), bounds

        return run_groups(self.plan, prep["feats"].shape[0], parts, plain, bounded, self.ddp, self.d)

    @property
    def memory_side(self) -> int:
        return self.cfg.size

    def memory_estimates(self, batch: int, tile: int) -> dict:
        """Bytes of a step of ``batch`` images on each path (training/memory.py)."""
        from loftup.training.memory import estimate_stage1, model_dims

        cfg = self.cfg
        return estimate_stage1(
            batch=batch,
            size=cfg.size,
            jitters=cfg.recon_jitters if cfg.recon_weight else 0,
            max_masks=cfg.max_masks,
            mask_side=cfg.geometry,
            tile=tile,
            params=sum(p.numel() for p in self.params),
            dims=model_dims(self.model),
        )

    def _parts(self) -> dict:
        from loftup.training.memory import Part

        cfg = self.cfg
        parts = {}
        if cfg.tv_weight:
            parts["tv"] = Part("tv", cfg.tv_weight)
        if cfg.recon_weight:
            for j in range(cfg.recon_jitters):
                parts[f"recon{j}"] = Part("recon", cfg.recon_weight / cfg.recon_jitters, clamp=True)
        if cfg.consistency_weight:
            parts["consistency"] = Part("consistency", cfg.consistency_weight)
        parts["mse"] = Part("mse")
        return parts

    def _prepare(self, batch, step: int) -> dict:
        """What every image's loss needs, drawn for the whole batch in the released order: the
        inputs, masks, and (from one stream per (seed, step), so a resumed run draws the same)
        the jitters and random projections; the backbone's features of the jittered views."""
        from loftup.training.data import batch_masks
        from loftup.training.losses import apply_jitter, draw_jitter, random_projection

        cfg, dev = self.cfg, self.d.device
        feats, image = self.inputs(batch, step)
        masks, valid = batch_masks(batch, dev)
        b, c = feats.shape[0], self.model.dim
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)

        def fresh_projection():
            return random_projection(b, c, min(cfg.proj_dim, c), generator=gen, unit=cfg.proj_unit, device=dev)

        prep = {"feats": feats, "image": image, "masks": masks, "valid": valid, "ids": batch["image_id"], "bounds": {}}
        views = []
        if cfg.recon_weight:
            full = batch["image_full"].to(dev).float().div_(255)
            if full.shape[-1] != cfg.res:
                full = F.interpolate(
                    full, size=(cfg.res, cfg.res), mode="bilinear", antialias=True, align_corners=False
                )
            for j in range(cfg.recon_jitters):
                jit = draw_jitter(gen, cfg.max_pad, cfg.max_zoom)
                lr_jit = self.lowres(apply_jitter(full, jit, cfg.res))
                base = ((cfg.seed * 1_000_003 + step) * 131 + self.d.rank) * 64 + j
                views.append(
                    {"jit": jit, "lr": lr_jit, "proj": fresh_projection(), "seeds": [base * 4096 + i for i in range(b)]}
                )
                bound = torch.zeros(b, device=dev)
                if "scale_net" in self.aux:  # err^2 / (2 s^2) >= 0: the NLL is at least mean(log s)
                    with torch.no_grad():
                        bound = self.aux["scale_net"](lr_jit).log().flatten(1).mean(1)
                prep["bounds"][f"recon{j}"] = bound
        elif cfg.tv_weight:
            prep["proj_tv"] = fresh_projection()
        prep["views"] = views
        prep["proj_mse"] = fresh_projection()
        return prep

    def _image_terms(self, prep: dict, i: int, pred: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
        """Image i's loss values from its prediction ``pred`` (1, C, size, size); ``names``: only these."""
        from torch.utils.checkpoint import checkpoint

        from loftup.training.losses import (
            apply_jitter,
            pooled_consistency,
            project,
            projected_mse,
            reconstruction_nll,
            total_variation,
        )

        cfg = self.cfg
        bounded = self.plan.path == "bounded"
        pred = self.space.output(pred)
        values = {}
        for j, view in enumerate(prep["views"]):
            tv = j == 0 and "tv" in self._parts() and (names is None or "tv" in names)
            if not (tv or names is None or f"recon{j}" in names):
                continue
            lr = view["lr"][i : i + 1]

            def view_terms(p, view=view, lr=lr, tv=tv):
                hr = apply_jitter(p, view["jit"], cfg.res)
                down = self.aux["downsampler"](
                    hr, lr.shape[-2:], seeds=view["seeds"][i : i + 1], rows_per_chunk=2 if bounded else 0
                )
                scales = self.aux["scale_net"](lr) if "scale_net" in self.aux else None
                nll = reconstruction_nll(down, lr, view["proj"][i : i + 1], scales)
                if not tv:
                    return nll, None
                return nll, total_variation(project(hr, view["proj"][i : i + 1]).square().sum(1, keepdim=True))

            # bounded: keep only the prediction; the view is recomputed in backward
            nll, tv_value = checkpoint(view_terms, pred, use_reentrant=False) if bounded else view_terms(pred)
            values[f"recon{j}"] = nll
            if tv_value is not None:
                values["tv"] = tv_value
        if "proj_tv" in prep and (names is None or "tv" in names):
            proj = prep["proj_tv"][i : i + 1]
            values["tv"] = total_variation(project(pred, proj).square().sum(1, keepdim=True))
        if "consistency" in self._parts() and (names is None or "consistency" in names):
            values["consistency"] = pooled_consistency(pred, self.space(prep["feats"][i : i + 1]))
        if names is None or "mse" in names:
            values["mse"] = projected_mse(pred, self._target(prep, i), prep["proj_mse"][i : i + 1])
        return values

    @torch.no_grad()
    def _target(self, prep: dict, i: int) -> torch.Tensor:
        cfg = self.cfg
        if self.implicit is not None:
            return self.space.output(
                self.implicit(prep["ids"][i : i + 1].tolist(), cfg.size, self.projection, self.space.space)
            )
        feats = self.space(prep["feats"][i : i + 1])
        return stage1_target(cfg.target, feats, prep["masks"][i : i + 1], prep["valid"][i : i + 1], cfg.size, cfg.alpha)

    def after_step(self, step: int) -> None:
        pass

    # -- state and export ------------------------------------------------------------------
    def state(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "aux": self.aux.state_dict(),
        }
        if self.projection is not None:
            state["projection"] = self.projection.state_dict()
        return state

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.aux.load_state_dict(state["aux"])
        if self.projection is not None:
            self.projection.load_state_dict(state["projection"])

    def export(self, run, step: int) -> str:
        from loftup.training.checkpoint import save_model

        cfg, d = self.cfg, self.d
        if d.enabled:
            distributed.broadcast_buffers(self.model)
        out = self.model
        if cfg.bn_recalibrate:
            # On a copy: last.pt keeps the training state, so a resumed run stays exact.
            out = copy.deepcopy(self.model)
            n = recalibrate_batchnorm(
                out, (self.inputs(b) for b in self.loader(0, 0)), cfg.bn_recalibrate, (cfg.size, cfg.size)
            )
            run.log({"step": step, "bn_recalibrated_batches": n})
            if d.enabled:
                distributed.broadcast_buffers(out)
        if d.enabled:
            distributed.write_weights_digest(out, run.path, d)
        path = run.path / "stage1.safetensors"
        if d.master:
            save_model(
                out,
                path,
                projection=self.projection,
                extra={
                    "stage": 1,
                    "backbone": cfg.backbone,
                    "res": cfg.res,
                    "size": cfg.size,
                    "alpha": cfg.alpha,
                    "target": cfg.target,
                    "recipe": cfg.recipe,
                    "head": cfg.head,
                    "consistency_weight": cfg.consistency_weight,
                    **self.space.describe(),
                    "steps": step,
                    "bn_recalibrate": cfg.bn_recalibrate,
                },
            )
        return str(path)


def sample_features(cfg, store, index, n: int = 256) -> torch.Tensor:
    """The stored features of the first ``n`` training images: what the PCA and the raw space's
    feature scale are fitted on."""
    fs = store.features(cfg.backbone, cfg.res)
    return torch.from_numpy(fs.get_many(index.image_ids[:n])).float()


def fit_projection(cfg, sample: torch.Tensor):
    from loftup.training.projection import FeatureProjection

    return FeatureProjection.fit(sample, cfg.pca_dim)


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
