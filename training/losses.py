"""Loss terms of the released LoftUp recipe; the trainers weight and combine them.

- `projected_mse`: Stage 1 main term (MSE after a fresh random projection to 64 dims).
- `affinity_loss`: Stage 2 main term (MSE between cosine-affinity matrices), computed
  through C x C Gram matrices; `affinity_loss_explicit` is the N x N oracle.
- `total_variation`: smoothness regulariser (the caller applies its weight, 0.001).
- `AttentionDownsampler` / `MultiViewReconstruction`: FeatUp-style multi-view
  reconstruction, switchable, off the default-critical path.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "affinity_loss",
    "affinity_loss_explicit",
    "projected_mse",
    "total_variation",
    "AttentionDownsampler",
    "MultiViewReconstruction",
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
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape"
        )


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


def affinity_loss_explicit(
    student: torch.Tensor, teacher: torch.Tensor, border: float = 0.1
) -> torch.Tensor:
    """The same loss through explicit (B, N, N) affinity matrices: a test/bench oracle only."""
    _check_pair(student, teacher)
    with torch.autocast(device_type=student.device.type, enabled=False):
        s = _unit_pixels(student, border)
        t = _unit_pixels(teacher, border).to(s.dtype)
        a_s = s.transpose(1, 2) @ s
        a_t = t.transpose(1, 2) @ t
        return ((a_s - a_t) ** 2).mean(dim=(1, 2)).mean()


# --------------------------------------------------------------------------- stage 1


def projected_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    dim: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between (B,C,H,W) `pred` and `target` after one random projection C -> `dim`.

    The projection is a Gaussian (dim x C) matrix scaled by 1/sqrt(dim), drawn afresh on
    every call from `generator` (or the global RNG) and shared by pred and target. It is
    float32 (float64 for float64 inputs); `target` is cast to `pred`'s dtype. The scale
    keeps each pixel's squared error norm in expectation, so the value (a mean over `dim`
    channels) is about C/dim times the plain MSE.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    chans = pred.shape[1]
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    draw_device = generator.device if generator is not None else pred.device
    proj = torch.randn(dim, chans, generator=generator, device=draw_device, dtype=dtype)
    proj = proj.to(pred.device).div_(math.sqrt(dim))
    if pred.dtype != dtype:
        proj = proj.to(pred.dtype)
    # P pred - P target = P (pred - target): one projection instead of two.
    projected = torch.einsum("dc,bchw->bdhw", proj, pred - target.to(pred.dtype))
    # Squares are summed in float32 at least, even if autocast ran the einsum in bf16.
    return projected.to(dtype).pow(2).mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic L1 total variation of (..., H, W): mean |vertical diff| + mean |horizontal diff|.

    Means (not sums) keep the value independent of resolution and channel count.
    """
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dy + dx


# --------------------------------------------------------------------------- multi-view


class AttentionDownsampler(nn.Module):
    """Learned attention pooling of HR features (B,C,H,W) to a low-res grid (B,C,h,w).

    Each low-res cell covers a kernel x kernel window (kernel = stride). Its pixels are
    weighted by a softmax of a 1x1-conv score of the HR features plus a learned bias per
    position in the window, then summed. The score conv and bias start at zero, so an
    untrained downsampler is exactly average pooling. When H != h*kernel (non-integer
    ratio, or another resolution) the HR features are first resized bilinearly to
    (h*kernel, w*kernel).
    """

    def __init__(self, dim: int, kernel_size: int = 14):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.score = nn.Conv2d(dim, 1, kernel_size=1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        self.position_bias = nn.Parameter(torch.zeros(kernel_size, kernel_size))

    def forward(self, hr_feats: torch.Tensor, out_size=None) -> torch.Tensor:
        k = self.kernel_size
        batch, chans, height, width = hr_feats.shape
        if out_size is None:
            out_size = (height // k, width // k)
        h, w = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        if (height, width) != (h * k, w * k):
            hr_feats = F.interpolate(
                hr_feats, size=(h * k, w * k), mode="bilinear", align_corners=False
            )
        logits = self.score(hr_feats).view(batch, h, k, w, k)
        logits = logits + self.position_bias.view(1, 1, k, 1, k)
        weights = logits.permute(0, 1, 3, 2, 4).reshape(batch, h, w, k * k).softmax(dim=-1)
        weights = weights.view(batch, h, w, k, k)
        windows = hr_feats.view(batch, chans, h, k, w, k)
        return torch.einsum("bchkwl,bhwkl->bchw", windows, weights)


class MultiViewReconstruction(nn.Module):
    """FeatUp-style multi-view reconstruction loss (switchable; MSE).

    For each of `n_jitters` random views (a horizontal flip with probability 1/2 and, when
    a backbone is given, a zoom-in crop of factor up to `max_zoom` at a random position;
    one view per image, drawn from `generator` so runs are reproducible), the HR prediction
    is warped like the image, pooled back to the low-res grid by a learned
    `AttentionDownsampler`, and compared with the backbone's features of the warped image.

    Without a backbone (no `backbone_fn`, here or at construction) the views are flips
    only, whose low-res features are exactly the flipped `lr_feats`, so no extra backbone
    pass is needed. The module owns trainable parameters (the downsampler): optimise them
    with the model and checkpoint its state_dict.

    Randomness, by priority: the `generator` given to forward; else, with a constructor
    `seed`, a stream derived from (seed, step) when `step` is given (exact resume) or one
    persistent stream seeded once; else the global RNG.
    """

    def __init__(
        self,
        dim: int,
        n_jitters: int = 4,
        kernel_size: int = 14,
        max_zoom: float = 1.3,
        flip_prob: float = 0.5,
        backbone_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if max_zoom < 1.0:
            raise ValueError(f"max_zoom must be >= 1, got {max_zoom}")
        self.n_jitters = n_jitters
        self.max_zoom = max_zoom
        self.flip_prob = flip_prob
        self.seed = seed
        self.downsampler = AttentionDownsampler(dim, kernel_size)
        # Kept out of nn.Module's registry: a backbone passed here must not join this
        # module's parameters (the optimiser) or its state_dict (the checkpoints).
        self.__dict__["default_backbone_fn"] = backbone_fn
        self.__dict__["_stream"] = None if seed is None else torch.Generator().manual_seed(seed)

    def _generator(self, generator, step):
        if generator is not None or self.seed is None:
            return generator
        if step is None:
            return self._stream
        # One stream per (seed, step): a resumed run draws the same views as a straight one.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2**63))

    def _draw(self, batch: int, zoom: bool, generator) -> torch.Tensor:
        """Per-image affine maps (B,2,3) from output to input coordinates ([-1,1] frame)."""
        u = torch.rand(batch, 4, generator=generator, dtype=torch.float64)
        sign = torch.where(u[:, 0] < self.flip_prob, -1.0, 1.0).to(torch.float64)
        scale = 1.0 + u[:, 1] * (self.max_zoom - 1.0) if zoom else torch.ones(batch, dtype=torch.float64)
        inv = 1.0 / scale
        theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = sign * inv
        theta[:, 1, 1] = inv
        # The crop window stays inside the frame, so no padding convention matters.
        theta[:, 0, 2] = (2.0 * u[:, 2] - 1.0) * (1.0 - inv)
        theta[:, 1, 2] = (2.0 * u[:, 3] - 1.0) * (1.0 - inv)
        return theta

    @staticmethod
    def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        pure_flip = bool((theta[:, 1, 1] == 1.0).all() and (theta[:, :, 2] == 0.0).all())
        if pure_flip:
            # Exact mirror instead of resampling at (numerically) almost-pixel centres.
            flipped = (theta[:, 0, 0] < 0).to(x.device).view(-1, 1, 1, 1)
            return torch.where(flipped, x.flip(-1), x)
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(
        self,
        upsampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        lr_feats: torch.Tensor,
        image: torch.Tensor,
        hr_pred: torch.Tensor | None = None,
        backbone_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> torch.Tensor:
        """Mean over the views of MSE(downsample(warp(hr_pred)), lowres(warp(image))).

        upsampler(lr_feats, image) is called only when `hr_pred` is None. backbone_fn
        (default: the constructor's) gets the warped `image` exactly as passed (same
        normalisation) and must return features on the grid of `lr_feats`; it runs
        without gradients.
        """
        if backbone_fn is None:
            backbone_fn = self.default_backbone_fn
        generator = self._generator(generator, step)
        if hr_pred is None:
            if upsampler is None:
                raise ValueError("give hr_pred or an upsampler to compute it")
            hr_pred = upsampler(lr_feats, image)
        batch = lr_feats.shape[0]
        losses = []
        for _ in range(self.n_jitters):
            theta = self._draw(batch, zoom=backbone_fn is not None, generator=generator)
            if backbone_fn is None:
                target = self._warp(lr_feats, theta)
            else:
                with torch.no_grad():
                    target = backbone_fn(self._warp(image, theta))
            pooled = self.downsampler(self._warp(hr_pred, theta), target.shape[-2:])
            losses.append(F.mse_loss(pooled, target.detach().to(pooled.dtype)))
        return torch.stack(losses).mean()
