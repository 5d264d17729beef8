"""Evaluation metrics and label propagation against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loftup.training.evaluation.davis import propagate
from loftup.training.evaluation.metrics import (
    boundary_f,
    boundary_map,
    confusion_matrix,
    davis_summary,
    region_iou,
    seg_scores,
)


def test_miou_and_pixel_accuracy_match_a_hand_built_confusion_matrix():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, -1, 1], [0, 1, 1, -1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 1], [0, 1, 2, 3]])
    names = ["a", "b", "c", "d", "e"]
    cm = confusion_matrix(pred, label, 5)
    # Hand-counted (rows = label, columns = prediction), the two ignored pixels left out.
    expected = np.zeros((5, 5), np.int64)
    expected[0, 0], expected[0, 1] = 2, 1  # label a: (0,0) a, (0,1) b, (2,0) a
    expected[1, 1], expected[1, 2] = 4, 1  # label b: (0,2) (0,3) (1,3) (2,1) b, (2,2) c
    expected[2, 2], expected[2, 0] = 1, 1  # label c: (1,0) c, (1,1) a
    assert np.array_equal(cm.numpy(), expected)
    s = seg_scores(cm, names)
    iou = {"a": 2 / (3 + 3 - 2), "b": 4 / (5 + 5 - 4), "c": 1 / (2 + 2 - 1)}  # d, e: in neither labels nor preds
    assert s["per_class_iou"] == pytest.approx(iou)
    assert s["miou"] == pytest.approx(np.mean(list(iou.values())))
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    assert s["classes_scored"] == 3 and s["pixels"] == 10
    # A class only predicted (never labelled) counts with IoU 0.
    s2 = seg_scores(confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), 5), names)
    assert s2["per_class_iou"] == {"a": 0.5, "d": 0.0} and s2["miou"] == pytest.approx(0.25)


def _brute_boundary(m: np.ndarray) -> np.ndarray:
    h, w = m.shape
    b = np.zeros_like(m, bool)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if y == h - 1:
                b[y, x] = m[y, x] != m[y, x + 1]
            elif x == w - 1:
                b[y, x] = m[y, x] != m[y + 1, x]
            else:
                b[y, x] = m[y, x] != m[y, x + 1] or m[y, x] != m[y + 1, x] or m[y, x] != m[y + 1, x + 1]
    return b


def _brute_f(gt: np.ndarray, pred: np.ndarray, tol: float) -> float:
    r = math.ceil(tol * math.hypot(*gt.shape))
    gb, pb = _brute_boundary(gt), _brute_boundary(pred)
    gp, pp = np.argwhere(gb), np.argwhere(pb)
    if len(gp) == 0 and len(pp) == 0:
        return 1.0
    if len(gp) == 0 or len(pp) == 0:
        return 0.0

    def matched(a, b):
        return sum(any((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 <= r * r for q in b) for p in a)

    precision, recall = matched(pp, gp) / len(pp), matched(gp, pp) / len(gp)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_j_and_f_match_brute_force_on_small_masks():
    rng = np.random.default_rng(0)
    for trial in range(6):
        h, w = rng.integers(20, 40, size=2)
        gt = np.zeros((h, w), bool)
        pred = np.zeros((h, w), bool)
        y, x = rng.integers(2, 10, size=2)
        gt[y : y + rng.integers(5, 10), x : x + rng.integers(5, 12)] = True
        pred[
            y + rng.integers(-3, 4) : y + rng.integers(4, 12), max(0, x + rng.integers(-3, 4)) : x + rng.integers(4, 14)
        ] = True
        if trial == 0:
            pred[:] = False  # an empty prediction: F = 0, J = 0
        assert np.array_equal(boundary_map(gt), _brute_boundary(gt))
        expected_j = (gt & pred).sum() / (gt | pred).sum()
        assert region_iou(gt, pred) == pytest.approx(expected_j)
        for tol in (0.008, 0.05, 3):
            expected_f = _brute_f(gt, pred, tol) if tol < 1 else _brute_f(gt, pred, tol / math.hypot(h, w) - 1e-9)
            assert boundary_f(gt, pred, tolerance=tol) == pytest.approx(expected_f), (trial, tol)
    empty = np.zeros((8, 8), bool)
    assert region_iou(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    # A 10 x 10 square shifted by one pixel in a 100 x 100 image: within the 2-px tolerance.
    a, b = np.zeros((100, 100), bool), np.zeros((100, 100), bool)
    a[20:30, 20:30], b[21:31, 20:30] = True, True
    assert boundary_f(a, b) == 1.0 and region_iou(a, b) == pytest.approx(90 / 110)
    void = np.zeros_like(a)
    void[30, :] = True  # the only row where they differ below is void
    assert region_iou(a, b, void) == pytest.approx(90 / 100)


def test_davis_means_are_over_objects_not_sequences():
    summary = davis_summary(
        {
            "one": {1: {"J": 0.2, "F": 0.4}},
            "three": {1: {"J": 1.0, "F": 1.0}, 2: {"J": 0.6, "F": 0.8}, 3: {"J": 0.6, "F": 0.6}},
        }
    )
    assert summary["J_mean"] == pytest.approx(0.6) and summary["F_mean"] == pytest.approx(0.7)
    assert summary["JF_mean"] == pytest.approx(0.65) and summary["objects"] == 4
    assert summary["per_sequence"]["three"]["J_mean"] == pytest.approx(2.2 / 3)


def _dense_propagation(target, sources, segs, temperature, radius, k):
    """The reference formulation: every context's full N x N affinity, masked, top-k jointly."""
    c, h, w = target.shape
    t = torch.nn.functional.normalize(target.reshape(c, -1), dim=0)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)
    near = ((yy[:, None] - yy[None]).abs() <= radius) & ((xx[:, None] - xx[None]).abs() <= radius)
    aff = torch.cat(
        [torch.exp(t.T @ torch.nn.functional.normalize(s.reshape(c, -1), dim=0) / temperature) * near for s in sources],
        1,
    )
    labels = torch.cat([s.reshape(s.shape[0], -1) for s in segs], 1)
    kth = aff.topk(k, dim=1).values[:, -1:]
    aff = torch.where(aff >= kth, aff, torch.zeros_like(aff))
    aff = aff / aff.sum(1, keepdim=True)
    return (labels @ aff.T).reshape(-1, h, w)


@pytest.mark.parametrize("radius,tile", [(2, 1), (3, 4), (5, 8), (30, 5)])
def test_tiled_propagation_equals_the_dense_reference(radius, tile):
    g = torch.Generator().manual_seed(radius)
    h, w, c = 13, 17, 6
    target = torch.randn(c, h, w, generator=g)
    sources = [torch.randn(c, h, w, generator=g) for _ in range(3)]
    segs = [torch.softmax(torch.randn(4, h, w, generator=g), 0) for _ in range(3)]
    ours = propagate(target, sources, segs, temperature=0.1, radius=radius, topk=5, tile=tile)
    ref = _dense_propagation(target, sources, segs, 0.1, radius, 5)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
