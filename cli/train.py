"""``loftup-train``: Stage 1, Stage 2, evaluation and inference. Thin: parse, call the library, print.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N $(which loftup-train) stage1 ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loftup.cli.common import console, run

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _ints(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    from loftup.pipeline.shards import parse_shards

    return parse_shards(text)


def _train_shards(text: Optional[str], allow_missing: bool, store: str, jobs: list[str]) -> Optional[list[int]]:
    shards = _ints(text)
    if shards is None or not allow_missing:
        return shards
    from loftup.training.data import present_shards

    present, missing = present_shards(store, shards, jobs)
    if missing:
        console.print(f"[yellow]--allow-missing: training without {len(missing)} unfinished shard(s): {missing[:20]}")
    return present


def _summary(title: str, result: dict) -> None:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("field")
    t.add_column("value", justify="right")
    for k, v in result.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        t.add_row(k, str(v))
    console.print(t)


@app.command()
def stage1(
    store: str = typer.Option(..., help="Store written by loftup-pipeline (images, masks, features)."),
    out: Path = typer.Option(..., help="Run directory: config.json, metrics.jsonl, last.pt, stage1.safetensors."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone whose stored features to upsample."),
    res: int = typer.Option(224, help="Backbone input size of the stored features."),
    geometry: int = typer.Option(224, help="Stored image/mask geometry to read."),
    size: int = typer.Option(224, help="Prediction and pseudo-GT size (112 for cheap CPU runs)."),
    alpha: float = typer.Option(0.8, help="Mask refinement strength (Eq. 1)."),
    max_masks: int = typer.Option(150, help="Masks per image, in annotation order."),
    pca_dim: Optional[int] = typer.Option(None, help="Upsample a PCA of the features with this many channels (CPU runs)."),
    batch_size: int = typer.Option(8, help="Global batch size (split across ranks)."),
    epochs: int = typer.Option(1, help="Epochs over the store."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps (overrides epochs)."),
    lr: float = typer.Option(1e-4, help="NAdam learning rate."),
    lr_schedule: str = typer.Option("constant", help="constant (released recipe) or cosine (decay to 0 over the run)."),
    warmup_steps: int = typer.Option(0, help="Linear warm-up steps before the schedule."),
    decay_steps: Optional[int] = typer.Option(None, help="Cosine horizon in steps (default: this run's steps; set it when a run will be resumed longer)."),
    bn_recalibrate: int = typer.Option(0, help="Recompute BatchNorm statistics of the exported weights over N batches (precise BN; 0 = off)."),
    weight_decay: float = typer.Option(0.0, help="Weight decay."),
    grad_clip: float = typer.Option(1.0, help="Gradient norm clip (0 = off)."),
    proj_dim: int = typer.Option(64, help="Dims of the fresh random projection in the MSE."),
    tv_weight: float = typer.Option(0.001, help="Total-variation weight (released recipe: 0.001)."),
    recon_weight: float = typer.Option(0.0, help="FeatUp multi-view reconstruction weight (runs the backbone live; released recipe: 1)."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights (only for the reconstruction term)."),
    random_init: bool = typer.Option(False, help="Random backbone for the reconstruction term (tests)."),
    shards: Optional[str] = typer.Option(None, help="Train on these shards only, e.g. '0-89'."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Train on the --shards that are finished; skip the others instead of stopping."),
    seed: int = typer.Option(0, help="Seed for init, data order and projections."),
    workers: int = typer.Option(2, help="DataLoader workers per rank."),
    checkpoint_every: int = typer.Option(200, help="Write last.pt every N steps."),
    log_every: int = typer.Option(10, help="Log metrics every N steps."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, help="Continue exactly from OUT/last.pt."),
):
    """Stage 1: mask-refined bicubic pseudo-GT built on the fly from stored features and masks."""
    from loftup.training.stage1 import Stage1Config, train

    cfg = Stage1Config(
        store=store, out=str(out), backbone=backbone, res=res, geometry=geometry, size=size, alpha=alpha, max_masks=max_masks,
        pca_dim=pca_dim, batch_size=batch_size, epochs=epochs, max_steps=max_steps, lr=lr, lr_schedule=lr_schedule,
        warmup_steps=warmup_steps, decay_steps=decay_steps, bn_recalibrate=bn_recalibrate, weight_decay=weight_decay,
        grad_clip=grad_clip, proj_dim=proj_dim, tv_weight=tv_weight, recon_weight=recon_weight, weights=weights,
        random_init=random_init, shards=_train_shards(shards, allow_missing, store, ["images", "masks", f"features/{backbone}@{res}"]), seed=seed, workers=workers, checkpoint_every=checkpoint_every,
        log_every=log_every, device=device, resume=resume,
    )
    _summary("stage 1", train(cfg))


@app.command()
def stage2(
    init: Path = typer.Option(..., help="Stage 1 checkpoint (RUN_DIR/stage1.safetensors)."),
    store: str = typer.Option(..., help="Store with images and masks at the HR geometry."),
    out: Path = typer.Option(..., help="Run directory."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone run live (must match the Stage 1 checkpoint)."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file."),
    random_init: bool = typer.Option(False, help="Random backbone weights (tests and demos)."),
    geometry: int = typer.Option(896, help="Stored HR geometry to read."),
    hr: Optional[int] = typer.Option(None, help="Resize the HR image to this size (cheaper CPU runs)."),
    sizes: str = typer.Option("224,336,448,518", help="Student input sizes s (multiples of the patch size)."),
    crops: int = typer.Option(2, help="Teacher crops per image."),
    alpha: float = typer.Option(0.5, help="Mask refinement of the teacher output."),
    max_masks: int = typer.Option(150, help="Masks per image, in annotation order."),
    ema_decay: float = typer.Option(0.99, help="EMA decay of the teacher."),
    ema_every: int = typer.Option(10, help="Update the teacher every N steps."),
    border: float = typer.Option(0.1, help="Border fraction dropped by the affinity loss."),
    affinity_weight: float = typer.Option(20.0, help="Weight of the affinity loss."),
    tv_weight: float = typer.Option(0.0, help="Total-variation weight."),
    batch_size: int = typer.Option(8, help="Global batch size."),
    epochs: int = typer.Option(1, help="Epochs."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many steps."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    weight_decay: float = typer.Option(0.0, help="Weight decay."),
    grad_clip: float = typer.Option(1.0, help="Gradient norm clip (0 = off)."),
    shards: Optional[str] = typer.Option(None, help="Train on these shards only."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Train on the --shards that are finished; skip the others instead of stopping."),
    seed: int = typer.Option(0, help="Seed."),
    workers: int = typer.Option(2, help="DataLoader workers per rank."),
    checkpoint_every: int = typer.Option(200, help="Write last.pt every N steps."),
    log_every: int = typer.Option(10, help="Log every N steps."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, help="Continue exactly from OUT/last.pt (teacher included)."),
):
    """Stage 2: self-distillation from an EMA teacher on HR crops, the VFM run live."""
    from loftup.training.stage2 import Stage2Config, train

    cfg = Stage2Config(
        init=str(init), store=store, out=str(out), backbone=backbone, weights=weights, random_init=random_init,
        geometry=geometry, hr=hr, sizes=[int(x) for x in sizes.split(",")], crops=crops, alpha=alpha, max_masks=max_masks,
        ema_decay=ema_decay, ema_every=ema_every, border=border, affinity_weight=affinity_weight, tv_weight=tv_weight,
        batch_size=batch_size, epochs=epochs, max_steps=max_steps, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip,
        shards=_train_shards(shards, allow_missing, store, ["images", "masks"]), seed=seed, workers=workers,
        checkpoint_every=checkpoint_every, log_every=log_every, device=device, resume=resume,
    )
    result = train(cfg)
    result["timings"] = {k: round(v, 2) for k, v in result["timings"].items()}
    _summary("stage 2", result)


@app.command()
def evaluate(
    store: str = typer.Option(..., help="Store with images, masks and features."),
    shards: str = typer.Option(..., help="Held-out shards to evaluate on."),
    checkpoint: list[Path] = typer.Option([], help="Checkpoints to compare (repeatable)."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone of the stored features."),
    res: int = typer.Option(224, help="Backbone input size of the stored features."),
    size: int = typer.Option(224, help="Evaluation resolution."),
    limit: Optional[int] = typer.Option(None, help="At most this many images."),
):
    """Nearest-prototype mIoU against stored instance masks: checkpoints vs bilinear/bicubic."""
    import numpy as np

    from loftup.storage import open_store
    from loftup.training.checkpoint import load_model
    from loftup.training.evaluate import evaluate_store, standard_upsamplers

    st = open_store(store)
    ids = np.concatenate([st.image_ids(s) for s in _ints(shards)])[:limit]
    rows = {}
    projection = None
    ups = standard_upsamplers()
    for ck in checkpoint:
        model, meta = load_model(ck, with_meta=True)
        projection = meta.get("projection_module")
        ups[ck.stem] = (lambda m: (lambda f, img, sz: m.eval()(f, img, output_size=sz)))(model)
    rows = evaluate_store(st, ids, backbone, res, ups, size=size, projection=projection)
    _summary(f"prototype mIoU on {len(ids)} held-out images", rows)


@app.command()
def upsample(
    image: Path = typer.Argument(..., help="Image file to upsample the features of."),
    checkpoint: Optional[Path] = typer.Option(None, help="Our checkpoint (stage1/stage2 .safetensors)."),
    official: Optional[Path] = typer.Option(None, help="An officially released LoftUp checkpoint (.pth)."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone to compute the low-res features."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file."),
    random_init: bool = typer.Option(False, help="Random backbone weights (demos)."),
    backbone_res: int = typer.Option(224, help="Backbone input size."),
    size: int = typer.Option(448, help="Output feature resolution."),
    out: Path = typer.Option(Path("upsampled"), help="Output directory."),
    fmt: str = typer.Option("safetensors", help="Feature file format: safetensors or npy."),
):
    """Upsample one image's features; writes the HR features and a PCA picture (with bilinear)."""
    from loftup.training.inference import upsample_image

    result = upsample_image(
        image, checkpoint=checkpoint, official=official, backbone=backbone, weights=weights, random_init=random_init,
        backbone_res=backbone_res, size=size, out_dir=out, fmt=fmt,
    )
    _summary("upsample", {k: str(v) for k, v in result.items()})


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
