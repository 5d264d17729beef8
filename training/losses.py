"""Loss terms of the released LoftUp recipe; the stage recipes weight and combine them.

- `random_projection` / `project` / `projected_mse`: Stage 1 main term (MSE after a fresh
  random projection to 64 dims; released: Gaussian columns scaled to unit norm).
- `affinity_loss`: Stage 2 main term (MSE between cosine-affinity matrices), computed
  through C x C Gram matrices; `affinity_loss_explicit` is the N x N oracle.
- `total_variation`: FeatUp's TV (squared neighbour differences / (b*c*h*w)).
- `draw_jitter` / `apply_jitter`, `gaussian_blur`, `AttentionDownsampler`, `ScaleNet`,
  `reconstruction_loss`: FeatUp's multi-view reconstruction as the released training scripts
  call it; the per-image optimiser (training/implicit.py) runs the same pieces, with FeatUp's
  implicit recipe where it differs given as parameters (crop and flip jitters, the
  downsampler's ``"implicit"`` variant, an unclamped NLL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "affinity_loss",
    "affinity_loss_explicit",
    "random_projection",
    "project",
    "projected_mse",
    "total_variation",
    "gaussian_blur",
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


def pooled_consistency(pred: torch.Tensor, lowres: torch.Tensor) -> torch.Tensor:
    """mean((avgpool(pred) - lowres)^2): (B,C,H,W) ``pred`` average-pooled onto the (B,C,h,w) grid of
    ``lowres``, in float32 at least. For an upsampler whose output should keep each cell's value
    (a backbone-space head), it is the reconstruction term with a fixed pooling downsampler."""
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    pooled = F.adaptive_avg_pool2d(pred.to(dtype), lowres.shape[-2:])
    return (pooled - lowres.to(dtype)).square().mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """FeatUp's TV of (B,C,H,W): (sum of squared vertical + horizontal neighbour differences) / (B*C*H*W)."""
    b, c, h, w = x.shape
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).square().sum()
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).square().sum()
    return (dy + dx) / (b * c * h * w)


# --------------------------------------------------------------------------- multi-view reconstruction


def gaussian_blur(x: torch.Tensor, kernel: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Depthwise ``kernel x kernel`` Gaussian blur with reflected borders (kornia's gaussian_blur2d
    defaults): FeatUp blurs the HR features this way (5x5, sigma 1) before its attention downsampler."""
    r = torch.arange(kernel, dtype=x.dtype, device=x.device) - (kernel - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    k2 = (g[:, None] * g[None, :]).expand(x.shape[1], 1, kernel, kernel)
    p = kernel // 2
    return F.conv2d(F.pad(x, [p] * 4, mode="reflect"), k2, groups=x.shape[1])


@dataclass(frozen=True)
class Jitter:
    """One jitter: reflect-pad (pad_y, pad_x) pixels of a ``ref``-sized image per side, zoom by
    (zoom_y, zoom_x), then bring the map back to the input's size, and mirror it if ``flip``.

    Back to size is where the two recipes differ: the released LoftUp scripts resize the whole
    zoomed map (``crop`` None); FeatUp's implicit upsampler crops the input-sized window whose
    top-left corner is ``crop`` = (row, col) of the padded and zoomed map.
    """

    pad_y: int
    pad_x: int
    zoom_y: float
    zoom_x: float
    crop: tuple[int, int] | None = None
    flip: bool = False


def draw_jitter(generator: torch.Generator | None = None, max_pad: int = 8, max_zoom: float = 0.1) -> Jitter:
    """pad in randint(0, max_pad) per axis, zoom 1 + U(-max_zoom, max_zoom) per axis (no flip, no rotation)."""
    pads = torch.randint(0, max_pad + 1, (2,), generator=generator)
    zooms = 1.0 + (torch.rand(2, generator=generator, dtype=torch.float64) * 2 - 1) * max_zoom
    return Jitter(int(pads[0]), int(pads[1]), float(zooms[0]), float(zooms[1]))


def apply_jitter(x: torch.Tensor, j: Jitter, ref: int | None = None) -> torch.Tensor:
    """Warp (B,C,H,W) ``x`` by ``j``; pads scale with H / ref so an image and a prediction of
    another size get the same warp (``ref`` None: the pads as they are). The output has x's size."""
    h, w = x.shape[-2:]
    py, px = (j.pad_y, j.pad_x) if ref is None else (round(j.pad_y * h / ref), round(j.pad_x * w / ref))
    out = F.pad(x, (px, px, py, py), mode="reflect") if (px or py) else x
    if j.crop is None:
        out = F.interpolate(out, scale_factor=(j.zoom_y, j.zoom_x), mode="bilinear", align_corners=False)
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    elif j.zoom_y == 1.0 and j.zoom_x == 1.0:
        out = out[:, :, j.crop[0] : j.crop[0] + h, j.crop[1] : j.crop[1] + w]
    else:
        out = _zoomed_window(out, j.zoom_y, j.zoom_x, *j.crop, h, w)
    return torch.flip(out, [3]) if j.flip else out


def _zoomed_window(padded: torch.Tensor, zoom_y: float, zoom_x: float, y: int, x: int, h: int, w: int):
    """The ``h x w`` window at (y, x) of ``padded`` zoomed bilinearly, without zooming the rest:
    output pixel i of the zoomed map reads source coordinate (i + 0.5) / zoom - 0.5
    (``F.interpolate(scale_factor=zoom, align_corners=False)``)."""
    b = padded.shape[0]
    ph, pw = padded.shape[-2:]
    dev = padded.device
    rows = (torch.arange(y, y + h, device=dev, dtype=torch.float64) + 0.5) / zoom_y - 0.5
    cols = (torch.arange(x, x + w, device=dev, dtype=torch.float64) + 0.5) / zoom_x - 0.5
    # grid_sample's normalised coordinates (align_corners=False): u = (2 * src + 1) / size - 1
    gy = ((2 * rows.clamp(min=0) + 1) / ph - 1).to(padded.dtype)
    gx = ((2 * cols.clamp(min=0) + 1) / pw - 1).to(padded.dtype)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None].expand(b, h, w, 2)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)


class AttentionDownsampler(nn.Module):
    """FeatUp's learned attention downsampler, (B,C,H,W) -> (B,C,h,w).

    The HR features are blurred (``blur`` = (kernel, sigma), 5x5 sigma 1; None: not blurred),
    cut into k x k windows at stride (H - k) // (h - 1); each window pixel gets a logit from
    Dropout(``dropout``) + Linear(C, 1), a Bernoulli(``keep``) mask, a learned per-offset affine
    (w * logit + b), and the window is averaged with the softmax of those logits.

    ``variant`` names where the two FeatUp recipes this project runs differ:

    - ``"released"`` (FeatUp's training code, as LoftUp's released scripts call it): dropout on
      each window's copy of its pixels, the keep mask drawn in eval mode too, and a map whose
      size the stride rule does not tile into exactly h x w windows resized to (k * h, k * w);
    - ``"implicit"`` (the per-image optimiser, training/implicit.py): the logit Linear runs once
      per pixel and is then windowed, so dropout is drawn per pixel (FeatUp's unfold of its
      129-channel map holds ~1 GB per step at 224); the keep mask only in training mode;
      windows at the floored stride; the weighted window sums one row of windows at a time,
      recomputed in the backward pass, so peak memory is one row of windows.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        dropout: float = 0.2,
        keep: float = 0.8,
        blur: tuple[int, float] | None = (5, 1.0),
        variant: str = "released",
    ):
        super().__init__()
        if variant not in ("released", "implicit"):
            raise ValueError(f"variant must be 'released' or 'implicit', got {variant!r}")
        self.dim, self.kernel_size, self.keep, self.blur, self.variant = dim, kernel_size, keep, blur, variant
        self.attention_net = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(dim, 1))
        self.w = nn.Parameter(torch.ones(kernel_size, kernel_size) + 0.01 * torch.randn(kernel_size, kernel_size))
        self.b = nn.Parameter(torch.zeros(kernel_size, kernel_size) + 0.01 * torch.randn(kernel_size, kernel_size))

    def _tiling(self, hr: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """The map to cut (resized where the released rule wants it) and the windows' stride."""
        k = self.kernel_size
        height, width = hr.shape[-2:]
        if self.variant == "implicit":
            sh, sw = (height - k) // max(h - 1, 1), (width - k) // max(w - 1, 1)
            if k + (h - 1) * sh > height or k + (w - 1) * sw > width or (h > 1 and sh < 1) or (w > 1 and sw < 1):
                raise ValueError(f"kernel {k} at {height}x{width} cannot tile the {h}x{w} grid")
            return hr, (sh, sw)
        if min(height, width) < k:
            raise ValueError(f"a {height}x{width} map is smaller than the downsampling kernel {k}")
        if (height - k) % max(h - 1, 1) or (width - k) % max(w - 1, 1):
            # FeatUp's stride rule only tiles sizes like k * h exactly; resample others to that.
            hr = F.interpolate(hr, size=(k * h, k * w), mode="bilinear", align_corners=False)
            height, width = k * h, k * w
        return hr, ((height - k) // (h - 1) if h > 1 else k, (width - k) // (w - 1) if w > 1 else k)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(x, *self.blur) if self.blur else x

    def forward(self, hr_feats: torch.Tensor, out_size, seeds=None, rows_per_chunk: int = 0) -> torch.Tensor:
        """``seeds`` (one int per image; the released variant): the dropout and keep masks come
        from a generator per (image, window row) instead of the global RNG, so a batch, its images
        one at a time and any chunking of the rows draw the same masks (the bounded training path
        relies on it). ``rows_per_chunk`` > 0 (with ``seeds``): that many window rows at a time,
        each chunk recomputed in backward (torch.utils.checkpoint) instead of keeping its windows."""
        k = self.kernel_size
        b, c = hr_feats.shape[:2]
        h, w = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        hr_feats, (sh, sw) = self._tiling(hr_feats, h, w)
        if seeds is not None:
            if self.variant != "released":
                raise ValueError("seeded masks are drawn by the released variant only")
            if len(seeds) != b:
                raise ValueError(f"{len(seeds)} seeds for a batch of {b}")
            return self._seeded(hr_feats, (h, w), (sh, sw), [int(x) for x in seeds], rows_per_chunk)
        x = self._blur(hr_feats)
        if self.variant == "released":
            patches = F.unfold(x, k, stride=(sh, sw)).view(b, c, k * k, h, w).permute(0, 3, 4, 2, 1)
            logits = self.attention_net(patches).squeeze(-1)  # (b, h, w, k*k)
            logits = logits * (torch.rand(b, h, w, 1, device=logits.device) > 1 - self.keep)
        else:
            drop, lin = self.attention_net
            pix = torch.einsum("bchw,c->bhw", drop(x), lin.weight[0]) + lin.bias
            logits = pix.unfold(1, k, sh).unfold(2, k, sw)[:, :h, :w].reshape(b, h, w, k * k)
            if self.training:
                logits = logits * (torch.rand(b, h, w, 1, device=logits.device) < self.keep)
        attn = (logits * self.w.flatten() + self.b.flatten()).softmax(-1)
        if self.variant == "released":
            return torch.einsum("bhwpc,bhwp->bchw", patches, attn)
        attn = attn.view(b, h, w, k, k)
        rows = []
        for i in range(h):
            args = (x, attn, i, sh, sw, w, k)
            rows.append(checkpoint(_pool_row, *args, use_reentrant=False) if x.requires_grad else _pool_row(*args))
        return torch.stack(rows, 2)

    def _seeded(self, hr_feats, out_size, stride, seeds: list[int], rows_per_chunk: int) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = out_size[0]
        chunk = rows_per_chunk if rows_per_chunk > 0 else h
        if rows_per_chunk > 0:
            blurred = checkpoint(self._blur, hr_feats, use_reentrant=False, preserve_rng_state=False)
        else:
            blurred = self._blur(hr_feats)
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
                keeps.append(torch.rand((w, 1), generator=gen, device=blurred.device) > 1 - self.keep)
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


def _pool_row(x, attn, i, sh, sw, gw, k):
    band = x[:, :, i * sh : i * sh + k]  # (b, c, k, W)
    windows = band.unfold(3, k, sw)[:, :, :, :gw]  # (b, c, k, gw, k): a view
    return torch.einsum("bcujv,bjuv->bcj", windows, attn[:, i])


class ScaleNet(nn.Module):
    """FeatUp's predicted uncertainty: s = exp(Conv1x1(C->1)(lr) + offset) clamped >= ``minimum``
    (the conv's initial weights scaled by ``init``); 0.1, 0.1 and 1e-4 in both FeatUp recipes."""

    def __init__(self, dim: int, init: float = 0.1, offset: float = 0.1, minimum: float = 1e-4):
        super().__init__()
        self.offset, self.minimum = offset, minimum
        self.net = nn.Conv2d(dim, 1, 1)
        with torch.no_grad():
            self.net.weight.mul_(init)
            self.net.bias.mul_(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.net(x) + self.offset).clamp_min(self.minimum)


def reconstruction_loss(
    down: torch.Tensor,
    target: torch.Tensor,
    proj: torch.Tensor | None,
    scales: torch.Tensor | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """One jitter's FeatUp reconstruction term, clamped at >= 0 as the released scripts do
    (``clamp=False``: as FeatUp's implicit upsampler, unclamped).

    down: the downsampled jittered prediction, target: the backbone's features of the jittered
    image (both (B,C,h,w)), compared after the projection ``proj`` (None: as they are). With
    ``scales`` (B,1,h,w), the Gaussian NLL mean(err^2 / (2 s^2) + log s); without, the plain MSE.
    """
    loss = reconstruction_nll(down, target, proj, scales)
    return loss.clamp(min=0.0) if clamp else loss


def reconstruction_nll(
    down: torch.Tensor, target: torch.Tensor, proj: torch.Tensor | None, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`reconstruction_loss` before its clamp (the mean over images of per-image means:
    the stages clamp the batch's mean, wherever they compute its parts)."""
    if proj is None:
        err = (down - target.to(down.dtype)).square()
    else:
        err = (project(down, proj) - project(target.to(down.dtype), proj)).square()
    return (err / (2 * scales**2) + scales.log()).mean() if scales is not None else err.mean()
