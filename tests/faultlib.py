"""Helpers of the fault-injection tests (test_faults.py, test_safety.py): the console-script
driver and the tiny world both use (its fixture is in conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

DRIVER = Path(__file__).with_name("cli_driver.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1"}
# Dims of dinov2_vits14 at 224: what stage1 expects of stored features.
DIM, GRID = 384, 16


def run_cases(cases: list[tuple[str, list[str]]], unprivileged: bool = False) -> list[dict]:
    """Run (script, args) cases, each in its own process (see cli_driver.py). ``unprivileged``:
    without root's power to ignore file permissions, so that read-only files mean what they say
    when the tests run as root (skipped when that cannot be arranged)."""
    cmd = [sys.executable, str(DRIVER)]
    if unprivileged and os.geteuid() == 0:
        if not shutil.which("setpriv"):
            import pytest

            pytest.skip("running as root without setpriv: cannot drop the permission override")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all", *cmd]
    payload = json.dumps([{"script": s, "args": [str(a) for a in args]} for s, args in cases])
    proc = subprocess.run(cmd, input=payload, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def commit_features(store, shard: int, seed: int) -> None:
    """Random DINOv2-S-shaped features of a shard's stored images, committed (config_hash 'test')."""
    ids = store.image_ids(shard)
    feats = np.random.default_rng(seed).standard_normal((len(ids), DIM, GRID, GRID)).astype(np.float16)
    fstore = store.features("dinov2_vits14", 224)
    fstore.write_shard(shard, feats, ids, info={"patch": 14})
    store.write_marker(fstore.job, shard, {"images": len(ids), "errors": 0, "config_hash": "test"})


def make_world(root: Path) -> dict:
    """Tiny tars (2 good, 1 truncated, 1 garbage), a store with masks, images and features of
    shards 0-1, and broken checkpoint files."""
    from loftup.pipeline.jobs import ImagesJob, MasksJob
    from loftup.pipeline.runner import run_job
    from loftup.pipeline.shards import resolve_shards
    from loftup.sample_data import write_sample_shards
    from loftup.storage import open_store

    tars = root / "tars"
    write_sample_shards(tars, tars=2, images_per_tar=2, short_side=64, seed=1)
    write_sample_shards(tars, tars=1, images_per_tar=2, short_side=64, seed=1, first_shard=2, faults=("truncated_tar",))
    (tars / "sa_000003.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    store = open_store(root / "store", create=True, geometries=(224,))
    shards = resolve_shards("0-1", tars)
    for job in (MasksJob(sizes=(224,)), ImagesJob(sizes=(224,))):
        assert not run_job(job, store, shards, executor="inline").failed
    for s in (0, 1):
        commit_features(store, s, s)
    bad = root / "bad"
    bad.mkdir()
    (bad / "zero.safetensors").write_bytes(b"")
    (bad / "zero.json").write_text(json.dumps({"format": "loftup-model", "config": {"dim": 384}}))
    (bad / "garbage.safetensors").write_bytes(np.random.default_rng(1).bytes(500))
    (bad / "garbage.json").write_text("{not json")
    (root / "run_zero").mkdir()
    (root / "run_zero" / "last.pt").write_bytes(b"")
    (root / "run_zero" / "config.json").write_text("{}")  # a run dir whose checkpoint write was cut
    (root / "photo.png").write_bytes(b"")
    return {"root": root, "tars": tars, "store": root / "store"}
