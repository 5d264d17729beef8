"""``loftup-pipeline``: Ray jobs over SA-1B shards."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from loftup.cli.common import JsonOpt, VersionOpt, console, feature_set, print_json, renamed, run, with_options
from loftup.pipeline.options import RunOptions
from loftup.storage.errors import LoftupError

HELP = """Ray jobs over SA-1B tar shards that fill a store: images, masks, features, pseudo-GT and the
per-image optimisation baseline. A job skips the shards it has already done: rerun it to resume."""
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)


@app.callback()
def _options(version: bool = VersionOpt) -> None:
    pass


ShardsOpt = typer.Option(
    ..., "--shards", help="Shards to process, e.g. '0-99,120,200-210' (shard n is sa_<n:06d>.tar)."
)
StoreOpt = typer.Option(..., "--store", help="Store root: a local path or an fsspec URL.")
RootOpt = typer.Option(..., "--sa1b-root", help="Directory holding the SA-1B tars sa_000000.tar ...")
# --sizes was the name of --geometries (--size now means an output size only): accepted, not shown.
OldSizesOpt = typer.Option(None, "--sizes", hidden=True)


def _open(store: str, create: bool = True, sizes: tuple[int, ...] | None = None):
    from loftup.storage import open_store

    kwargs = {"geometries": sizes} if sizes else {}
    return open_store(store, create=create, **kwargs)


def _finish(summary, next_step: str) -> None:
    from loftup.pipeline.progress import summary_table

    console.print(summary_table(summary))
    if summary.failed:
        for shard, msg in sorted(summary.failed.items()):
            console.print(f"[red]shard {shard:06d}:[/red] {msg}")
        console.print("next: fix what the lines above say and rerun the same command; done shards are skipped")
        raise typer.Exit(1)
    from loftup.storage.redact import redact_text

    console.print(f"next: {redact_text(next_step)}", highlight=False, soft_wrap=True)


def _run(job, store, shard_list, run: RunOptions, next_step: str) -> None:
    from loftup.pipeline.runner import run_job

    _finish(run_job(job, store, shard_list, run, console=console), next_step)


def _check_weights(backbone: str, weights: Optional[str], random_init: bool, ray_address: Optional[str]) -> None:
    """A missing weights file is one line here, before any shard starts, not a failed shard in the
    store. Skipped on a cluster (--ray-address): its nodes may hold files this machine does not."""
    from loftup.pipeline.backbones import backbone_info
    from loftup.pipeline.backbones.weights import KNOWN_WEIGHTS, resolve_weights

    backbone_info(backbone)  # an unknown name is one line too
    if random_init and weights is not None:
        raise LoftupError(f"{backbone}: pass either --weights or --random-init, not both")
    if ray_address is not None or weights == "download":
        return
    if backbone in KNOWN_WEIGHTS:
        resolve_weights(backbone, weights, random_init)
    elif weights is not None and not random_init and not Path(weights).is_file():
        raise LoftupError(f"weights file not found: {weights}")


def _check_sam(checkpoint: Optional[str], random_init: bool, ray_address: Optional[str]) -> None:
    if random_init or ray_address is not None:
        return
    if checkpoint is None:
        raise LoftupError(
            "no SAM checkpoint: pass --sam-checkpoint PATH (sam_vit_h_4b8939.pth or another checkpoint of the "
            "segment-anything release), or --sam-random-init for tests"
        )
    if not Path(checkpoint).is_file():
        raise LoftupError(f"SAM checkpoint not found: {checkpoint}")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 14:
        raise typer.BadParameter(f"invalid sizes {text!r}")
    return sizes


def _photo_list(
    photos: str | None, exclude: str | None, photos_dir: str | None, packages: bool = False
) -> list[str] | None:
    from loftup.sample_data import photo_names

    if not exclude:
        return photos.split(",") if photos else None
    chosen = photos.split(",") if photos else list(photo_names(photos_dir, packages))
    excluded = set(exclude.split(","))
    return [p for p in chosen if p not in excluded]


@app.command("sample-data")
def sample_data(
    out: Optional[Path] = typer.Argument(None, help="Directory to write sa_000000.tar ... into."),
    tars: int = typer.Option(2, help="Number of tars."),
    images_per_tar: int = typer.Option(
        8, help="Images per tar (real photos, augmented when more are asked than exist)."
    ),
    short_side: int = typer.Option(1500, help="Short side of the written images (SA-1B: 1500)."),
    seed: int = typer.Option(0, help="Seed for augmentation, ids and quirks."),
    first_shard: int = typer.Option(0, help="Number of the first tar."),
    fault: list[str] = typer.Option(
        [], help="Inject a fault into the last tar: corrupt_jpeg, missing_json, broken_json, truncated_tar."
    ),
    photos: Optional[str] = typer.Option(
        None, help="Comma list of photos to use (default all; see `loftup-pipeline sample-data --list-photos`)."
    ),
    exclude_photos: Optional[str] = typer.Option(
        None, help="Comma list of photos to leave out (e.g. the ones held out for evaluation)."
    ),
    list_photos: bool = typer.Option(
        False, "--list-photos", help="Print the photos that load on this machine and exit."
    ),
    photos_dir: Optional[Path] = typer.Option(
        None,
        "--photos-dir",
        help="Use your own photos instead of the package photos (Felzenszwalb segments as masks): a folder of "
        "JPEG/PNG files (subfolders included) or a list file of 'PACKAGE PATH' or 'PATH' lines, e.g. "
        "loftup/data/debian_photos.txt.",
    ),
    package_photos: bool = typer.Option(
        False, "--package-photos", help="With --photos-dir: use the package photos too (first)."
    ),
):
    """Write small SA-1B-format tars from real photos (package photos, or a folder of your own)."""
    from loftup.sample_data import photo_names, write_sample_shards

    pdir = str(photos_dir.resolve()) if photos_dir is not None else None
    if package_photos and pdir is None:
        raise LoftupError("--package-photos adds the package photos to --photos-dir: give --photos-dir too")
    if list_photos:
        console.print(" ".join(photo_names(pdir, package_photos)))
        return
    if out is None:
        raise LoftupError("sample-data: give the output directory (OUT)")
    paths = write_sample_shards(
        out,
        tars=tars,
        images_per_tar=images_per_tar,
        short_side=short_side,
        seed=seed,
        first_shard=first_shard,
        faults=tuple(fault),
        photos=_photo_list(photos, exclude_photos, pdir, package_photos),
        photos_dir=pdir,
        package_photos=package_photos,
    )
    for p in paths:
        console.print(f"wrote {p} ({p.stat().st_size / 2**20:.1f} MiB)")
    last = first_shard + len(paths) - 1
    console.print(
        f"next: loftup-pipeline images --shards {first_shard}-{last} --sa1b-root {out} --store STORE",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@with_options(RunOptions, "run")
def masks(
    shards: str = ShardsOpt,
    sa1b_root: str = RootOpt,
    store: str = StoreOpt,
    source: str = typer.Option(
        "sa1b",
        help="Mask source: sa1b (the tar's annotations), sam (SAM automatic generation), felzenszwalb (CPU demo).",
    ),
    geometries: str = typer.Option(
        "224,896", help="Training geometries the masks are re-encoded into (short side + centre crop)."
    ),
    sizes: Optional[str] = OldSizesOpt,
    sam_checkpoint: Optional[str] = typer.Option(
        None, help="SAM checkpoint file (sam_vit_h_4b8939.pth, ...) for --source sam."
    ),
    sam_model: str = typer.Option(
        "auto", help="SAM model type: vit_h, vit_l, vit_b, or auto (read from the checkpoint)."
    ),
    sam_random_init: bool = typer.Option(False, help="SAM with random weights (tests and demos only)."),
    points_per_side: Optional[int] = typer.Option(None, help="SAM: point grid per side (default 32, as SA-1B)."),
    crop_n_layers: Optional[int] = typer.Option(
        None, help="SAM: multi-crop layers (default 2, as SA-1B; 0 is 3x cheaper)."
    ),
    pred_iou_thresh: Optional[float] = typer.Option(None, help="SAM: predicted-IoU threshold (default 0.88)."),
    stability_score_thresh: Optional[float] = typer.Option(None, help="SAM: stability-score threshold (default 0.95)."),
    max_side: Optional[int] = typer.Option(None, help="sam/felzenszwalb: downscale the image to this long side first."),
    max_masks: Optional[int] = typer.Option(None, help="Keep at most this many masks per image (in order)."),
    run: RunOptions = None,
):
    """Class-agnostic masks into the Parquet mask store (original RLE + each training geometry)."""
    from loftup.pipeline.jobs import MasksJob
    from loftup.pipeline.shards import resolve_shards

    if source == "sam":
        _check_sam(sam_checkpoint, sam_random_init, run.ray_address)
    shard_list = resolve_shards(shards, sa1b_root)
    opts: dict = {}
    if max_masks is not None:
        opts["max_masks"] = max_masks
    if max_side is not None and source != "sa1b":
        opts["max_side"] = max_side
    if source == "sam":
        opts.update(checkpoint=sam_checkpoint, random_init=sam_random_init, model_type=sam_model)
        for key, value in (
            ("points_per_side", points_per_side),
            ("crop_n_layers", crop_n_layers),
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
        ):
            if value is not None:
                opts[key] = value
    size_t = _sizes(renamed(geometries, sizes, "--geometries", "--sizes", default="224,896"))
    job = MasksJob(source=source, source_options=opts, sizes=size_t)
    _run(
        job,
        _open(store, sizes=size_t),
        shard_list,
        run,
        next_step=f"loftup-pipeline features --shards {shards} --store {store} --backbone NAME (loftup-pipeline backbones lists them)",
    )


@app.command()
@with_options(RunOptions, "run", exclude=("gpus_per_task",))
def images(
    shards: str = ShardsOpt,
    sa1b_root: str = RootOpt,
    store: str = StoreOpt,
    geometries: str = typer.Option("224,896", help="Training geometries (short side + centre crop), JPEG-encoded."),
    sizes: Optional[str] = OldSizesOpt,
    quality: int = typer.Option(95, help="JPEG quality of the stored images."),
    run: RunOptions = None,
):
    """Training images at each geometry into the Parquet image store."""
    from loftup.pipeline.jobs import ImagesJob
    from loftup.pipeline.shards import resolve_shards

    shard_list = resolve_shards(shards, sa1b_root)
    size_t = _sizes(renamed(geometries, sizes, "--geometries", "--sizes", default="224,896"))
    job = ImagesJob(sizes=size_t, quality=quality)
    _run(
        job,
        _open(store, sizes=size_t),
        shard_list,
        dataclasses.replace(run, gpus_per_task=0.0),
        next_step=f"loftup-pipeline masks --shards {shards} --sa1b-root {sa1b_root} --store {store}",
    )


@app.command()
@with_options(RunOptions, "run")
def features(
    shards: str = ShardsOpt,
    store: str = StoreOpt,
    backbone: str = typer.Option(
        "dinov2_vits14", help="Backbone from the registry (loftup-pipeline backbones lists them)."
    ),
    res: int = typer.Option(224, help="Input resolution of the backbone (a multiple of its patch size)."),
    weights: Optional[str] = typer.Option(None, help="Local weights file of the backbone."),
    random_init: bool = typer.Option(False, help="Random weights (tests and demos only)."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    device: str = typer.Option("auto", help="'auto' (the task's GPU if any), 'cpu' or 'cuda'."),
    run: RunOptions = None,
):
    """Low-resolution VFM features of the stored images into the Zarr v3 feature store."""
    from loftup.pipeline.jobs import FeaturesJob
    from loftup.pipeline.shards import parse_shards

    _check_weights(backbone, weights, random_init, run.ray_address)
    st = _open(store, create=False)
    shard_list = [(s, None) for s in parse_shards(shards)]
    job = FeaturesJob(
        backbone=backbone, res=res, weights=weights, random_init=random_init, batch_size=batch_size, device=device
    )
    _run(job, st, shard_list, run, next_step=f"loftup-train stage1 --store {store} --out runs/stage1 --shards {shards}")


@app.command()
@with_options(RunOptions, "run")
def pseudogt(
    shards: str = ShardsOpt,
    store: str = StoreOpt,
    backbone: Optional[str] = typer.Option(
        None, help="Backbone of the stored features (default: the store's feature set)."
    ),
    res: Optional[int] = typer.Option(None, help="Backbone input size of the stored features (default: the store's)."),
    geometry: int = typer.Option(224, help="Stored mask geometry = pseudo-GT size."),
    alpha: float = typer.Option(0.8, help="Mask refinement strength (Eq. 1)."),
    max_masks: int = typer.Option(150, help="Masks per image, in annotation order."),
    limit: Optional[int] = typer.Option(
        None, help="At most this many images per shard (pseudo-GT is ~38 MB/image at 224x224x384 fp16)."
    ),
    png_dir: Optional[str] = typer.Option(None, help="Where to write PNGs (default: inside a local store)."),
    png: bool = typer.Option(True, "--png/--no-png", help="Write PNGs of bicubic vs refined pseudo-GT."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
    run: RunOptions = None,
):
    """Materialise mask-refined bicubic pseudo-GT for inspection (Zarr) with PNGs of bicubic vs refined."""
    from loftup.pipeline.shards import parse_shards
    from loftup.training.materialise import PseudoGTJob

    st = _open(store, create=False)
    backbone, res = feature_set(st, backbone, res, strict=True)
    job = PseudoGTJob(
        backbone=backbone,
        res=res,
        geometry=geometry,
        alpha=alpha,
        max_masks=max_masks,
        limit=limit,
        png=png,
        png_dir=png_dir,
        device=device,
    )
    _run(
        job,
        st,
        [(s, None) for s in parse_shards(shards)],
        run,
        next_step=f"loftup-train stage1 --store {store} --out runs/stage1 --shards {shards}",
    )


@app.command()
@with_options(RunOptions, "run")
def implicit(
    shards: str = ShardsOpt,
    store: str = StoreOpt,
    backbone: str = typer.Option("dinov2_vits14", help="Backbone from the registry, run live on every jittered view."),
    res: int = typer.Option(224, help="Backbone input size = size of the optimised map."),
    weights: Optional[str] = typer.Option(None, help="Local weights file of the backbone."),
    random_init: bool = typer.Option(False, help="Random backbone weights (tests and demos only)."),
    images_per_shard: Optional[int] = typer.Option(
        None, help="Optimise only the first N images of each shard (~1 min each on an A100)."
    ),
    steps: Optional[int] = typer.Option(None, help="Optimisation steps per image (FeatUp: 1200)."),
    views: Optional[int] = typer.Option(None, help="Jittered views per image (FeatUp: 3000)."),
    dense: bool = typer.Option(
        False, "--dense", help="Also store the full-resolution map (fp16 Zarr, one chunk per image)."
    ),
    device: str = typer.Option("auto", help="'auto' (the task's GPU if any), 'cpu' or 'cuda'."),
    run: RunOptions = None,
):
    """Per-image optimisation baseline (FeatUp's implicit upsampler): a network per image (+ dense maps)."""
    from loftup.pipeline.shards import parse_shards
    from loftup.training.implicit_job import ImplicitJob

    recipe = {k: v for k, v in (("steps", steps), ("views", views)) if v is not None}
    _check_weights(backbone, weights, random_init, run.ray_address)
    st = _open(store, create=False)
    job = ImplicitJob(
        backbone=backbone,
        res=res,
        weights=weights,
        random_init=random_init,
        images_per_shard=images_per_shard,
        dense=dense,
        recipe=recipe,
        device=device,
    )
    _run(job, st, [(s, None) for s in parse_shards(shards)], run, next_step=f"loftup-store report --store {store}")


@app.command()
def status(store: str = StoreOpt, as_json: bool = JsonOpt):
    """Per job: shards done, images, failures, bytes, throughput."""
    from loftup.cli.store import print_status, status_json

    st = _open(store, create=False)
    print_json(status_json(st)) if as_json else print_status(st)


@app.command()
def backbones():
    """List the registered backbones: patch, dim, input normalisation and where their weights go."""
    from rich.table import Table

    from loftup.pipeline.backbones import backbone_info, list_backbones

    t = Table("name", "patch", "dim", "normalisation", "weights (--weights FILE, or found offline at)")
    for name in list_backbones():
        i = backbone_info(name)
        t.add_row(name, str(i["patch"]), str(i["dim"]), i["normalisation"], i["weights_hint"])
    console.print(t)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
