"""The console scripts as a pipe sees them: results on stdout (``--json`` parses, and its values
match the store's files read here with pyarrow), messages on stderr, exit codes; the store as
``--store`` or positionally; defaults taken from what the store holds. Uses the ``world`` fixture
(conftest.py) and the forked-process driver of faultlib.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from faultlib import run_cases

from loftup.storage import open_store

HED_DIM, HED_GRID = 512, 14  # what hed_vgg16 gives at 224
# evaluate masks at a small size on few masks: its scoring takes seconds per image at 224
CHEAP = ["--upsampler", "bilinear", "--size", "56", "--max-masks", "8"]


def _rows(root, folder: str) -> int:
    return sum(pq.read_metadata(p).num_rows for p in sorted((root / folder).rglob("*.parquet")))


@pytest.fixture(scope="module")
def stores(world, tmp_path_factory):
    """The world's store, a copy whose only features are hed_vgg16's, and one with both sets."""
    base = tmp_path_factory.mktemp("cli")
    hed, two = base / "hed", base / "two"
    shutil.copytree(world["store"], hed)
    shutil.rmtree(hed / "features" / "dinov2_vits14@224")
    shutil.rmtree(hed / "_status" / "features__dinov2_vits14@224")
    for root in (hed,):
        st = open_store(root)
        for shard in (0, 1):
            ids = st.image_ids(shard)
            feats = np.random.default_rng(shard).standard_normal((len(ids), HED_DIM, HED_GRID, HED_GRID))
            fstore = st.features("hed_vgg16", 224)
            fstore.write_shard(shard, feats.astype(np.float16), ids, info={"patch": 16})
            st.write_marker(fstore.job, shard, {"images": len(ids), "errors": 0, "config_hash": "test"})
    shutil.copytree(hed, two)
    shutil.copytree(world["store"] / "features" / "dinov2_vits14@224", two / "features" / "dinov2_vits14@224")
    shutil.copytree(
        world["store"] / "_status" / "features__dinov2_vits14@224", two / "_status" / "features__dinov2_vits14@224"
    )
    damaged = base / "damaged"
    shutil.copytree(world["store"], damaged)
    (damaged / "masks" / "shard=000001" / "part-0.parquet").unlink()
    return {"store": world["store"], "hed": hed, "two": two, "damaged": damaged, "root": base, "tars": world["tars"]}


@pytest.fixture(scope="module")
def results(stores):
    """Every case of both tests, run in one driver process (its start costs seconds)."""
    s, r = stores["store"], stores["root"]
    hed, two = stores["hed"], stores["two"]
    image_id = int(open_store(s).image_ids(0)[0])
    hed_image = int(open_store(hed).image_ids(0)[0])
    evaluate = ["evaluate", "masks", "--shards", "0", *CHEAP, "--json"]
    json_cases = [
        ("loftup-store", ["info", "--store", s, "--json"]),
        ("loftup-store", ["info", s, "--json"]),  # the positional store, as before
        ("loftup-store", ["status", "--store", s, "--json"]),
        ("loftup-pipeline", ["status", "--store", s, "--json"]),
        ("loftup-store", ["masks", "--store", s, "--json"]),
        ("loftup-store", ["masks", s, "--image-id", image_id, "--limit", "1", "--json"]),
        ("loftup-store", ["masks", "--store", s, "--limit", "2"]),
        ("loftup-store", ["verify", "--store", s, "--json"]),
        ("loftup-store", ["verify", "--store", stores["damaged"], "--json"]),
        (
            "loftup-pipeline",
            ["masks", "--shards", "0-3", "--sa1b-root", stores["tars"], "--store", r / "fail"]
            + ["--executor", "inline", "--geometries", "224"],
        ),
        ("loftup-store", ["errors", "--store", r / "fail", "--json"]),
        ("loftup-store", ["status", "--store", r / "fail"]),
        ("loftup-train", ["evaluate", "masks", "--store", s, "--shards", "0", *CHEAP, "--json"]),
        ("loftup-store", ["info"]),
        ("loftup-store", ["masks", "--store", s, "--shards", "1", "--json"]),
        ("loftup-store", ["masks", s, "--shard", "1", "--json"]),  # the old name of --shards
        ("loftup-train", ["evaluate", "masks", "--store", s, "--shards", "0", *CHEAP, "--out", r / "ev"]),
    ]
    default_cases = [
        ("loftup-train", [*evaluate, "--store", hed]),
        ("loftup-store", ["show", "--store", hed, "--image-id", hed_image, "--out", r / "hed.png"]),
        ("loftup-train", [*evaluate, "--store", two]),
        ("loftup-store", ["show", "--store", two, "--image-id", hed_image, "--out", r / "two.png"]),
        ("loftup-train", [*evaluate, "--store", two, "--res", "224", "--backbone", "hed_vgg16"]),
        ("loftup-train", ["stage1", "--store", two, "--out", r / "s1"]),
        ("loftup-pipeline", ["pseudogt", "--store", two, "--shards", "0"]),
        ("loftup-train", ["stage1", "--store", hed, "--out", r / "s1", "--backbone", "dinov2_vits14"]),
        ("loftup-pipeline", ["pseudogt", "--store", hed, "--shards", "0", "--res", "448"]),
    ]
    features = ["features", "--store", s, "--shards", "0", "--backbone", "dinov2_vits14", "--executor", "inline"]
    early_cases = [
        ("loftup-pipeline", features),  # no local copy of DINOv2's weights on the test machines
        ("loftup-pipeline", [*features, "--weights", r / "nope.pth"]),
        ("loftup-pipeline", ["implicit", "--store", s, "--shards", "0", "--weights", r / "nope.pth"]),
        (
            "loftup-pipeline",
            ["masks", "--source", "sam", "--store", r / "sam", "--sa1b-root", stores["tars"]] + ["--shards", "0"],
        ),
        (
            "loftup-pipeline",
            ["masks", "--source", "sam", "--sam-checkpoint", r / "sam.pth", "--store", r / "sam"]
            + ["--sa1b-root", stores["tars"], "--shards", "0"],
        ),
    ]
    # A checkpoint trained on CLIP: stage 2 takes its backbone, so what stops it is CLIP's missing weights.
    import torch

    from loftup.training.checkpoint import save_model
    from loftup.training.model import LoftUp

    torch.manual_seed(0)
    save_model(LoftUp(16), r / "clip.safetensors", extra={"backbone": "clip_vitb16"})
    default_cases.append(
        ("loftup-train", ["stage2", "--init", r / "clip.safetensors", "--store", s, "--out", r / "s2"])
    )
    before = _listing(s)
    everything = json_cases + default_cases + early_cases
    res = run_cases(everything)
    for (script, args), got in zip(everything, res):
        assert "Traceback" not in got["err"], (script, args, got["err"])
    assert _listing(s) == before  # no case wrote to the store it read
    n, m = len(json_cases), len(default_cases)
    return res[:n], res[n : n + m], res[n + m :]


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_every_reporting_command_prints_json_on_stdout_that_matches_the_files(stores, results):
    s, r = stores["store"], stores["root"]
    image_id = int(open_store(s).image_ids(0)[0])
    res = results[0]
    info, info_pos, status, pstatus, masks, one, table, ok, bad, run, errors, fstatus, ev, nostore, s1, s1_old, _ = res
    codes = [g["rc"] for g in res]
    assert codes == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 2, 0, 0, 0], codes

    manifest = json.loads((s / "manifest.json").read_text())
    assert json.loads(info["out"]) == manifest == json.loads(info_pos["out"])

    jobs = json.loads(status["out"])["jobs"]
    assert json.loads(pstatus["out"])["jobs"] == jobs
    assert sorted(jobs) == ["features/dinov2_vits14@224", "images", "masks"]
    assert jobs["images"]["images"] == _rows(s, "images") and jobs["masks"]["shards"] == 2
    assert jobs["masks"]["masks"] == _rows(s, "masks")

    m = json.loads(masks["out"])
    files = sorted((s / "masks").rglob("*.parquet"))
    on_disk = [pq.read_table(p, columns=["image_id", "ann_id", "area"]).to_pylist() for p in files]
    key = lambda x: (x["image_id"], x["ann_id"], x["area"])
    assert m["masks"] == _rows(s, "masks") == len(m["rows"]) > 2
    assert sorted(map(key, m["rows"])) == sorted(key(x) for rows in on_disk for x in rows)
    shard1 = json.loads(s1["out"])
    assert shard1 == json.loads(s1_old["out"]) and shard1["masks"] == _rows(s / "masks", "shard=000001") > 0
    o = json.loads(one["out"])
    assert len(o["rows"]) == 1 and o["rows"][0]["image_id"] == image_id
    assert o["masks"] == sum(x["image_id"] == image_id for x in m["rows"])
    assert f"showing 2 of {m['masks']} rows" in " ".join(table["out"].split()) and table["err"] == ""

    assert json.loads(ok["out"]) == {"ok": True, "deep": False, "problems": []}
    b = json.loads(bad["out"])
    assert not b["ok"] and any("part-0.parquet" in p for p in b["problems"])

    e = json.loads(errors["out"])
    err_files = sorted((r / "fail" / "_errors").rglob("*.parquet"))
    assert e["errors"] == len(e["rows"]) == sum(pq.read_metadata(p).num_rows for p in err_files) >= 2
    assert {x["shard"] for x in e["rows"] if x["stage"] == "shard"} == {2, 3}
    assert "task s: seconds of shard work, summed over shards" in " ".join(fstatus["out"].split())

    result = json.loads(ev["out"])
    assert (
        result["_run"]["backbone"] == "dinov2_vits14"
        and result["_run"]["images"] == len(open_store(s).image_ids(0)) == 2
    )
    assert 0.0 <= result["bilinear"]["prototype_miou"] <= 1.0
    assert "protocol:" in ev["err"] and "protocol" not in ev["out"].split("{", 1)[0]
    assert nostore["err"].strip().splitlines()[-1].endswith("give the store: --store STORE")


def test_features_default_to_the_stores_and_several_are_listed(stores, results):
    r = stores["root"]
    res = results[1]
    assert [g["rc"] for g in res] == [0, 0, 2, 2, 0, 2, 2, 2, 2, 2], [g["err"][-500:] for g in res]
    assert res[9]["err"].strip().splitlines()[-1].startswith("error: no weights for clip_vitb16: pass --weights PATH")
    ev = json.loads(res[0]["out"])
    assert ev["_run"]["backbone"] == "hed_vgg16" and ev["_protocol"]["res"] == 224
    assert "hed_vgg16@224 PCA" in res[1]["err"] and (r / "hed.png").stat().st_size > 1000
    for got in res[2:4] + res[5:7]:
        assert got["err"].strip().splitlines() == [
            "error: the store has several feature sets (dinov2_vits14@224, hed_vgg16@224): "
            "choose one with --backbone and --res"
        ]
    assert not (r / "two.png").exists() and not (r / "s1").exists()
    assert res[7]["err"].strip().splitlines() == [
        "error: the store has no features dinov2_vits14@*; it has: hed_vgg16@224 (loftup-pipeline features makes them)"
    ]
    assert res[8]["err"].strip().splitlines()[-1].startswith("error: the store has no features *@448; it has: hed")
    assert sorted(open_store(stores["hed"]).jobs()) == ["features/hed_vgg16@224", "images", "masks"]  # nothing written
    assert json.loads(res[4]["out"])["_run"]["backbone"] == "hed_vgg16"


def _commands(cmd, path=()):
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_and_version_of_every_command_are_for_users(monkeypatch, capsys):
    from importlib.metadata import version

    import typer

    from loftup.cli import infer, pipeline, store, train
    from loftup.cli.common import run

    monkeypatch.setenv("COLUMNS", "80")
    seen = 0
    apps = {"loftup": infer.app, "loftup-pipeline": pipeline.app, "loftup-train": train.app, "loftup-store": store.app}
    for script, app in apps.items():
        monkeypatch.setattr("sys.argv", [script])
        with pytest.raises(SystemExit) as exc:
            run(app, ["--version"])
        assert exc.value.code == 0 and capsys.readouterr().out == f"loftup {version('loftup')}\n"
        for path in _commands(typer.main.get_command(app)):
            texts = []
            for flag in ("-h", "--help") if not path else ("-h",):
                with pytest.raises(SystemExit) as exc:
                    run(app, [*path, flag])
                got = capsys.readouterr()
                assert exc.value.code == 0 and got.err == "", (path, got.err)
                texts.append(got.out)
            text = texts[0]
            assert texts[0] == texts[-1] and "Usage:" in text and "-h" in text, path
            for hidden in ("--backbone-res", "--sizes", "--shard ", "--json PATH"):  # old names, still accepted
                assert hidden not in text or (hidden == "--sizes" and path == ("stage2",)), (script, path, hidden)
            for bad in (
                "…",
                "╭",
                "<bool>",
                "<str>",
                "<int>",
                "<float>",
                "<path>",
                "<list",
                "``",
                "Thin:",
                "--no-no-",
                "{",
            ):
                assert bad not in text, (script, path, bad, text)
            seen += 1
    assert seen >= 20
    # `loftup upsample` is a console script of its own
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["loftup"] == "loftup.cli:loftup_main" and set(apps) <= set(scripts)


def test_missing_weights_are_one_line_before_any_shard_starts(stores, results):
    r = stores["root"]
    lines = [got["err"].strip().splitlines() for got in results[2]]
    assert [got["rc"] for got in results[2]] == [2] * 5, lines
    assert all(len(x) == 1 and x[0].startswith("error: ") for x in lines), lines
    assert lines[0][0].startswith("error: no weights for dinov2_vits14: pass --weights PATH")
    assert lines[1][0] == lines[2][0] == f"error: weights file not found: {r / 'nope.pth'}"
    assert "--sam-checkpoint PATH" in lines[3][0] and "--sam-random-init" in lines[3][0]
    assert "random_init=True" not in lines[3][0]
    assert lines[4][0] == f"error: SAM checkpoint not found: {r / 'sam.pth'}"
    assert not (r / "sam").exists()  # the store was not even created


def _at_80(monkeypatch, capsys, app, args) -> str:
    from loftup.cli.common import run

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exc:
        run(app, [str(a) for a in args])
    got = capsys.readouterr()
    assert exc.value.code == 0, got.err
    return got.out


def test_summaries_read_whole_at_80_columns(stores, results, monkeypatch, capsys):
    import io

    from rich.console import Console

    from loftup.cli import store as store_cli
    from loftup.pipeline.progress import summary_table
    from loftup.pipeline.runner import RunSummary

    s = stores["store"]
    status = _at_80(monkeypatch, capsys, store_cli.app, ["status", "--store", s])
    jobs = open_store(s).summary()
    assert "…" not in status and "task s: seconds of shard work, summed over shards (not wall time)" in status
    masks = jobs["masks"]
    assert f"masks: 2 done, 0 damaged, 0 failed shards; {masks['images']} images, {masks['masks']} masks" in status
    rows = _at_80(monkeypatch, capsys, store_cli.app, ["masks", "--store", s, "--limit", "20"])
    assert "…" not in rows and f"showing 20 of {masks['masks']} rows" in rows
    assert len([ln for ln in rows.splitlines() if ln.startswith("image_id=")]) == 20

    # A job's summary: wall seconds, said so, every header whole
    out = io.StringIO()
    summary = RunSummary(job="masks", done={0: {"images": 8, "errors": 1, "bytes": 3 << 20}}, seconds=2.0)
    Console(file=out, width=80).print(summary_table(summary))
    text = out.getvalue()
    assert "…" not in text and "wall s: wall-clock seconds of this run" in text
    for header in ("done", "skipped", "failed", "images", "errors", "bytes", "wall s", "images/s"):
        assert header in text.splitlines()[2]
    assert "3.0 MiB" in text and "4.00" in text  # 8 images in 2 s

    # evaluate masks names what it wrote, and writes no pictures it does not make
    ev = results[0][-1]
    assert ev["rc"] == 0 and "| bilinear |" in ev["out"]
    assert ev["err"].strip().splitlines()[-1] == (
        f"wrote {stores['root'] / 'ev' / 'results.json'}, {stores['root'] / 'ev' / 'results.md'} (no pictures for this task)"
    )


def test_command_line_defaults_are_the_jobs_defaults():
    """The options the command line is generated from start where the job classes do."""
    import dataclasses

    from loftup.pipeline import job_options as o
    from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
    from loftup.training.implicit_job import ImplicitJob
    from loftup.training.materialise import PseudoGTJob

    def defaults(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    pairs = [(o.FeaturesOptions, FeaturesJob), (o.PseudoGTOptions, PseudoGTJob), (o.ImplicitOptions, ImplicitJob)]
    for options, job in pairs:
        mine, theirs = defaults(options), defaults(job)
        store_given = {"backbone", "res"} if options is o.PseudoGTOptions else set()  # None: the store's
        shared = set(mine) & set(theirs) - store_given
        assert len(shared) >= 4 and {k: mine[k] for k in shared} == {k: theirs[k] for k in shared}, options
    geometries = tuple(int(g) for g in o.GEOMETRIES.split(","))
    assert geometries == defaults(ImagesJob)["sizes"] == defaults(MasksJob)["sizes"]
    assert defaults(o.ImagesOptions)["quality"] == defaults(ImagesJob)["quality"]
    assert defaults(o.MasksOptions)["source"] == defaults(MasksJob)["source"]
