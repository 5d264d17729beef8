"""RLE codec: the Python counts parser and the run-walking resampler against full decodes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco

from loftup.storage import geometry, rle

ODD_SIZES = [(1, 1), (1, 9), (9, 1), (2, 3), (13, 17), (31, 29), (64, 48), (97, 131)]


def truth_runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with zeros, computed naively from the pixels."""
    flat = mask.T.ravel().astype(bool)
    out, value, n = [], False, 0
    for v in flat:
        if v == value:
            n += 1
        else:
            out.append(n)
            value, n = v, 1
    out.append(n)
    return out


def blob(h: int, w: int, rng) -> np.ndarray:
    """A real-looking mask: a union of ellipses minus a hole, with ragged borders."""
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(1, h / 2 + 1), rng.uniform(1, w / 2 + 1)
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 + 0.2 * rng.standard_normal((h, w))
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    m &= ((yy - cy) ** 2 + (xx - cx) ** 2) > (min(h, w) / 6) ** 2
    return m


def masks(rng):
    for h, w in ODD_SIZES:
        yield np.zeros((h, w), bool)
        yield np.ones((h, w), bool)
        yield rng.random((h, w)) < 0.5
        yield rng.random((h, w)) < 0.03
        yield blob(h, w, rng)


def test_encode_decode_match_pycocotools():
    rng = np.random.default_rng(0)
    for m in masks(rng):
        r = rle.encode(m)
        ref = coco.encode(np.asfortranarray(m.astype(np.uint8)))
        assert r == {"size": list(m.shape), "counts": ref["counts"].decode()}
        assert isinstance(r["counts"], str)
        np.testing.assert_array_equal(rle.decode(r), m)
        assert rle.area(r) == int(m.sum())


def test_runs_parse_the_compressed_string():
    rng = np.random.default_rng(1)
    for m in masks(rng):
        r = rle.encode(m)
        got = rle.runs(r)
        assert got.dtype == np.int64
        assert got.tolist() == truth_runs(m)
        # and back: the runs re-encode to the very same string
        again = coco.frPyObjects({"size": list(m.shape), "counts": got.tolist()}, *m.shape)
        assert again["counts"].decode() == r["counts"]


def test_runs_large_counts_and_negative_deltas():
    # SA-1B sized masks: counts need several 5-bit groups and deltas go negative.
    rng = np.random.default_rng(2)
    h, w = 1500, 2250
    m = np.zeros((h, w), bool)
    m[100:1400, 300:320] = True
    m[700:701, 1000:2000] = True
    m[5:9, 2240:] = True
    m |= blob(h, w, rng) & (rng.random((h, w)) < 0.999)
    r = rle.encode(m)
    assert rle.runs(r).tolist() == truth_runs(m)
    assert int(rle.runs(r).sum()) == h * w


def test_empty_and_full_masks():
    for h, w in [(1, 1), (5, 3), (1500, 2250)]:
        empty, full = rle.encode(np.zeros((h, w), bool)), rle.encode(np.ones((h, w), bool))
        assert rle.runs(empty).tolist() == [h * w]
        assert rle.runs(full).tolist() == [0, h * w]
        assert rle.area(empty) == 0 and rle.area(full) == h * w
        for size in (1, 7, 224):
            assert rle.runs(rle.to_geometry(empty, size)).tolist() == [size * size]
            assert rle.runs(rle.to_geometry(full, size)).tolist() == [0, size * size]


def test_resample_equals_decode_then_index():
    rng = np.random.default_rng(3)
    for m in masks(rng):
        h, w = m.shape
        r = rle.encode(m)
        cases = [
            (np.arange(h), np.arange(w)),  # identity
            (np.sort(rng.integers(0, h, 11)), np.sort(rng.integers(0, w, 5))),  # repeats (upsampling)
            (np.unique(rng.integers(0, h, 6)), np.unique(rng.integers(0, w, 9))),  # strictly increasing
            (rng.integers(0, h, 7), rng.integers(0, w, 8)),  # arbitrary order
            (np.arange(h)[::-1], np.arange(w)[::-1]),  # flipped
        ]
        for rows, cols in cases:
            out = rle.resample(r, rows, cols)
            assert out["size"] == [len(rows), len(cols)]
            np.testing.assert_array_equal(rle.decode(out), m[rows][:, cols])
            assert out == rle.encode(m[rows][:, cols])


def test_resample_rejects_out_of_range():
    r = rle.encode(np.ones((4, 5), bool))
    with pytest.raises(IndexError):
        rle.resample(r, np.array([0, 4]), np.array([0]))


def test_to_geometry_equals_decode_with_source_index():
    rng = np.random.default_rng(4)
    shapes = ODD_SIZES + [(150, 225), (225, 150), (300, 301)]
    for h, w in shapes:
        m = blob(h, w, rng) if rng.random() < 0.5 else rng.random((h, w)) < 0.4
        r = rle.encode(m)
        for size in (1, 7, 16, 224):
            rows, cols = geometry.source_index(h, w, size)
            got = rle.to_geometry(r, size)
            assert got["size"] == [size, size]
            np.testing.assert_array_equal(rle.decode(got), m[rows][:, cols])


def test_to_geometry_agrees_with_pil_nearest_except_at_ties():
    # PIL's NEAREST resize + the same crop, as an independent check. The two rules differ only
    # where a pixel centre maps exactly onto a source pixel border: nearest-exact takes the
    # pixel after it, PIL the one before.
    rng = np.random.default_rng(5)
    checked_ties = 0
    for h, w, size in [(150, 225, 64), (64, 196, 7), (112, 55, 16), (163, 180, 64), (301, 97, 32), (1500, 2250, 224)]:
        m = blob(h, w, rng)
        p = geometry.plan(h, w, size)
        pil = Image.fromarray(m.astype(np.uint8) * 255).resize((p.nw, p.nh), Image.NEAREST)
        pil = np.asarray(pil.crop((p.left, p.top, p.left + size, p.top + size))) > 0
        ours = rle.decode(rle.to_geometry(rle.encode(m), size))
        ty = ((np.arange(size) + p.top + 0.5) * h) % p.nh == 0
        tx = ((np.arange(size) + p.left + 0.5) * w) % p.nw == 0
        tie = ty[:, None] | tx[None, :]
        np.testing.assert_array_equal(ours[~tie], pil[~tie])
        checked_ties += int(tie.any())
    assert checked_ties >= 3  # the cases above were picked to include ties


def test_decode_many():
    rng = np.random.default_rng(6)
    ms = [blob(20, 30, rng) for _ in range(4)]
    stacked = rle.decode_many([rle.encode(m) for m in ms])
    assert stacked.shape == (4, 20, 30) and stacked.dtype == bool
    np.testing.assert_array_equal(stacked, np.stack(ms))
    assert rle.decode_many([]).shape == (0, 0, 0)
    with pytest.raises(ValueError):
        rle.decode_many([rle.encode(ms[0]), rle.encode(np.zeros((3, 3), bool))])
