"""Trainer mechanics: data, exact resume, DDP on gloo, Stage 2 crop alignment and EMA."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from loftup.pipeline.jobs import FeaturesJob, ImagesJob, MasksJob
from loftup.pipeline.runner import run_job
from loftup.pipeline.shards import resolve_shards
from loftup.storage import open_store


@pytest.fixture(scope="module")
def train_store(sample_shards, tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("train") / "store", create=True)
    shards = resolve_shards("0-1", sample_shards)
    run_job(ImagesJob(), store, shards, executor="inline")
    run_job(MasksJob(source_options={"max_masks": 20}), store, shards, executor="inline")
    run_job(FeaturesJob(random_init=True, batch_size=8), store, [(s, None) for s, _ in shards], executor="inline")
    return store


def _stage1_cfg(store, out, **kw):
    from loftup.training.stage1 import Stage1Config

    base = dict(
        store=store.url,
        out=str(out),
        pca_dim=16,
        size=56,
        max_masks=10,
        batch_size=2,
        lr=1e-3,
        workers=0,
        checkpoint_every=1000,
        log_every=1,
        progress=False,
        device="cpu",
        model={"heads": 2},
        random_init=True,
        recon_jitters=2,
    )
    return Stage1Config(**{**base, **kw})


def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_shard_aware_sampler_is_seeded_blocked_and_resumable():
    from loftup.training.data import ShardAwareSampler, StoreIndex

    idx = StoreIndex(np.arange(100, 130), np.repeat([3, 5, 9], 10))
    a = list(ShardAwareSampler(idx, seed=1, epoch=0))
    assert sorted(a) == list(range(30)) and a != list(range(30))
    assert a == list(ShardAwareSampler(idx, seed=1, epoch=0))
    assert a != list(ShardAwareSampler(idx, seed=1, epoch=1))
    # each shard's rows are contiguous in the order: a rank reads few shards at a time
    shards = idx.shards[a]
    assert sum(shards[i] != shards[i + 1] for i in range(29)) == 2
    r0 = list(ShardAwareSampler(idx, seed=1, world=2, rank=0))
    r1 = list(ShardAwareSampler(idx, seed=1, world=2, rank=1))
    assert len(r0) == len(r1) == 15 and not set(r0) & set(r1)
    assert list(ShardAwareSampler(idx, seed=1, start=7)) == a[7:]


def test_stage1_dataset_rows_match_the_stores(train_store):
    from pycocotools import mask as coco

    from loftup.training.data import Stage1Dataset, batch_masks, build_index, collate, unpack_masks

    index = build_index(train_store, ["images", "masks", "features/dinov2_vits14@224"])
    assert len(index) == 8
    ds = Stage1Dataset(train_store.url, index, "dinov2_vits14", 224, max_masks=10)
    item = ds[3]
    image_id = int(index.image_ids[3])
    rles = train_store.masks_for(image_id, size=224)[:10]
    expect = np.stack([coco.decode({"size": r["size"], "counts": r["counts"].encode()}) for r in rles]).astype(bool)
    np.testing.assert_array_equal(unpack_masks(item["mask_bits"], (224, 224)).numpy(), expect)
    np.testing.assert_array_equal(item["feats"].numpy(), train_store.features("dinov2_vits14", 224).get(image_id))
    first = unpack_masks(ds[0]["mask_bits"], (224, 224))
    batch = collate([ds[0], ds[3]])
    masks, valid = batch_masks(batch, "cpu")
    assert masks.shape == (2, max(len(first), len(expect)), 224, 224) and masks.shape[:2] == valid.shape
    assert valid.sum(1).tolist() == [len(first), len(expect)]
    np.testing.assert_array_equal(masks[1, : len(expect)].numpy(), expect)
    np.testing.assert_array_equal(masks[0, : len(first)].numpy(), first.numpy())
    assert not masks[~valid].any()  # padding decodes to empty masks


@pytest.mark.parametrize("size", [(224, 224), (7, 5), (13, 9), (1, 1)])
def test_packed_masks_round_trip_to_pycocotools_decode(size):
    from pycocotools import mask as coco

    from loftup.storage import rle
    from loftup.training.data import unpack_masks

    rng = np.random.default_rng(sum(size))
    masks = rng.random((6, *size)) < np.linspace(0, 1, 6)[:, None, None]  # empty ... full
    rles = [rle.encode(m) for m in masks]
    bits, hw = rle.decode_packed(rles)
    assert hw == size and bits.shape == (6, (size[0] * size[1] + 7) // 8)
    expect = np.stack([coco.decode({"size": r["size"], "counts": r["counts"].encode()}) for r in rles]).astype(bool)
    np.testing.assert_array_equal(expect, masks)
    np.testing.assert_array_equal(unpack_masks(torch.from_numpy(bits), size).numpy(), expect)


def test_missing_features_is_a_clear_error(train_store, tmp_path):
    from loftup.storage.errors import StoreError
    from loftup.training.stage1 import train

    with pytest.raises(StoreError, match="no features for dinov2_vitb14@224"):
        train(_stage1_cfg(train_store, tmp_path / "r", backbone="dinov2_vitb14", max_steps=1))


def test_stage1_resume_is_exact(train_store, tmp_path):
    from loftup.training.stage1 import train

    # warm-up + cosine over 6 steps: the rate is a function of the step, so it resumes too
    # (and precise BN on the exported copy must not leak into last.pt)
    # hue jitter on too: its draws are a function of (seed, step) as well
    sched = dict(lr_schedule="cosine", warmup_steps=2, decay_steps=6, bn_recalibrate=2, hue_jitter=90.0)
    straight = train(_stage1_cfg(train_store, tmp_path / "a", max_steps=6, **sched))
    assert straight["steps"] == 6
    train(_stage1_cfg(train_store, tmp_path / "b", max_steps=3, **sched))
    resumed = train(_stage1_cfg(train_store, tmp_path / "b", max_steps=6, resume=True, **sched))
    assert resumed["steps"] == 6
    wa, wb = _weights(tmp_path / "a" / "stage1.safetensors"), _weights(tmp_path / "b" / "stage1.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # and the run actually trained: weights moved from a fresh init
    train(_stage1_cfg(train_store, tmp_path / "c", max_steps=1))
    assert not all(torch.equal(wa[k], _weights(tmp_path / "c" / "stage1.safetensors")[k]) for k in wa)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert '"bn_recalibrated_batches": 2' in lines[-1]
    import json
    import math

    records = [json.loads(line) for line in lines[:-1]]
    # every released term was on, and the gradient was clipped (to 1e-4) in the first 10 steps only
    assert len(records) == 6 and all({"mse", "recon", "tv"} <= r.keys() and "grad_norm" in r for r in records)
    lrs = [r["lr"] for r in records]
    expect = [5e-4, 1e-3] + [5e-4 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    np.testing.assert_allclose(lrs, expect, rtol=1e-9)
    # --resume with another config: one line naming the fields, exit code 2, nothing trained
    before = (tmp_path / "b" / "last.pt").stat().st_mtime_ns
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "loftup.cli.train",
            "stage1",
            "--store",
            train_store.url,
            "--out",
            str(tmp_path / "b"),
            "--pca-dim",
            "16",
            "--size",
            "56",
            "--max-masks",
            "10",
            "--batch-size",
            "2",
            "--lr",
            "0.002",
            "--tv-weight",
            "0.5",
            "--resume",
            "--random-init",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: the config differs"), p.stderr
    assert "lr (0.001 -> 0.002)" in err[0] and "tv_weight (0.001 -> 0.5)" in err[0] and "Traceback" not in p.stderr
    assert (tmp_path / "b" / "last.pt").stat().st_mtime_ns == before


def test_hue_rotation_keeps_grey_and_brightness_and_cycles_channels_at_120_degrees():
    from loftup.training.data import hue_rotate, hue_rotation

    rot = hue_rotation(torch.tensor([0.0, 2 * np.pi / 3, 0.7]))
    torch.testing.assert_close(rot[0], torch.eye(3))
    # 120 degrees about the grey axis maps R -> G -> B -> R: a cyclic permutation of the channels
    torch.testing.assert_close(rot[1], torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rot[2] @ rot[2].T, torch.eye(3), atol=1e-6, rtol=0)  # a rotation
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    y = hue_rotate(x, 180.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(y.mean(1), x.mean(1), atol=1e-6, rtol=0)  # brightness (grey level) kept
    grey = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    torch.testing.assert_close(hue_rotate(grey, 180.0, torch.Generator().manual_seed(1)), grey, atol=1e-6, rtol=0)
    assert (y - x).abs().amax() > 0.05  # and colours did change
    torch.testing.assert_close(hue_rotate(x, 0.0, torch.Generator().manual_seed(1)), x)


def test_recipes_resolve_released_and_paper_terms():
    from loftup.training.loop import clips_at, resolve
    from loftup.training.stage1 import RECIPES as R1
    from loftup.training.stage1 import Stage1Config
    from loftup.training.stage2 import RECIPES as R2
    from loftup.training.stage2 import Stage2Config

    rel = resolve(Stage1Config(store="s", out="o"), R1)
    assert (rel.tv_weight, rel.recon_weight, rel.recon_jitters, rel.proj_unit, rel.recon_uncertainty) == (
        0.001,
        1.0,
        4,
        True,
        True,
    )
    assert [clips_at(rel, k) for k in (0, 9, 10, 500)] == [True, True, False, False] and rel.grad_clip == 1e-4
    paper = resolve(Stage1Config(store="s", out="o", recipe="paper"), R1)
    assert (paper.tv_weight, paper.recon_weight, paper.proj_unit, paper.grad_clip) == (0.0, 0.0, False, 0.0)
    assert not clips_at(paper, 0)
    assert (
        resolve(Stage1Config(store="s", out="o", recipe="paper", tv_weight=0.2), R1).tv_weight == 0.2
    )  # explicit wins
    rel2 = resolve(Stage2Config(store="s", out="o", init="i"), R2)
    assert (
        rel2.weight_decay,
        rel2.tv_weight,
        rel2.recon_weight,
        rel2.recon_jitters,
        rel2.ema_warmup,
        rel2.teacher_train,
    ) == (0.01, 0.05, 1.0, 2, True, True)
    paper2 = resolve(Stage2Config(store="s", out="o", init="i", recipe="paper"), R2)
    assert (paper2.weight_decay, paper2.tv_weight, paper2.recon_weight, paper2.ema_warmup, paper2.teacher_train) == (
        0.0,
        0.0,
        0.0,
        False,
        False,
    )
    from loftup.storage.errors import LoftupError

    with pytest.raises(LoftupError, match="unknown recipe 'featup'"):
        resolve(Stage1Config(store="s", out="o", recipe="featup"), R1)


def test_paper_recipe_trains_on_the_main_term_alone(train_store, tmp_path, monkeypatch):
    import json

    from loftup.training.run_dir import RunDir
    from loftup.training.stage1 import train

    saved, save_state = [], RunDir.save_state
    monkeypatch.setattr(
        RunDir, "save_state", lambda self, state: (saved.append(state["step"]), save_state(self, state))
    )
    train(_stage1_cfg(train_store, tmp_path / "p", max_steps=2, recipe="paper", checkpoint_every=200))
    assert saved == [2]  # last.pt once, at the end: not again after the loop
    records = [json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert [set(r) & {"mse", "recon", "tv", "grad_norm"} for r in records] == [{"mse"}, {"mse"}]


def test_precise_batchnorm_is_the_plain_average_over_batches():
    from loftup.training.stage1 import recalibrate_batchnorm

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, feats, image, output_size=None):
            return self.bn(feats)

    torch.manual_seed(0)
    net = Net().eval()
    batches = [(torch.randn(4, 3, 5, 5) * (k + 1) + k, None) for k in range(5)]
    assert recalibrate_batchnorm(net, iter(batches), limit=3, output_size=None) == 3
    used = torch.stack([b for b, _ in batches[:3]])  # (3, 4, 3, 5, 5)
    per_batch = used.transpose(1, 2).reshape(3, 3, -1)
    torch.testing.assert_close(net.bn.running_mean, per_batch.mean(2).mean(0))
    torch.testing.assert_close(net.bn.running_var, per_batch.var(2, unbiased=True).mean(0))
    assert net.bn.momentum == 0.1 and not net.training


def test_bad_lr_schedule_is_a_clear_error(train_store, tmp_path):
    from loftup.storage.errors import LoftupError
    from loftup.training.stage1 import train

    with pytest.raises(LoftupError, match="lr_schedule must be"):
        train(_stage1_cfg(train_store, tmp_path / "r", lr_schedule="linear", max_steps=1))


def _torchrun(args, tmp_path, nproc=2):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        "29533",
        "-m",
        "loftup.cli.train",
        *args,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _rank_digests(run: Path) -> list[str]:
    return [(run / f"weights_rank{r}.sha256").read_text().strip() for r in range(2)]


def test_stage1_ddp_gloo_two_ranks_identical(train_store, tmp_path):
    run = tmp_path / "ddp"
    _torchrun(
        [
            "stage1",
            "--store",
            train_store.url,
            "--out",
            str(run),
            "--pca-dim",
            "16",
            "--size",
            "56",
            "--max-masks",
            "10",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--log-every",
            "1",
            "--random-init",
            "--recon-jitters",
            "1",
        ],
        tmp_path,
    )
    d = _rank_digests(run)
    assert d[0] == d[1]
    cfg = (run / "config.json").read_text()
    assert '"world_size": 2' in cfg


# --------------------------------------------------------------------------------- stage 2
def test_crop_plan_covers_region_inside_crop():
    from loftup.training.data import plan_crop

    rng = np.random.default_rng(0)
    for s in (224, 336, 448, 518):
        for _ in range(50):
            c = plan_crop(896, s, rng)
            t = 896 / s
            assert 0 <= c.top <= 896 - s and 0 <= c.left <= 896 - s
            assert c.n >= int(s / t) - 1
            # student pixels [r0, r0+n) map inside the crop
            assert c.r0 * t >= c.top - 1e-9 and (c.r0 + c.n) * t <= c.top + s + 1e-9
            assert c.c0 * t >= c.left - 1e-9 and (c.c0 + c.n) * t <= c.left + s + 1e-9


def test_stage2_crop_masks_are_the_crops_of_the_stored_masks(train_store):
    from pycocotools import mask as coco

    from loftup.training.data import Stage2Dataset, batch_masks, build_index, collate_stage2

    index = build_index(train_store, ["images", "masks"])
    ds = Stage2Dataset(train_store.url, index, geometry=896, crops=2, max_masks=7)
    batch = collate_stage2([ds[(1, 224, 5)], ds[(2, 224, 6)]])
    masks, valid = batch_masks(batch, "cpu")
    assert masks.shape[0] == 4 and masks.shape[-2:] == (224, 224)
    for k, c in enumerate(batch["crops"]):
        row = (1, 2)[k // 2]
        rles = train_store.masks_for(int(index.image_ids[row]), size=896)[:7]
        full = np.stack([coco.decode({"size": r["size"], "counts": r["counts"].encode()}) for r in rles]).astype(bool)
        expect = full[:, c.top : c.top + 224, c.left : c.left + 224]
        assert int(valid[k].sum()) == len(rles)
        np.testing.assert_array_equal(masks[k, : len(rles)].numpy(), expect)
        assert not masks[k, len(rles) :].any()


def test_teacher_equal_to_student_gives_zero_loss_and_shift_does_not():
    import torch.nn.functional as F

    from loftup.training.data import plan_crop
    from loftup.training.losses import affinity_loss
    from loftup.training.stage2 import student_regions, teacher_targets

    torch.manual_seed(0)
    hr, s = 448, 112  # t = 4: the teacher sees each student pixel as a 4x4 block
    student = torch.randn(1, 8, s, s)
    crops = [plan_crop(hr, s, np.random.default_rng(i)) for i in range(2)]
    n = min(c.n for c in crops)
    # What a perfect teacher would output on each crop: the student's field, seen at HR.
    field_hr = F.interpolate(student, scale_factor=4, mode="nearest")
    teacher = torch.cat([field_hr[:, :, c.top : c.top + s, c.left : c.left + s] for c in crops])
    target = teacher_targets(teacher, crops, n)
    pred = student_regions(student, crops, per_image=2, n=n)
    assert torch.allclose(target, pred, atol=1e-6)
    assert affinity_loss(pred, target).item() < 1e-10
    shifted = [replace(c, c0=c.c0 + 1) for c in crops]
    assert affinity_loss(student_regions(student, shifted, 2, n), target).item() > 1e-3


def test_ema_update_and_released_warmup_schedule():
    from types import SimpleNamespace

    from loftup.training.stage2 import Stage2, ema_decay_at, ema_update

    s, t = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    s.weight.data.normal_()
    s.running_mean.normal_()
    s.num_batches_tracked.fill_(7)
    t0, m0 = t.weight.detach().clone(), t.running_mean.clone()
    ema_update(t, s, 0.99)
    assert torch.allclose(t.weight, 0.99 * t0 + 0.01 * s.weight)
    assert torch.allclose(t.running_mean, 0.99 * m0 + 0.01 * s.running_mean)  # float buffers averaged
    assert int(t.num_batches_tracked) == 7  # integer buffers copied
    # ema-pytorch: decay min(1 - (1 + k)^(-2/3), 0.99), k its update counter
    for k, expect in ((10, 1 - 11 ** (-2 / 3)), (20, 1 - 21 ** (-2 / 3)), (998, 1 - 999 ** (-2 / 3)), (5000, 0.99)):
        assert ema_decay_at(k, 0.99) == pytest.approx(expect, rel=1e-12)
    # the loop calls after_step(step) with step optimizer steps done: copy after step 1, then every 10
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    fake = SimpleNamespace(
        cfg=SimpleNamespace(ema_warmup=True, ema_every=10, ema_decay=0.99),
        student=student,
        teacher=teacher,
        timings={"backward": 0.0},
    )
    seen = []
    for step in range(1, 32):
        before = teacher.weight.detach().clone()
        student.weight.data.add_(1.0)
        Stage2.after_step(fake, step)
        if not torch.equal(before, teacher.weight):
            decay = ((teacher.weight - student.weight) / (before - student.weight)).mean().item()
            seen.append((step, round(decay, 6)))
    assert seen == [
        (1, 0.0),
        (11, round(1 - 11 ** (-2 / 3), 6)),
        (21, round(1 - 21 ** (-2 / 3), 6)),
        (31, round(1 - 31 ** (-2 / 3), 6)),
    ]


@pytest.fixture(scope="module")
def stage1_ckpt(train_store, tmp_path_factory):
    from loftup.training.stage1 import train

    out = tmp_path_factory.mktemp("s1")
    train(_stage1_cfg(train_store, out, max_steps=2))
    return out / "stage1.safetensors"


def _stage2_cfg(store, init, out, **kw):
    from loftup.training.stage2 import Stage2Config

    base = dict(
        init=str(init),
        store=store.url,
        out=str(out),
        random_init=True,
        hr=224,
        sizes=[56, 84],
        max_masks=10,
        batch_size=2,
        lr=1e-3,
        ema_every=2,
        workers=0,
        checkpoint_every=1000,
        log_every=1,
        progress=False,
        device="cpu",
    )
    return Stage2Config(**{**base, **kw})


def test_stage2_resume_is_exact_teacher_included(train_store, stage1_ckpt, tmp_path):
    from loftup.training.stage2 import train

    train(_stage2_cfg(train_store, stage1_ckpt, tmp_path / "a", max_steps=5))
    train(_stage2_cfg(train_store, stage1_ckpt, tmp_path / "b", max_steps=3))
    train(_stage2_cfg(train_store, stage1_ckpt, tmp_path / "b", max_steps=5, resume=True))
    for name in ("stage2.safetensors", "stage2_teacher.safetensors"):
        wa, wb = _weights(tmp_path / "a" / name), _weights(tmp_path / "b" / name)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    # released terms all on; AdamW with weight decay 0.01; the teacher in train mode
    import json

    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all({"affinity", "recon", "tv"} <= r.keys() for r in records)
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.01 and state["aux"]  # downsampler + scale net
    from loftup.training.distributed import Dist
    from loftup.training.loop import resolve
    from loftup.training.stage2 import RECIPES, Stage2

    for recipe, mode in (("released", True), ("paper", False)):
        built = Stage2(resolve(_stage2_cfg(train_store, stage1_ckpt, tmp_path / "x", recipe=recipe), RECIPES), Dist())
        assert built.teacher.training is mode and built.student.training
        assert built.optimizer.param_groups[0]["weight_decay"] == (0.01 if mode else 0.0)
    # EMA warm-up every 2 steps: the teacher moved, but less than the student
    w1 = _weights(stage1_ckpt)
    ws, wt = _weights(tmp_path / "a" / "stage2.safetensors"), _weights(tmp_path / "a" / "stage2_teacher.safetensors")
    k = next(k for k in ws if k.endswith("final_conv.0.weight"))
    d_student = (ws[k] - w1[k]).norm()
    d_teacher = (wt[k] - w1[k]).norm()
    assert 0 < d_teacher < d_student


def test_stage2_rejects_init_of_another_backbone(train_store, stage1_ckpt, tmp_path):
    from loftup.storage.errors import LoftupError
    from loftup.training.stage2 import train

    with pytest.raises(LoftupError, match="trained on backbone 'dinov2_vits14'"):
        train(_stage2_cfg(train_store, stage1_ckpt, tmp_path / "x", backbone="dinov2_vitb14", max_steps=1))


def test_stage2_ddp_gloo_two_ranks_identical(train_store, stage1_ckpt, tmp_path):
    run = tmp_path / "ddp2"
    _torchrun(
        [
            "stage2",
            "--init",
            str(stage1_ckpt),
            "--store",
            train_store.url,
            "--out",
            str(run),
            "--random-init",
            "--hr",
            "224",
            "--sizes",
            "56,84",
            "--max-masks",
            "10",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--ema-every",
            "1",
        ],
        tmp_path,
    )
    d = _rank_digests(run)
    assert d[0] == d[1]


def test_retention_by_hand_and_upsample_writes_lowres_and_bilinear(stage1_ckpt, tmp_path):
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import load_file
    from skimage import data

    from loftup.pipeline.backbones import create_backbone
    from loftup.training.checkpoint import load_model
    from loftup.training.inference import retention, upsample_image
    from loftup.training.target_space import layer_norm_target

    g = torch.Generator().manual_seed(0)
    up, low = torch.randn(1, 5, 8, 8, generator=g), torch.randn(1, 5, 2, 2, generator=g)
    cells = [
        F.cosine_similarity(up[0, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].mean((1, 2)), low[0, :, i, j], dim=0)
        for i in range(2)
        for j in range(2)
    ]
    assert retention(up, low) == pytest.approx(torch.stack(cells).mean().item(), rel=1e-6)
    assert retention(F.interpolate(low, size=(8, 8), mode="nearest"), low) == pytest.approx(1.0, abs=1e-6)

    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    net = create_backbone("dinov2_vits14", random_init=True)
    res = upsample_image(
        tmp_path / "astronaut.png", checkpoint=stage1_ckpt, backbone=net, size=56, out_dir=tmp_path / "up"
    )
    saved = load_file(str(res["features"]))
    assert saved["features"].shape == (16, 56, 56) and saved["bilinear"].shape == (16, 56, 56)
    # lowres: the backbone's features, projected as the checkpoint projects them, layer-normalised
    _, meta = load_model(stage1_ckpt, with_meta=True)
    from loftup.storage.geometry import resize_image

    img = torch.from_numpy(
        np.asarray(resize_image(Image.open(tmp_path / "astronaut.png").convert("RGB"), 224), dtype=np.float32) / 255
    ).permute(2, 0, 1)[None]
    with torch.no_grad():
        expect = layer_norm_target(meta["projection_module"](net(img)))[0]
    torch.testing.assert_close(saved["lowres"], expect, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        saved["bilinear"],
        F.interpolate(expect[None], size=(56, 56), mode="bilinear", align_corners=False)[0],
        rtol=1e-4,
        atol=1e-4,
    )
    assert res["retention_loftup"] == pytest.approx(retention(saved["features"], saved["lowres"]), abs=1e-4)
    assert res["retention_bilinear"] == pytest.approx(retention(saved["bilinear"], saved["lowres"]), abs=1e-4)
    assert res["retention_bilinear"] > 0.9


# --------------------------------------------------------------------------- memory (training/memory.py)
def _grads_and_buffers(recipe, model, batch, step):
    recipe.optimizer.zero_grad(set_to_none=True)
    terms = recipe.step(batch, step)
    loss = sum(terms.values())
    if loss.requires_grad:  # the plain path over the whole batch leaves the backward to the loop
        loss.backward()
    named = list(model.named_parameters()) + [(f"aux.{n}", p) for n, p in recipe.aux.named_parameters()]
    grads = {n: p.grad.detach().clone() for n, p in named}
    return {k: float(v.detach()) for k, v in terms.items()}, grads, [b.clone() for b in model.buffers()]


def _close(a: dict, b: dict, rtol: float) -> None:
    scale = max(float(g.abs().max()) for g in a.values())
    for name, g in a.items():
        # conv biases in front of a BatchNorm have a true gradient of 0 (rounding noise only)
        atol = rtol * max(float(g.abs().max()), 1e-3 * scale)
        torch.testing.assert_close(b[name], g, rtol=0, atol=atol, msg=name)


def _gap(a: dict, b: dict, name: str) -> float:
    return float((a[name] - b[name]).abs().max() / a[name].abs().max())


def test_bounded_path_equals_plain_stage1_gradients_terms_and_batchnorm(train_store, tmp_path):
    """Every parameter's gradient (LoftUp and the reconstruction's downsampler and scale net),
    the loss terms and the BatchNorm running statistics of one released-recipe step (with the
    pooled-consistency term on); with micro-batches too, which change BatchNorm (so they differ
    from the whole batch)."""
    from loftup.training.distributed import Dist
    from loftup.training.loop import resolve
    from loftup.training.memory import MemoryPlan
    from loftup.training.run_dir import seed_all
    from loftup.training.stage1 import RECIPES, Stage1

    def run(path, micro=None):
        seed_all(0)
        cfg = _stage1_cfg(train_store, tmp_path / "x", batch_size=3, consistency_weight=0.5)
        r = Stage1(resolve(cfg, RECIPES), Dist())
        r.plan = MemoryPlan(path=path, tile=24, micro_batch=micro)  # 56 px: 3 x 3 tiles
        return _grads_and_buffers(r, r.model, batch, 5)

    seed_all(0)
    batch = next(
        Stage1(resolve(_stage1_cfg(train_store, tmp_path / "x", batch_size=3), RECIPES), Dist()).batches(0, 0, 0)
    )
    (t_plain, g_plain, b_plain), (t_bounded, g_bounded, b_bounded) = run("plain"), run("bounded")
    assert t_plain.keys() == t_bounded.keys() == {"mse", "recon", "tv", "consistency"}
    for k in t_plain:
        assert t_bounded[k] == pytest.approx(t_plain[k], rel=1e-5)
    _close(g_plain, g_bounded, rtol=2e-3)
    for a, b in zip(b_plain, b_bounded):
        torch.testing.assert_close(b, a)
    (_, g_micro, _), (_, g_micro_bounded, _) = run("plain", 1), run("bounded", 1)
    _close(g_micro, g_micro_bounded, rtol=2e-3)
    w = "upsampler.first_conv.1.weight"
    assert _gap(g_plain, g_micro, w) > 100 * _gap(g_plain, g_bounded, w)


def test_bounded_path_equals_plain_stage2_gradients_teacher_and_terms(train_store, stage1_ckpt, tmp_path):
    from loftup.training.distributed import Dist
    from loftup.training.loop import resolve
    from loftup.training.memory import MemoryPlan
    from loftup.training.run_dir import seed_all
    from loftup.training.stage2 import RECIPES, Stage2

    def build(path):
        seed_all(0)
        r = Stage2(resolve(_stage2_cfg(train_store, stage1_ckpt, tmp_path / "x"), RECIPES), Dist())
        r.plan = MemoryPlan(path=path, tile=32)
        return r

    plain, bounded = build("plain"), build("bounded")
    batch = next(plain.batches(0, 0, 3))
    t_plain, g_plain, b_plain = _grads_and_buffers(plain, plain.student, batch, 3)
    t_bounded, g_bounded, b_bounded = _grads_and_buffers(bounded, bounded.student, batch, 3)
    assert t_plain.keys() == t_bounded.keys() == {"affinity", "recon", "tv"}
    for k in t_plain:
        assert t_bounded[k] == pytest.approx(t_plain[k], rel=1e-5)
    _close(g_plain, g_bounded, rtol=2e-3)
    # the teacher (train mode: BatchNorm over the crops) moved its running statistics the same way
    for a, b in zip(list(plain.teacher.buffers()) + b_plain, list(bounded.teacher.buffers()) + b_bounded):
        torch.testing.assert_close(b, a)


def test_bounded_run_says_so_and_logs_the_same_losses(train_store, stage1_ckpt, tmp_path):
    import json

    from loftup.training.stage1 import train

    result = train(_stage1_cfg(train_store, tmp_path / "b", max_steps=2, memory_path="bounded"))
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["memory"]["memory_path"] == "bounded" and config["memory"]["estimated_peak_gib"] > 0
    assert result["memory"]["measured_peak_gib"] > 0
    plain = [json.loads(x) for x in (stage1_ckpt.parent / "metrics.jsonl").read_text().splitlines()]
    bounded = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in bounded] == [1, 2] and all(r["peak_memory_gib"] > 0 for r in bounded)
    for p, b in zip(plain, bounded):  # the fixture's run: the same config on the plain path
        for k in ("mse", "recon", "tv"):
            assert b[k] == pytest.approx(p[k], rel=1e-4)


def test_convex_head_trains_both_stages_in_the_raw_space(train_store, tmp_path, monkeypatch):
    """--head convex: Stage 1's target is the pseudo-GT of the raw (PCA) features divided by their
    RMS, the prediction is divided by the same constant; both stages record the space and scale,
    and the checkpoints load as a convex-head LoftUp."""
    import json

    import loftup.training.losses as losses
    from loftup.training.checkpoint import load_model
    from loftup.training.data import batch_masks
    from loftup.training.pseudo_gt import pseudo_gt
    from loftup.training.stage1 import train
    from loftup.training.stage2 import train as train2
    from loftup.training.target_space import feature_rms

    seen = []
    real = losses.projected_mse
    monkeypatch.setattr(losses, "projected_mse", lambda p, t, proj: seen.append(t) or real(p, t, proj))
    batches = []
    import loftup.training.stage1 as stage1

    real_inputs = stage1.Stage1.inputs
    monkeypatch.setattr(
        stage1.Stage1, "inputs", lambda self, b, step=None: batches.append(b) or real_inputs(self, b, step)
    )
    run = train(_stage1_cfg(train_store, tmp_path / "c1", max_steps=1, recipe="paper", head="convex"))
    model, meta = load_model(run["checkpoint"], with_meta=True)
    extra, proj = meta["extra"], meta["projection_module"]
    fs = train_store.features("dinov2_vits14", 224)
    ids = np.concatenate([train_store.image_ids(s) for s in (0, 1)])
    sample = torch.from_numpy(fs.get_many(ids[:256])).float()
    assert extra["head"] == "convex" and extra["target_space"] == "raw"
    assert extra["feature_scale"] == pytest.approx(feature_rms(proj(sample)), rel=1e-6)
    assert model.upsampler.head is not None and run["target_space"] == "raw"
    masks, valid = batch_masks(batches[0], "cpu")
    expect = pseudo_gt(proj(batches[0]["feats"].float()), masks, valid, 56, alpha=0.8) / extra["feature_scale"]
    # the loss is written per image (training/memory.py): one target per image of the batch
    torch.testing.assert_close(torch.cat(seen[: len(expect)]), expect, rtol=1e-4, atol=1e-5)

    train2(_stage2_cfg(train_store, run["checkpoint"], tmp_path / "c2", max_steps=2))
    meta2 = json.loads((tmp_path / "c2" / "stage2.json").read_text())
    assert meta2["config"]["head"] == "convex" and meta2["extra"]["target_space"] == "raw"
    assert meta2["extra"]["feature_scale"] == extra["feature_scale"]


def test_pooled_consistency_term_of_a_convex_step_by_hand(train_store, tmp_path):
    """--consistency-weight w adds w x the mean over the batch of mean((cell mean of the output -
    low-res vector)^2), both divided by the run's feature scale; off (absent) by default."""
    from loftup.training.distributed import Dist
    from loftup.training.loop import resolve
    from loftup.training.run_dir import seed_all
    from loftup.training.stage1 import RECIPES, Stage1, Stage1Config

    def build(**kw):
        seed_all(0)
        cfg = _stage1_cfg(train_store, tmp_path / "x", recipe="paper", head="convex", size=64, **kw)
        return Stage1(resolve(cfg, RECIPES), Dist())

    r = build(consistency_weight=0.5)
    batch = next(r.batches(0, 0, 0))
    terms = r.step(batch, 0)
    feats, image = r.inputs(batch, 0)
    with torch.no_grad():
        pred = r.model(feats, image, output_size=64).double() / r.space.scale
    low = feats.double() / r.space.scale  # the raw space: the PCA features themselves
    b, c, h, w = low.shape
    cells = pred.reshape(b, c, h, 64 // h, w, 64 // w).mean((3, 5))  # 16 x 16 grid, 4 x 4 pixels a cell
    expect = 0.5 * (cells - low).square().mean((1, 2, 3)).mean()
    assert r.space.space == "raw" and r.space.scale > 1.5
    assert float(terms["consistency"].detach()) == pytest.approx(float(expect), rel=1e-4)
    r.cfg = replace(r.cfg, consistency_weight=Stage1Config.consistency_weight)
    assert "consistency" not in r._parts() and "consistency" not in r.step(batch, 0)


def test_cpu_threads_leave_a_core_per_worker_and_never_raise_the_callers_count(monkeypatch):
    """A pool that runs one training per process on one thread each (bench/quality_bench.py)
    must keep its one thread: raising it oversubscribed the cores and made the pseudo-GT's
    index_add_ (an OpenMP radix sort) spin, 60x slower per call."""
    import os

    from loftup.training.distributed import Dist, cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        cpu_threads(Dist(), workers=2)
        assert torch.get_num_threads() == 6  # 8 cores, 2 loader workers
        cpu_threads(Dist(world=2), workers=1)
        assert torch.get_num_threads() == 3  # 4 cores per rank, 1 worker
        torch.set_num_threads(1)  # the caller's choice
        cpu_threads(Dist(), workers=0)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(8)
        cpu_threads(Dist(device=torch.device("meta")), workers=2)  # not a CPU run: untouched
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)


def test_a_training_run_gives_the_callers_thread_count_back(train_store, tmp_path, monkeypatch):
    """The run lowers the count for its loader worker (8 cores, 1 worker: 7 threads) and the
    caller gets its own 8 back: a later run in the same process must not inherit it."""
    import os

    from loftup.training.stage1 import train

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n, real=torch.set_num_threads: (seen.append(n), real(n)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        train(_stage1_cfg(train_store, tmp_path / "r", max_steps=1, workers=1))
        assert seen[1:] == [7, 8] and torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)
