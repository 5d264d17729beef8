"""Fault injection: every console script's failure paths (exit codes, one line, no traceback),
failed shards recorded, Ctrl-C, and damage that the store detects and repairs. The ``world``
fixture (tiny tars and a store) is in conftest.py, the driver helpers in faultlib.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from faultlib import ENV, commit_features, run_cases

from loftup.pipeline.jobs import ImagesJob, MasksJob
from loftup.pipeline.runner import run_job
from loftup.pipeline.shards import resolve_shards
from loftup.storage import open_store
from loftup.storage.errors import LoftupError


def _cases(w):
    r, t, s = w["root"], w["tars"], w["store"]
    tiny = ["--size", "112", "--pca-dim", "8", "--workers", "0", "--device", "cpu", "--max-steps", "1", "--random-init"]
    return [
        # (script, args, exit code, text that must be on stderr)
        ("loftup-pipeline", ["masks", "--shards", "0", "--sa1b-root", t], 2, "Missing option '--store'"),
        (
            "loftup-pipeline",
            ["features", "--shards", "0", "--store", s, "--res", "abc"],
            2,
            "Invalid value for '--res'",
        ),
        ("loftup-pipeline", ["nosuchcmd"], 2, "No such command"),
        ("loftup-store", ["nosuchcmd"], 2, "No such command"),
        ("loftup-train", ["stage1", "--out", r / "o"], 2, "Missing option '--store'"),
        (
            "loftup-pipeline",
            [
                "masks",
                "--shards",
                "0-3",
                "--sa1b-root",
                t,
                "--store",
                r / "s_fail",
                "--executor",
                "inline",
                "--sizes",
                "224",
            ],
            1,
            "truncated",
        ),
        ("loftup-pipeline", ["masks", "--shards", "9", "--sa1b-root", t, "--store", s], 2, "sa_000009.tar"),
        (
            "loftup-pipeline",
            ["masks", "--shards", "0", "--sa1b-root", t, "--store", s, "--check-skipped", "fast"],
            2,
            "unknown --check-skipped 'fast'",
        ),
        (
            "loftup-pipeline",
            [
                "features",
                "--shards",
                "0",
                "--store",
                s,
                "--backbone",
                "dinov2_vits14",
                "--res",
                "56",
                "--weights",
                r / "nope.pth",
                "--executor",
                "inline",
            ],
            2,  # checked before any shard starts
            "weights file not found: " + str(r / "nope.pth"),
        ),
        ("loftup-pipeline", ["status", "--store", r / "nostore"], 2, "no store at"),
        ("loftup-pipeline", ["sample-data", r / "sd", "--fault", "exploding"], 2, "unknown fault"),
        ("loftup-store", ["info", r / "nostore"], 2, "no store at"),
        (
            "loftup-store",
            ["show", s, "--image-id", "999", "--out", r / "x.png"],
            2,
            "image 999 is not in the image store",
        ),
        (
            "loftup-store",
            ["show", s, "--image-id", "IMG", "--backbone", "vit_s16", "--out", r / "x.png"],
            2,
            "no features of vit_s16@224",
        ),
        ("loftup-store", ["masks", s, "--columns", "image_id,nosuchcol"], 2, "nosuchcol"),
        (
            "loftup-train",
            ["stage1", "--store", s, "--out", r / "run_zero", "--resume", "--batch-size", "2", *tiny],
            2,
            "run_zero/last.pt",
        ),
        (
            "loftup-train",
            ["stage1", "--store", s, "--out", r / "o1", "--batch-size", "64", *tiny],
            2,
            "fewer than one global batch of 64",
        ),
        ("loftup-train", ["stage1", "--store", s, "--out", r / "o2", "--shards", "1,7", *tiny], 2, "7 (finish them"),
        # a budget no path fits, and a micro-batch that does not divide the batch: refused before
        # the first step, nothing written (checked below)
        (
            "loftup-train",
            ["stage1", "--store", s, "--out", r / "o_mem", "--batch-size", "2", "--max-memory", "0.5", *tiny],
            2,
            "stage1 at batch 2, 112 px output needs about",
        ),
        (
            "loftup-train",
            ["stage1", "--store", s, "--out", r / "o_mem", "--batch-size", "2", "--micro-batch", "3", *tiny],
            2,
            "--micro-batch 3 must divide the per-rank batch 2",
        ),
        (
            "loftup-train",
            ["stage2", "--init", r / "bad" / "garbage.safetensors", "--store", s, "--out", r / "o3", "--random-init"],
            2,
            "garbage.json",
        ),
        (
            "loftup-train",
            ["upsample", r / "photo.png", "--checkpoint", r / "bad" / "zero.safetensors"],
            2,
            "zero.safetensors",
        ),
        (
            "loftup-train",
            ["evaluate", "masks", "--store", s, "--shards", "0", "--backbone", "vit_s16"],
            2,
            "vit_s16@224",
        ),
        # after the failed masks run above: its failed shards show in status and errors
        ("loftup-store", ["status", r / "s_fail"], 0, "masks"),
        ("loftup-store", ["errors", r / "s_fail"], 0, "sa_000002.tar"),
    ]


def test_every_command_failure_path_exit_code_one_line_no_traceback(world):
    st = open_store(world["store"])
    image_id = int(st.image_ids(0)[0])
    cases = [
        (sc, [str(image_id) if a == "IMG" else a for a in args], code, text) for sc, args, code, text in _cases(world)
    ]
    results = run_cases([(sc, args) for sc, args, _, _ in cases])
    Path(os.environ.get("LOFTUP_FAULTS_TIMES", os.devnull)).write_text(
        json.dumps([(c[0], str(c[1][:2]), r["seconds"]) for c, r in zip(cases, results)])
    )
    for (script, args, code, text), res in zip(cases, results):
        where = f"{script} {' '.join(map(str, args))}\nstdout: {res['out'][-800:]}\nstderr: {res['err'][-1500:]}"
        assert res["rc"] == code, where
        assert "Traceback" not in res["err"] + res["out"] and "╭" not in res["err"], where
        assert text in res["err"].replace("\n", " ") or text in res["out"].replace("\n", " "), where
        if code == 2 and "Usage:" not in res["err"]:
            lines = [ln for ln in res["err"].splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("error: ")]
            assert len(errors) == 1 and lines[-1] == errors[0], where  # the error is one line, and the last

    mem = next(res["err"] for (_, args, _, _), res in zip(cases, results) if "0.5" in args)
    assert "GiB even on the bounded path, more than --max-memory 0.5 GiB" in mem
    assert not (world["root"] / "o_mem").exists()  # refused before the run directory was made

    # The truncated (2) and garbage (3) tars failed as a whole: recorded, shown by status/errors.
    st = open_store(world["root"] / "s_fail")
    assert st.failed_shards("masks") == [2, 3]
    row = st.summary()["masks"]
    assert row["shards"] == 2 and row["failed_shards"] == 2
    reasons = {e["shard"]: e["reason"] for e in st.errors("masks").to_pylist() if e["stage"] == "shard"}
    assert sorted(reasons) == [2, 3] and "truncated" in reasons[2]
    status = results[-2]["err"] + results[-2]["out"]  # rich tables go to stderr
    masks_line = next(ln for ln in status.splitlines() if ln.strip("│ ").startswith("masks"))
    assert [c.strip() for c in masks_line.split("│") if c.strip()][1:4] == ["2", "0", "2"]  # done, damaged, failed


def test_ctrl_c_prints_one_line_and_exits_130(world, tmp_path):
    # 200 shards (links to one tar) so that the job is still running when SIGINT arrives, even
    # when this process is descheduled for seconds on a loaded machine.
    tars = tmp_path / "tars"
    tars.mkdir()
    for s in range(200):
        (tars / f"sa_{s:06d}.tar").symlink_to(world["tars"] / "sa_000000.tar")
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loftup.cli.pipeline",
            "masks",
            "--shards",
            "0-199",
            "--sa1b-root",
            str(tars),
            "--store",
            str(store),
            "--executor",
            "inline",
            "--sizes",
            "224",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        # A shell without job control starts background commands with SIGINT ignored, and the
        # child would inherit that (CI run as `bash .ci/run &` did): give it a user's Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    marker = store / "_status" / "masks" / "shard=000000.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["error: interrupted; completed work is kept, rerun to resume"], err
    st = open_store(store)
    done = st.done_shards("masks")
    assert 0 < len(done) < 200  # interrupted mid-job, committed shards kept
    from loftup.storage.verify import verify_store

    # committed shards intact; at most the interrupted shard's build (or its half-done swap) lies
    # around, reported, unserved, finished or removed by the next run
    problems = verify_store(st)
    interrupted = ("leftover temp files", "left its commit half done", "data without a marker")
    assert all(any(k in p for k in interrupted) for p in problems) and len(problems) <= 1, problems


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_run_dir_resume_is_safe_and_exact(tmp_path, monkeypatch):
    import random

    import torch

    from loftup.storage.errors import LoftupError
    from loftup.training.run_dir import RunDir, set_rng_state

    run = RunDir(tmp_path)
    for step in range(1, 8):
        run.log({"step": step, "loss": float(step)})
    run.close()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    run.save_state({"model": {"w": torch.arange(3.0)}, "step": 4, "epoch": 0, "offset": 8})
    after_save = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    (tmp_path / "last.tmp4242").write_bytes(b"half a checkpoint")  # what a killed writer left
    (tmp_path / ".last.pt.0123456789ab.tmp").write_bytes(b"half")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # the kill cut this line
    resumed = RunDir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]
    state = resumed.load_state()
    set_rng_state(state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == after_save
    assert torch.equal(state["model"]["w"], torch.arange(3.0)) and state["offset"] == 8
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # steps after the checkpoint are logged again by the resumed run
    mode = (tmp_path / "last.pt").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the user's umask, not a temp file's 0600

    torch.save({"step": 1, "rng": _Evil()}, tmp_path / "last.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoftupError, match="last.pt"):
        RunDir(tmp_path).load_state()
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "last.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(LoftupError, match="cannot load .*last.pt"):
        RunDir(tmp_path).load_state()


# -- damage: detected, repaired, never served ----------------------------------------------------
@pytest.fixture
def small_store(world, tmp_path):
    """masks + images (the real jobs) and features (random arrays, committed) of shards 0-1."""
    store = open_store(tmp_path / "store", create=True, geometries=(224,))
    shards = resolve_shards("0-1", world["tars"])
    for job in (MasksJob(sizes=(224,)), ImagesJob(sizes=(224,))):
        assert not run_job(job, store, shards, executor="inline").failed
    for s in (0, 1):
        commit_features(store, s, 10 + s)
    return store, shards


def _flip_bit(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def test_deleted_file_is_reported_refused_by_training_and_redone(small_store):
    from loftup.storage.errors import StoreError
    from loftup.storage.verify import verify_store
    from loftup.training.data import build_index

    store, shards = small_store
    assert verify_store(store, deep=True) == []
    want = store.masks_table(0).sort_by([("image_id", "ascending"), ("order", "ascending")])
    (Path(store.root) / "masks" / "shard=000000" / "part-0.parquet").unlink()
    assert any("masks shard 000000: missing file part-0.parquet" in p for p in verify_store(store))
    row = store.summary()["masks"]
    assert (row["shards"], row["damaged_shards"]) == (1, 1)  # status no longer counts it as done
    with pytest.raises(StoreError, match="shard 0 of masks .* is damaged"):
        build_index(store, ["images", "masks"], [0, 1])
    summary = run_job(MasksJob(sizes=(224,)), store, shards, executor="inline")
    assert sorted(summary.done) == [0] and summary.skipped == [1] and 0 in summary.damaged
    store.refresh()
    assert store.masks_table(0).sort_by([("image_id", "ascending"), ("order", "ascending")]).equals(want)
    assert verify_store(store, deep=True) == []


def test_flipped_bits_fail_reads_and_deep_verify(small_store):
    from loftup.storage.errors import StoreError
    from loftup.storage.verify import verify_store

    store, _ = small_store
    root = Path(store.root)
    chunk = root / "features" / "dinov2_vits14@224" / "shard=000001" / "features" / "c" / "0" / "0" / "0" / "0"
    _flip_bit(chunk, 0.3)
    _flip_bit(root / "masks" / "shard=000000" / "part-0.parquet", 0.3)
    assert verify_store(store) == []  # sizes unchanged: only checksums can tell
    deep = verify_store(store, deep=True)
    assert any(p.startswith("masks shard 000000: part-0.parquet changed since commit") for p in deep), deep
    assert any(p.startswith("features/dinov2_vits14@224 shard 000001:") for p in deep), deep
    image_id = int(store.image_ids(1)[0])
    with pytest.raises(StoreError, match="shard 1 of features/dinov2_vits14@224: damaged"):
        open_store(store.url).features("dinov2_vits14", 224).get(image_id)
    pf = store._mask_files.parquet_file(store._mask_files.path(0))
    with pytest.raises(OSError, match="CRC"):
        pf.read()  # the Parquet page checksum (write_page_checksum) catches the flip on read
    with pytest.raises(OSError, match="CRC"):
        store.masks_dask(["image_id", "rle_224"]).compute()  # the dask view verifies them too
    from loftup.cli.common import run
    from loftup.cli.store import app

    codes = []
    for args in (["verify", store.url], ["verify", store.url, "--deep"]):
        with pytest.raises(SystemExit) as exit_info:
            run(app, args)
        codes.append(exit_info.value.code)
    assert codes == [0, 1]


def test_rerun_redoes_a_shard_whose_bits_flipped_unless_told_to_check_sizes_only(small_store):
    from loftup.storage.errors import LoftupError
    from loftup.storage.verify import verify_store

    store, shards = small_store
    want = store.masks_table(0).sort_by([("image_id", "ascending"), ("order", "ascending")])
    part = Path(store.root) / "masks" / "shard=000000" / "part-0.parquet"
    _flip_bit(part, 0.3)
    quick = run_job(MasksJob(sizes=(224,)), store, shards, executor="inline", check_skipped="sizes")
    assert quick.done == {} and sorted(quick.skipped) == [0, 1] and quick.damaged == {}
    summary = run_job(MasksJob(sizes=(224,)), store, shards, executor="inline")  # checksums: the default
    assert sorted(summary.done) == [0] and summary.skipped == [1]
    assert "sha256 differs" in summary.damaged[0]
    store.refresh()
    assert store.masks_table(0).sort_by([("image_id", "ascending"), ("order", "ascending")]).equals(want)
    assert verify_store(store, deep=True) == []
    with pytest.raises(LoftupError, match="--check-skipped 'fast'"):
        run_job(MasksJob(sizes=(224,)), store, shards, executor="inline", check_skipped="fast")


def test_uncommitted_data_is_never_served(small_store):
    from loftup.storage.verify import verify_store

    store, _ = small_store
    n0 = len(store.masks_table(0))
    total = store.masks_dataset().count_rows()
    ids0 = store.image_ids(0)
    (Path(store.root) / "_status" / "masks" / "shard=000000.json").unlink()  # lost marker (disk full)
    (Path(store.root) / "_status" / "features__dinov2_vits14@224" / "shard=000000.json").unlink()
    store.refresh()
    assert store.masks_dataset().count_rows() == total - n0
    with pytest.raises(LoftupError, match=f"image {int(ids0[0])} is in images shard 0, whose masks are not committed"):
        store.masks_for(int(ids0[0]))
    assert store.features("dinov2_vits14", 224).shards() == [1]
    problems = verify_store(store)
    assert any("masks shard 000000: data without a marker" in p for p in problems)
    assert any("features/dinov2_vits14@224 shard 000000: data without a marker" in p for p in problems)


def test_second_run_of_a_job_refuses_stale_lease_is_reclaimed(small_store):
    from loftup.storage import commit
    from loftup.storage.errors import LoftupError

    store, shards = small_store
    other = open_store(store.url)
    with other.lease("masks"):  # another run holds the job, its heartbeat fresh
        with pytest.raises(LoftupError, match="job masks is already running on this store"):
            run_job(MasksJob(sizes=(224,)), store, shards, executor="inline")
        assert run_job(ImagesJob(sizes=(224,)), store, shards, executor="inline").skipped == [0, 1]  # other jobs run
    lease = commit.lease_path(store.root, "masks")
    stale = {"holder": "gone-host:1:dead", "job": "masks", "heartbeat": time.time() - 2 * commit.LEASE_STALE}
    commit.atomic_write(store.fs, lease, json.dumps(stale).encode())  # a killed run's lease
    summary = run_job(MasksJob(sizes=(224,)), store, shards, executor="inline")
    assert summary.skipped == [0, 1] and not store.fs.exists(lease)


# -- bad input is refused, not stored -----------------------------------------------------------
def test_bad_rle_becomes_an_error_row_not_a_mask(world, tmp_path):
    import io
    import tarfile

    from pycocotools import mask as mask_utils

    src = world["tars"] / "sa_000000.tar"
    tars = tmp_path / "tars"
    tars.mkdir()
    docs = {}
    with tarfile.open(src) as tf, tarfile.open(tars / "sa_000000.tar", "w") as out:
        for m in tf.getmembers():
            data = tf.extractfile(m).read() if m.isfile() else None
            if m.name.endswith(".json"):
                doc = json.loads(data)
                k = len(docs)
                ann = doc["annotations"][0]
                h, w = ann["segmentation"]["size"]
                if k == 0:  # counts of a valid mask of another size: decodes silently, wrong
                    other = np.zeros((h // 2, w), np.uint8, order="F")
                    other[:5, :5] = 1
                    ann["segmentation"]["counts"] = mask_utils.encode(other)["counts"].decode()
                else:  # garbage
                    ann["segmentation"]["counts"] = "not an rle!"
                docs[doc["image"]["image_id"]] = ann["id"]
                data = json.dumps(doc).encode()
                m.size = len(data)
            out.addfile(m, io.BytesIO(data) if data is not None else None)
    store = open_store(tmp_path / "store", create=True, geometries=(224,))
    summary = run_job(MasksJob(sizes=(224,)), store, resolve_shards("0", tars), executor="inline")
    assert not summary.failed and summary.done[0]["images"] == 0 and summary.done[0]["errors"] == 2
    rows = {e["image_id"]: e["reason"] for e in store.errors("masks").to_pylist()}
    assert sorted(rows) == sorted(docs)
    first, second = (rows[i] for i in sorted(docs))
    assert f"annotation {docs[sorted(docs)[0]]}" in first and "add up to" in first
    assert "not COCO-compressed counts" in second or "add up to" in second
    assert store.masks_dataset().count_rows() == 0


def test_area_and_bbox_must_match_the_mask():
    from pycocotools import mask as mask_utils

    from loftup.pipeline.sa1b import normalise_annotation

    m = np.zeros((40, 60), np.uint8, order="F")
    m[10:20, 5:35] = 1  # 300 px, bbox [5, 10, 30, 10]
    seg = {"size": [40, 60], "counts": mask_utils.encode(m)["counts"].decode()}
    good = {"id": 1, "segmentation": seg, "area": 300, "bbox": [5, 10, 30, 10]}
    assert normalise_annotation([good])[0]["area"] == 300
    assert normalise_annotation([{"id": 1, "segmentation": seg}])[0]["bbox"] == [5.0, 10.0, 30.0, 10.0]
    with pytest.raises(ValueError, match="annotation 1: area 87698 but the mask has 300 px"):
        normalise_annotation([{**good, "area": 87698}])
    with pytest.raises(ValueError, match="bbox"):
        normalise_annotation([{**good, "bbox": [0, 0, 60, 40]}])


# -- credentials ---------------------------------------------------------------------------------
def test_credentials_never_reach_markers_manifest_configs_or_errors(tmp_path):
    from loftup.storage.errors import StoreError, error_line
    from loftup.training.run_dir import RunDir

    url = "s3://AKIDUSER:TopSecretPass@bucket/store"
    opts = {"key": "AKIDKEY123", "secret": "TopSecretKey", "client_kwargs": {"region_name": "eu-west-1"}}
    signed = "https://host/sa_000000.tar?X-Amz-Signature=TopSecretSig&x=1"
    store = open_store(tmp_path / "store", create=True, geometries=(224,))
    store.update_manifest(lambda m: m["jobs"].update({"masks": {"config": {"store": url, "storage_options": opts}}}))
    store.write_marker("masks", 0, {"tar": signed, "store": url, "config": {"storage_options": opts}})
    run = RunDir(tmp_path / "run")
    run.save_config({"store": url, "storage_options": opts})
    run.log({"step": 1, "store": url})
    run.close()
    written = "".join(p.read_text() for p in tmp_path.rglob("*.json*") if p.is_file())
    for secret in ("TopSecret", "AKIDKEY123"):
        assert secret not in written
    assert "s3://AKIDUSER:***@bucket/store" in written and "eu-west-1" in written  # the rest is kept
    assert "TopSecret" not in error_line(StoreError(f"no store at {url}"))


def test_lease_of_a_killed_run_on_this_host_is_taken_over_at_once(small_store):
    import socket

    from loftup.storage import commit

    store, shards = small_store
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = f"{socket.gethostname()}:{int(dead.stdout)}:feedbeef"
    commit.atomic_write(
        store.fs,
        commit.lease_path(store.root, "masks"),
        json.dumps({"holder": holder, "job": "masks", "heartbeat": time.time()}).encode(),
    )
    assert run_job(MasksJob(sizes=(224,)), store, shards, executor="inline").skipped == [0, 1]


# -- long work seen from a log file ----------------------------------------------------------------
def test_progress_logs_true_rates_when_not_a_terminal(monkeypatch):
    import io
    import re

    from rich.console import Console

    from loftup.pipeline.progress import ShardProgress
    from loftup.training.progress import TrainProgress

    monkeypatch.setenv("LOFTUP_LOG_EVERY", "0.25")
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=300)
    t0 = time.monotonic()
    with ShardProgress("masks", {0: 8, 1: 8}, console=console) as view:
        for _ in range(6):
            time.sleep(0.12)
            view.advance(0, 1, 0)
        view.finish(0, {"images": 6, "errors": 0})
        time.sleep(0.3)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("masks:")]
    assert len(lines) >= 2  # a line per period, with nothing else to show
    last = re.search(r"(\d+)/(\d+) images, [\d.]+ img/s now, ([\d.]+) img/s overall", lines[-1])
    assert last and last.group(1) == "6"
    elapsed = time.monotonic() - t0
    assert 6 / elapsed <= float(last.group(3)) <= 6 / 0.72 + 0.5  # images over wall time, not a burst rate

    buf.truncate(0)
    progress = TrainProgress("stage 1", total=100, start=40, console=console)  # resumed at step 40
    t0 = time.monotonic()
    for step in range(41, 47):
        time.sleep(0.1)
        progress.update(step, 0.5)
    progress.close()
    true_rate = 6 / (time.monotonic() - t0)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("stage 1:")]
    assert len(lines) >= 2 and "step 46/100" in lines[-1] and "loss 0.5000" in lines[-1]
    overall = float(re.search(r"([\d.]+) step/s overall", lines[-1]).group(1))
    assert abs(overall - true_rate) < 0.25 * true_rate  # not (46 - 0) steps in this short time
