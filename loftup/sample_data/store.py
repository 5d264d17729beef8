"""The one sample store builder: tests, benches and demos get their stores here."""

from __future__ import annotations

import time
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
    first_shard: int = 0,
    random_init: bool = True,
    batch_size: int = 4,
    device: str = "auto",
    log=None,
    console=None,
):
    """A complete store over sample tars, built by the real jobs (inline).

    ``jobs`` picks the stages; features use random backbone weights unless ``random_init`` is
    False (tests and benches have no downloads). Returns the opened store; the tars go to
    ``tars_dir`` (default ``root``'s sibling ``<root>_tars``), shards ``first_shard`` onwards.

    A second call costs only the checks: tars already written are kept, an existing store is
    opened as it is, and every job skips the shards it has finished; a call with another
    ``first_shard`` adds those shards (a held-out tar of other photos, say) to the same store.
    ``log(line)`` gets what was built and how long it took; ``console`` is the jobs' progress.
    """
    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.storage import open_store

    unknown = set(jobs) - {"masks", "images", "features"}
    if unknown:
        raise LoftupError(f"unknown sample-store job(s) {sorted(unknown)}")
    root = Path(root)
    tars_dir = Path(tars_dir) if tars_dir is not None else root.with_name(root.name + "_tars")
    numbers = range(first_shard, first_shard + tars)
    if not all((tars_dir / f"sa_{s:06d}.tar").exists() for s in numbers):
        t0 = time.perf_counter()
        write_sample_shards(
            tars_dir,
            tars=tars,
            images_per_tar=images_per_tar,
            short_side=short_side,
            seed=seed,
            first_shard=first_shard,
            photos=photos,
            photos_dir=photos_dir,
            package_photos=package_photos,
        )
        if log is not None:
            log(
                f"sample shards: {tars} x {images_per_tar} images at {short_side} px in {time.perf_counter() - t0:.1f} s"
            )
    store = open_store(root, create=True, geometries=sizes)
    shards = resolve_shards(f"{numbers[0]}-{numbers[-1]}", tars_dir)
    planned = []
    if "masks" in jobs:
        planned.append((MasksJob(sizes=tuple(sizes)), shards))
    if "images" in jobs:
        planned.append((ImagesJob(sizes=tuple(sizes)), shards))
    if "features" in jobs:
        job = FeaturesJob(backbone=backbone, res=res, random_init=random_init, batch_size=batch_size, device=device)
        planned.append((job, [(s, None) for s, _ in shards]))
    for job, todo in planned:
        summary = run_job(job, store, todo, executor="inline", **({} if console is None else {"console": console}))
        if summary.failed:
            raise LoftupError(f"sample store: {job.name} failed on {summary.failed}")
        if log is not None and summary.done:
            log(f"{job.name}: {len(summary.done)} shard(s) in {summary.seconds:.1f} s")
    return store
