"""bench/gpu_bench.py runs end to end on the CPU with tiny sizes, so it cannot rot before a GPU runs it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_errors_are_one_line(capsys):
    bench = _bench()
    assert bench.main(["--only", "upsampler,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown section(s) nope; known: upsampler, stage1, stage2, features, sam"]
    if not torch.cuda.is_available():
        assert bench.main(["--only", "upsampler"]) == 2
        assert "no CUDA device here; run with --cpu-small" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_cpu_small_run(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-small", "--json", str(out), "--workdir", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert "LoftUp dim 384 on CPU" in printed and "training steps, pipeline, SAM" in printed
    result = json.loads(out.read_text())
    rows = result["rows"]
    cfg = bench.SMALL

    # Upsampler: every (grid, size, path, precision) measured, bounded rows carry the CPU plan.
    up = {(r["what"], r["grid"], r["out"], r["precision"]): r for r in rows if r["what"] in ("dense", "bounded")}
    for grid in cfg["grids"]:
        for out_px in cfg["sizes"]:
            for precision in ("fp32", "bf16"):
                for path in ("dense", "bounded"):
                    r = up[(path, grid, out_px, precision)]
                    assert r["ms"] > 0 and "error" not in r
                assert up[("bounded", grid, out_px, precision)]["plan"] == [out_px, 4096]
    largest = [r for r in rows if r.get("largest")]
    assert [(r["out"], r["precision"]) for r in largest] == [(cfg["largest"][-1], "fp32"), (cfg["largest"][-1], "bf16")]
    assert {r["grid"] for r in rows if r["what"] == "dinov2_s"} == set(cfg["grids"])

    # Training steps: the trainers really ran, and the step times are their own per-step logs.
    work = tmp_path / "work"
    for stage, name in (("stage1", "stage1.safetensors"), ("stage2", "stage2.safetensors")):
        assert (work / stage / name).exists()
        row = next(r for r in rows if r["what"] == f"{stage}_step")
        logged = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in logged if "samples_per_s" in r]
        assert len(rates) == cfg[stage]["steps"] == row["steps_timed"] + 1
        assert row["s_per_step"] == pytest.approx(min(row["batch"] / r for r in rates[1:]))

    # Features job: it stored every sample image's features; the bare forward saw the same images.
    from loftup.storage import open_store

    store = open_store(work / "store")
    ids = store.image_ids(0).tolist()
    assert len(ids) == cfg["shards"]["per_tar"]
    feats = store.features("dinov2_vits14", 224)
    assert all(feats.get(i).shape == (384, 16, 16) for i in ids)
    job, bare = (next(r for r in rows if r["what"] == w) for w in ("features_job", "backbone_bare"))
    assert job["images"] == bare["images"] == len(ids)
    assert job["overhead_pct"] == pytest.approx(100 * (bare["images_per_s"] / job["images_per_s"] - 1))

    sam = next(r for r in rows if r["what"] == "sam_amg")
    assert sam["images"] == cfg["sam"]["images"] and sam["s_per_image"] > 0
    assert sam["settings"]["points_per_side"] == 2 and sam["settings"]["pred_iou_thresh"] == 0.88
