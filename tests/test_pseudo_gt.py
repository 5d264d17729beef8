"""Pseudo-GT: bicubic + sequential mask refinement (Eq. 1) and RLE decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from loftup.training.pseudo_gt import (
    bicubic_upsample,
    mask_refine,
    mask_refine_reference,
    masks_from_rles,
    pseudo_gt,
)

IMPLS = ["regions", "gather"]


def _rect(h, w, top, left, bottom, right):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[top:bottom, left:right] = True
    return m


def _awkward_batch(seed=0, b=3, c=6, h=12, w=14, m=9):
    """Features, masks, valid with overlap, nesting, duplicates, empties and padding.

    Padding (and explicitly invalid) slots hold random non-empty masks so that failing
    to ignore them changes the result.
    """
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, c, h, w, generator=g)
    masks = torch.rand(b, m, h, w, generator=g) > 0.5
    valid = torch.zeros(b, m, dtype=torch.bool)
    counts = [m, 5, 0][:b] + [m] * max(0, b - 3)
    for i, n in enumerate(counts):
        valid[i, :n] = True
    big = _rect(h, w, 1, 1, h - 1, w - 2)
    inner = _rect(h, w, 3, 2, 8, 9)
    innermost = _rect(h, w, 4, 4, 6, 6)
    masks[0, 0], masks[0, 1], masks[0, 2] = big, inner, innermost  # nested, outer first
    masks[0, 3] = innermost  # duplicate of an earlier mask
    masks[0, 4] = _rect(h, w, 6, 5, 11, 13)  # overlaps two nested ones
    masks[0, 5] = torch.zeros(h, w, dtype=torch.bool)  # empty
    masks[0, 6] = torch.ones(h, w, dtype=torch.bool)  # whole frame
    valid[0, 7] = False  # invalid inside the used range
    masks[1, 0], masks[1, 1] = innermost, big  # nested, inner first
    masks[1, 2] = torch.zeros(h, w, dtype=torch.bool)
    return feats, masks, valid


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_matches_reference_loop(impl, alpha):
    feats, masks, valid = _awkward_batch()
    got = mask_refine(feats, masks, valid, alpha, impl=impl)
    want = mask_refine_reference(feats, masks, valid, alpha)
    assert got.shape == feats.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if alpha > 0:
        assert not torch.allclose(got, feats)


@pytest.mark.parametrize("impl", IMPLS)
def test_random_many_masks_against_reference(impl):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 16, 16, generator=g) * 3 + 1
    # Random rectangles of all sizes: lots of overlap and many regions.
    masks = torch.zeros(2, 40, 16, 16, dtype=torch.bool)
    for b in range(2):
        for m in range(40):
            y0, x0 = torch.randint(0, 15, (2,), generator=g).tolist()
            y1 = y0 + 1 + int(torch.randint(0, 16 - y0, (1,), generator=g))
            x1 = x0 + 1 + int(torch.randint(0, 16 - x0, (1,), generator=g))
            masks[b, m, y0:y1, x0:x1] = True
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 33:] = False
    got = mask_refine(feats, masks, valid, 0.8, impl=impl)
    torch.testing.assert_close(got, mask_refine_reference(feats, masks, valid, 0.8), rtol=1e-5, atol=1e-5)


def test_sequential_semantics_by_hand():
    # One channel, four pixels [0, 4, 8, 12]; masks {0,1} then {1,2}; alpha 0.5.
    # After mask 1: [1, 3, 8, 12]. Mask 2 uses the updated 3: mean(3, 8) = 5.5,
    # so pixel 1 -> 1.5 + 2.75 and pixel 2 -> 4 + 2.75. Pixel 3 is under no mask.
    feats = torch.tensor([0.0, 4.0, 8.0, 12.0]).view(1, 1, 1, 4)
    masks = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool).view(1, 2, 1, 4)
    valid = torch.ones(1, 2, dtype=torch.bool)
    want = torch.tensor([1.0, 4.25, 6.75, 12.0]).view(1, 1, 1, 4)
    for impl in IMPLS:
        torch.testing.assert_close(mask_refine(feats, masks, valid, 0.5, impl=impl), want)
    torch.testing.assert_close(mask_refine_reference(feats, masks, valid, 0.5), want)
    # Order matters: the other order is a different result.
    swapped = mask_refine(feats, masks.flip(1), valid, 0.5)
    assert not torch.allclose(swapped, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_alpha_zero_is_identity_and_outside_pixels_untouched(impl):
    feats, masks, valid = _awkward_batch(seed=1)
    assert torch.equal(mask_refine(feats, masks, valid, 0.0, impl=impl), feats)
    # Image 2 has no valid mask at all: bit-identical whatever alpha.
    out = mask_refine(feats, masks, valid, 0.8, impl=impl)
    assert torch.equal(out[2], feats[2])
    # Image 1: pixels outside its valid masks are bit-identical.
    covered = (masks[1] & valid[1, :, None, None]).any(0)
    assert (~covered).any()
    assert torch.equal(out[1][:, ~covered], feats[1][:, ~covered])


@pytest.mark.parametrize("impl", IMPLS)
def test_alpha_one_sets_mask_to_its_mean(impl):
    feats = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = _rect(8, 8, 2, 1, 6, 7)
    masks = mask.expand(2, 1, 8, 8).clone()
    out = mask_refine(feats, masks, None, 1.0, impl=impl)
    for b in range(2):
        mean = feats[b][:, mask].mean(1, keepdim=True)
        torch.testing.assert_close(out[b][:, mask], mean.expand(-1, int(mask.sum())))
        assert torch.equal(out[b][:, ~mask], feats[b][:, ~mask])


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_padding_masks_change_nothing(impl):
    feats, masks, valid = _awkward_batch(seed=4)
    base = mask_refine(feats, masks, valid, 0.8, impl=impl)
    # Interleave empty valid masks and garbage invalid masks: same result.
    b, m, h, w = masks.shape
    more = torch.zeros(b, 2 * m + 1, h, w, dtype=torch.bool)
    more_valid = torch.zeros(b, 2 * m + 1, dtype=torch.bool)
    more[:, 1::2] = masks
    more_valid[:, 1::2] = valid
    more[:, 0::2] = torch.rand(b, m + 1, h, w, generator=torch.Generator().manual_seed(9)) > 0.3
    more_valid[:, 0::2] = False
    more_valid[0, 0] = True
    more[0, 0] = False  # valid but empty
    got = mask_refine(feats, more, more_valid, 0.8, impl=impl)
    torch.testing.assert_close(got, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_and_input_untouched(impl, dtype):
    feats, masks, valid = _awkward_batch(seed=5)
    feats = feats.to(dtype)
    before = feats.clone()
    masks_before = masks.clone()
    out = mask_refine(feats, masks, valid, 0.8, impl=impl)
    assert out.dtype == dtype
    assert out.is_contiguous()
    assert torch.equal(feats, before)
    assert torch.equal(masks, masks_before)
    # Arithmetic is float32: equal to the float32 oracle rounded once to `dtype`.
    want = mask_refine_reference(feats.float(), masks, valid, 0.8).to(dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)


def test_no_masks_and_errors():
    feats = torch.randn(2, 3, 5, 5)
    out = mask_refine(feats, torch.zeros(2, 0, 5, 5, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.bool), 0.8)
    assert torch.equal(out, feats) and out.data_ptr() != feats.data_ptr()
    with pytest.raises(ValueError):
        mask_refine(feats, torch.zeros(2, 1, 4, 5, dtype=torch.bool), None, 0.8)
    with pytest.raises(ValueError):
        mask_refine(feats, torch.zeros(2, 1, 5, 5, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool), 0.8)
    with pytest.raises(ValueError):
        mask_refine(feats, torch.zeros(2, 1, 5, 5, dtype=torch.bool), None, 0.8, impl="nope")


def test_pseudo_gt_is_bicubic_then_refine():
    g = torch.Generator().manual_seed(6)
    lr = torch.randn(2, 4, 4, 4, generator=g)
    up = bicubic_upsample(lr, 16)
    torch.testing.assert_close(up, F.interpolate(lr, size=(16, 16), mode="bicubic", align_corners=False))
    assert bicubic_upsample(lr, (12, 20)).shape == (2, 4, 12, 20)
    masks = torch.rand(2, 3, 16, 16, generator=g) > 0.5
    valid = torch.tensor([[True, True, False], [True, False, False]])
    got = pseudo_gt(lr, masks, valid, 16)
    torch.testing.assert_close(got, mask_refine_reference(up, masks, valid, 0.8))
    assert not torch.allclose(got, up)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def test_masks_from_rles_order_padding_and_cap():
    rng = np.random.default_rng(0)
    per_image = [rng.random((4, 6, 7)) > 0.5, rng.random((2, 6, 7)) > 0.5, np.zeros((0, 6, 7), bool)]
    rles = [[_rle(m) for m in arr] for arr in per_image]
    masks, valid = masks_from_rles(rles, (6, 7))
    assert masks.shape == (3, 4, 6, 7) and masks.dtype == torch.bool
    assert valid.tolist() == [[True] * 4, [True, True, False, False], [False] * 4]
    assert np.array_equal(masks[0].numpy(), per_image[0])
    assert np.array_equal(masks[1, :2].numpy(), per_image[1])
    assert not masks[1, 2:].any() and not masks[2].any()

    capped, capped_valid = masks_from_rles(rles, (6, 7), max_masks=3)
    assert capped.shape == (3, 3, 6, 7)
    assert np.array_equal(capped[0].numpy(), per_image[0][:3])  # the first three, in order
    assert capped_valid.sum().item() == 5

    empty, empty_valid = masks_from_rles([[], []], 5)
    assert empty.shape == (2, 0, 5, 5) and empty_valid.shape == (2, 0)

    with pytest.raises(ValueError):
        masks_from_rles(rles, 8)


def test_more_masks_than_one_int64_code_holds():
    # 130 masks need several rounds of region-code compression (about 55 bits each here).
    g = torch.Generator().manual_seed(12)
    feats = torch.randn(2, 3, 6, 7, generator=g)
    masks = torch.rand(2, 130, 6, 7, generator=g) > 0.7
    valid = torch.ones(2, 130, dtype=torch.bool)
    valid[0, 100:] = False
    want = mask_refine_reference(feats, masks, valid, 0.5)
    torch.testing.assert_close(mask_refine(feats, masks, valid, 0.5), want, rtol=1e-5, atol=1e-5)
    # Masks 100+ of image 0 are padding: dropping them changes nothing.
    torch.testing.assert_close(mask_refine(feats[:1], masks[:1, :100], None, 0.5), want[:1], rtol=1e-5, atol=1e-5)
    # Bottom pixels told apart only by the first mask (right half), then 129 masks on the
    # top rows: a code that overflowed would lose that first distinction.
    masks = torch.zeros(1, 130, 6, 7, dtype=torch.bool)
    masks[0, 0, :, 3:] = True
    masks[0, 1:, :3] = True
    want = mask_refine_reference(feats[:1], masks, None, 0.5)
    torch.testing.assert_close(mask_refine(feats[:1], masks, None, 0.5), want, rtol=1e-5, atol=1e-5)
