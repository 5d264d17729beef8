"""Output heads of LoftUp: the released one, and a head that stays in the backbone's feature space.

The released head (``head="loftup"``) turns each pixel's refined query into its output through
a learned 1x1 projection and a final LayerNorm, so the output lives in a space of its own
(README: "Differences"). The **convex head** (``head="convex"``) keeps everything LoftUp
computes up to its refined queries (coordinates and image through the Fourier features, the
conv stage and the cross-attention blocks) and LoftUp's keys (the channel-normalised low-res
features with their grid encoding), and replaces the output projection by one more attention
whose values are the RAW low-res feature vectors::

    out(p) = sum_j w_pj f_j,   w_p = softmax_j( s <Wq q_p, Wk LN(t_j)> - d(p, j)^2 / (2 sigma^2) ),  j in N(p)

- ``f_j``: the backbone's own vector at low-res cell j (no channel norm, no value or output
  projection, no final norm), so every output pixel is a convex combination of them: it lies in
  their convex hull, a linear probe trained on the low-res features applies to it, and a linear
  map of the features (a PCA) commutes with the head.
- ``s = exp(log_scale)``: the content logits' inverse temperature (learned; ``learn_scale``).
- ``d(p, j)``: the distance, in cells, from pixel p's position on the low-res grid to cell j's
  centre (align_corners=False geometry); ``sigma = exp(log_sigma)`` is learned. At
  initialisation the content term is small (``init_scale``), so the head starts as a smooth
  Gaussian interpolation of the low-res features (close to bilinear) and learns where to sharpen.
  ``prior=False`` drops this term.
- ``N(p)``: the cells within ``radius`` rows and columns of p's nearest cell, a
  (2 radius + 1)^2 window (``radius=-1``: every cell). ``radius=0`` is nearest upsampling.

The measurements behind the defaults are in docs/results.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["HEADS", "ConvexHead", "HeadContext", "attach_head", "head_of", "output_space"]

HEADS = ("loftup", "convex")


@dataclass
class HeadContext:
    """What every query chunk of one forward shares: keys (B, S, k), values (B, S, C), the cells'
    rows/columns (S,), and the output geometry."""

    keys: torch.Tensor
    values: torch.Tensor
    cell_rows: torch.Tensor
    cell_cols: torch.Tensor
    grid: tuple[int, int]
    size: tuple[int, int]


def _positions(n_out: int, n_grid: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of ``n_out`` output pixels along an axis: its continuous position on the low-res
    grid (cell j's centre at j; align_corners=False) and its nearest cell (nearest-exact)."""
    pos = (torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * (n_grid / n_out) - 0.5
    nearest = torch.floor((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * (n_grid / n_out))
    return pos, nearest.clamp_(0, n_grid - 1).long()


class ConvexHead(nn.Module):
    """Backbone-space output: attention of each pixel's refined query over the low-res cells,
    values = the raw low-res feature vectors (see the module docstring)."""

    def __init__(
        self,
        width: int,
        key_dim: int = 64,
        radius: int = 1,
        prior: bool = True,
        sigma: float = 0.5,
        init_scale: float = 0.1,
        learn_scale: bool = True,
    ):
        super().__init__()
        self.radius, self.prior = int(radius), bool(prior)
        self.q_proj = nn.Linear(width, key_dim)
        self.k_norm = nn.LayerNorm(width)
        self.k_proj = nn.Linear(width, key_dim)
        scale = torch.tensor(math.log(init_scale / math.sqrt(key_dim)))
        self.log_scale = nn.Parameter(scale) if learn_scale else None
        if not learn_scale:
            self.register_buffer("fixed_log_scale", scale)
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma))) if prior else None

    def scale(self) -> torch.Tensor:
        return (self.log_scale if self.log_scale is not None else self.fixed_log_scale).exp()

    def context(self, tokens: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> HeadContext:
        """``tokens`` (B, S, width) LoftUp's keys; ``values`` (B, C, h, w) the raw features."""
        h, w = values.shape[-2:]
        dev = values.device
        cells = torch.arange(h * w, device=dev)
        return HeadContext(
            keys=self.k_proj(self.k_norm(tokens)),
            values=values.flatten(2).transpose(1, 2),
            cell_rows=torch.div(cells, w, rounding_mode="floor"),
            cell_cols=cells % w,
            grid=(h, w),
            size=(int(size[0]), int(size[1])),
        )

    def bias(self, ctx: HeadContext, pixels: torch.Tensor) -> torch.Tensor | None:
        """(n, S) additive logits of the flat output ``pixels``: the positional prior and, outside
        the window, -inf. None when neither applies."""
        (h, w), (H, W) = ctx.grid, ctx.size
        py = torch.div(pixels, W, rounding_mode="floor")
        px = pixels % W
        bias = None
        if self.prior:
            pos_y, _ = _positions(H, h, pixels.device)
            pos_x, _ = _positions(W, w, pixels.device)
            d2 = (pos_y[py][:, None] - ctx.cell_rows[None]) ** 2 + (pos_x[px][:, None] - ctx.cell_cols[None]) ** 2
            bias = d2 * (-0.5 * torch.exp(-2 * self.log_sigma))
        if self.radius >= 0:
            _, ny = _positions(H, h, pixels.device)
            _, nx = _positions(W, w, pixels.device)
            inside = ((ny[py][:, None] - ctx.cell_rows[None]).abs() <= self.radius) & (
                (nx[px][:, None] - ctx.cell_cols[None]).abs() <= self.radius
            )
            outside = torch.zeros(inside.shape, device=pixels.device).masked_fill_(~inside, float("-inf"))
            bias = outside if bias is None else bias + outside
        return bias

    def weights(self, queries: torch.Tensor, ctx: HeadContext, pixels: torch.Tensor) -> torch.Tensor:
        """(B, n, S) convex weights of ``queries`` (B, n, width) at the flat output ``pixels`` (n,)."""
        logits = (self.q_proj(queries) @ ctx.keys.transpose(1, 2)) * self.scale()
        bias = self.bias(ctx, pixels)
        if bias is not None:
            logits = logits + bias
        return torch.softmax(logits.float(), dim=-1)

    def attend(self, queries: torch.Tensor, ctx: HeadContext, pixels: torch.Tensor) -> torch.Tensor:
        """(B, n, C) outputs: the convex combinations of the raw low-res vectors."""
        w = self.weights(queries, ctx, pixels)
        return (w.to(ctx.values.dtype) @ ctx.values).to(ctx.values.dtype)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
        """Dense path: ``queries`` (B, H*W, width) in raster order -> (B, C, H, W)."""
        H, W = size
        ctx = self.context(tokens, values, size)
        out = self.attend(queries, ctx, torch.arange(H * W, device=queries.device))
        return out.transpose(1, 2).reshape(out.shape[0], -1, H, W)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, prior={self.prior}"


def attach_head(core: nn.Module, head: str, options: dict | None = None) -> None:
    """Give a ``LoftUpCore`` the output ``head`` (its released ``final_conv`` stays for "loftup")."""
    if head == "loftup":
        if options:
            raise ValueError(f"the released head takes no options, got {sorted(options)}")
        return
    if head != "convex":
        raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    core.final_conv = None
    core.head = ConvexHead(core.width, **(options or {}))


def head_of(model: nn.Module) -> str:
    """The head of a ``LoftUp`` (or of anything with its ``config``)."""
    return getattr(model, "config", {}).get("head", "loftup")


def output_space(model: nn.Module) -> str:
    """The target space (training/target_space.py) a model's outputs live in: LoftUp's released
    head ends with a channel LayerNorm; the convex head outputs the backbone's own (raw) space."""
    return "raw" if head_of(model) == "convex" else "layer_norm"
