"""Loss terms: affinity (Gram form vs explicit N x N), projected MSE, TV, multi-view."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from loftup.training.losses import (
    AttentionDownsampler,
    MultiViewReconstruction,
    affinity_loss,
    affinity_loss_explicit,
    projected_mse,
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


def test_projected_mse_uses_one_shared_fresh_projection():
    g = torch.Generator().manual_seed(6)
    pred = torch.randn(2, 10, 5, 6, generator=g)
    target = torch.randn(2, 10, 5, 6, generator=g)
    got = projected_mse(pred, target, dim=4, generator=torch.Generator().manual_seed(7))
    proj = torch.randn(4, 10, generator=torch.Generator().manual_seed(7)) / math.sqrt(4)
    p = torch.einsum("dc,bchw->bdhw", proj, pred)
    t = torch.einsum("dc,bchw->bdhw", proj, target)
    torch.testing.assert_close(got, ((p - t) ** 2).mean())
    # Same projection for both: a common shift in the projection's null space is free,
    # an independent projection per argument would see it.
    null = torch.linalg.svd(proj, full_matrices=True).Vh[-1]
    shifted = target + 5.0 * null.view(1, 10, 1, 1)
    torch.testing.assert_close(
        projected_mse(pred, shifted, dim=4, generator=torch.Generator().manual_seed(7)), got, rtol=1e-4, atol=1e-5
    )
    assert projected_mse(pred, pred, dim=4).item() == 0.0

    # Reproducible with a seeded generator; fresh on each call otherwise.
    a = projected_mse(pred, target, generator=torch.Generator().manual_seed(1))
    b = projected_mse(pred, target, generator=torch.Generator().manual_seed(1))
    assert a.item() == b.item()
    gen = torch.Generator().manual_seed(1)
    first, second = projected_mse(pred, target, generator=gen), projected_mse(pred, target, generator=gen)
    assert first.item() == a.item() and second.item() != first.item()
    assert projected_mse(pred, target).item() != projected_mse(pred, target).item()
    # The 1/sqrt(dim) scale preserves each pixel's squared error norm in expectation, so
    # the projected mean (over dim channels) is the plain MSE times C / dim.
    many = torch.stack([projected_mse(pred, target, dim=64) for _ in range(20)]).mean()
    assert abs(many.item() / (F.mse_loss(pred, target).item() * 10 / 64) - 1) < 0.15
    with pytest.raises(ValueError):
        projected_mse(pred, target[:, :3])


def test_projected_mse_gradient_and_dtype():
    pred = torch.randn(1, 6, 4, 4, requires_grad=True)
    target = torch.randn(1, 6, 4, 4).half()
    loss = projected_mse(pred, target, dim=8, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and pred.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = projected_mse(pred, target, dim=8, generator=torch.Generator().manual_seed(0))
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, loss, rtol=3e-2, atol=1e-3)


def test_total_variation_mean_abs_differences():
    assert total_variation(torch.full((2, 3, 5, 5), 4.0)).item() == 0.0
    x = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]).view(1, 1, 2, 3)
    # vertical |diffs| = [0, 1, 3] -> mean 4/3; horizontal = [1, 2, 0, 0] -> mean 3/4
    torch.testing.assert_close(total_variation(x), torch.tensor(4 / 3 + 3 / 4))


def test_attention_downsampler_shapes_and_average_pooling():
    torch.manual_seed(0)
    down = AttentionDownsampler(dim=5, kernel_size=4)
    hr = torch.randn(2, 5, 12, 16)
    assert down(hr).shape == (2, 5, 3, 4)
    assert down(hr, (2, 3)).shape == (2, 5, 2, 3)  # non-integer ratio: resized first
    # Zero scores and bias (the initial state, set explicitly here): average pooling.
    with torch.no_grad():
        down.score.weight.zero_()
        down.score.bias.fill_(3.0)
        down.position_bias.zero_()
    torch.testing.assert_close(down(hr), F.avg_pool2d(hr, 4))
    # A dominant position bias selects that pixel of every window.
    with torch.no_grad():
        down.position_bias[1, 2] = 60.0
    torch.testing.assert_close(down(hr), hr[..., 1::4, 2::4], rtol=1e-5, atol=1e-5)
    # Learned, input-dependent weights stay a convex combination of the window.
    with torch.no_grad():
        down.score.weight.normal_()
        down.position_bias.normal_()
    out = down(hr)
    assert not torch.allclose(out, F.avg_pool2d(hr, 4))
    assert (out <= F.max_pool2d(hr, 4) + 1e-5).all() and (out >= -F.max_pool2d(-hr, 4) - 1e-5).all()


class _TinyUpsampler(nn.Module):
    """Bilinear upsampling of the low-res features plus a learned image term."""

    def __init__(self, dim):
        super().__init__()
        self.mix = nn.Conv2d(dim + 3, dim, 3, padding=1)

    def forward(self, lr, image):
        up = F.interpolate(lr, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return up + self.mix(torch.cat([up, image], 1))


def test_multiview_flip_only_is_zero_for_consistent_prediction():
    g = torch.Generator().manual_seed(8)
    lr = torch.randn(2, 6, 4, 5, generator=g)
    image = torch.rand(2, 3, 16, 20, generator=g)
    mv = MultiViewReconstruction(dim=6, kernel_size=4)
    with torch.no_grad():
        mv.downsampler.score.weight.normal_()
        mv.downsampler.position_bias.normal_()
    # Piecewise-constant HR features pool back to lr_feats whatever the weights, and the
    # flipped views must match the flipped lr_feats.
    hr = F.interpolate(lr, scale_factor=4, mode="nearest")
    loss = mv(None, lr, image, hr_pred=hr, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    # A prediction that is not flip-consistent is penalised.
    shifted = torch.roll(hr, shifts=3, dims=-1)
    assert mv(None, lr, image, hr_pred=shifted, generator=torch.Generator().manual_seed(0)).item() > 1e-2


def test_multiview_with_backbone_warps_image_and_prediction_alike():
    g = torch.Generator().manual_seed(9)
    image = torch.rand(2, 3, 32, 32, generator=g)

    def backbone_fn(img):  # "features" = 8x8 block means of the image
        return F.avg_pool2d(img, 8)

    mv = MultiViewReconstruction(dim=3, kernel_size=8, max_zoom=1.6)
    # If the HR prediction is the image itself, every warped view pools (uniform
    # downsampler) to exactly the backbone's features of the warped image.
    loss = mv(None, backbone_fn(image), image, hr_pred=image, backbone_fn=backbone_fn,
              generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-10
    lr = backbone_fn(image)
    wrong = torch.roll(image, shifts=5, dims=-2)
    a = mv(None, lr, image, hr_pred=wrong, backbone_fn=backbone_fn, generator=torch.Generator().manual_seed(2))
    b = mv(None, lr, image, hr_pred=wrong, backbone_fn=backbone_fn, generator=torch.Generator().manual_seed(2))
    c = mv(None, lr, image, hr_pred=wrong, backbone_fn=backbone_fn, generator=torch.Generator().manual_seed(3))
    assert a.item() > 1e-4 and a.item() == b.item() and c.item() != a.item()


@pytest.mark.parametrize("with_backbone", [False, True])
def test_multiview_gradients_reach_upsampler_and_downsampler(with_backbone):
    torch.manual_seed(10)
    dim = 4
    up = _TinyUpsampler(dim)
    patchify = nn.Conv2d(3, dim, 4, stride=4)
    image = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        lr = patchify(image)
    mv = MultiViewReconstruction(dim=dim, kernel_size=4)
    backbone_fn = patchify if with_backbone else None
    loss = mv(up, lr, image, backbone_fn=backbone_fn, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for p in list(up.parameters()) + [mv.downsampler.score.weight, mv.downsampler.position_bias]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert patchify.weight.grad is None  # the frozen backbone gets nothing


def test_multiview_seed_step_streams_and_default_backbone():
    g = torch.Generator().manual_seed(11)
    image = torch.rand(2, 3, 16, 16, generator=g)
    patchify = nn.Conv2d(3, 4, 4, stride=4)
    with torch.no_grad():
        lr = patchify(image)
    hr = torch.randn(2, 4, 16, 16, generator=g)
    mv = MultiViewReconstruction(dim=4, kernel_size=4, backbone_fn=patchify, seed=5)
    # The backbone given at construction is used but is not part of the module.
    assert {n for n, _ in mv.named_parameters()} == {
        "downsampler.score.weight", "downsampler.score.bias", "downsampler.position_bias"}
    assert all(k.startswith("downsampler.") for k in mv.state_dict())
    at3 = mv(None, lr, image, hr_pred=hr, step=3)
    assert mv(None, lr, image, hr_pred=hr, step=3).item() == at3.item()
    assert mv(None, lr, image, hr_pred=hr, step=4).item() != at3.item()
    twin = MultiViewReconstruction(dim=4, kernel_size=4, backbone_fn=patchify, seed=5)
    assert twin(None, lr, image, hr_pred=hr, step=3).item() == at3.item()
    # The zoomed views differ from flip-only views computed without the backbone.
    flips = MultiViewReconstruction(dim=4, kernel_size=4, seed=5)
    assert flips(None, lr, image, hr_pred=hr, step=3).item() != at3.item()
    # Without a step, a seeded module draws from one persistent stream.
    first, second = mv(None, lr, image, hr_pred=hr), mv(None, lr, image, hr_pred=hr)
    assert first.item() != second.item()
