"""``loftup-train``: Stage 1, Stage 2, evaluation and inference.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N $(which loftup-train) stage1 ...``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from loftup.cli.common import JsonOpt, VersionOpt, console, print_json, renamed, run
from loftup.cli.infer import upsample
from loftup.storage.errors import LoftupError

HELP = """Train LoftUp (Stage 1, Stage 2), evaluate upsamplers with the paper's probes, and upsample
images. On several GPUs or nodes: torchrun --nproc_per_node N $(which loftup-train) stage1 ..."""
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)


@app.callback()
def _options(version: bool = VersionOpt) -> None:
    pass


def _ints(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    from loftup.pipeline.shards import parse_shards

    return parse_shards(text)


def _summary(title: str, result: dict) -> None:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("field")
    t.add_column("value", justify="right", overflow="fold")
    for k, v in result.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        t.add_row(k, str(v))
    console.print(t)


def _config_command(name: str, module: str, config: str, doc: str, summary=None, from_store=(), from_init=()):
    """Register ``loftup-train NAME``: one option per field of the stage's config dataclass (declared
    once, with its help, in training/loop.py and the stage's module), then train and print a summary.
    ``from_store``: ``backbone`` and ``res`` default to the store's feature set instead;
    ``from_init``: ``backbone`` defaults to the one the ``--init`` checkpoint was trained on."""
    import dataclasses
    import importlib
    import inspect
    import typing

    mod = importlib.import_module(f"loftup.training.{module}")
    cls = getattr(mod, config)
    fallback = {f.name: f.default for f in dataclasses.fields(cls)}
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
        if f.name in from_store or f.name in from_init:
            kind, default = Optional[kind], None
            help_text = f.metadata["help"] + (
                f" Default: the store's feature set ({f.name} of the one there)."
                if f.name in from_store
                else f" Default: the one --init was trained on, else {f.default}."
            )
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(None, flag, help=help_text),
                    annotation=kind,
                )
            )
            continue
        if kind in (bool, Optional[bool]):
            opt = typer.Option(default, f"{flag}/--no-{flag[2:]}", help=f.metadata["help"])
        else:
            opt = typer.Option(default, flag, help=f.metadata["help"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind))

    def command(**kwargs):
        allow_missing = kwargs.pop("allow_missing")
        kwargs = {k: parsers[k](v) if k in parsers else v for k, v in kwargs.items()}
        if from_store and None in (kwargs["backbone"], kwargs["res"]):
            from loftup.cli.common import feature_set
            from loftup.storage import open_store

            kwargs["backbone"], kwargs["res"] = feature_set(
                open_store(kwargs["store"]), kwargs["backbone"], kwargs["res"], strict=True
            )
        if from_init and kwargs["backbone"] is None:
            from loftup.training.checkpoint import load_model

            extra = load_model(kwargs["init"], with_meta=True)[1].get("extra") or {}
            kwargs["backbone"] = extra.get("backbone") or fallback["backbone"]
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
    from_store=("backbone", "res"),
)
_config_command(
    "stage2",
    "stage2",
    "Stage2Config",
    "Stage 2: self-distillation from an EMA teacher on HR crops, the VFM run live.",
    _stage2_summary,
    from_init=("backbone",),
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


def _trained_on(ups) -> Optional[str]:
    """The backbone the given checkpoints were trained for: one error line if they disagree."""
    names = sorted({u.trained_on for u in ups if u.trained_on})
    if len(names) > 1:
        raise LoftupError(f"the checkpoints were trained on different backbones ({', '.join(names)}): give --backbone")
    return names[0] if names else None


def _run_evaluation(task: str, protocol, options: dict, as_json: bool, backbone=None, store=None, **kwargs):
    """Build the upsamplers, pick the backbone (given; else the checkpoints'; else the store's; else
    the registry default), run, print the table (or JSON) on stdout."""
    import time

    from loftup.pipeline.backbones import DEFAULT_BACKBONE
    from loftup.training.evaluation import build_upsamplers, evaluate
    from loftup.training.evaluation.report import markdown

    ups = build_upsamplers(
        list(options["upsampler"] or []),
        [str(c) for c in options["checkpoint"] or []],
        target_space=options["target_space"],
        match_projection=options["match_projection"],
        device="cpu",
    )
    backbone = backbone or _trained_on(ups)
    if store is not None:
        from loftup.cli.common import feature_set

        backbone, res = feature_set(store, backbone, protocol.res)
        protocol = dataclasses.replace(protocol, res=res)
        kwargs["store"] = store
    out, started = options["out"], time.time()
    console.print("protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.as_dict().items()))
    result = evaluate(
        task, ups, protocol=protocol, out=out, device=options["device"], backbone=backbone or DEFAULT_BACKBONE, **kwargs
    )
    if as_json:
        print_json(result)
    else:
        print(markdown(task, result))
    if out is not None:
        pictures = [p for p in out.glob("*.png") if p.stat().st_mtime >= started - 1]
        console.print(
            f"wrote {out / 'results.json'}, {out / 'results.md'}"
            + (f" and {len(pictures)} pictures" if pictures else " (no pictures for this task)")
        )


_TARGET_HELP = "Space of the baselines' features: layer_norm (LoftUp's) or raw."
_OUT_HELP = "Write results.json, results.md and pictures here."
_DEVICE_HELP = "auto, cpu or cuda."
_BACKBONE_HELP = "Backbone run live on the images (default: the checkpoints', else dinov2_vits14)."
# --backbone-res was the name of --res before the CLIs shared one vocabulary: still accepted, not shown.
_OLD_RES = typer.Option(None, "--backbone-res", hidden=True)


def _res(res: Optional[int], old: Optional[int]) -> Optional[int]:
    return renamed(res, old, "--res", "--backbone-res")


@evaluate_app.command("seg")
def evaluate_seg(
    dataset: str = typer.Option(..., help="Layout: cocostuff27, cityscapes, voc or folder."),
    root: Path = typer.Option(..., help="Dataset folder in that layout."),
    backbone: Optional[str] = typer.Option(None, help=_BACKBONE_HELP),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file."),
    random_init: bool = typer.Option(False, help="Random backbone weights (tests)."),
    upsampler: list[str] = typer.Option(["bilinear"], help=_UPSAMPLER_HELP),
    checkpoint: list[Path] = typer.Option([], help=_CHECKPOINT_HELP),
    match_projection: bool = typer.Option(True, help=_MATCH_HELP),
    target_space: str = typer.Option("layer_norm", help=_TARGET_HELP),
    size: int = typer.Option(224, help="Resize + centre-crop size of images, labels, guidance and output."),
    res: Optional[int] = typer.Option(None, help="Backbone input size (default: --size)."),
    backbone_res: Optional[int] = _OLD_RES,
    epochs: int = typer.Option(10, help="Probe epochs."),
    lr: float = typer.Option(1e-4, help="Probe NAdam learning rate."),
    batch_size: int = typer.Option(8, help="Probe batch size."),
    seed: int = typer.Option(0, help="Probe init and data order seed."),
    train_split: str = typer.Option("train", help="Split the probes train on."),
    split: str = typer.Option("val", help="Split scored."),
    workers: int = typer.Option(2, help="DataLoader workers."),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
    out: Optional[Path] = typer.Option(None, help=_OUT_HELP),
    as_json: bool = JsonOpt,
):
    """Linear-probe semantic segmentation (LoftUp's eval_seg protocol): mIoU and pixel accuracy."""
    from loftup.training.evaluation import SegProtocol

    protocol = SegProtocol(
        size=size, backbone_res=_res(res, backbone_res), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed
    )
    _run_evaluation(
        "seg",
        protocol,
        locals(),
        as_json,
        backbone=backbone,
        dataset=dataset,
        root=root,
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
    backbone: Optional[str] = typer.Option(None, help=_BACKBONE_HELP),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file."),
    random_init: bool = typer.Option(False, help="Random backbone weights (tests)."),
    upsampler: list[str] = typer.Option(["bilinear"], help=_UPSAMPLER_HELP),
    checkpoint: list[Path] = typer.Option([], help=_CHECKPOINT_HELP),
    match_projection: bool = typer.Option(True, help=_MATCH_HELP),
    target_space: str = typer.Option("layer_norm", help=_TARGET_HELP),
    size: int = typer.Option(224, help="Frames resized to SIZE x SIZE; features upsampled to SIZE/2."),
    res: Optional[int] = typer.Option(None, help="Backbone input size (default: --size)."),
    backbone_res: Optional[int] = _OLD_RES,
    context: int = typer.Option(7, help="Previous predictions used besides the first frame."),
    temperature: float = typer.Option(0.1, help="Affinity temperature."),
    radius: int = typer.Option(12, help="Spatial radius in feature cells."),
    topk: int = typer.Option(5, help="Neighbours averaged per pixel."),
    boundary_tolerance: float = typer.Option(0.008, help="F's match tolerance, a fraction of the image diagonal."),
    save_masks: bool = typer.Option(False, help="Also write every prediction as DAVIS palette PNGs under OUT/masks."),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
    out: Optional[Path] = typer.Option(None, help=_OUT_HELP),
    as_json: bool = JsonOpt,
):
    """DAVIS 2017 label propagation (LiFT/LoftUp protocol): J, F and J&F as the official toolkit."""
    from loftup.training.evaluation import DavisProtocol

    protocol = DavisProtocol(
        size=size,
        backbone_res=_res(res, backbone_res),
        context=context,
        temperature=temperature,
        radius=radius,
        topk=topk,
        boundary_tolerance=boundary_tolerance,
    )
    _run_evaluation(
        "davis",
        protocol,
        locals(),
        as_json,
        backbone=backbone,
        root=root,
        split=split,
        weights=weights,
        random_init=random_init,
        save_masks=save_masks,
    )


@evaluate_app.command("masks")
def evaluate_masks(
    store: str = typer.Option(..., help="Store with images, masks and features."),
    shards: str = typer.Option(..., help="Held-out shards to evaluate on, e.g. 8-9."),
    backbone: Optional[str] = typer.Option(
        None, help="Backbone of the stored features (default: the store's, or the checkpoints')."
    ),
    upsampler: list[str] = typer.Option(["bilinear", "bicubic"], help=_UPSAMPLER_HELP),
    checkpoint: list[Path] = typer.Option([], help=_CHECKPOINT_HELP),
    match_projection: bool = typer.Option(True, help=_MATCH_HELP),
    target_space: str = typer.Option("layer_norm", help=_TARGET_HELP),
    res: Optional[int] = typer.Option(None, help="Backbone input size of the stored features (default: the store's)."),
    geometry: int = typer.Option(224, help="Stored image/mask geometry to read."),
    size: int = typer.Option(224, help="Evaluation resolution."),
    max_masks: int = typer.Option(150, help="Masks per image, in annotation order."),
    limit: Optional[int] = typer.Option(None, help="At most this many images."),
    device: str = typer.Option("auto", help=_DEVICE_HELP),
    out: Optional[Path] = typer.Option(None, help="Write results.json and results.md here."),
    as_json: bool = JsonOpt,
):
    """Nearest-prototype mIoU against the store's instance masks (a class-free proxy)."""
    import numpy as np

    from loftup.storage import open_store
    from loftup.training.evaluation import MasksProtocol

    st = open_store(store)
    ids = np.concatenate([st.image_ids(s) for s in _ints(shards)])[:limit]
    protocol = MasksProtocol(size=size, res=res, geometry=geometry, max_masks=max_masks)
    _run_evaluation("masks", protocol, locals(), as_json, backbone=backbone, store=st, image_ids=ids)


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


# Inference is `loftup upsample` (cli/infer.py); this spelling stays for the scripts that use it.
app.command("upsample", hidden=True, help="The same as `loftup upsample`.")(upsample)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
