"""Materialised pseudo-GT on a tiny real store: values, limit, PNGs, resume, errors, alpha=0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
from loftup.pipeline.runner import run_job
from loftup.sample_data import write_sample_shards
from loftup.storage import LoftupError, StoreError, open_store
from loftup.training.materialise import PseudoGTJob, materialise, png_shard_dir
from loftup.training.pseudo_gt import bicubic_upsample, masks_from_rles, pseudo_gt
from loftup.training.target_space import layer_norm_target

GAP = 6  # save_panels' default gap between and around panels


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # The PNGs' PCA is a LAPACK SVD; on 2 cores shared with other test runs, OpenBLAS's
    # spinning worker threads make it ~7x slower than a single thread.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mat")
    tars = write_sample_shards(root / "sa1b", tars=1, images_per_tar=2, short_side=400)
    st = open_store(root / "store", create=True)
    shards = [(0, str(tars[0]))]
    for job in (ImagesJob(), MasksJob(source_options={"max_masks": 15})):
        assert not run_job(job, st, shards, executor="inline").failed
    assert not run_job(FeaturesJob(random_init=True), st, [(0, None)], executor="inline").failed
    return st


def _expected(store, ids, alpha, max_masks=150, size=224):
    lr = torch.from_numpy(store.features("dinov2_vits14", 224).get_many(ids)).float()
    masks, valid = masks_from_rles(store.masks_for_many(ids, size), size, max_masks)
    return layer_norm_target(lr), masks, valid


def test_values_pngs_and_resume(store, tmp_path):
    png_dir = tmp_path / "png"
    summary = materialise(store, "0", png_dir=str(png_dir))
    assert not summary.failed and list(summary.done) == [0]
    marker = summary.done[0]
    ids = store.image_ids(0)
    assert marker["images"] == len(ids) == 2 and marker["pngs"] == 2

    pg = open_store(store.url).pseudogt("dinov2_vits14", 224)
    np.testing.assert_array_equal(pg.shard_image_ids(0), ids)
    stored = pg.get_many(ids)
    assert stored.dtype == np.float16 and stored.shape == (2, 384, 224, 224)
    assert pg.array(0).chunks == (1, 384, 224, 224)

    target, masks, valid = _expected(store, ids, 0.8)
    assert int(valid.sum()) == marker["masks"] and 0 < marker["masks"] <= 30
    want = pseudo_gt(target, masks, valid, 224, alpha=0.8).numpy()
    np.testing.assert_allclose(stored.astype(np.float32), want, rtol=1e-3, atol=2e-3)
    # Refinement really happened: the stored map is not the plain bicubic.
    bicubic = bicubic_upsample(target, 224).numpy()
    assert np.abs(stored.astype(np.float32) - bicubic).max() > 0.1

    files = sorted(png_shard_dir(store, "dinov2_vits14", 224, 0, str(png_dir)).glob("*.png"))
    assert [f.stem for f in files] == sorted(str(i) for i in ids)
    for f in files:
        im = np.asarray(Image.open(f).convert("RGB"))
        assert im.shape[1] == 4 * 224 + 5 * GAP and im.shape[0] > 224
        for p in range(4):  # every panel carries content
            x0 = GAP + p * (224 + GAP)
            panel = im[-(224 + GAP) : -GAP, x0 : x0 + 224].astype(np.float32)
            assert panel.std() > 5.0, (f.name, p)
        # The refined panel differs from the bicubic one (same PCA colours, different maps).
        bic = im[-(224 + GAP) : -GAP, GAP + 2 * 230 : GAP + 2 * 230 + 224].astype(np.int16)
        ref = im[-(224 + GAP) : -GAP, GAP + 3 * 230 : GAP + 3 * 230 + 224].astype(np.int16)
        assert np.abs(bic - ref).mean() > 1.0

    again = materialise(store, [0], png_dir=str(png_dir))
    assert again.skipped == [0] and not again.done and not again.failed
    assert store.marker("pseudogt/dinov2_vits14@224", 0)["finished_at"] == marker["finished_at"]


def test_limit_alpha_zero_and_default_png_dir(store):
    summary = materialise(store, [0], limit=1, alpha=0.0)
    assert not summary.failed
    ids = store.image_ids(0)[:1]
    pg = open_store(store.url).pseudogt("dinov2_vits14", 224)
    np.testing.assert_array_equal(pg.shard_image_ids(0), ids)
    assert summary.done[0]["images"] == 1

    target, _, _ = _expected(store, ids, 0.0)
    bicubic = bicubic_upsample(target, 224).to(torch.float16).numpy()
    np.testing.assert_array_equal(pg.get_many(ids), bicubic)

    png_dir = png_shard_dir(store, "dinov2_vits14", 224, 0)
    assert png_dir.parent.parent.name == "pseudogt_png"
    assert [p.name for p in png_dir.glob("*.png")] == [f"{int(ids[0])}.png"]


def test_config_hash_covers_the_values():
    base = PseudoGTJob().config_hash()
    for change in ({"alpha": 0.5}, {"max_masks": 10}, {"limit": 3}, {"geometry": 896}):
        assert PseudoGTJob(**change).config_hash() != base, change
    # Where and in what batches it ran does not change the values.
    assert PseudoGTJob(device="cpu", batch_size=2).config_hash() == base


def test_user_errors_are_one_line(store, monkeypatch):
    job = PseudoGTJob(png=False)
    with pytest.raises(
        StoreError, match=r"shard 5: no features/dinov2_vits14@224 .*loftup-pipeline features.*no masks"
    ):
        job.run_shard(store, 5, None, lambda ok, err: None)
    summary = materialise(store, [5], png=False)
    assert list(summary.failed) == [5] and "loftup-pipeline features" in summary.failed[5]
    assert store.marker(job.name, 5) is None
    with pytest.raises(StoreError, match="geometries"):
        PseudoGTJob(geometry=448).check(store)
    # A whole shard that cannot fit in memory is refused with the way out, not OOM-killed.
    import loftup.training.materialise as materialise_module

    monkeypatch.setattr(materialise_module, "MAX_SHARD_BYTES", 384 * 224 * 224 * 2)
    with pytest.raises(LoftupError, match="2 images of pseudo-GT need .*--limit N"):
        job.run_shard(store, 0, None, lambda ok, err: None)
