"""Data safety (issue 26): a failed ``--overwrite`` keeps the committed shard byte for byte, a swap
killed half-way is finished by the next run, footers and markers are checked before any training
step reads a shard, permission and path errors are one line, no file given to any option runs
code. Each case runs through the real console scripts (tests/cli_driver.py) and checks the data
after."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from faultlib import run_cases

from loftup.storage import commit, open_store
from loftup.storage.errors import NotInStore

MASKS0 = Path("masks") / "shard=000000" / "part-0.parquet"
TINY = ["--size", "112", "--pca-dim", "8", "--workers", "0", "--device", "cpu", "--max-steps", "1", "--random-init"]


class EvilScript(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` creates a file when the archive is loaded."""

    def __init__(self, target: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool, str]:
        return (self.w, self.training, self.target)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool, str]) -> None:
        t = torch.from_file(state[2], True, 2)
        t.fill_(1.0)
        self.w = state[0] * t
        self.training = state[1]
        self.target = state[2]


class EvilPickle:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def check_result(case, res) -> None:
    script, args, code, text = case
    where = f"{script} {' '.join(map(str, args))}\nstdout: {res['out'][-800:]}\nstderr: {res['err'][-1500:]}"
    assert res["rc"] == code, where
    assert "Traceback" not in res["err"] + res["out"] and "\x1b[" not in res["err"], where
    assert text in " ".join(res["err"].split()) or text in " ".join(res["out"].split()), where
    if code == 2:
        lines = [ln for ln in res["err"].splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("error: "), where
        assert len([ln for ln in lines if ln.startswith("error: ")]) == 1, where


def snapshot(store: Path, *parts: str) -> dict[str, bytes]:
    """Every committed file of the store under ``parts`` (markers, data, error tables), by path."""
    out = {}
    for part in parts:
        for p in sorted((store / part).rglob("*")):
            if p.is_file() and p.name != commit.LEASE:
                out[str(p.relative_to(store))] = p.read_bytes()
    return out


def sorted_masks(store) -> dict[int, list]:
    t = store.masks_dataset().to_table(columns=["image_id", "order", "rle_224"])
    t = t.sort_by([("image_id", "ascending"), ("order", "ascending")])
    out: dict[int, list] = {}
    for i, r in zip(t.column("image_id").to_pylist(), t.column("rle_224").to_pylist()):
        out.setdefault(i, []).append(r)
    return out


def flip_footer_max(path: Path) -> tuple[int, int]:
    """Lower the footer's ``image_id`` max statistic by one bit (the page CRCs do not cover it)."""
    md = pq.read_metadata(path)
    col = md.schema.to_arrow_schema().get_field_index("image_id")
    hi = md.row_group(md.num_row_groups - 1).column(col).statistics.max
    data = bytearray(path.read_bytes())
    start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    needle, bit = struct.pack("<q", hi), hi & -hi  # the lowest set bit: the max gets smaller
    flipped = struct.pack("<q", hi ^ bit)
    at = data.find(needle, start)
    assert at > 0
    while at != -1:
        data[at : at + 8] = flipped
        at = data.find(needle, at + 8)
    path.write_bytes(bytes(data))
    return hi, hi ^ bit


def rewrite_marker(store: Path, job: str, shard: int, edit) -> None:
    path = store / "_status" / commit.job_key(job) / f"shard={shard:06d}.json"
    marker = json.loads(path.read_text())
    edit(marker)
    path.write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def arena(world):
    """Copies of the shared store, each damaged in its own way, and the files the cases give."""
    root, base = world["root"], world["store"]
    a = root / "safety"
    a.mkdir()
    stores = {}
    for name in ("ow", "footer", "nodigest", "types", "manifest", "schema", "ro", "unread", "nomask", "temps"):
        stores[name] = a / f"s_{name}"
        shutil.copytree(base, stores[name])
    # -- case 1: tars whose shard 0 is now cut short, and a garbage weights file
    bad_tars = a / "tars_cut"
    bad_tars.mkdir()
    blob = (world["tars"] / "sa_000000.tar").read_bytes()
    (bad_tars / "sa_000000.tar").write_bytes(blob[: len(blob) // 2])
    # -- case 2: one flipped bit in the footer's image_id max of masks shard 0
    true_max, bad_max = flip_footer_max(stores["footer"] / MASKS0)
    # -- case 3: a marker without digests over a deleted file; wrong-typed marker fields;
    # wrong-typed manifest entries; a schema version given as a string
    rewrite_marker(stores["nodigest"], "masks", 0, lambda m: m.pop("files"))
    (stores["nodigest"] / MASKS0).unlink()
    rewrite_marker(stores["types"], "masks", 0, lambda m: m.update(files=[1, 2]))
    rewrite_marker(stores["types"], "images", 1, lambda m: m.update(images="many"))
    for name, edit in (("manifest", {"jobs": [], "backbones": "x"}), ("schema", {"schema_version": "1"})):
        mpath = stores[name] / "manifest.json"
        mpath.write_text(json.dumps({**json.loads(mpath.read_text()), **edit}))
    # -- case 4: a read-only store; a shard file nobody may read
    for p in [stores["ro"], *stores["ro"].rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    (stores["unread"] / MASKS0).chmod(0)
    # -- case 8: an image whose masks were all refused (shard 0 committed without its rows);
    # leftover temp files of a killed build
    st = open_store(stores["nomask"])
    table = st.masks_table(0)
    dropped = int(table.column("image_id").to_numpy().min())
    old = {k: v for k, v in st.marker("masks", 0).items() if k != "files"}
    with st.build_shard("masks", 0) as build:
        st.write_masks(0, table.filter(ds.field("image_id") != dropped))
        st.write_errors("masks", 0, [{"image_id": dropped, "member": None, "stage": "masks", "reason": "refused"}])
        build.commit(old)
    leftover = stores["temps"] / "masks" / ".shard=000000.0123456789ab.build.tmp"
    leftover.mkdir()
    (leftover / "part-0.parquet").write_bytes(b"half a shard")
    # -- files given to options: TorchScript and pickle payloads, a NaN checkpoint, a photo
    pwned = a / "pwned"
    torch.jit.script(EvilScript(str(pwned))).save(str(a / "evil_script.pt"))
    torch.save({"state_dict": {"w": EvilPickle(str(pwned))}}, a / "evil_pickle.pth")
    from loftup.training.checkpoint import save_model
    from loftup.training.model import LoftUp

    model = LoftUp(8)
    with torch.no_grad():
        model.upsampler.final_conv[0].weight.fill_(float("nan"))
    save_model(model, a / "nan.safetensors", extra={"backbone": "dinov2_vits14"})
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 30, 200)).save(a / "photo.png")
    return {
        **world,
        "a": a,
        "stores": stores,
        "bad_tars": bad_tars,
        "pwned": pwned,
        "true_max": true_max,
        "bad_max": bad_max,
        "dropped": dropped,
        "leftover": leftover,
    }


def test_failed_overwrite_keeps_the_committed_shard_byte_for_byte(arena):
    s, bad = arena["stores"]["ow"], arena["bad_tars"]
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA for --device cuda to fail")
    before = snapshot(s, "masks", "features", "images", "_status", "_errors")
    garbage = arena["root"] / "bad" / "garbage.safetensors"
    feats = ["features", "--shards", "0", "--store", s, "--res", "224", "--executor", "inline", "--overwrite"]
    cases = [
        (
            "loftup-pipeline",
            ["masks", "--shards", "0", "--sa1b-root", bad, "--store", s, "--sizes", "224", "--executor", "inline"]
            + ["--overwrite"],
            1,
            "its committed version is kept",
        ),
        ("loftup-pipeline", [*feats, "--random-init", "--device", "cuda"], 1, "its committed version is kept"),
        ("loftup-pipeline", [*feats, "--weights", garbage], 1, "cannot read weights"),
    ]
    results = run_cases([(sc, args) for sc, args, _, _ in cases])
    for case, res in zip(cases, results):
        check_result(case, res)
    assert "truncated" in results[0]["err"] and "cuda" in results[1]["err"].lower()
    assert snapshot(s, "masks", "features", "images", "_status", "_errors") == before
    store = open_store(s)
    from loftup.storage.verify import verify_store

    assert verify_store(store, deep=True) == []
    assert store.failed_shards("masks") == [] and store.summary()["masks"]["shards"] == 2


def _new_masks(store, shard: int):
    """Shard ``shard``'s masks with every RLE replaced: what a rebuilt version looks like."""
    import pyarrow as pa

    t = store.masks_table(shard)
    return t.set_column(t.schema.get_field_index("counts"), "counts", pa.array(["x"] * t.num_rows, pa.string()))


def test_a_swap_killed_at_any_point_leaves_the_old_or_the_new_shard(world, tmp_path, monkeypatch):
    """Kill the swap after each of its file-system steps: readers then see the old version or no
    committed shard (never the old marker over new files), and the next run's recovery commits
    the new version."""
    shutil.copytree(world["store"], tmp_path / "s")
    probe = open_store(tmp_path / "s")
    old_marker = {k: v for k, v in probe.marker("masks", 0).items() if k != "files"}
    old_counts = probe.masks_table(0).column("counts").to_pylist()
    new = _new_masks(probe, 0)
    steps = ("_move", "rename_into_place", "atomic_write", "remove")

    def crash_after(n: int):
        calls = {"n": 0}

        def wrap(fn):
            def step(*args, **kw):
                out = fn(*args, **kw)
                calls["n"] += 1
                if calls["n"] == n:
                    raise KeyboardInterrupt  # a kill: nothing after this step runs
                return out

            return step

        return calls, wrap

    outcomes = set()
    for n in range(1, 50):
        path = tmp_path / f"k{n}"
        shutil.copytree(tmp_path / "s", path)
        st = open_store(path)
        calls, wrap = crash_after(n)
        killed = False
        with monkeypatch.context() as m:
            try:
                with st.build_shard("masks", 0) as build:
                    st.write_masks(0, new)
                    st.write_errors("masks", 0, [])
                    for name in steps:
                        m.setattr(commit, name, wrap(getattr(commit, name)))
                    build.commit(old_marker)
            except KeyboardInterrupt:
                killed = True
        reader = open_store(path)
        marker = reader.marker("masks", 0)
        if commit.usable(marker):
            counts = reader.masks_table(0).column("counts").to_pylist()
            assert counts in (old_counts, new.column("counts").to_pylist())
            outcomes.add("old" if counts == old_counts else "new")
            assert reader.shard_problems("masks", 0, deep=True) == []  # the marker matches its files
        else:
            assert marker is None
            with pytest.raises(NotInStore):  # an uncommitted shard is never served
                reader.masks_for(int(new.column("image_id")[0]))
            outcomes.add("uncommitted")
        if not killed:  # the swap ran to its end: every step has been a kill point
            break
        reader.recover("masks")
        assert reader.masks_table(0).column("counts").to_pylist() == new.column("counts").to_pylist()
        from loftup.storage.verify import verify_store

        assert verify_store(reader, deep=True) == [] and commit.leftover_temps(reader.fs, reader.root, "masks") == []
    assert outcomes == {"old", "uncommitted", "new"} and n > 5


def _status_row(text: str, job: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.strip("│ ").startswith(job + " "))
    return [c.strip() for c in line.split("│") if c.strip()]


def test_damaged_footers_markers_manifests_and_bad_files_are_one_line_and_repaired(arena, tmp_path):
    a, st, tars = arena["a"], arena["stores"], arena["tars"]
    base = open_store(arena["store"])
    want = sorted_masks(base)
    image_id = int(base.image_ids(0)[0])
    # Precondition, independent of loftup: pyarrow's own filter trusts the flipped statistic and
    # finds no rows of the image with the largest id, though the (checksummed) pages hold them.
    part = st["footer"] / MASKS0
    hi = arena["true_max"]
    assert pq.read_metadata(part).row_group(0).column(0).statistics.max == arena["bad_max"] < hi
    assert (pq.read_table(part, columns=["image_id"]).column(0).to_numpy() == hi).sum() > 0
    assert ds.dataset(part).to_table(filter=ds.field("image_id") == hi).num_rows == 0
    # Files given to options: a LoftUp checkpoint without its projection's mean, released-layout
    # weights with a 0-d tensor, a store path under a file, an output path that is a directory.
    from safetensors.torch import load_file, save_file

    from loftup.training.checkpoint import save_model, to_official_state_dict
    from loftup.training.model import LoftUp
    from loftup.training.projection import FeatureProjection

    save_model(LoftUp(8), a / "proj.safetensors", projection=FeatureProjection(16, 8))
    state = load_file(a / "proj.safetensors")
    save_file({k: v for k, v in state.items() if k != "projection.mean"}, a / "proj.safetensors")
    official = to_official_state_dict(LoftUp(8))
    torch.save({**official, "upsampler.fourier_feat.1.biases": torch.tensor(1.0)}, a / "scalar.pth")
    photo, outdir = a / "photo.png", a / "outdir"
    outdir.mkdir()
    s_any = a / "s_any"
    shutil.copytree(arena["store"], s_any)
    manifests = {n: (st[n] / "manifest.json").read_bytes() for n in ("manifest", "schema")}
    for run in ("o_old", "o_nm"):  # directories holding an earlier run
        (a / run).mkdir()
        (a / run / "metrics.jsonl").write_text("".join(json.dumps({"step": k}) + "\n" for k in range(1, 6)))
        (a / run / "last.pt").write_bytes(b"an earlier run's state")
    earlier = {p.name: p.read_bytes() for p in (a / "o_old").iterdir()}

    masks = ["--sa1b-root", tars, "--sizes", "224", "--executor", "inline"]
    stage1 = ["--batch-size", "2", *TINY]
    quick = ["--batch-size", "2", *TINY[2:], "--size", "56", "--recon-weight", "0"]  # the one run that trains
    evil, pickled, nan = a / "evil_script.pt", a / "evil_pickle.pth", a / "nan.safetensors"
    nomask = ["stage1", "--store", st["nomask"]]
    cases = [
        # case 2: a flipped footer statistic, caught by cheap verify, status, queries and training
        ("loftup-store", ["verify", st["footer"]], 1, "Parquet footer changed since commit"),
        ("loftup-store", ["status", st["footer"]], 0, "masks"),
        ("loftup-store", ["masks", st["footer"], "--image-id", hi], 2, "masks shard 0 is damaged"),
        ("loftup-train", ["stage1", "--store", st["footer"], "--out", a / "o_footer", *stage1], 2, "damaged"),
        ("loftup-pipeline", ["masks", "--shards", "0-1", "--store", st["footer"], *masks], 0, "redoing it"),
        # case 3: a marker without digests over a deleted file; wrong-typed marker fields
        ("loftup-train", ["stage1", "--store", st["nodigest"], "--out", a / "o_nd", *stage1], 2, "no file digests"),
        ("loftup-store", ["status", st["nodigest"]], 0, "masks"),
        ("loftup-store", ["verify", st["nodigest"]], 1, "no file digests"),
        ("loftup-pipeline", ["masks", "--shards", "0-1", "--store", st["nodigest"], *masks], 0, "redoing it"),
        ("loftup-store", ["status", st["types"]], 0, "images"),
        ("loftup-store", ["verify", st["types"]], 1, "'files' is a list"),
        ("loftup-train", ["stage1", "--store", st["types"], "--out", a / "o_t", *stage1], 2, "damaged"),
        ("loftup-pipeline", ["masks", "--shards", "0-1", "--store", st["types"], *masks], 0, "redoing it"),
        ("loftup-pipeline", ["images", "--shards", "0-1", "--store", st["types"], *masks], 0, "redoing it"),
        # case 3: wrong-typed manifest entries, a schema version given as a string
        ("loftup-store", ["info", st["manifest"]], 2, "damaged manifest.json"),
        ("loftup-pipeline", ["masks", "--shards", "0", "--store", st["manifest"], *masks], 2, "damaged manifest.json"),
        ("loftup-store", ["status", st["schema"]], 2, "schema_version is '1' (a str)"),
        # case 4: paths that are files, directories where files go
        ("loftup-pipeline", ["masks", "--shards", "0", "--store", photo / "s", *masks], 2, "Not a directory"),
        ("loftup-store", ["show", arena["store"], "--image-id", image_id, "--out", outdir], 2, "Is a directory"),
        ("loftup-train", ["stage1", "--store", arena["store"], "--out", photo, *stage1], 2, "File exists"),
        # case 5: checkpoint loaders outside the strict path
        ("loftup-train", ["upsample", photo, "--checkpoint", a / "proj.safetensors"], 2, "missing: mean"),
        ("loftup-train", ["upsample", photo, "--official", a / "scalar.pth"], 2, "has shape ()"),
        # case 7: archives and pickles that would run code (every option reads files through
        # read_state_dict: test_every_weights_file_is_read_without_running_code)
        ("loftup-train", ["upsample", photo, "--checkpoint", evil], 2, "refusing TorchScript archive"),
        ("loftup-train", ["upsample", photo, "--official", evil], 2, "refusing TorchScript archive"),
        ("loftup-train", ["upsample", photo, "--official", pickled], 2, "Weights only load failed"),
        (
            "loftup-train",
            ["evaluate", "masks", "--store", s_any, "--shards", "0", "--checkpoint", pickled],
            2,
            "Weights only load failed",
        ),  # fmt: skip
        # case 8: smaller points
        (
            "loftup-train",
            ["evaluate", "masks", "--store", s_any, "--shards", "0", "--checkpoint", nan],
            2,
            "non-finite values",
        ),  # fmt: skip
        (
            "loftup-train",
            ["stage2", "--init", nan, "--store", s_any, "--out", a / "o_nan", "--random-init"],
            2,
            "non-finite values",
        ),  # fmt: skip
        (
            "loftup-train",
            ["stage1", "--store", s_any, "--out", a / "o_lr", "--lr", "-1", *stage1],
            2,
            "--lr must be a positive number",
        ),  # fmt: skip
        (
            "loftup-pipeline",
            ["masks", "--shards", "0", "--store", s_any, *masks, "--max-retries", "-1"],
            2,
            "--max-retries must be >= 0",
        ),  # fmt: skip
        (
            "loftup-pipeline",
            ["masks", "--shards", "0-1", "--store", s_any, *masks[:-1], "bogus"],
            2,
            "unknown executor 'bogus'",
        ),  # fmt: skip
        ("loftup-store", ["verify", st["temps"]], 1, "leftover temp files of an interrupted run"),
        ("loftup-pipeline", ["masks", "--shards", "0-1", "--store", st["temps"], *masks], 0, "masks"),
        ("loftup-train", [*nomask, "--out", a / "o_old", *stage1], 2, "holds a run"),
        ("loftup-train", [*nomask, "--out", a / "o_nm", "--overwrite", *quick], 0, "left out 1 image(s) without"),
    ]
    results = run_cases([(sc, args) for sc, args, _, _ in cases])
    for case, res in zip(cases, results):
        check_result(case, res)
    assert not arena["pwned"].exists()  # no archive or pickle ran

    # case 2: status counted the damaged shard apart; training wrote nothing; the rerun repaired it
    row = _status_row(results[1]["err"] + results[1]["out"], "masks")
    assert row[1:5] == ["1", "1", "0", "2"]  # done, damaged, failed, images of the intact shard only
    assert not (a / "o_footer" / "last.pt").exists() and not (a / "o_footer" / "metrics.jsonl").exists()
    for name in ("footer", "nodigest", "types", "temps"):
        repaired = open_store(st[name])
        assert sorted_masks(repaired) == want, name
        from loftup.storage.verify import verify_store

        assert verify_store(repaired, deep=True) == [], name
    assert ds.dataset(part).to_table(filter=ds.field("image_id") == hi).num_rows > 0
    # case 3: the digest-less and wrong-typed markers were replaced by valid ones
    row = _status_row(results[6]["err"] + results[6]["out"], "masks")
    assert row[1:5] == ["1", "1", "0", "2"]
    types = open_store(st["types"])
    assert all(commit.usable(types.marker(j, s)) for j in ("masks", "images") for s in (0, 1))
    assert types.images_table(1).equals(base.images_table(1))
    assert {n: (st[n] / "manifest.json").read_bytes() for n in manifests} == manifests
    # case 4: nothing was created where a file stood
    assert photo.is_file() and not outdir.joinpath("show.png").exists()
    # case 8: the image without masks was left out and counted; a fresh run refused an existing
    # run directory, and --overwrite started the metrics afresh
    assert not arena["leftover"].exists()
    config = json.loads((a / "o_nm" / "config.json").read_text())
    assert config["images"] == 3 and config["images_without_masks"] == 1
    steps = [json.loads(line)["step"] for line in (a / "o_nm" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # not the earlier run's 1-5 followed by this one's
    from loftup.training.run_dir import RunDir

    assert RunDir(a / "o_nm").load_state()["step"] == 1
    assert {p.name: p.read_bytes() for p in (a / "o_old").iterdir()} == earlier


def test_read_only_store_and_unreadable_shard_file_are_one_line_or_redone(arena):
    """Case 4 without root's override of file permissions: a read-only store can be read, and
    written by nobody; a shard file that cannot be read is a damaged shard, redone."""
    ro, unread, tars = arena["stores"]["ro"], arena["stores"]["unread"], arena["tars"]
    image_id = int(open_store(arena["store"]).image_ids(0)[0])
    before = snapshot(ro, ".")
    masks = ["--sa1b-root", tars, "--sizes", "224", "--executor", "inline"]
    cases = [
        ("loftup-pipeline", ["masks", "--shards", "0", "--store", ro, *masks], 2, "cannot write to the store"),
        ("loftup-store", ["status", ro], 0, "masks"),
        ("loftup-store", ["verify", ro], 0, "store verified"),
        ("loftup-store", ["show", ro, "--image-id", image_id, "--out", ro / "x.png"], 2, "Permission denied"),
        ("loftup-pipeline", ["masks", "--shards", "0-1", "--store", unread, *masks], 0, "cannot be read"),
    ]
    try:
        results = run_cases([(sc, args) for sc, args, _, _ in cases], unprivileged=True)
    finally:
        for p in [ro, *ro.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    for case, res in zip(cases, results):
        check_result(case, res)
    assert snapshot(ro, ".") == before  # nothing written, not even a lease
    repaired = open_store(unread)
    assert sorted_masks(repaired) == sorted_masks(open_store(arena["store"]))
    from loftup.storage.verify import verify_store

    assert verify_store(repaired, deep=True) == []


def test_disk_full_while_a_checkpoint_is_written_is_one_line_and_tears_nothing(world, tmp_path, monkeypatch, capsys):
    """Case 6: ENOSPC from the kernel, simulated where the bytes go (the file object the atomic
    writer opens), reaches ``torch.save`` as a RuntimeError; the CLI says the disk is full."""
    import builtins
    import errno

    from loftup.cli.common import run
    from loftup.cli.train import app

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opener(path, mode="r", *args, **kw):
        f = real_open(path, mode, *args, **kw)
        return FullDisk(f) if ".last.pt." in str(path) else f  # the temp name of last.pt

    monkeypatch.setattr(commit, "open", opener, raising=False)  # what atomic_writer opens
    out = tmp_path / "run"
    args = ["stage1", "--store", world["store"], "--out", out, "--batch-size", "2", *TINY[2:]]
    with pytest.raises(SystemExit) as exit_info:
        run(app, [str(x) for x in args + ["--size", "56", "--recon-weight", "0"]])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exit_info.value.code == 2, err
    assert lines[-1] == f"error: disk full while writing {out / 'last.pt'}; completed work is kept: free space and " \
        "rerun to resume", err  # fmt: skip
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.name == "last.pt") == []


def test_every_weights_file_is_read_without_running_code(arena, tmp_path):
    """Case 7: every option that takes a weights or checkpoint file reads it through
    read_state_dict (and ``last.pt`` through weights_only), which runs nothing: a TorchScript
    archive whose ``__setstate__`` creates a file, and a pickle that would run a shell command,
    are refused, and the file never appears; a plain TorchScript archive reads exactly."""
    import re

    from loftup.pipeline.backbones.weights import read_state_dict
    from loftup.storage.errors import WeightsError

    pwned = arena["pwned"]
    with pytest.raises(WeightsError, match="refusing TorchScript archive .*__setstate__"):
        read_state_dict(arena["a"] / "evil_script.pt")
    with pytest.raises(WeightsError, match="Weights only load failed") as info:
        read_state_dict(arena["a"] / "evil_pickle.pth")
    assert "\x1b[" not in str(info.value) and not pwned.exists()
    torch.jit.load(str(arena["a"] / "evil_script.pt"))  # the reference loader would have run it
    assert pwned.exists()
    pwned.unlink()

    plain = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ModuleList([torch.nn.Linear(4, 2)])
    )
    torch.jit.script(torch.nn.Sequential(plain[0], plain[1])).save(str(tmp_path / "plain.pt"))
    got, ref = read_state_dict(tmp_path / "plain.pt"), torch.jit.load(str(tmp_path / "plain.pt")).state_dict()
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)

    # No other loader: nothing in the package calls torch.jit.load or an unguarded torch.load.
    root = Path(__file__).resolve().parents[1]
    for path in [*root.glob("storage/*.py"), *root.glob("pipeline/**/*.py"), *root.glob("training/**/*.py"),
                 *root.glob("cli/*.py")]:  # fmt: skip
        text = path.read_text()
        assert "jit.load(" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_markers_from_before_footer_digests_have_their_statistics_checked_against_the_ids(world, tmp_path):
    """A marker written before footer digests (file digests, no ``footer_sha256``): readers check
    each row group's count and image_id range against the page-checksummed ids instead."""
    from loftup.storage.errors import StoreError

    base = open_store(world["store"])
    for flip in (False, True):
        path = tmp_path / f"s{int(flip)}"
        shutil.copytree(world["store"], path)
        rewrite_marker(path, "masks", 0, lambda m: [f.pop("footer_sha256", None) for f in m["files"].values()])
        hi = flip_footer_max(path / MASKS0)[0] if flip else int(base.image_ids(0).max())
        st = open_store(path)
        assert st.shard_problems("masks", 0) == []  # the cheap check has no footer digest to compare
        if flip:
            with pytest.raises(StoreError, match="masks shard 0 is damaged: the Parquet footer"):
                st.masks_for(hi)
        else:
            assert st.masks_for(hi) == base.masks_for(hi) and len(st.masks_for(hi)) > 0
