"""Commit protocol: atomic writes, markers, reset order, concurrent writers and crashes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import numpy as np
import pyarrow as pa
import pytest

from loftup.storage import commit, open_store, rle

SIZES = (8,)


def shard_masks(shard: int, sizes=SIZES, n_images: int = 30, per_image: int = 7) -> pa.Table:
    """Deterministic mask rows of one shard (ids unique to the shard)."""
    from loftup.storage import mask_schema

    rng = np.random.default_rng(shard)
    rows = []
    for i in range(n_images):
        image_id = shard * 10_000 + i
        for order in range(per_image):
            m = rng.random((12, 10)) < 0.3
            r = rle.encode(m)
            rows.append(
                {"image_id": image_id, "ann_id": image_id * 100 + order, "order": order, "height": 12, "width": 10,
                 "counts": r["counts"], "area": rle.area(r),
                 "bbox": [0.0, 0.0, 10.0, 12.0], "predicted_iou": float(rng.random()), "stability_score": 0.9,
                 "crop_box": [0.0, 0.0, 10.0, 12.0], "point": [1.0, 2.0], "source": f"p{shard}",
                 **{f"rle_{s}": rle.to_geometry(r, s)["counts"] for s in sizes}}
            )  # fmt: skip
    return pa.Table.from_pylist(rows, schema=mask_schema(sizes))


def shard_features(shard: int, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + shard)
    return rng.standard_normal((n, 16, 4, 4)).astype(np.float16), shard * 10_000 + np.arange(n)


def marker_info(shard: int) -> dict:
    return {"config_hash": "c", "images": 30, "masks": 210, "errors": 0, "bytes": 1, "seconds": 0.1,
            "versions": {}, "finished_at": "now"}  # fmt: skip


def _write_shard_job(url: str, shard: int, barrier, rounds: int) -> None:
    """Child process: write one shard's masks + features (many times, in lockstep), commit it."""
    st = open_store(url)
    table = shard_masks(shard)
    feats, ids = shard_features(shard)
    for _ in range(rounds):
        barrier.wait(timeout=60)
        st.write_masks(shard, table)
        st.features("bb", 32).write_shard(shard, feats, ids, info={"dim": 16, "patch": 8})
        st.write_errors("masks", shard, [{"image_id": ids[0], "member": "m", "stage": "s", "reason": f"r{shard}"}])
    st.write_marker("masks", shard, marker_info(shard))
    st.write_marker("features/bb@32", shard, marker_info(shard))


def _crash_after_data(url: str, shard: int) -> None:
    """Child process: write a shard's data, start one more file, and die before any marker."""
    st = open_store(url)
    st.write_masks(shard, shard_masks(shard))
    st.write_errors("masks", shard, [{"image_id": 1, "member": "m", "stage": "s", "reason": "x"}])
    feats, ids = shard_features(shard)
    st.features("bb", 32).write_shard(shard, feats, ids)
    path = commit.errors_path(st.root, "masks", shard)
    with commit.atomic_writer(st.fs, path) as f:
        f.write(b"half a file")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def test_atomic_write_replaces_or_leaves_untouched(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    target = str(tmp_path / "d" / "f.bin")
    assert commit.atomic_write(fs, target, b"one") == 3
    commit.atomic_write(fs, target, b"two!")
    assert open(target, "rb").read() == b"two!"
    with pytest.raises(RuntimeError):
        with commit.atomic_writer(fs, target) as f:
            f.write(b"partial")
            raise RuntimeError("writer died")
    assert open(target, "rb").read() == b"two!"
    assert os.listdir(tmp_path / "d") == ["f.bin"]
    tmp = commit.temp_path(target)
    assert tmp.startswith(str(tmp_path / "d") + "/.f.bin.") and commit.is_temp(tmp)
    assert commit.temp_path(target) != tmp


def test_names():
    assert commit.shard_name(123) == "shard=000123"
    assert commit.parse_shard_name("x/shard=000123.json") == 123
    assert commit.parse_shard_name(".shard=000123.json.abc.tmp") is None
    assert commit.job_key("features/dinov2_vits14@224") == "features__dinov2_vits14@224"
    assert commit.marker_path("/r", "features/b@224", 7) == "/r/_status/features__b@224/shard=000007.json"
    for bad in ("", "/abs", "a/../b", "_status", "a__b", "x/"):
        with pytest.raises(commit.StoreError):
            commit.job_key(bad)


def test_reset_removes_marker_first_then_everything_of_the_shard(tmp_store, monkeypatch):
    st = tmp_store
    for shard in (4, 5):
        st.write_masks(shard, shard_masks(shard, st.geometries))
        st.write_errors("masks", shard, [{"image_id": 1, "member": "m", "stage": "s", "reason": "x"}])
        st.write_marker("masks", shard, marker_info(shard))
    # stale temps of shard 4 (and one of shard 5 that must survive)
    stale = [
        st.path("masks", ".shard=000004.0123456789ab.tmp"),
        st.path("_errors", "masks", ".shard=000004.parquet.0123456789ab.tmp"),
        st.path("_status", "masks", ".shard=000004.json.0123456789ab.tmp"),
    ]
    keep = st.path("_status", "masks", ".shard=000005.json.0123456789ab.tmp")
    for p in [*stale, keep]:
        st.fs.pipe_file(p, b"junk")

    removed = []
    real_remove = commit.remove
    monkeypatch.setattr(commit, "remove", lambda fs, path: removed.append(path) or real_remove(fs, path))
    st.reset_shard("masks", 4)

    assert removed[0] == commit.marker_path(st.root, "masks", 4)
    assert removed[1] == st.path("masks", "shard=000004")
    assert st.marker("masks", 4) is None and list(st.done_shards("masks")) == [5]
    assert not any(st.fs.exists(p) for p in stale) and st.fs.exists(keep)
    assert st.masks_dataset().to_table(columns=["shard"]).column(0).unique().to_pylist() == [5]
    assert st.errors("masks").column("shard").to_pylist() == [5]
    with pytest.raises(commit.StoreError, match="image 40000 is not in the store"):
        st.masks_for(40_000, 224)
    assert len(st.masks_for(50_000, 224)) == 7
    st.reset_shard("masks", 99)  # resetting a shard that never ran is a no-op


@pytest.mark.timeout(120)
def test_two_processes_write_different_shards_concurrently(tmp_path):
    url = str(tmp_path / "store")
    st = open_store(url, create=True, geometries=SIZES)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_shard_job, args=(url, shard, barrier, 3)) for shard in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    assert [p.exitcode for p in procs] == [0, 0]

    assert list(st.done_shards("masks")) == [1, 2]
    for shard in (1, 2):
        want = shard_masks(shard).sort_by([("image_id", "ascending"), ("order", "ascending")])
        assert st.masks_table(shard).equals(want)
        feats, ids = shard_features(shard)
        fstore = st.features("bb", 32)
        np.testing.assert_array_equal(fstore.array(shard)[...].view(np.uint16), feats.view(np.uint16))
        np.testing.assert_array_equal(fstore.shard_image_ids(shard), ids)
        np.testing.assert_array_equal(fstore.get(int(ids[5])).view(np.uint16), feats[5].view(np.uint16))
    assert st.masks_dataset().count_rows() == 2 * 210
    assert sorted(st.errors("masks").column("reason").to_pylist()) == ["r1", "r2"]
    assert st.features("bb", 32).info == {"dim": 16, "grid": [4, 4], "patch": 8}
    assert [p for p in st.fs.find(st.root, withdirs=True) if ".tmp" in p] == []


@pytest.mark.timeout(120)
def test_crash_before_marker_is_redone_with_one_copy(tmp_path):
    url = str(tmp_path / "store")
    st = open_store(url, create=True, geometries=SIZES)
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_crash_after_data, args=(url, 3))
    proc.start()
    proc.join(90)
    assert proc.exitcode == -signal.SIGKILL

    # the data landed, but without a marker it is never served; the half-written file is hidden
    assert 3 not in st.done_shards("masks")
    assert st.masks_dataset().count_rows() == 0 and st.features("bb", 32).shards() == []
    assert st.fs.exists(st.path("masks", "shard=000003", "part-0.parquet"))
    temps = [p for p in st.fs.find(st.root, withdirs=True) if commit.is_temp(p)]
    assert len(temps) == 1 and "/_errors/masks/.shard=000003.parquet." in temps[0]
    assert st.errors("masks").num_rows == 1  # the previous complete errors file

    # the next run: no marker -> reset, redo, commit
    st.reset_shard("masks", 3)
    st.reset_shard("features/bb@32", 3)
    assert st.masks_dataset().count_rows() == 0 and st.features("bb", 32).shards() == []
    assert [p for p in st.fs.find(st.root, withdirs=True) if commit.is_temp(p)] == []
    table = shard_masks(3)
    st.write_masks(3, table)
    feats, ids = shard_features(3)
    st.features("bb", 32).write_shard(3, feats, ids)
    st.write_errors("masks", 3, [])
    st.write_marker("masks", 3, marker_info(3))
    st.write_marker("features/bb@32", 3, marker_info(3))

    assert list(st.done_shards("masks")) == [3]
    got = st.masks_dataset().to_table(columns=["image_id", "order", "shard"])
    assert got.num_rows == table.num_rows == 210
    keys = set(zip(got.column("image_id").to_pylist(), got.column("order").to_pylist()))
    assert len(keys) == 210
    assert st.errors("masks").num_rows == 0
    np.testing.assert_array_equal(st.features("bb", 32).image_ids(), ids)
    np.testing.assert_array_equal(st.features("bb", 32).dask().compute().view(np.uint16), feats.view(np.uint16))


def test_commit_on_memory_filesystem():
    import uuid

    st = open_store(f"memory://commit-{uuid.uuid4().hex}", create=True, geometries=SIZES)
    try:
        st.write_masks(0, shard_masks(0))
        st.write_errors("masks", 0, [{"image_id": 3, "member": "m", "stage": "s", "reason": "x"}])
        assert st.done_shards("masks") == {}
        st.write_marker("masks", 0, marker_info(0))
        assert st.done_shards("masks")[0]["masks"] == 210
        st.reset_shard("masks", 0)
        assert st.done_shards("masks") == {} and st.masks_dataset().count_rows() == 0
        assert st.errors().num_rows == 0
        assert [p for p in st.fs.find(st.root, withdirs=True) if commit.is_temp(p)] == []
    finally:
        st.fs.rm(st.root, recursive=True)
