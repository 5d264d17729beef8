"""Quality on real data: real photos, real masks, a real pretrained backbone (hed_vgg16).

The split is photo-disjoint. Training tars hold augmented crops of the other 14 photos, with
scikit-image segments as their class-agnostic masks (SA-1B's masks are machine-made too);
the held-out tar holds 16 augmented crops of the two photos the training never shows, the
Pascal VOC and ARC2017 photos, whose masks are real instance annotations. The score is
nearest-prototype mIoU against those instance masks (training/evaluation/masks.py).

Stage 1 runs the CPU-scale recipe (README results): a 64-channel PCA of the features, 56 px
outputs (4x the 14 x 14 grid), 300 steps of 4 images at a raised rate with warm-up and cosine
decay, the guidance image's hue rotated at random (``hue_jitter``), BatchNorm statistics
recomputed over 32 batches at the end, ``--recipe paper`` (the main term alone; the released
reconstruction runs the backbone on every jittered view, too slow for a test). Stage 2
continues from it at 112/160 px for 30 steps and is scored at 56 and 112. Numbers: README
results.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
from loftup.pipeline.runner import run_job
from loftup.pipeline.shards import resolve_shards
from loftup.storage import open_store

pytestmark = pytest.mark.quality
BACKBONE = "hed_vgg16"
HELD_OUT_PHOTOS = ("voc", "arc2017")
TRAIN_TARS = 8
HELD_OUT = TRAIN_TARS  # the shard number of the held-out tar
STAGE1_STEPS = 300


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    from loftup.sample_data import photo_names, write_sample_shards

    root = tmp_path_factory.mktemp("real")
    train_photos = [p for p in photo_names() if p not in HELD_OUT_PHOTOS]
    write_sample_shards(root / "sa1b", tars=TRAIN_TARS, images_per_tar=16, seed=0, photos=train_photos)
    write_sample_shards(root / "sa1b", tars=1, images_per_tar=16, seed=0, first_shard=HELD_OUT, photos=HELD_OUT_PHOTOS)
    store = open_store(root / "store", create=True)
    shards = resolve_shards(f"0-{HELD_OUT}", root / "sa1b")
    for job in (ImagesJob(), MasksJob()):
        assert not run_job(job, store, shards, executor="inline").failed
    assert not run_job(
        FeaturesJob(backbone=BACKBONE, batch_size=16), store, [(s, None) for s, _ in shards], executor="inline"
    ).failed
    return store


@pytest.fixture(scope="module")
def stage1_run(real_store, tmp_path_factory):
    from loftup.training.stage1 import Stage1Config, train

    out = tmp_path_factory.mktemp("stage1")
    return train(
        Stage1Config(
            store=real_store.url,
            out=str(out),
            backbone=BACKBONE,
            shards=list(range(TRAIN_TARS)),
            pca_dim=64,
            size=56,
            max_masks=60,
            batch_size=4,
            max_steps=STAGE1_STEPS,
            lr=2e-3,
            lr_schedule="cosine",
            warmup_steps=50,
            bn_recalibrate=32,
            workers=0,
            progress=False,
            log_every=50,
            device="cpu",
            recipe="paper",
            hue_jitter=180.0,
        )
    )


def _evaluate(store, checkpoints: dict, size: int) -> dict:
    from dataclasses import replace

    from loftup.training.evaluation import MasksProtocol, baseline, evaluate, resolve_checkpoint

    ckpts = [replace(resolve_checkpoint(path), name=name) for name, path in checkpoints.items()]
    # The baselines see the checkpoints' own PCA channels, so the comparison is on equal features.
    ups = [replace(baseline(n), projection=ckpts[0].projection) for n in ("bilinear", "bicubic")] + ckpts
    res = evaluate(
        "masks",
        ups,
        protocol=MasksProtocol(size=size),
        store=store,
        image_ids=store.image_ids(HELD_OUT),
        backbone=BACKBONE,
        progress=False,
    )
    return {u.name: res[u.name]["prototype_miou"] for u in ups}


# Budget (issue 10): this test also pays for the store and the 300-step Stage 1 run it shares
# with the next one, under 4 minutes on a quiet 2-core machine (6.5 with a busy second core),
# so its limit is over 3x the slow case.
@pytest.mark.timeout(1200)
def test_stage1_beats_bilinear_on_held_out_images(real_store, stage1_run):
    ckpt = {"stage1": stage1_run["checkpoint"]}
    at56, at112 = _evaluate(real_store, ckpt, size=56), _evaluate(real_store, ckpt, size=112)
    print(json.dumps({"56": at56, "112": at112}, indent=2))
    assert np.isfinite(list(at56.values()) + list(at112.values())).all()
    # Measured (seed 0, this fixture): 0.455 vs bilinear 0.307 and bicubic 0.268 at 56, the training
    # size; seeds 0-2 of the same recipe in bench/quality_bench.py: 0.454, 0.367, 0.375. At 112, a
    # size Stage 1 never saw, the seeds straddle bilinear (0.375, 0.298, 0.270 vs 0.291): only the
    # lead over bicubic (0.258) is asserted there. At 56: half the smallest seed's margin.
    assert at56["stage1"] > at56["bilinear"] + 0.03, at56
    assert at56["stage1"] > at56["bicubic"] + 0.03, at56
    assert at112["stage1"] > at112["bicubic"], at112


@pytest.mark.timeout(2400)
def test_stage2_after_stage1_beats_bilinear_on_held_out_images(real_store, stage1_run, tmp_path_factory):
    from loftup.training.stage2 import Stage2Config
    from loftup.training.stage2 import train as train2

    out = tmp_path_factory.mktemp("stage2")
    s2 = train2(
        Stage2Config(
            init=stage1_run["checkpoint"],
            store=real_store.url,
            out=str(out),
            backbone=BACKBONE,
            shards=list(range(TRAIN_TARS)),
            hr=448,
            sizes=[112, 160],
            max_masks=60,
            batch_size=2,
            max_steps=30,
            lr=1e-4,
            ema_every=5,
            workers=0,
            progress=False,
            log_every=5,
            device="cpu",
            recipe="paper",
            grad_clip=1.0,
        )
    )
    ckpts = {"stage1": stage1_run["checkpoint"], "stage2": s2["checkpoint"]}
    at56, at112 = _evaluate(real_store, ckpts, size=56), _evaluate(real_store, ckpts, size=112)
    print(json.dumps({"56": at56, "112": at112}, indent=2))
    assert np.isfinite(list(at56.values()) + list(at112.values())).all()
    # Measured (seed 0): Stage 2 0.430 at 56 and 0.348 at 112 against Stage 1's 0.455 and 0.373;
    # in bench/quality_bench.py's seeds 0-2 Stage 2 moved Stage 1 by -0.008 to +0.035. 30 CPU
    # steps of self-distillation do not add to this Stage 1 (README results), so that is not
    # asserted: Stage 2 must keep Stage 1's quality (within 0.05 at both sizes) and its lead
    # over both baselines at the training size.
    assert at56["stage2"] > at56["bilinear"] + 0.03, at56
    assert at56["stage2"] > at56["bicubic"] + 0.03, at56
    for at in (at56, at112):
        assert abs(at["stage2"] - at["stage1"]) < 0.05, at
