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


def _config_command(name: str, module: str, config: str, doc: str, summary=None):
    """Register ``loftup-train NAME``: one option per field of the stage's config dataclass (declared
    once, with its help, in training/loop.py and the stage's module), then train and print a summary."""
    import dataclasses
    import importlib
    import inspect
    import typing

    mod = importlib.import_module(f"loftup.training.{module}")
    cls = getattr(mod, config)
    hints = typing.get_type_hints(cls)
    params, parsers = [], {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind, flag = hints[f.name], f"--{f.name.replace('_', '-')}"
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...  # required
        if f.metadata.get("parse") == "ints":
            parsers[f.name] = _ints
            kind, default = Optional[str], ",".join(map(str, default)) if isinstance(default, list) else default
        if kind in (bool, Optional[bool]):
            opt = typer.Option(default, f"{flag}/--no-{flag[2:]}", help=f.metadata["help"])
        else:
            opt = typer.Option(default, flag, help=f.metadata["help"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind))

    def command(**kwargs):
        allow_missing = kwargs.pop("allow_missing")
        kwargs = {k: parsers[k](v) if k in parsers else v for k, v in kwargs.items()}
        if allow_missing and kwargs.get("shards"):
            kwargs["shards"] = _present(kwargs)
        result = mod.train(cls(**kwargs))
        if summary is not None:
            summary(result)
        _summary(name.replace("stage", "stage "), result)

    params.append(
        inspect.Parameter(
            "allow_missing",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                False,
                "--allow-missing",
                help="Train on the --shards that are finished; skip the others instead of stopping.",
            ),
        )
    )
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    command.__name__ = name
    app.command(name=name)(command)


def _present(kwargs: dict) -> list[int]:
    """``--allow-missing``: the --shards the store has finished (stage 1 also needs the features)."""
    from loftup.training.data import present_shards

    jobs = ["images", "masks"] + ([f"features/{kwargs['backbone']}@{kwargs['res']}"] if "res" in kwargs else [])
    present, missing = present_shards(kwargs["store"], kwargs["shards"], jobs)
    if missing:
        console.print(f"[yellow]--allow-missing: training without {len(missing)} unfinished shard(s): {missing[:20]}")
    return present


def _stage2_summary(result: dict) -> None:
    result["timings"] = {k: round(v, 2) for k, v in result.get("timings", {}).items()}


_config_command(
    "stage1",
    "stage1",
    "Stage1Config",
    "Stage 1: mask-refined bicubic pseudo-GT built on the fly from stored features and masks.",
)
_config_command(
    "stage2",
    "stage2",
    "Stage2Config",
    "Stage 2: self-distillation from an EMA teacher on HR crops, the VFM run live.",
    _stage2_summary,
)


evaluate_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The paper's probes on the official dataset layouts, every upsampler under one protocol.",
)
app.add_typer(evaluate_app, name="evaluate")

_UPSAMPLER_HELP = "Baselines to run (repeatable): bilinear, bicubic, nearest, lowres."
_CHECKPOINT_HELP = (
    "A LoftUp checkpoint (repeatable): ours (.safetensors), a released .pth/.bin, or official:NAME "
    "(dinov2s, dinov2s_reg, dinov2b, dinov2b_reg, clip, siglip, siglip2; from the local HF cache)."
)
_MATCH_HELP = "Also run each baseline in every checkpoint's own PCA projection (named BASELINE@CHECKPOINT)."


def _run_evaluation(task: str, protocol, upsampler, checkpoint, match_projection, target_space, device, out, **kwargs):
    from loftup.training.evaluation import build_upsamplers, evaluate
    from loftup.training.evaluation.report import markdown

    ups = build_upsamplers(
        list(upsampler or []),
        [str(c) for c in checkpoint or []],
        target_space=target_space,
        match_projection=match_projection,
        device="cpu",
    )
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
    target_space: str = typer.Option(
        "layer_norm", help="Space of the baselines' features: layer_norm (LoftUp's) or raw."
    ),
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
    _run_evaluation(
        "seg",
        protocol,
        upsampler,
        checkpoint,
        match_projection,
        target_space,
        device,
        out,
        dataset=dataset,
        root=root,
        backbone=backbone,
        weights=weights,
        random_init=random_init,
        train_split=train_split,
        split=split,
        workers=workers,
    )


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
    target_space: str = typer.Option(
        "layer_norm", help="Space of the baselines' features: layer_norm (LoftUp's) or raw."
    ),
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

    protocol = DavisProtocol(
        size=size,
        backbone_res=backbone_res,
        context=context,
        temperature=temperature,
        radius=radius,
        topk=topk,
        boundary_tolerance=boundary_tolerance,
    )
    _run_evaluation(
        "davis",
        protocol,
        upsampler,
        checkpoint,
        match_projection,
        target_space,
        device,
        out,
        root=root,
        split=split,
        backbone=backbone,
        weights=weights,
        random_init=random_init,
        save_masks=save_masks,
    )


@evaluate_app.command("masks")
def evaluate_masks(
    store: str = typer.Option(..., help="Store with images, masks and features."),
    shards: str = typer.Option(..., help="Held-out shards to evaluate on."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone of the stored features."),
    upsampler: list[str] = typer.Option(["bilinear", "bicubic"], help=_UPSAMPLER_HELP),
    checkpoint: list[Path] = typer.Option([], help=_CHECKPOINT_HELP),
    match_projection: bool = typer.Option(True, help=_MATCH_HELP),
    target_space: str = typer.Option(
        "layer_norm", help="Space of the baselines' features: layer_norm (LoftUp's) or raw."
    ),
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
    _run_evaluation(
        "masks",
        protocol,
        upsampler,
        checkpoint,
        match_projection,
        target_space,
        device,
        out,
        store=st,
        image_ids=ids,
        backbone=backbone,
    )


@evaluate_app.command("make-tiny-data")
def evaluate_make_tiny_data(
    out: Path = typer.Argument(..., help="Folder to write."),
    layout: str = typer.Option("voc", help="cocostuff27, cityscapes, voc, folder, or davis."),
    train: int = typer.Option(8, help="Training images (segmentation layouts)."),
    val: int = typer.Option(4, help="Val images (segmentation layouts)."),
    frames: int = typer.Option(8, help="Frames per sequence (davis)."),
    seed: int = typer.Option(0, help="Crop seed."),
    photos: str = typer.Option(
        "voc", help="Labelled photos to crop (segmentation): voc, or voc,arc2017 (folder layout; per photo)."
    ),
    motions: str = typer.Option(
        "diagonal", help="Camera motions, one sequence per photo each (davis): diagonal, anti, pan, zoom."
    ),
):
    """Write a tiny dataset in an official layout from installed photos with real labels (demos, tests)."""
    from loftup.training.evaluation.datasets import make_tiny_dataset, make_tiny_davis

    path = (
        make_tiny_davis(out, frames=frames, motions=tuple(motions.split(",")))
        if layout == "davis"
        else make_tiny_dataset(layout, out, train, val, seed, photos=tuple(photos.split(",")))
    )
    console.print(f"wrote a tiny {layout} dataset to {path}")


@app.command()
def upsample(
    image: Path = typer.Argument(..., help="Image file to upsample the features of."),
    checkpoint: Optional[Path] = typer.Option(None, help="Our checkpoint (stage1/stage2 .safetensors)."),
    official: Optional[str] = typer.Option(
        None,
        help="A released LoftUp: dinov2s, dinov2s_reg, dinov2b, dinov2b_reg, clip, siglip, siglip2 (local HF cache) or its .bin path.",
    ),
    backbone: Optional[str] = typer.Option(
        None,
        help="Backbone for the low-res features (default: the one the upsampler was trained for, else dinov2_vits14).",
    ),
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
        image,
        checkpoint=checkpoint,
        official=official,
        backbone=backbone,
        weights=weights,
        random_init=random_init,
        backbone_res=backbone_res,
        size=size,
        out_dir=out,
        fmt=fmt,
    )
    _summary("upsample", {k: str(v) for k, v in result.items()})


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
