"""The pipeline jobs end to end on real sample shards: masks, images, features, resume, faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.compute as pc
import pytest
from pycocotools import mask as mask_utils

from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
from loftup.pipeline.runner import run_job
from loftup.pipeline.shards import resolve_shards
from loftup.storage import open_store
from loftup.storage.geometry import source_index


def _json_by_image(tar_path):
    out = {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if m.name.endswith(".json"):
                d = json.load(tf.extractfile(m))
                out[int(d["image"]["image_id"])] = d
    return out


def _cli(*args, env=None, check=True):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def built_store(sample_shards, tmp_path_factory):
    """masks + images + features (random-init DINOv2-S) over the two sample shards, inline."""
    store = open_store(tmp_path_factory.mktemp("pipe") / "store", create=True)
    shards = resolve_shards("0-1", sample_shards)
    for job in (MasksJob(), ImagesJob()):
        s = run_job(job, store, shards, executor="inline")
        assert not s.failed
    s = run_job(FeaturesJob(random_init=True, batch_size=4), store, [(i, None) for i, _ in shards], executor="inline")
    assert not s.failed
    return store


def test_sa1b_masks_equal_pycocotools_and_geometry(built_store, sample_shards):
    table = built_store.masks_dataset().to_table()
    truth = {}
    for shard in (0, 1):
        truth |= _json_by_image(sample_shards / f"sa_{shard:06d}.tar")
    assert set(pc.unique(table["image_id"]).to_pylist()) == set(truth)
    rows = table.to_pylist()
    assert len(rows) == sum(len(d["annotations"]) for d in truth.values())
    checked = 0
    for row in rows[::7]:  # every 7th mask keeps the test quick and still covers every image
        ann = truth[row["image_id"]]["annotations"][row["order"]]
        assert row["ann_id"] == ann["id"]
        seg = ann["segmentation"]
        full = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        stored = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["counts"].encode()}).astype(
            bool
        )
        np.testing.assert_array_equal(stored, full)
        for size in (224, 896):
            rows_i, cols_i = source_index(full.shape[0], full.shape[1], size)
            expect = full[rows_i][:, cols_i]
            got = mask_utils.decode({"size": [size, size], "counts": row[f"rle_{size}"].encode()}).astype(bool)
            np.testing.assert_array_equal(got, expect)
        assert row["bbox"] == [float(v) for v in ann["bbox"]]
        checked += 1
    assert checked > 10


def test_features_equal_backbone_on_stored_image(built_store):
    import torch

    from loftup.pipeline.backbones import create_backbone

    fs = built_store.features("dinov2_vits14", 224)
    ids = fs.image_ids()
    assert len(ids) == 8
    model = create_backbone("dinov2_vits14", random_init=True)
    for image_id in ids[:3]:
        img = np.asarray(built_store.image(int(image_id), 224))
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            ref = model(x)[0].numpy()
        got = np.asarray(fs.get(int(image_id))).astype(np.float32)
        assert got.shape == (384, 16, 16)
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_second_run_is_noop_and_config_change_redoes(built_store, sample_shards):
    shards = resolve_shards("0-1", sample_shards)
    before = built_store.masks_dataset().to_table().num_rows
    s = run_job(MasksJob(), built_store, shards, executor="inline")
    assert sorted(s.skipped) == [0, 1] and not s.done
    assert built_store.masks_dataset().to_table().num_rows == before
    s = run_job(MasksJob(source_options={"max_masks": 5}), built_store, shards[:1], executor="inline")
    assert list(s.done) == [0]
    t = built_store.masks_dataset().to_table()
    per_image = pc.value_counts(t.filter(pc.equal(t["shard"], 0))["image_id"])
    assert max(v["counts"].as_py() for v in per_image) <= 5


def test_redone_upstream_makes_features_stale(built_store, sample_shards):
    from loftup.pipeline.runner import plan_shards

    job = FeaturesJob(random_init=True, batch_size=4)
    shards = [(0, None), (1, None)]
    todo, skipped = plan_shards(job, built_store, shards, overwrite=False)
    assert todo == [] and sorted(skipped) == [0, 1]
    run_job(ImagesJob(), built_store, resolve_shards("1", sample_shards), executor="inline", overwrite=True)
    todo, skipped = plan_shards(job, built_store, shards, overwrite=False)
    assert todo == [(1, None)] and skipped == [0]
    run_job(job, built_store, shards, executor="inline")
    assert plan_shards(job, built_store, shards, overwrite=False)[0] == []


def test_corrupt_jpeg_and_missing_json_become_error_rows(tmp_path):
    from loftup.sample_data import write_sample_shards

    root = tmp_path / "sa1b"
    write_sample_shards(root, tars=1, images_per_tar=4, short_side=600, faults=("corrupt_jpeg", "missing_json"))
    store = open_store(tmp_path / "store", create=True)
    shards = resolve_shards("0", root)
    s = run_job(ImagesJob(), store, shards, executor="inline")
    assert not s.failed
    errs = store.errors("images").to_pylist()
    stages = sorted(e["stage"] for e in errs)
    assert len(errs) == 2, errs
    assert "decode" in stages
    assert store.images_dataset().to_table().num_rows == 2
    s = run_job(MasksJob(), store, shards, executor="inline")
    assert store.errors("masks").num_rows == 1  # the corrupt JPEG is not read by the sa1b source


def test_truncated_tar_fails_only_its_shard(tmp_path):
    from loftup.sample_data import write_sample_shards

    root = tmp_path / "sa1b"
    write_sample_shards(root, tars=2, images_per_tar=2, short_side=400, faults=("truncated_tar",))
    store = open_store(tmp_path / "store", create=True)
    s = run_job(MasksJob(), store, resolve_shards("0-1", root), executor="inline")
    assert list(s.done) == [0]
    assert list(s.failed) == [1] and "sa_000001.tar" in s.failed[1]
    assert sorted(store.done_shards("masks")) == [0]


def test_cli_errors_are_one_line(tmp_path, sample_shards):
    p = _cli(
        "loftup.cli.pipeline",
        "masks",
        "--shards",
        "3-1",
        "--sa1b-root",
        str(sample_shards),
        "--store",
        str(tmp_path / "s"),
        check=False,
    )
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "3-1" in p.stderr
    p = _cli(
        "loftup.cli.pipeline",
        "masks",
        "--shards",
        "0-5",
        "--sa1b-root",
        str(sample_shards),
        "--store",
        str(tmp_path / "s"),
        check=False,
    )
    assert p.returncode == 2 and "sa_000002.tar" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    p = _cli("loftup.cli.store", "status", str(tmp_path / "other"), check=False)
    assert p.returncode == 2 and "schema version" in p.stderr and "Traceback" not in p.stderr
    p = _cli("loftup.cli.pipeline", "features", "--shards", "0", "--store", str(tmp_path / "other2"), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def _masks_rows(store):
    t = store.masks_dataset().to_table(columns=["image_id", "ann_id", "order", "rle_224"])
    return sorted(zip(*(t[c].to_pylist() for c in t.column_names)))


def test_ray_worker_killed_mid_shard_then_rerun_is_exact(tmp_path, sample_shards):
    """A SIGKILLed Ray worker is retried; the retried shard starts from scratch; rows are exact."""
    ref = open_store(tmp_path / "ref", create=True)
    run_job(MasksJob(), ref, resolve_shards("0-1", sample_shards), executor="inline")

    flag = tmp_path / "killed.flag"
    args = (
        "loftup.cli.pipeline",
        "masks",
        "--shards",
        "0-1",
        "--sa1b-root",
        str(sample_shards),
        "--store",
        str(tmp_path / "s"),
        "--num-cpus",
        "2",
    )
    p = _cli(*args, env={"LOFTUP_CHAOS_KILL": f"2:{flag}"})
    assert flag.exists(), "the chaos hook never fired"
    # An embedded run: no Ray token-auth WARNING, and the summary says what to run next.
    assert "Token authentication" not in p.stderr and "Started a local Ray instance" not in p.stderr
    assert f"next: loftup-pipeline features --shards 0-1 --store {tmp_path / 's'} --backbone NAME" in p.stderr
    st = open_store(tmp_path / "s")
    assert _masks_rows(st) == _masks_rows(ref)
    assert sorted(st.done_shards("masks")) == [0, 1]


def test_killed_driver_then_rerun_is_exact(tmp_path, sample_shards):
    """The whole CLI killed mid-shard (inline executor): the rerun redoes that shard only."""
    ref = open_store(tmp_path / "ref", create=True)
    run_job(ImagesJob(), ref, resolve_shards("0-1", sample_shards), executor="inline")
    flag = tmp_path / "killed.flag"
    args = (
        "loftup.cli.pipeline",
        "images",
        "--shards",
        "0-1",
        "--sa1b-root",
        str(sample_shards),
        "--store",
        str(tmp_path / "s"),
        "--executor",
        "inline",
    )
    p = _cli(*args, env={"LOFTUP_CHAOS_KILL": f"6:{flag}"}, check=False)
    assert p.returncode == -9 and flag.exists()
    st = open_store(tmp_path / "s")
    assert sorted(st.done_shards("images")) == [0]  # shard 1 was in flight
    _cli(*args)
    a = st.images_dataset().to_table(columns=["image_id", "jpeg_224"]).sort_by("image_id")
    b = ref.images_dataset().to_table(columns=["image_id", "jpeg_224"]).sort_by("image_id")
    assert a.equals(b)


def test_ray_cluster_address_path(tmp_path, sample_shards):
    """Connect to a Ray instance started outside the job, as on a cluster (``auto`` finds it
    the way a job submitted on a cluster node does, auth token included)."""
    port = 6391
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, "RAY_ACCEPT_CLUSTER_DEFAULTS": "1"}
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=180,
    )
    try:
        p = _cli(
            "loftup.cli.pipeline",
            "masks",
            "--shards",
            "0-1",
            "--sa1b-root",
            str(sample_shards),
            "--store",
            str(tmp_path / "s"),
            "--ray-address",
            "auto",
        )
        st = open_store(tmp_path / "s")
        assert sorted(st.done_shards("masks")) == [0, 1]
        assert "summary" in p.stderr
        # Without --ray-address the job stays embedded even though a cluster runs on this host
        # (ray.init would otherwise attach to it and refuse --num-cpus with a traceback).
        p = _cli(
            "loftup.cli.pipeline",
            "images",
            "--shards",
            "0",
            "--sa1b-root",
            str(sample_shards),
            "--store",
            str(tmp_path / "s"),
            "--num-cpus",
            "1",
        )
        assert sorted(st.done_shards("images")) == [0] and "Traceback" not in p.stderr
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
