"""The one sample store builder: tests, benches and demos get their stores here."""

from __future__ import annotations

from pathlib import Path

from loftup.sample_data.tars import write_sample_shards
from loftup.storage.errors import LoftupError


def build_sample_store(
    root,
    tars_dir=None,
    *,
    tars: int = 2,
    images_per_tar: int = 2,
    short_side: int = 256,
    sizes=(224,),
    jobs=("masks", "images", "features"),
    backbone: str = "dinov2_vits14",
    res: int = 224,
    seed: int = 0,
    photos=None,
    photos_dir=None,
    package_photos: bool = False,
):
    """A complete store over freshly written sample tars, built by the real jobs (inline).

    ``jobs`` picks the stages (features use random backbone weights: tests and benches have no
    downloads). Returns the opened store; the tars go to ``tars_dir`` (default ``root``'s
    sibling ``<root>_tars``).
    """
    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.storage import open_store

    root = Path(root)
    tars_dir = Path(tars_dir) if tars_dir is not None else root.with_name(root.name + "_tars")
    write_sample_shards(
        tars_dir,
        tars=tars,
        images_per_tar=images_per_tar,
        short_side=short_side,
        seed=seed,
        photos=photos,
        photos_dir=photos_dir,
        package_photos=package_photos,
    )
    store = open_store(root, create=True, geometries=sizes)
    shards = resolve_shards(f"0-{tars - 1}", tars_dir)
    unknown = set(jobs) - {"masks", "images", "features"}
    if unknown:
        raise LoftupError(f"unknown sample-store job(s) {sorted(unknown)}")
    planned = []
    if "masks" in jobs:
        planned.append((MasksJob(sizes=tuple(sizes)), shards))
    if "images" in jobs:
        planned.append((ImagesJob(sizes=tuple(sizes)), shards))
    if "features" in jobs:
        planned.append(
            (FeaturesJob(backbone=backbone, res=res, random_init=True, batch_size=4), [(s, None) for s, _ in shards])
        )
    for job, todo in planned:
        summary = run_job(job, store, todo, executor="inline")
        if summary.failed:
            raise LoftupError(f"sample store: {job.name} failed on {summary.failed}")
    return store
