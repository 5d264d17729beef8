"""Per-image optimisation baseline (FeatUp implicit) on a tiny real store: the optimiser, the job
(compact == dense, resume, per-image errors), the scalability report and Stage 1's implicit target."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loftup.pipeline.backbones import create_backbone
from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
from loftup.pipeline.runner import run_job
from loftup.sample_data import write_sample_shards
from loftup.storage import StoreError, open_store
from loftup.storage.implicit import implicit_store
from loftup.training import implicit as im
from loftup.training.implicit_job import ImplicitJob
from loftup.training.implicit_targets import ImplicitTargets
from loftup.training.losses import apply_jitter, gaussian_blur
from loftup.training.materialise import PseudoGTJob

RES = 56  # DINOv2-S/14 grid 4x4: the whole recipe at toy scale
# Toy scale; lr 1e-2 so that 40 steps move the network as far as FeatUp's 1200 at 2e-3 would.
TINY = dict(
    views=12,
    pca_views=6,
    proj_dim=8,
    featurize_batch=12,
    kernel_size=17,
    steps=40,
    views_per_step=3,
    max_pad=6,
    lr=1e-2,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Per-pixel ops on small maps: on 2 shared cores a second intra-op thread only adds spinning.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("implicit")
    tars = write_sample_shards(root / "sa1b", tars=1, images_per_tar=2, short_side=300)
    st = open_store(root / "store", create=True, geometries=(224,))
    shards = [(0, str(tars[0]))]
    for job in (ImagesJob(sizes=(224,)), MasksJob(sizes=(224,), source_options={"max_masks": 8})):
        assert not run_job(job, st, shards, executor="inline").failed
    assert not run_job(FeaturesJob(random_init=True, res=RES), st, [(0, None)], executor="inline").failed
    return st


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("dinov2_vits14", random_init=True)


def _image(store, image_id):
    from PIL import Image

    img = store.image(image_id, 224).resize((RES, RES), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().div(255)


def _featup_jitter(maps, pad, zoom, x, y, flip):
    """FeatUp's formulation (zoom the whole padded map, then crop), as the reference."""
    h, w = maps.shape[-2:]
    p = F.pad(maps, [pad] * 4, mode="reflect")
    if zoom > 1:
        p = F.interpolate(p, scale_factor=zoom, mode="bilinear")
    out = p[:, :, x : x + h, y : y + w]
    return out.flip(3) if flip else out


def test_jitter_matches_featup_formulation():
    maps = torch.randn(1, 4, 20, 20)
    cfg = im.ImplicitConfig(max_pad=5)
    params = im.sample_jitter(40, (20, 20), cfg, torch.Generator().manual_seed(0))
    assert 0.2 < (params["zoom"] > 1).float().mean() < 0.8 and params["flip"].any() and not params["flip"].all()
    for i in range(40):
        args = (float(params["zoom"][i]), int(params["x"][i]), int(params["y"][i]), bool(params["flip"][i]))
        ref = _featup_jitter(maps, 5, *args)
        assert ref.shape == (1, 4, 20, 20)
        torch.testing.assert_close(apply_jitter(maps, im.view_jitter(params, i, 5)), ref, atol=1e-4, rtol=0)


def test_downsampler_matches_featup_unfold_formulation():
    # Eval mode (no dropout, no logit mask): the row-wise windowed pooling equals FeatUp's unfold.
    torch.manual_seed(0)
    _, down, _ = im.build_modules(8, (4, 4), replace(im.ImplicitConfig(), kernel_size=17), "cpu")
    down = down.eval()
    x = torch.randn(2, 9, 56, 56, requires_grad=True)

    def featup(x):
        x = gaussian_blur(x, 5, 1.0)
        p = F.unfold(x, 17, stride=(56 - 17) // 3).view(2, 9, 289, 16).permute(0, 3, 2, 1)
        logits = down.attention_net(p).squeeze(-1) * down.w.flatten() + down.b.flatten()
        return torch.einsum("blpc,blp->bcl", p, logits.softmax(-1)).view(2, 9, 4, 4)

    ref = featup(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    down.train()  # the recomputing path; dropout off so the values are comparable
    down.attention_net[0].p = 0.0
    down.keep = 1.0
    out = down(x, (4, 4))
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_optimiser_lowers_loss_and_explains_the_views(store, backbone):
    image_id = int(store.image_ids(0)[0])
    x = _image(store, image_id)
    cfg = im.ImplicitConfig(**TINY)
    fit = im.fit_image(x, backbone, cfg, image_id=image_id)
    assert len(fit.rec_losses) == cfg.steps and fit.views.shape == (12, 8, 4, 4)
    assert np.mean(fit.rec_losses[-5:]) < np.mean(fit.rec_losses[:5]) - 0.1
    # The views are the live backbone's: view 0 recomputed independently, channel-normed, projected.
    with torch.no_grad():
        p = fit.params
        v0 = backbone(
            _featup_jitter(x, cfg.max_pad, float(p["zoom"][0]), int(p["x"][0]), int(p["y"][0]), bool(p["flip"][0]))
        )
        v0 = F.layer_norm(v0.permute(0, 2, 3, 1), (384,)).permute(0, 3, 1, 2)
        torch.testing.assert_close(fit.unprojector.project(v0)[0], fit.views[0], atol=1e-3, rtol=1e-3)
    # The same seed and zero steps give the network at initialisation.
    init = im.fit_image(x, backbone, replace(cfg, steps=0), image_id=image_id)

    def error(net):
        # Independent of the optimiser's own path: FeatUp's jitter formulation, plain MSE, eval mode.
        net.eval()
        fit.downsampler.eval()
        with torch.no_grad():
            hr = net(x)
            both = torch.cat([hr.square().sum(1, keepdim=True).sqrt(), hr], 1)
            errs = []
            for i in range(cfg.views):
                j = _featup_jitter(
                    both, cfg.max_pad, float(p["zoom"][i]), int(p["x"][i]), int(p["y"][i]), bool(p["flip"][i])
                )
                errs.append((fit.downsampler(j, fit.views.shape[-2:])[:, 1:] - fit.views[i : i + 1]).square().mean())
        return float(torch.stack(errs).mean())

    before, after = error(init.network), error(fit.network)
    assert after < 0.9 * before, (before, after)


def _job(steps=10, **kw):
    return ImplicitJob(random_init=True, res=RES, images_per_shard=2, recipe=dict(TINY, steps=steps), **kw)


def test_job_compact_equals_dense_resumes_and_records(store):
    job = _job(dense=True)
    s = run_job(job, store, [(0, None)], executor="inline")
    assert not s.failed, s.failed
    marker = store.marker(job.name, 0)
    ist = implicit_store(open_store(store.url), "dinov2_vits14", RES)
    ids = store.image_ids(0)
    assert marker["images"] == 2 and marker["errors"] == 0 and marker["recipe"]["steps"] == 10
    assert marker["compact_bytes"] == os.path.getsize(ist.compact_path(0))
    assert marker["bytes"] == marker["compact_bytes"] + marker["dense_bytes"] > 0
    assert marker["steps_total"] == 20 and marker["views_total"] == 24 and marker["fit_seconds"] > 0
    dense = ist.dense.get_many(ids)
    assert dense.shape == (2, 384, RES, RES) and dense.dtype == np.float16
    for image_id, blob, d in zip(ids, ist.blobs(ids), dense):
        net, unproj, meta = im.from_compact(blob)
        assert meta["format"] == im.FORMAT and json.loads(meta["config"])["steps"] == 10
        again = im.render(net, unproj, _image(store, int(image_id))).half().numpy()
        np.testing.assert_array_equal(again, d)
    # Stage 1's implicit targets: dense and re-evaluated compact give the same maps.
    targets = ImplicitTargets(store, "dinov2_vits14", RES)
    from_dense = targets.maps(ids)
    targets._dense_ids = set()
    torch.testing.assert_close(targets.maps(ids), from_dense, atol=0, rtol=0)

    # Resume: a done shard with the same config is skipped; another recipe redoes it.
    assert run_job(_job(dense=True), store, [(0, None)], executor="inline").skipped == [0]
    assert _job(dense=True).config_hash() != _job(dense=True, steps=11).config_hash()


def _du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_report_sums_markers_and_files(store, tmp_path, capsys, monkeypatch):
    from loftup.cli import store as store_cli
    from loftup.storage.report import scalability_report

    assert not run_job(_job(dense=True), store, [(0, None)], executor="inline").failed
    with pytest.raises(StoreError, match=r"no finished pseudogt/dinov2_vits14@56 job; run `loftup-pipeline pseudogt"):
        scalability_report(store)
    assert not run_job(PseudoGTJob(res=RES, png=False, limit=1), store, [(0, None)], executor="inline").failed
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    from loftup.cli.common import run

    rep = None
    for args in (["--json", "--json-out", str(out_json), "--png", str(out_png)], ["--store", store.url]):
        monkeypatch.setattr(sys, "argv", ["loftup-store", "report", *([store.url] if "--json" in args else []), *args])
        with pytest.raises(SystemExit) as exit_info:
            run(store_cli.app)
        assert exit_info.value.code == 0
        printed = capsys.readouterr().out
        rep = json.loads(printed) if "--json" in args else rep
    assert rep == json.loads(out_json.read_text())
    assert out_png.stat().st_size > 1000 and "50K images" in printed

    # Recomputed here from the markers and the files on disk.
    root = store.root
    mk = lambda job: list(store.done_shards(job).values())
    f, m, p, i = (
        mk("features/dinov2_vits14@56"),
        mk("masks"),
        mk("pseudogt/dinov2_vits14@56"),
        mk("implicit/dinov2_vits14@56"),
    )
    n_f = sum(x["images"] for x in f)
    sec_one = (
        sum(x["seconds"] for x in f) / n_f
        + sum(x["seconds"] for x in m) / sum(x["images"] for x in m)
        + sum(x["pseudogt_seconds"] for x in p) / sum(x["images"] for x in p)
    )
    bytes_one = _du(f"{root}/features/dinov2_vits14@56/shard=000000") / n_f + _du(f"{root}/masks/shard=000000") / 2
    n_i = sum(x["images"] for x in i)
    shard = f"{root}/implicit/dinov2_vits14@56/shard=000000"
    compact = os.path.getsize(f"{shard}/compact.parquet") / n_i
    dense = (_du(f"{shard}/features") + _du(f"{shard}/image_ids")) / n_i
    spv = sum(x["featurize_seconds"] for x in i) / sum(x["views_total"] for x in i)
    sps = sum(x["optimise_seconds"] for x in i) / sum(x["steps_total"] for x in i)
    as_run = sum(x["seconds"] for x in i) / n_i
    full = 3000 * spv + 1200 * sps + as_run - sum(x["fit_seconds"] for x in i) / n_i
    one, per = rep["one_pass"], rep["per_image_optimisation"]
    assert one["seconds_per_image"] == pytest.approx(sec_one) and one["bytes_per_image"] == pytest.approx(bytes_one)
    assert per["bytes_per_image"] == pytest.approx(compact) and per["dense_bytes_per_image"] == pytest.approx(dense)
    assert per["seconds_per_image_as_run"] == pytest.approx(as_run) and per["seconds_per_image"] == pytest.approx(full)
    assert per["dense_fp32_bytes_per_image"] == 4 * 384 * RES * RES
    assert rep["ratios"]["seconds"] == pytest.approx(full / sec_one)
    row = rep["extrapolation"]["1000000"]
    assert (
        row["one_pass"]["hours"] == pytest.approx(1e6 * sec_one / 3600) and row["one_pass"]["hours_unit"] == "CPU-hours"
    )
    assert row["per_image_optimisation"]["bytes_dense"] == pytest.approx(1e6 * dense)
    assert set(rep["extrapolation"]) == {"50000", "1000000", "11000000"} and rep["paper"]["per_image_optimisation"]


def test_report_cli_names_the_missing_job(tmp_store, capsys, monkeypatch):
    from loftup.cli import store as store_cli
    from loftup.cli.common import run

    monkeypatch.setattr(sys, "argv", ["loftup-store", "report", tmp_store.url])
    with pytest.raises(SystemExit) as exit_info:
        run(store_cli.app)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [
        f"error: no per-image optimisation in {tmp_store.url}: run `loftup-pipeline implicit` first"
    ]


def test_verify_checks_implicit_shards(store):
    from loftup.storage.verify import verify_store

    assert not run_job(_job(dense=True), store, [(0, None)], executor="inline").failed
    assert [p for p in verify_store(store) if "implicit" in p] == []
    marker = store.marker("implicit/dinov2_vits14@56", 0)
    store.write_marker("implicit/dinov2_vits14@56", 0, {**marker, "images": 3})
    problems = [p for p in verify_store(store) if "implicit" in p]
    assert problems and "2 compact rows, marker says 3" in problems[0]
    store.write_marker("implicit/dinov2_vits14@56", 0, marker)


def test_one_bad_image_is_an_error_row(store, monkeypatch):
    real = im.fit_image
    bad = int(store.image_ids(0)[1])

    def flaky(image01, backbone, cfg, image_id=0, **kw):
        if image_id == bad:
            raise RuntimeError("simulated failure")
        return real(image01, backbone, cfg, image_id=image_id, **kw)

    monkeypatch.setattr(im, "fit_image", flaky)
    job = ImplicitJob(random_init=True, res=RES, recipe=dict(TINY, steps=2))
    s = run_job(job, store, [(0, None)], executor="inline", overwrite=True)
    assert not s.failed and s.done[0]["images"] == 1 and s.done[0]["errors"] == 1
    errs = store.errors(job.name).to_pylist()
    assert [(e["image_id"], e["stage"]) for e in errs] == [(bad, "implicit")] and "simulated failure" in errs[0][
        "reason"
    ]
    assert s.done[0]["dense_bytes"] == 0 and not implicit_store(store, "dinov2_vits14", RES).has_dense(0)


def test_stage1_trains_on_stored_implicit_features(store, tmp_path, monkeypatch):
    from loftup.training.stage1 import Stage1Config, train

    assert not run_job(_job(dense=True), store, [(0, None)], executor="inline").failed
    seen = []
    real_call = ImplicitTargets.__call__

    def spy(self, image_ids, size, projection=None, space="layer_norm"):
        out = real_call(self, image_ids, size, projection, space)
        seen.append((list(image_ids), out, projection))
        return out

    monkeypatch.setattr(ImplicitTargets, "__call__", spy)
    cfg = Stage1Config(
        store=store.url,
        out=str(tmp_path / "run"),
        res=RES,
        size=RES,
        target="implicit",
        pca_dim=8,
        batch_size=2,
        max_steps=2,
        workers=0,
        progress=False,
        device="cpu",
        recipe="paper",
        log_every=1,
    )
    result = train(cfg)
    # the targets are read per image (each image's loss is written on its own: training/memory.py)
    ids = store.image_ids(0).tolist()
    assert result["steps"] == 2 and len(seen) == 2 * len(ids)
    assert [sorted(sum((b for b, _, _ in seen[k : k + 2]), [])) for k in (0, 2)] == [ids, ids]
    dense = implicit_store(store, "dinov2_vits14", RES).dense
    for batch_ids, target, projection in seen:
        assert len(batch_ids) == 1 and projection is not None
        # Independently: the stored dense maps, PCA-projected as the run's inputs, channel-normalised.
        hr = torch.from_numpy(dense.get_many(batch_ids).astype(np.float32))
        expect = F.layer_norm(projection(hr).permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
        torch.testing.assert_close(target, expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(StoreError, match="run `loftup-pipeline implicit"):
        train(
            replace(
                cfg,
                out=str(tmp_path / "run2"),
                backbone="dinov2_vits14",
                res=RES,
                shards=[0],
                target="implicit",
                store=str(_store_without_implicit(tmp_path, store)),
            )
        )


def _store_without_implicit(tmp_path, store):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(store.root, root, ignore=shutil.ignore_patterns("implicit", "implicit__*"))
    return root


def test_cli_user_errors_are_one_line(store, capsys, monkeypatch):
    from loftup.cli import pipeline as pipeline_cli
    from loftup.cli.common import run

    for extra, message in (
        (
            ["--dense"],
            "error: --dense keeps ~37 MB per image in memory until the shard is written: give --images-per-shard",
        ),
        (["--res", "50"], "error: --res 50 is not a multiple of dinov2_vits14's patch size 14"),
    ):
        monkeypatch.setattr(
            sys,
            "argv",
            [
                "loftup-pipeline",
                "implicit",
                "--shards",
                "0",
                "--store",
                store.url,
                "--random-init",
                "--executor",
                "inline",
                *extra,
            ],
        )
        with pytest.raises(SystemExit) as exit_info:
            run(pipeline_cli.app)
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]
