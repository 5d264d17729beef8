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


evaluate_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="The paper's probes on the official dataset layouts, every upsampler under one protocol.")
app.add_typer(evaluate_app, name="evaluate")

_UPSAMPLER_HELP = "Baselines to run (repeatable): bilinear, bicubic, nearest, lowres."
_CHECKPOINT_HELP = "A LoftUp checkpoint (ours .safetensors, or a released .pth), named after its file (repeatable)."
_MATCH_HELP = "Also run each baseline in every checkpoint's own PCA projection (named BASELINE@CHECKPOINT)."


def _run_evaluation(task: str, protocol, upsampler, checkpoint, match_projection, target_space, device, out, **kwargs):
    from loftup.training.evaluation import build_upsamplers, evaluate
    from loftup.training.evaluation.report import markdown

    ups = build_upsamplers(list(upsampler or []), [str(c) for c in checkpoint or []], target_space=target_space,
                           match_projection=match_projection, device="cpu")
    console.print("protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.as_dict().items()))
    result = evaluate(task, ups, protocol=protocol, out=out, device=device, **kwargs)
    print(markdown(task, result))
    if out is not None:
        console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} and pictures")


@evaluate_app.command("seg")
def evaluate_seg(
    dataset: str = typer.Option(..., help="Layout: cocostuff27, cityscapes, voc or folder."),
    root: Path = typer.Option(..., help="Dataset folder in that layout."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone run live on the images."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file."),
    random_init: bool = typer.Option(False, help="Random backbone weights (tests)."),
    upsampler: list[str] = typer.Option(["bilinear"], help=_UPSAMPLER_HELP),
    checkpoint: list[Path] = typer.Option([], help=_CHECKPOINT_HELP),
    match_projection: bool = typer.Option(True, help=_MATCH_HELP),
    target_space: str = typer.Option("layer_norm", help="Space of the baselines' features: layer_norm (LoftUp's) or raw."),
    size: int = typer.Option(224, help="Resize + centre-crop size of images, labels, guidance and output."),
    backbone_res: Optional[int] = typer.Option(None, help="Backbone input size (default: --size)."),
    epochs: int = typer.Option(10, help="Probe epochs."),
    lr: float = typer.Option(1e-4, help="Probe NAdam learning rate."),
    batch_size: int = typer.Option(8, help="Probe batch size."),
    seed: int = typer.Option(0, help="Probe init and data order seed."),
    train_split: str = typer.Option("train", help="Split the probes train on."),
    split: str = typer.Option("val", help="Split scored."),
    workers: int = typer.Option(2, help="DataLoader workers."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Write results.json, results.md and pictures here."),
):
    """Linear-probe semantic segmentation (LoftUp's eval_seg protocol): mIoU and pixel accuracy."""
    from loftup.training.evaluation import SegProtocol

    protocol = SegProtocol(size=size, backbone_res=backbone_res, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    _run_evaluation("seg", protocol, upsampler, checkpoint, match_projection, target_space, device, out, dataset=dataset,
                    root=root, backbone=backbone, weights=weights, random_init=random_init, train_split=train_split,
                    split=split, workers=workers)


@evaluate_app.command("davis")
def evaluate_davis(
    root: Path = typer.Option(..., help="DAVIS 2017 folder (JPEGImages/480p, Annotations/480p, ImageSets/2017)."),
    split: str = typer.Option("val", help="ImageSets/2017/SPLIT.txt."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone run live on the frames."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file."),
    random_init: bool = typer.Option(False, help="Random backbone weights (tests)."),
    upsampler: list[str] = typer.Option(["bilinear"], help=_UPSAMPLER_HELP),
    checkpoint: list[Path] = typer.Option([], help=_CHECKPOINT_HELP),
    match_projection: bool = typer.Option(True, help=_MATCH_HELP),
    target_space: str = typer.Option("layer_norm", help="Space of the baselines' features: layer_norm (LoftUp's) or raw."),
    size: int = typer.Option(224, help="Frames resized to SIZE x SIZE; features upsampled to SIZE/2."),
    backbone_res: Optional[int] = typer.Option(None, help="Backbone input size (default: --size)."),
    context: int = typer.Option(7, help="Previous predictions used besides the first frame."),
    temperature: float = typer.Option(0.1, help="Affinity temperature."),
    radius: int = typer.Option(12, help="Spatial radius in feature cells."),
    topk: int = typer.Option(5, help="Neighbours averaged per pixel."),
    boundary_tolerance: float = typer.Option(0.008, help="F's match tolerance, a fraction of the image diagonal."),
    save_masks: bool = typer.Option(False, help="Also write every prediction as DAVIS palette PNGs under OUT/masks."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Write results.json, results.md and pictures here."),
):
    """DAVIS 2017 label propagation (LiFT/LoftUp protocol): J, F and J&F as the official toolkit."""
    from loftup.training.evaluation import DavisProtocol

    protocol = DavisProtocol(size=size, backbone_res=backbone_res, context=context, temperature=temperature,
                             radius=radius, topk=topk, boundary_tolerance=boundary_tolerance)
    _run_evaluation("davis", protocol, upsampler, checkpoint, match_projection, target_space, device, out, root=root,
                    split=split, backbone=backbone, weights=weights, random_init=random_init, save_masks=save_masks)


@evaluate_app.command("masks")
def evaluate_masks(
    store: str = typer.Option(..., help="Store with images, masks and features."),
    shards: str = typer.Option(..., help="Held-out shards to evaluate on."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone of the stored features."),
    upsampler: list[str] = typer.Option(["bilinear", "bicubic"], help=_UPSAMPLER_HELP),
    checkpoint: list[Path] = typer.Option([], help=_CHECKPOINT_HELP),
    match_projection: bool = typer.Option(True, help=_MATCH_HELP),
    target_space: str = typer.Option("layer_norm", help="Space of the baselines' features: layer_norm (LoftUp's) or raw."),
    res: int = typer.Option(224, help="Backbone input size of the stored features."),
    geometry: int = typer.Option(224, help="Stored image/mask geometry to read."),
    size: int = typer.Option(224, help="Evaluation resolution."),
    max_masks: int = typer.Option(150, help="Masks per image, in annotation order."),
    limit: Optional[int] = typer.Option(None, help="At most this many images."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Write results.json and results.md here."),
):
    """Nearest-prototype mIoU against the store's instance masks (a class-free proxy)."""
    import numpy as np

    from loftup.storage import open_store
    from loftup.training.evaluation import MasksProtocol

    st = open_store(store)
    ids = np.concatenate([st.image_ids(s) for s in _ints(shards)])[:limit]
    protocol = MasksProtocol(size=size, res=res, geometry=geometry, max_masks=max_masks)
    _run_evaluation("masks", protocol, upsampler, checkpoint, match_projection, target_space, device, out, store=st,
                    image_ids=ids, backbone=backbone)


@evaluate_app.command("make-tiny-data")
def evaluate_make_tiny_data(
    out: Path = typer.Argument(..., help="Folder to write."),
    layout: str = typer.Option("voc", help="cocostuff27, cityscapes, voc, folder, or davis."),
    train: int = typer.Option(8, help="Training images (segmentation layouts)."),
    val: int = typer.Option(4, help="Val images (segmentation layouts)."),
    frames: int = typer.Option(8, help="Frames per sequence (davis)."),
    seed: int = typer.Option(0, help="Crop seed."),
):
    """Write a tiny dataset in an official layout from installed photos with real labels (demos, tests)."""
    from loftup.training.evaluation.datasets import make_tiny_dataset, make_tiny_davis

    path = make_tiny_davis(out, frames=frames) if layout == "davis" else make_tiny_dataset(layout, out, train, val, seed)
    console.print(f"wrote a tiny {layout} dataset to {path}")


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
