"""Streaming writers: memory bounded by their limits, output identical to one-shot writes.

Tiny limits (a few rows / images per row group or Zarr shard) exercise the multi-part layout
that a real 11,186-image tar gets with the default limits.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from loftup.storage import StoreError, open_store
from loftup.storage.features import _codec
from loftup.storage.masks import mask_schema

SIZES = (4,)


def _mask_table(image_ids, seed=0) -> pa.Table:
    """Mask rows of several images, 1-6 masks each, in annotation order."""
    rng = np.random.default_rng(seed)
    rows = []
    for image_id in image_ids:
        for order in range(int(rng.integers(1, 7))):
            rows.append(
                {
                    "image_id": int(image_id),
                    "ann_id": int(image_id) * 10 + order,
                    "order": order,
                    "height": 8,
                    "width": 6,
                    "counts": f"c{image_id}.{order}.{rng.integers(1 << 30)}",
                    "rle_4": f"r{image_id}.{order}",
                    "area": int(rng.integers(1, 48)),
                    "bbox": [0.0, 1.0, 2.0, 3.0],
                    "predicted_iou": 0.5,
                    "stability_score": 0.9,
                    "crop_box": [0.0, 0.0, 6.0, 8.0],
                    "point": [1.0, 2.0],
                    "source": "sa1b",
                }
            )
    return pa.Table.from_pylist(rows, schema=mask_schema(SIZES))


def _one_shot(table: pa.Table, path, row_group: int) -> pa.Table:
    """Today's write: sort everything, one write_table call."""
    ref = table.sort_by([("image_id", "ascending"), ("order", "ascending")])
    pq.write_table(ref, path, row_group_size=row_group)
    return pq.read_table(path)


def _group_sizes(path) -> list[int]:
    md = pq.read_metadata(path)
    return [md.row_group(g).num_rows for g in range(md.num_row_groups)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shuffled", [False, True], ids=["in-order", "out-of-order"])
def test_mask_writer_bounded_and_identical_to_one_shot(tmp_path, shuffled):
    store = open_store(tmp_path / "s", create=True, geometries=SIZES)
    ids = np.arange(1000, 1060, 3)
    if shuffled:
        ids = np.random.default_rng(1).permutation(ids)
    table = _mask_table(ids)
    ref = _one_shot(table, tmp_path / "ref.parquet", row_group=7)
    final = store._mask_files.path(5)
    with store.mask_writer(5, row_group=7, limit_rows=20) as w:
        for start in range(0, len(ids), 2):  # two images per add, as a tar read in batches
            part = table.filter(pa.compute.is_in(table["image_id"], pa.array(ids[start : start + 2])))
            w.add(part)
            # Nothing is visible before the commit; memory never holds more than the limit.
            assert not os.path.exists(final) and store._mask_files.files() == {}
            assert w.buffered_rows < (20 if shuffled else 7)
    store.write_marker("masks", 5, {})  # the commit: readers serve committed shards only
    assert w.peak_rows < (20 if shuffled else 7) and w.rows == table.num_rows
    assert (w.spilled_runs > 1) == shuffled
    got = pq.read_table(final)
    assert got.equals(ref)  # row for row, every column
    assert _group_sizes(final) == _group_sizes(tmp_path / "ref.parquet") and len(_group_sizes(final)) > 1
    assert sorted(os.listdir(os.path.dirname(final))) == ["part-0.parquet"]  # spilled runs are gone
    # The random-access path reads the streamed file like any other.
    some = int(ids[3])
    want = [r["rle_4"] for r in ref.filter(pa.compute.equal(ref["image_id"], some)).to_pylist()]
    assert [m["counts"] for m in store.masks_for(some, size=4)] == want


@pytest.mark.timeout(30)
def test_writer_failure_leaves_nothing(tmp_path):
    store = open_store(tmp_path / "s", create=True, geometries=SIZES)
    with pytest.raises(RuntimeError), store.mask_writer(0, row_group=3, limit_rows=4) as w:
        w.add(_mask_table([9, 8, 7]))
        w.add(_mask_table([1, 2]))  # out of order: spills runs to temp files
        raise RuntimeError("tar broke")
    assert not os.path.exists(tmp_path / "s" / "masks" / "shard=000000" / "part-0.parquet")
    assert [n for n in os.listdir(tmp_path / "s" / "masks" / "shard=000000")] == []
    # Images refuse a repeated id even across batches.
    img = pa.table({"image_id": [5], "file_name": ["a"], "height": [1], "width": [1], "jpeg_4": [b"x"]})
    with pytest.raises(StoreError, match="repeats image ids"), store.image_writer(0, row_group=2) as w:
        w.add(img)
        w.add(img)
    assert store._image_files.files() == {}


@pytest.mark.timeout(60)
def test_feature_writer_zarr_shards_bit_identical(tmp_path):
    store = open_store(tmp_path / "s", create=True)
    rng = np.random.default_rng(0)
    n, c, h, w = 11, 6, 3, 3
    feats = rng.standard_normal((n, c, h, w)).astype(np.float32) * 50
    feats[0, 0, 0, :3] = [np.inf, -0.0, 1e-8]  # fp16 edge values survive the same way
    ids = rng.permutation(np.arange(100, 100 + n))
    # Today's one-shot write: one Zarr shard holding the whole tar's block.
    ref = zarr.create_array(
        str(tmp_path / "ref"),
        shape=(n, c, h, w),
        dtype="float16",
        chunks=(1, c, h, w),
        shards=(n, c, h, w),
        compressors=_codec(),
        fill_value=0.0,
    )
    ref[...] = feats.astype(np.float16)
    fs = store.features("bb", 224)
    with fs.writer(3, n, c, (h, w), info={"patch": 14}, shard_images=4) as wr:
        for start in range(0, n, 3):
            wr.add(feats[start : start + 3], ids[start : start + 3])
            assert wr.buffered_images < 4 and fs.shards() == []  # invisible until committed
    assert wr.peak_images < 4
    store.write_marker(fs.job, 3, {})  # the commit: readers serve committed shards only
    arr = fs.array(3)
    assert arr.shards == (4, c, h, w) and arr.chunks == (1, c, h, w)
    shard_files = sorted(os.listdir(tmp_path / "s" / "features" / "bb@224" / "shard=000003" / "features" / "c"))
    assert shard_files == ["0", "1", "2"]  # three Zarr shards: 4 + 4 + 3 images
    np.testing.assert_array_equal(arr[...].view(np.uint16), ref[...].view(np.uint16))
    # Readers: ids, random access (index cached per open array), dask, and the one-call writer.
    np.testing.assert_array_equal(fs.image_ids(), ids)
    k = int(np.flatnonzero(ids == 105)[0])
    np.testing.assert_array_equal(fs.get(105).view(np.uint16), ref[k].view(np.uint16))
    many = fs.get_many([int(ids[10]), int(ids[0]), int(ids[5])])
    np.testing.assert_array_equal(many.view(np.uint16), ref[[10, 0, 5]].view(np.uint16))
    assert arr.store.hits >= 2 and arr.store.misses <= 3
    np.testing.assert_array_equal(np.asarray(fs.dask().compute()).view(np.uint16), ref[...].view(np.uint16))
    assert fs.dask().chunks[0] == (4, 4, 3)
    fs.write_shard(4, feats, ids + 1000, shard_images=4)
    store.write_marker(fs.job, 4, {})
    np.testing.assert_array_equal(fs.array(4)[...].view(np.uint16), ref[...].view(np.uint16))
    with pytest.raises(ValueError, match="declared"), fs.writer(5, 4, c, (h, w)) as wr:
        wr.add(feats[:3], ids[:3])
    assert fs.shards() == [3, 4]


@pytest.mark.timeout(240)
def test_jobs_stream_into_multi_part_shards(tmp_path, sample_shards, monkeypatch):
    """The three jobs with tiny limits write several row groups / Zarr shards per tar shard,
    identical row for row and bit for bit to the same jobs writing one part per shard."""
    from loftup.pipeline import jobs
    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.storage import features, images, masks

    shards = resolve_shards("0", sample_shards)

    def build(path):
        st = open_store(path, create=True)
        for job in (ImagesJob(), MasksJob(source_options={"max_masks": 12})):
            assert not run_job(job, st, shards, executor="inline").failed
        assert not run_job(FeaturesJob(random_init=True, batch_size=3), st, [(0, None)], executor="inline").failed
        return st

    one = build(tmp_path / "one")
    monkeypatch.setattr(jobs, "TAR_BATCH", 1)
    monkeypatch.setattr(masks, "MASK_ROW_GROUP", 5)
    monkeypatch.setattr(masks, "MASK_LIMIT_ROWS", 10)
    monkeypatch.setattr(images, "IMAGE_ROW_GROUP", 1)
    monkeypatch.setattr(features, "ZARR_SHARD_IMAGES", 2)
    many = build(tmp_path / "many")
    for name in ("masks", "images"):
        a, b = (
            one._mask_files if name == "masks" else one._image_files,
            many._mask_files if name == "masks" else many._image_files,
        )
        assert pq.read_metadata(a.files()[0]).num_row_groups == 1
        assert pq.read_metadata(b.files()[0]).num_row_groups > 1
        assert a.read(0).equals(b.read(0))
    f1, f2 = one.features("dinov2_vits14", 224), many.features("dinov2_vits14", 224)
    assert f1.array(0).shards[0] == 4 and f2.array(0).shards[0] == 2
    np.testing.assert_array_equal(f1.array(0)[...].view(np.uint16), f2.array(0)[...].view(np.uint16))
    np.testing.assert_array_equal(f1.image_ids(), f2.image_ids())
    assert many.marker("features/dinov2_vits14@224", 0)["images"] == 4


@pytest.mark.timeout(60)
def test_task_memory_sized_from_the_job_and_overridable(tmp_path, sample_shards):
    import subprocess
    import sys

    from loftup.pipeline.jobs import FeaturesJob, GiB, ImagesJob, MasksJob
    from loftup.pipeline.runner import task_memory
    from loftup.storage import LoftupError
    from loftup.storage.features import zarr_shard_images

    f224, f448 = FeaturesJob(), FeaturesJob(res=448)
    # Zarr shards hold at most 192 MiB of maps: 1,024 of 16x16x384 fp16, 256 of 32x32x384.
    assert zarr_shard_images(384, (16, 16)) == 1024 and zarr_shard_images(384, (32, 32)) == 256
    assert zarr_shard_images(1536, (64, 64)) == 16 and zarr_shard_images(8, (1, 1)) == 1024
    # A 448 forward holds 4x the tokens and 16x the attention of a 224 one.
    assert f448.memory_bytes() - f224.memory_bytes() > 32 * 6 * (1025**2 - 257**2) * 4
    assert FeaturesJob(batch_size=64).memory_bytes() > f224.memory_bytes()
    assert MasksJob(source="sam").memory_bytes() > MasksJob().memory_bytes() + 4 * GiB
    assert ImagesJob(sizes=(224,)).memory_bytes() < ImagesJob().memory_bytes()
    nodes = [8.0 * GiB, 16.0 * GiB]
    assert task_memory(f224, None, nodes, embedded=False) == f224.memory_bytes()
    assert task_memory(f224, 0.5, nodes, embedded=False) == GiB // 2
    assert task_memory(f224, 0, nodes, embedded=False) == 0
    assert task_memory(MasksJob(source="sam"), None, [GiB], embedded=True) == GiB  # capped on a laptop
    with pytest.raises(LoftupError, match="largest Ray node offers 1.0 GiB"):
        task_memory(MasksJob(source="sam"), None, [GiB], embedded=False)
    with pytest.raises(LoftupError, match="no Ray node offers that much"):
        task_memory(f224, 32, nodes, embedded=False)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "loftup.cli.pipeline",
            "images",
            "--shards",
            "0",
            "--sa1b-root",
            str(sample_shards),
            "--store",
            str(tmp_path / "s"),
            "--memory-per-task",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert p.returncode == 2 and "--memory-per-task must be >= 0 GiB" in p.stderr and "Traceback" not in p.stderr
