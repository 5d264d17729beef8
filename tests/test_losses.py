"""Loss terms against explicit reference computations: affinity (Gram form vs explicit N x N),
and every released term (unit-norm projection, FeatUp TV, jitter, attention downsampler,
uncertainty NLL clamped at 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loftup.training.losses import (
    AttentionDownsampler,
    Jitter,
    ScaleNet,
    affinity_loss,
    affinity_loss_explicit,
    apply_jitter,
    draw_jitter,
    pooled_consistency,
    project,
    projected_mse,
    random_projection,
    reconstruction_loss,
    total_variation,
)


def _pair(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=dtype)
    t = torch.randn(*shape, generator=g, dtype=dtype)
    return s, t


def _explicit_by_hand(student, teacher, border):
    """Independent float64 oracle: per image, crop, normalise, N x N, mean of squares."""
    out = []
    for s, t in zip(student, teacher):
        h, w = s.shape[-2:]
        bh, bw = int(round(border * h)), int(round(border * w))
        s = s[:, bh : h - bh, bw : w - bw].reshape(s.shape[0], -1).double()
        t = t[:, bh : h - bh, bw : w - bw].reshape(t.shape[0], -1).double()
        s = s / s.norm(dim=0, keepdim=True)
        t = t / t.norm(dim=0, keepdim=True)
        out.append(((s.T @ s - t.T @ t) ** 2).mean())
    return torch.stack(out).mean()


@pytest.mark.parametrize("shape", [(2, 5, 10, 10), (1, 3, 7, 9), (3, 8, 12, 6)])
@pytest.mark.parametrize("border", [0.0, 0.1, 0.25])
def test_affinity_matches_explicit_value_and_gradients(shape, border):
    s, t = _pair(shape, seed=sum(shape))
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    s2, t2 = s.clone().requires_grad_(), t.clone().requires_grad_()
    gram = affinity_loss(s1, t1, border)
    explicit = affinity_loss_explicit(s2, t2, border)
    assert gram.dim() == 0 and gram.dtype == torch.float64
    assert gram.item() > 1e-3
    torch.testing.assert_close(gram, explicit, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gram, _explicit_by_hand(s, t, border), rtol=1e-10, atol=1e-14)
    gram.backward()
    explicit.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-8, atol=1e-14)
    assert s1.grad.abs().sum() > 0


def test_affinity_border_pixels_are_ignored():
    s, t = _pair((2, 4, 10, 10), seed=1)
    base = affinity_loss(s, t, 0.1)  # drops one pixel on every side
    s_edge = s.clone()
    s_edge[..., 0, :] = 100.0
    s_edge[..., :, -1] = -7.0
    torch.testing.assert_close(affinity_loss(s_edge, t, 0.1), base, rtol=1e-12, atol=0)
    s_in = s.clone()
    s_in[..., 1, 1] = 100.0
    assert not torch.allclose(affinity_loss(s_in, t, 0.1), base)
    with pytest.raises(ValueError):
        affinity_loss(s, t, 0.5)
    with pytest.raises(ValueError):
        affinity_loss(s, t[:, :3], 0.1)


def test_affinity_zero_when_equal_and_per_pixel_scale_invariant():
    s, t = _pair((2, 6, 9, 11), seed=2)
    assert affinity_loss(s, s, 0.1).item() == 0.0
    assert affinity_loss(s.float(), s.float(), 0.1).item() == 0.0
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(2, 1, 9, 11, generator=g, dtype=torch.float64) * 50 + 0.01
    torch.testing.assert_close(affinity_loss(s * scale, t, 0.1), affinity_loss(s, t, 0.1), rtol=1e-12, atol=0)
    torch.testing.assert_close(affinity_loss(s, t * scale, 0.0), affinity_loss(s, t, 0.0), rtol=1e-12, atol=0)
    # A sign flip is not a positive scale: it changes the cosine affinities.
    signs = torch.where(scale > 25, -1.0, 1.0).double()
    assert not torch.allclose(affinity_loss(s * signs, t, 0.0), affinity_loss(s, t, 0.0))


def test_affinity_float32_has_no_cancellation_near_convergence():
    # Student ~ teacher is where the textbook Gram identity loses every digit in float32.
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, 32, 1, 1, generator=g) * 3 + torch.randn(1, 32, 40, 40, generator=g)
    for noise in (1e-1, 1e-2, 1e-3):
        other = base + noise * torch.randn(base.shape, generator=g)
        truth = affinity_loss_explicit(base.double(), other.double(), 0.1)
        got = affinity_loss(base, other, 0.1)
        assert got.dtype == torch.float32
        assert abs(got.item() - truth.item()) <= 1e-3 * truth.item(), (noise, got, truth)


def test_affinity_half_inputs_and_autocast_compute_in_float32():
    s, t = _pair((1, 8, 12, 12), seed=5, dtype=torch.float32)
    want = affinity_loss(s.bfloat16().float(), t.bfloat16().float(), 0.1)
    got = affinity_loss(s.bfloat16(), t.bfloat16(), 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = affinity_loss(s, t, 0.1)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, affinity_loss(s, t, 0.1), rtol=1e-6, atol=1e-8)


def test_random_projection_released_unit_columns_and_paper_scale():
    g = torch.Generator().manual_seed(0)
    p = random_projection(3, 40, 16, generator=g)
    assert p.shape == (3, 40, 16)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(3, 16))  # every column has unit norm
    q = random_projection(200, 40, 16, generator=torch.Generator().manual_seed(1), unit=False)
    assert abs(q.std().item() - 1 / 4) < 0.01  # paper form: entries N(0, 1/dim)
    a = random_projection(2, 5, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, random_projection(2, 5, 3, generator=torch.Generator().manual_seed(7)))


def test_projected_mse_is_the_mse_of_both_projections_by_hand():
    g = torch.Generator().manual_seed(3)
    pred, target = (
        torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64),
    )
    proj = random_projection(2, 6, 3, generator=g, dtype=torch.float64)
    expect = 0.0
    for b in range(2):
        for d in range(3):
            for y in range(4):
                for x in range(5):
                    a = sum(float(proj[b, c, d] * pred[b, c, y, x]) for c in range(6))
                    t = sum(float(proj[b, c, d] * target[b, c, y, x]) for c in range(6))
                    expect += (a - t) ** 2
    expect /= 2 * 3 * 4 * 5
    assert projected_mse(pred, target, proj).item() == pytest.approx(expect, rel=1e-10)
    # unit columns make the projected MSE the plain per-channel MSE in expectation (C/dim less than N(0,1/dim))
    big_p, big_t = torch.randn(4, 48, 16, 16), torch.randn(4, 48, 16, 16)
    vals = [
        projected_mse(big_p, big_t, random_projection(4, 48, 64, generator=torch.Generator().manual_seed(k)))
        for k in range(8)
    ]
    assert torch.stack(vals).mean().item() == pytest.approx(F.mse_loss(big_p, big_t).item(), rel=0.05)
    with pytest.raises(ValueError, match="differ"):
        projected_mse(pred, target[:, :3], proj)


def test_total_variation_is_featups_squared_differences_over_bchw():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    a = x.numpy()
    ref = sum(
        (a[b, c, i + 1, j] - a[b, c, i, j]) ** 2 for b in range(2) for c in range(3) for i in range(4) for j in range(4)
    )
    ref += sum(
        (a[b, c, i, j + 1] - a[b, c, i, j]) ** 2 for b in range(2) for c in range(3) for i in range(5) for j in range(3)
    )
    assert total_variation(x).item() == pytest.approx(ref / (2 * 3 * 5 * 4), rel=1e-12)
    assert total_variation(torch.full((1, 2, 4, 4), 3.0)).item() == 0.0


@pytest.mark.parametrize("size", [(12, 15), (11, 17)])
def test_pooled_consistency_is_the_mse_of_each_cells_mean_by_hand(size):
    """Each low-res cell against the mean of the output pixels of its bin (integer factor, and
    the overlapping bins of a non-integer one: rows floor(i H / h) to ceil((i + 1) H / h))."""
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    low = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    (H, W), (h, w) = size, (4, 5)
    expect = 0.0
    for b in range(2):
        for c in range(3):
            for i in range(h):
                for j in range(w):
                    r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
                    c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
                    cell = pred[b, c, r0:r1, c0:c1].numpy()
                    expect += (cell.mean() - float(low[b, c, i, j])) ** 2
    assert pooled_consistency(pred, low).item() == pytest.approx(expect / (2 * 3 * h * w), rel=1e-10)
    # nearest upsampling keeps every cell exactly; a convex mix of neighbours does not
    if H % h == 0 and W % w == 0:
        assert pooled_consistency(F.interpolate(low, size=size, mode="nearest"), low).item() < 1e-20
    blurred = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    assert pooled_consistency(blurred, low).item() > 0.01


def test_released_stage1_tv_is_on_the_squared_norm_of_the_projection():
    """What Stage 1 feeds the TV: |P x|^2 summed over the 64 projected dims, one channel."""
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    proj = random_projection(2, 8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    energy = project(x, proj).square().sum(1, keepdim=True)
    by_hand = torch.einsum("bchw,bcd->bdhw", x, proj).pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(energy, by_hand)
    assert total_variation(energy).item() > 0


def test_jitter_draws_and_warp_match_a_reflect_pad_then_resize():
    g = torch.Generator().manual_seed(0)
    draws = [draw_jitter(g, max_pad=8, max_zoom=0.1) for _ in range(200)]
    assert {d.pad_x for d in draws} == set(range(9)) and {d.pad_y for d in draws} == set(range(9))
    zooms = np.array([[d.zoom_y, d.zoom_x] for d in draws])
    assert zooms.min() >= 0.9 and zooms.max() <= 1.1 and zooms.std() > 0.04
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    # zoom 1: reflect-pad (numpy's "reflect" = torch's) and resize back
    j = Jitter(pad_y=2, pad_x=3, zoom_y=1.0, zoom_x=1.0)
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (3, 3)), mode="reflect"))
    expect = F.interpolate(padded, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(apply_jitter(x, j, ref=16), expect)
    # a prediction at half the image size gets half the pad (the same warp)
    half = apply_jitter(x, Jitter(4, 6, 1.0, 1.0), ref=32)
    torch.testing.assert_close(half, expect)


def _blur_by_hand(x: np.ndarray) -> np.ndarray:
    r = np.arange(5) - 2
    g = np.exp(-(r**2) / 2.0)
    k = np.outer(g, g) / np.outer(g, g).sum()
    b, c, h, w = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = (p[:, :, i : i + 5, j : j + 5] * k).sum((-1, -2))
    return out


def test_attention_downsampler_matches_featup_by_hand():
    torch.manual_seed(0)
    k, h = 4, 3
    down = AttentionDownsampler(dim=5, kernel_size=k).double()
    down.attention_net.eval()  # dropout on the logit layer off; the Bernoulli keep mask stays
    x = torch.randn(2, 5, k * h, k * h, dtype=torch.float64)
    torch.manual_seed(11)
    got = down(x, (h, h))
    torch.manual_seed(11)
    keep = (torch.rand(2, h, h, 1) > 0.2).numpy()
    blurred = _blur_by_hand(x.numpy())
    lin_w = down.attention_net[1].weight.detach().numpy()[0]
    lin_b = float(down.attention_net[1].bias)
    w, b = down.w.detach().numpy().reshape(-1), down.b.detach().numpy().reshape(-1)
    expect = np.zeros((2, 5, h, h))
    for n in range(2):
        for i in range(h):
            for j in range(h):
                win = blurred[n, :, i * k : i * k + k, j * k : j * k + k].reshape(5, -1)  # (C, k*k), row-major
                logits = (lin_w @ win + lin_b) * keep[n, i, j, 0] * w + b
                a = np.exp(logits - logits.max())
                expect[n, :, i, j] = win @ (a / a.sum())
    np.testing.assert_allclose(got.detach().numpy(), expect, rtol=1e-10, atol=1e-12)
    assert got.requires_grad
    got.sum().backward()
    assert down.w.grad is not None and down.attention_net[1].weight.grad.abs().sum() > 0


def test_uncertainty_nll_and_mse_reconstruction_by_hand_clamped_at_zero():
    g = torch.Generator().manual_seed(5)
    down, target = (
        torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64),
    )
    proj = random_projection(2, 6, 4, generator=g, dtype=torch.float64)
    err = (torch.einsum("bchw,bcd->bdhw", down, proj) - torch.einsum("bchw,bcd->bdhw", target, proj)) ** 2
    assert reconstruction_loss(down, target, proj).item() == pytest.approx(err.mean().item(), rel=1e-12)
    net = ScaleNet(6).double()
    scales = net(target)
    lin = F.conv2d(target, net.net.weight, net.net.bias)
    torch.testing.assert_close(scales, torch.exp(lin + 0.1).clamp_min(1e-4))
    nll = (err / (2 * scales**2) + torch.log(scales)).mean()
    assert reconstruction_loss(down, target, proj, scales).item() == pytest.approx(max(nll.item(), 0.0), rel=1e-12)
    # a confident (small) scale on a tiny error drives the NLL below 0: the released clamp makes it 0
    small = torch.full_like(scales, 0.1)
    assert reconstruction_loss(target + 1e-3, target, proj, small).item() == 0.0
