"""Loss terms of the released LoftUp recipe; the stage recipes weight and combine them.

- `random_projection` / `project` / `projected_mse`: Stage 1 main term (MSE after a fresh
  random projection to 64 dims; released: Gaussian columns scaled to unit norm).
- `affinity_loss`: Stage 2 main term (MSE between cosine-affinity matrices), computed
  through C x C Gram matrices; `affinity_loss_explicit` is the N x N oracle.
- `total_variation`: FeatUp's TV (squared neighbour differences / (b*c*h*w)).
- `draw_jitter` / `apply_jitter`, `AttentionDownsampler`, `ScaleNet`, `reconstruction_loss`:
  FeatUp's multi-view reconstruction as the released training scripts call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "affinity_loss",
    "affinity_loss_explicit",
    "random_projection",
    "project",
    "projected_mse",
    "total_variation",
    "gaussian_blur5",
    "Jitter",
    "draw_jitter",
    "apply_jitter",
    "AttentionDownsampler",
    "ScaleNet",
    "reconstruction_loss",
    "reconstruction_nll",
]


# --------------------------------------------------------------------------- affinity


def _unit_pixels(x: torch.Tensor, border: float) -> torch.Tensor:
    """Drop the border, L2-normalise each pixel's vector; (B,C,H,W) -> (B,C,N).

    Float64 stays float64 (the tests' oracle); everything else is promoted to float32.
    """
    if x.dim() != 4:
        raise ValueError(f"expected (B,C,H,W) features, got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    bh, bw = int(round(border * height)), int(round(border * width))
    if height - 2 * bh <= 0 or width - 2 * bw <= 0:
        raise ValueError(f"border {border} leaves no pixels of a {height}x{width} map")
    x = x[..., bh : height - bh, bw : width - bw]
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return F.normalize(x, dim=1).flatten(2)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")


def affinity_loss(student: torch.Tensor, teacher: torch.Tensor, border: float = 0.1) -> torch.Tensor:
    """MSE between the N x N cosine-affinity matrices of student and teacher, never built.

    Inputs are (B,C,H,W). `border` (fraction of H and of W, rounded to whole pixels) is
    dropped on every side, each pixel's C-vector is L2-normalised (columns of S, T: C x N),
    and the loss is mean_B ||S^T S - T^T T||_F^2 / N^2. Gradients reach both inputs
    (detach the teacher yourself).

    Numerics: the textbook Gram identity ||SS^T||^2 + ||TT^T||^2 - 2||ST^T||^2 subtracts
    terms of size ~N^2 to get a result that is small exactly when training has converged,
    so float32 loses most digits there. With M = (S+T)/2 and D = S-T we have
    S^T S - T^T T = M^T D + D^T M, hence

        ||S^T S - T^T T||_F^2 = 2 <M M^T, D D^T> + 2 tr((M D^T)^2)

    whose terms scale with |D|^2 like the result. Measured against float64 for N up to
    240^2: float32 stays within 1e-4 relative even at a loss of 1e-9 (the textbook form
    is off by 100% there, and by 2% already at 1e-6). Everything runs in float32
    (autocast disabled) unless the inputs are float64; memory is O(C*N + C^2).
    """
    _check_pair(student, teacher)
    with torch.autocast(device_type=student.device.type, enabled=False):
        s = _unit_pixels(student, border)
        t = _unit_pixels(teacher, border)
        if t.dtype != s.dtype:
            s, t = s.to(torch.float32), t.to(torch.float32)
        n = s.shape[-1]
        mean = (s + t) * 0.5
        diff = s - t
        g_mm = mean @ mean.transpose(1, 2)
        g_dd = diff @ diff.transpose(1, 2)
        g_md = mean @ diff.transpose(1, 2)
        per_image = (g_mm * g_dd).sum(dim=(1, 2)) + (g_md * g_md.transpose(1, 2)).sum(dim=(1, 2))
        per_image = 2.0 * per_image
        return (per_image / float(n) ** 2).mean()


def affinity_loss_explicit(student: torch.Tensor, teacher: torch.Tensor, border: float = 0.1) -> torch.Tensor:
    """The same loss through explicit (B, N, N) affinity matrices: a test/bench oracle only."""
    _check_pair(student, teacher)
    with torch.autocast(device_type=student.device.type, enabled=False):
        s = _unit_pixels(student, border)
        t = _unit_pixels(teacher, border).to(s.dtype)
        a_s = s.transpose(1, 2) @ s
        a_t = t.transpose(1, 2) @ t
        return ((a_s - a_t) ** 2).mean(dim=(1, 2)).mean()


# --------------------------------------------------------------------------- stage 1


def random_projection(
    batch: int,
    chans: int,
    dim: int = 64,
    generator: torch.Generator | None = None,
    unit: bool = True,
    dtype=torch.float32,
    device=None,
) -> torch.Tensor:
    """A fresh Gaussian projection per image, (B, C, dim).

    unit=True (released): each column is scaled to unit norm, so a projected squared error is
    about |error|^2 / C per output dim, i.e. the plain per-channel MSE. unit=False (the paper's
    plain form as our first version had it): entries N(0, 1/dim), which keeps |error|^2 per
    pixel in expectation, C/dim times larger than the unit-norm value.
    """
    draw_device = generator.device if generator is not None else (device or "cpu")
    p = torch.randn(batch, chans, dim, generator=generator, dtype=dtype, device=draw_device)
    p = p / p.square().sum(1, keepdim=True).sqrt() if unit else p / math.sqrt(dim)
    return p.to(device) if device is not None else p


def project(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) features through per-image (B,C,D) projections -> (B,D,H,W)."""
    return torch.einsum("bchw,bcd->bdhw", x, proj.to(x.dtype))


def projected_mse(pred: torch.Tensor, target: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """mean((P pred - P target)^2) with one projection shared by both, in float32 at least."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    # P pred - P target = P (pred - target): one projection instead of two.
    return project((pred - target.to(pred.dtype)).to(dtype), proj.to(dtype)).pow(2).mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """FeatUp's TV of (B,C,H,W): (sum of squared vertical + horizontal neighbour differences) / (B*C*H*W)."""
    b, c, h, w = x.shape
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).square().sum()
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).square().sum()
    return (dy + dx) / (b * c * h * w)


# --------------------------------------------------------------------------- multi-view reconstruction


def gaussian_blur5(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """5x5 Gaussian blur (sigma 1) per channel with reflected borders: FeatUp blurs the HR
    features this way before its attention downsampler."""
    r = torch.arange(5, dtype=x.dtype, device=x.device) - 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, 5).expand(c, 1, 1, 5).contiguous(), groups=c)
    return F.conv2d(x, g.view(1, 1, 5, 1).expand(c, 1, 5, 1).contiguous(), groups=c)


@dataclass(frozen=True)
class Jitter:
    """One released jitter: reflect-pad (pad_y, pad_x) pixels of a ``ref``-sized image per side,
    zoom by (zoom_y, zoom_x), then resize back to the input's size."""

    pad_y: int
    pad_x: int
    zoom_y: float
    zoom_x: float


def draw_jitter(generator: torch.Generator | None = None, max_pad: int = 8, max_zoom: float = 0.1) -> Jitter:
    """pad in randint(0, max_pad) per axis, zoom 1 + U(-max_zoom, max_zoom) per axis (no flip, no rotation)."""
    pads = torch.randint(0, max_pad + 1, (2,), generator=generator)
    zooms = 1.0 + (torch.rand(2, generator=generator, dtype=torch.float64) * 2 - 1) * max_zoom
    return Jitter(int(pads[0]), int(pads[1]), float(zooms[0]), float(zooms[1]))


def apply_jitter(x: torch.Tensor, j: Jitter, ref: int) -> torch.Tensor:
    """Warp (B,C,H,W) ``x`` by ``j``; pads scale with H / ref so an image and a prediction of
    another size get the same warp. The output has x's size."""
    h, w = x.shape[-2:]
    py, px = round(j.pad_y * h / ref), round(j.pad_x * w / ref)
    out = F.pad(x, (px, px, py, py), mode="reflect") if (px or py) else x
    out = F.interpolate(out, scale_factor=(j.zoom_y, j.zoom_x), mode="bilinear", align_corners=False)
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)


class AttentionDownsampler(nn.Module):
    """FeatUp's learned attention downsampler, (B,C,H,W) -> (B,C,h,w).

    The HR features are blurred (5x5 Gaussian), cut into k x k windows at stride
    (H - k) // (h - 1); each window pixel gets a logit from Dropout(0.2) + Linear(C, 1), a
    Bernoulli(0.8) keep mask, a learned per-offset affine (w * logit + b), and the window is
    averaged with the softmax of those logits. A map whose size that stride rule does not tile
    into exactly h x w windows is first resized to (k * h, k * w).
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.attention_net = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(dim, 1))
        self.w = nn.Parameter(torch.ones(kernel_size, kernel_size) + 0.01 * torch.randn(kernel_size, kernel_size))
        self.b = nn.Parameter(torch.zeros(kernel_size, kernel_size) + 0.01 * torch.randn(kernel_size, kernel_size))

    def forward(self, hr_feats: torch.Tensor, out_size, seeds=None, rows_per_chunk: int = 0) -> torch.Tensor:
        """``seeds`` (one int per image): the dropout and keep masks come from a generator per
        (image, window row) instead of the global RNG, so a batch, its images one at a time and
        any chunking of the rows draw the same masks (the bounded training path relies on it).
        ``rows_per_chunk`` > 0 (with ``seeds``): that many window rows at a time, each chunk
        recomputed in backward (torch.utils.checkpoint) instead of keeping its windows."""
        k = self.kernel_size
        b, c, height, width = hr_feats.shape
        h, w = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        if min(height, width) < k:
            raise ValueError(f"a {height}x{width} map is smaller than the downsampling kernel {k}")
        if (height - k) % max(h - 1, 1) or (width - k) % max(w - 1, 1):
            # FeatUp's stride rule only tiles sizes like k * h exactly; resample others to that.
            hr_feats = F.interpolate(hr_feats, size=(k * h, k * w), mode="bilinear", align_corners=False)
            height, width = k * h, k * w
        stride = ((height - k) // (h - 1) if h > 1 else k, (width - k) // (w - 1) if w > 1 else k)
        if seeds is not None:
            if len(seeds) != b:
                raise ValueError(f"{len(seeds)} seeds for a batch of {b}")
            return self._seeded(hr_feats, (h, w), stride, [int(x) for x in seeds], rows_per_chunk)
        blurred = gaussian_blur5(hr_feats)
        patches = F.unfold(blurred, k, stride=stride).view(b, c, k * k, h, w).permute(0, 3, 4, 2, 1)
        logits = self.attention_net(patches).squeeze(-1)  # (b, h, w, k*k)
        keep = torch.rand(b, h, w, 1, device=logits.device) > 0.2
        logits = (logits * keep) * self.w.flatten() + self.b.flatten()
        return torch.einsum("bhwpc,bhwp->bchw", patches, logits.softmax(-1))

    def _seeded(self, hr_feats, out_size, stride, seeds: list[int], rows_per_chunk: int) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = out_size[0]
        chunk = rows_per_chunk if rows_per_chunk > 0 else h
        if rows_per_chunk > 0:
            blurred = checkpoint(gaussian_blur5, hr_feats, use_reentrant=False, preserve_rng_state=False)
        else:
            blurred = gaussian_blur5(hr_feats)
        outs = []
        for r0 in range(0, h, chunk):
            args = (blurred, r0, min(h, r0 + chunk), stride, out_size, seeds)
            if rows_per_chunk > 0:  # the masks come from the seeds: nothing to preserve
                outs.append(checkpoint(self._rows, *args, use_reentrant=False, preserve_rng_state=False))
            else:
                outs.append(self._rows(*args))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def _rows(self, blurred, r0: int, r1: int, stride, out_size, seeds: list[int]) -> torch.Tensor:
        """Window rows [r0, r1) of the output, (B, C, r1 - r0, w)."""
        k, (sy, _), w = self.kernel_size, stride, out_size[1]
        b, c = blurred.shape[:2]
        rows = blurred[:, :, r0 * sy : (r1 - 1) * sy + k]
        patches = F.unfold(rows, k, stride=stride).view(b, c, k * k, r1 - r0, w).permute(0, 3, 4, 2, 1)
        p = self.attention_net[0].p if self.attention_net[0].training else 0.0
        drops, keeps = [], []
        for seed in seeds:
            for r in range(r0, r1):
                gen = torch.Generator(device=blurred.device).manual_seed(_row_seed(seed, r))
                if p > 0:
                    drops.append(torch.rand((w, k * k, c), generator=gen, device=blurred.device) >= p)
                keeps.append(torch.rand((w, 1), generator=gen, device=blurred.device) > 0.2)
        x = patches
        if drops:
            x = patches * (torch.stack(drops).view(b, r1 - r0, w, k * k, c).to(patches.dtype) / (1 - p))
        lin = self.attention_net[1]
        logits = F.linear(x, lin.weight, lin.bias).squeeze(-1)  # (b, rows, w, k*k)
        keep = torch.stack(keeps).view(b, r1 - r0, w, 1)
        logits = (logits * keep) * self.w.flatten() + self.b.flatten()
        return torch.einsum("bhwpc,bhwp->bchw", patches, logits.softmax(-1))


def _row_seed(seed: int, row: int) -> int:
    return (seed * 1_000_003 + row * 7_919 + 12_345) % (2**63 - 1)


class ScaleNet(nn.Module):
    """FeatUp's predicted uncertainty: s = exp(Conv1x1(C->1)(lr) + 0.1) clamped >= 1e-4 (init x 0.1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Conv2d(dim, 1, 1)
        with torch.no_grad():
            self.net.weight.mul_(0.1)
            self.net.bias.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.net(x) + 0.1).clamp_min(1e-4)


def reconstruction_loss(
    down: torch.Tensor, target: torch.Tensor, proj: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """One jitter's FeatUp reconstruction term, clamped at >= 0 as the released scripts do.

    down: the downsampled jittered prediction, target: the backbone's features of the jittered
    image (both (B,C,h,w)), compared after the projection ``proj``. With ``scales`` (B,1,h,w),
    the Gaussian NLL mean(err^2 / (2 s^2) + log s); without, the plain MSE.
    """
    return reconstruction_nll(down, target, proj, scales).clamp(min=0.0)


def reconstruction_nll(
    down: torch.Tensor, target: torch.Tensor, proj: torch.Tensor, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`reconstruction_loss` before its clamp (the mean over images of per-image means:
    the stages clamp the batch's mean, wherever they compute its parts)."""
    err = (project(down, proj) - project(target.to(down.dtype), proj)).square()
    return (err / (2 * scales**2) + scales.log()).mean() if scales is not None else err.mean()
