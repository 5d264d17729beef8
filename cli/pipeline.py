"""``loftup-pipeline``: Ray jobs over SA-1B shards."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from loftup.cli.common import (
    JsonOpt,
    VersionOpt,
    console,
    feature_set,
    print_json,
    print_table,
    renamed,
    run,
    stdout,
    with_options,
)
from loftup.pipeline.job_options import (
    GEOMETRIES,
    FeaturesOptions,
    ImagesOptions,
    ImplicitOptions,
    MasksOptions,
    PseudoGTOptions,
)
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


def _open(store: str, create: bool = True, sizes: tuple[int, ...] | None = None):
    from loftup.storage import open_store

    kwargs = {"geometries": sizes} if sizes else {}
    return open_store(store, create=create, **kwargs)


def _stored(shards: str) -> list[tuple[int, None]]:
    """The shards of a job that reads the store (no tars)."""
    from loftup.pipeline.shards import parse_shards

    return [(s, None) for s in parse_shards(shards)]


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
        stdout.print(" ".join(photo_names(pdir, package_photos)), highlight=False, soft_wrap=True)
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


def _geometries(o) -> tuple[int, ...]:
    return _sizes(renamed(o.geometries, o.sizes, "--geometries", "--sizes", default=GEOMETRIES))


@app.command()
@with_options(RunOptions, "run")
@with_options(MasksOptions, "o")
def masks(shards: str = ShardsOpt, sa1b_root: str = RootOpt, store: str = StoreOpt, o=None, run=None):
    """Class-agnostic masks into the Parquet mask store (original RLE + each training geometry)."""
    from loftup.pipeline.jobs import MasksJob
    from loftup.pipeline.shards import resolve_shards

    if o.source == "sam":
        _check_sam(o.sam_checkpoint, o.sam_random_init, run.ray_address)
    shard_list = resolve_shards(shards, sa1b_root)
    job = MasksJob(source=o.source, source_options=o.source_options(), sizes=_geometries(o))
    nxt = f"loftup-pipeline features --shards {shards} --store {store} --backbone NAME (loftup-pipeline backbones lists them)"
    _run(job, _open(store, sizes=job.sizes), shard_list, run, nxt)


@app.command()
@with_options(RunOptions, "run", exclude=("gpus_per_task",))
@with_options(ImagesOptions, "o")
def images(shards: str = ShardsOpt, sa1b_root: str = RootOpt, store: str = StoreOpt, o=None, run=None):
    """Training images at each geometry into the Parquet image store."""
    from loftup.pipeline.jobs import ImagesJob
    from loftup.pipeline.shards import resolve_shards

    shard_list = resolve_shards(shards, sa1b_root)
    job = ImagesJob(sizes=_geometries(o), quality=o.quality)
    nxt = f"loftup-pipeline masks --shards {shards} --sa1b-root {sa1b_root} --store {store}"
    _run(job, _open(store, sizes=job.sizes), shard_list, dataclasses.replace(run, gpus_per_task=0.0), nxt)


@app.command()
@with_options(RunOptions, "run")
@with_options(FeaturesOptions, "o")
def features(shards: str = ShardsOpt, store: str = StoreOpt, o=None, run=None):
    """Low-resolution VFM features of the stored images into the Zarr v3 feature store."""
    from loftup.pipeline.jobs import FeaturesJob

    _check_weights(o.backbone, o.weights, o.random_init, run.ray_address)
    st = _open(store, create=False)
    job = FeaturesJob(**dataclasses.asdict(o))
    _run(job, st, _stored(shards), run, f"loftup-train stage1 --store {store} --out runs/stage1 --shards {shards}")


@app.command()
@with_options(RunOptions, "run")
@with_options(PseudoGTOptions, "o")
def pseudogt(shards: str = ShardsOpt, store: str = StoreOpt, o=None, run=None):
    """Materialise mask-refined bicubic pseudo-GT for inspection (Zarr) with PNGs of bicubic vs refined."""
    from loftup.training.materialise import PseudoGTJob

    st = _open(store, create=False)
    backbone, res = feature_set(st, o.backbone, o.res, strict=True)
    job = PseudoGTJob(**{**dataclasses.asdict(o), "backbone": backbone, "res": res})
    _run(job, st, _stored(shards), run, f"loftup-train stage1 --store {store} --out runs/stage1 --shards {shards}")


@app.command()
@with_options(RunOptions, "run")
@with_options(ImplicitOptions, "o")
def implicit(shards: str = ShardsOpt, store: str = StoreOpt, o=None, run=None):
    """Per-image optimisation baseline (FeatUp's implicit upsampler): a network per image (+ dense maps).

    The backbone runs on every jittered view; the map is optimised at --res."""
    from loftup.training.implicit_job import ImplicitJob

    _check_weights(o.backbone, o.weights, o.random_init, run.ray_address)
    st = _open(store, create=False)
    fields = dataclasses.asdict(o)
    recipe = {k: v for k in ("steps", "views") if (v := fields.pop(k)) is not None}
    job = ImplicitJob(**fields, recipe=recipe)
    _run(job, st, _stored(shards), run, f"loftup-store report --store {store}")


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
    lines = []
    for name in list_backbones():
        i = backbone_info(name)
        t.add_row(name, str(i["patch"]), str(i["dim"]), i["normalisation"], i["weights_hint"])
        lines.append(f"{name}: patch {i['patch']}, dim {i['dim']}, {i['normalisation']}; weights: {i['weights_hint']}")
    print_table(t, lines)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
