"""The LoftUp feature upsampler, laid out like the authors' released checkpoints.

Parameter names follow the released state dict one to one (``channelnorm.*`` and
``upsampler.*``), so an official checkpoint loads with ``strict=True`` and our own
weights export to the official layout without any renaming.

Two execution paths compute the same function:

* the dense path (training, small outputs): whole-image convolutions and one
  attention call over all H*W queries, through the standard modules;
* the memory-bounded path (eval, large outputs): the image is processed in tiles
  with a 2-pixel halo for the two 3x3 convolutions, and each tile's queries go
  through the attention blocks in chunks with ``scaled_dot_product_attention``;
  apart from the output tensor, memory does not grow with the output size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoftUp", "LoftUpCore", "ChannelNorm", "ChannelLayerNorm", "MinMaxScale", "FourierFeatures"]

IMAGE_SCALINGS = ("image", "batch")

# Above this many output pixels an eval-mode forward switches to the bounded path
# (unless the caller pinned the behaviour with set_memory_bound).
AUTO_BOUND_PIXELS = 224 * 224
DEFAULT_CONV_TILE = 128
DEFAULT_QUERY_CHUNK = 4096
HALO = 2


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, parameters kept in ``.norm``."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelLayerNorm(nn.Module):
    """Channel LayerNorm with ``weight``/``bias`` held directly (released output norm, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        centred = x - mean
        var = centred.pow(2).mean(1, keepdim=True)
        x = centred / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MinMaxScale(nn.Module):
    """Per-channel min-max scaling of the image to [-0.5, 0.5].

    ``mode="image"`` takes min and max per image, so a batched call equals the
    single-image calls; ``mode="batch"`` takes them over the whole batch as the
    released module does.
    """

    def __init__(self, mode: str = "image"):
        super().__init__()
        if mode not in IMAGE_SCALINGS:
            raise ValueError(f"image_scaling must be one of {IMAGE_SCALINGS}, got {mode!r}")
        self.mode = mode

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.mode == "batch":
            flat = image.transpose(0, 1).reshape(image.shape[1], -1)
            lo = flat.min(dim=1).values.view(1, -1, 1, 1)
            hi = flat.max(dim=1).values.view(1, -1, 1, 1)
        else:
            flat = image.flatten(2)
            lo = flat.min(dim=2).values[:, :, None, None]
            hi = flat.max(dim=2).values[:, :, None, None]
        # The released scaler guards flat channels with the same floor.
        return (image - lo) / (hi - lo).clamp_min(1e-4) - 0.5

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class FourierFeatures(nn.Module):
    """Sin/cos features of (row, col, *extra channels) at log-spaced frequencies.

    Output channels: ``num_freqs * n`` sines, ``num_freqs * n`` cosines (frequency-major,
    input-minor, n = 2 + extra), then the extra channels themselves when ``append_inputs``.
    """

    def __init__(self, extra_channels: int, num_freqs: int, freq_range: Sequence[float] = (-2.0, 10.0),
                 append_inputs: bool = True):
        super().__init__()
        self.n_inputs = 2 + extra_channels
        self.extra_channels = extra_channels
        self.num_freqs = num_freqs
        self.freq_range = (float(freq_range[0]), float(freq_range[1]))
        self.append_inputs = append_inputs and extra_channels > 0
        self.biases = nn.Parameter(torch.randn(2, self.n_inputs, num_freqs))

    @property
    def out_channels(self) -> int:
        return 2 * self.n_inputs * self.num_freqs + (self.extra_channels if self.append_inputs else 0)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                cols: torch.Tensor | None = None) -> torch.Tensor:
        """Features for map ``x`` (B, extra or any, H, W); ``rows``/``cols`` override the
        default coordinates ``linspace(-1, 1)`` (a tile passes its slice of the full grid)."""
        b, _, h, w = x.shape
        if rows is None:
            rows = torch.linspace(-1, 1, h, device=x.device)
        if cols is None:
            cols = torch.linspace(-1, 1, w, device=x.device)
        grid = torch.stack([rows[:, None].expand(h, w), cols[None, :].expand(h, w)])
        parts = [grid.unsqueeze(0).expand(b, 2, h, w)]
        if self.extra_channels:
            parts.append(x)
        inputs = torch.cat(parts, dim=1).unsqueeze(1)  # (B, 1, n, H, W)
        freqs = torch.exp(torch.linspace(*self.freq_range, self.num_freqs, device=x.device))
        scaled = inputs * freqs.view(1, -1, 1, 1, 1)  # (B, F, n, H, W)
        # The released featurizer reads the (2, n, F) phases in (F, n) memory order;
        # keeping that reading is what makes released phases mean the same thing here.
        phase = self.biases.reshape(2, 1, self.num_freqs, self.n_inputs, 1, 1)
        sin = torch.sin(scaled + phase[0]).reshape(b, -1, h, w)
        cos = torch.cos(scaled + phase[1]).reshape(b, -1, h, w)
        out = [sin, cos]
        if self.append_inputs:
            out.append(x)
        return torch.cat(out, dim=1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention from high-res queries to low-res tokens (no residual here)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(query)
        kv = self.norm_kv(tokens)
        return self.attention(q, kv, kv, need_weights=False)[0]

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, S, head_dim) from the packed in_proj weights."""
        width = self.norm_kv.normalized_shape[0]
        heads = self.attention.num_heads
        kv = self.norm_kv(tokens)
        w, bias = self.attention.in_proj_weight, self.attention.in_proj_bias
        b, s, _ = kv.shape
        k = F.linear(kv, w[width:2 * width], bias[width:2 * width])
        v = F.linear(kv, w[2 * width:], bias[2 * width:])
        shape = (b, s, heads, width // heads)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Same as ``forward`` for precomputed keys/values; inference only (no dropout)."""
        width = self.norm_q.normalized_shape[0]
        heads = self.attention.num_heads
        b, n, _ = query.shape
        q = F.linear(self.norm_q(query), self.attention.in_proj_weight[:width],
                     self.attention.in_proj_bias[:width])
        q = q.view(b, n, heads, width // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, width)
        return self.attention.out_proj(out)


class FeedForward(nn.Module):
    """Pre-norm MLP of the released blocks (no residual here)."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttentionTransformer(nn.Module):
    """``blocks`` x (cross-attention + residual, feed-forward + residual), then a LayerNorm."""

    def __init__(self, width: int, blocks: int, heads: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([CrossAttentionBlock(width, heads, dropout), FeedForward(width, hidden, dropout)])
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            query = attn(query, tokens) + query
            query = ff(query) + query
        return self.norm(query)

    def keys_values(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [attn.project_kv(tokens) for attn, _ in self.layers]

    def run_chunk(self, query: torch.Tensor, kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        for (attn, ff), (k, v) in zip(self.layers, kvs):
            query = attn.attend(query, k, v) + query
            query = ff(query) + query
        return self.norm(query)


class LoftUpCore(nn.Module):
    """The released ``upsampler`` module: takes channel-normalised low-res features."""

    def __init__(self, dim: int, num_freqs_img: int = 20, freq_range: Sequence[float] = (-2.0, 10.0),
                 num_freqs_lr: int = 5, heads: int = 4, blocks: int = 2, dropout: float = 0.0,
                 image_scaling: str = "image"):
        super().__init__()
        self.dim = dim
        self.lr_pe = FourierFeatures(0, num_freqs_lr, freq_range, append_inputs=False)
        width = dim + self.lr_pe.out_channels
        self.width = width
        featurizer = FourierFeatures(3, num_freqs_img, freq_range, append_inputs=True)
        self.fourier_feat = nn.Sequential(MinMaxScale(image_scaling), featurizer)
        start = featurizer.out_channels
        self.first_conv = nn.Sequential(
            ChannelNorm(start),
            nn.Conv2d(start, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.ca_transformer = CrossAttentionTransformer(width, blocks, heads, dim, dropout)
        self.final_conv = nn.Sequential(nn.Conv2d(width, dim, 1), ChannelLayerNorm(dim))

    def tokens(self, lr_feats: torch.Tensor) -> torch.Tensor:
        """Low-res features with their grid encoding, as (B, h*w, width) tokens."""
        kv = torch.cat([lr_feats, self.lr_pe(lr_feats)], dim=1)
        return kv.flatten(2).transpose(1, 2)

    def forward(self, lr_feats: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.first_conv(self.fourier_feat(image))
        b, c, h, w = x.shape
        q = self.ca_transformer(x.flatten(2).transpose(1, 2), self.tokens(lr_feats))
        return self.final_conv(q.transpose(1, 2).reshape(b, c, h, w))

    @torch.no_grad()
    def forward_bounded(self, lr_feats: torch.Tensor, image: torch.Tensor, conv_tile: int,
                        query_chunk: int) -> torch.Tensor:
        """Eval-mode forward in tiles (2-px halo) and query chunks; equals ``forward``."""
        b, _, H, W = image.shape
        scaled = self.fourier_feat[0](image)
        rows_all = torch.linspace(-1, 1, H, device=image.device)
        cols_all = torch.linspace(-1, 1, W, device=image.device)
        kvs = self.ca_transformer.keys_values(self.tokens(lr_feats))
        convs = self._fused_convs()
        proj = self.final_conv[0]
        proj_w = proj.weight.view(proj.out_channels, proj.in_channels)
        out_norm = self.final_conv[1]
        out = torch.empty(b, self.dim, H, W, dtype=lr_feats.dtype, device=lr_feats.device)
        for y0 in range(0, H, conv_tile):
            y1 = min(H, y0 + conv_tile)
            for x0 in range(0, W, conv_tile):
                x1 = min(W, x0 + conv_tile)
                q = self._conv_tile(scaled, convs, rows_all, cols_all, y0, y1, x0, x1)
                # channels_last conv output: the (B, h*w, width) token view needs no copy.
                q = q.permute(0, 2, 3, 1).reshape(b, -1, self.width)
                n = q.shape[1]
                res = torch.empty(b, self.dim, n, dtype=out.dtype, device=out.device)
                for s in range(0, n, query_chunk):
                    t = self.ca_transformer.run_chunk(q[:, s:s + query_chunk], kvs)
                    t = F.layer_norm(F.linear(t, proj_w, proj.bias), (self.dim,), out_norm.weight,
                                     out_norm.bias, out_norm.eps)
                    res[:, :, s:s + query_chunk] = t.transpose(1, 2)
                out[:, :, y0:y1, x0:x1] = res.view(b, self.dim, y1 - y0, x1 - x0)
        return out

    def _fused_convs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The two 3x3 convs with their eval-mode BatchNorm folded in (channels_last weights)."""
        fused = []
        for conv, bn in ((self.first_conv[1], self.first_conv[2]), (self.first_conv[4], self.first_conv[5])):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
            bias = (conv.bias - bn.running_mean) * scale + bn.bias
            fused.append((weight, bias))
        return fused

    def _conv_tile(self, scaled, convs, rows_all, cols_all, y0, y1, x0, x1) -> torch.Tensor:
        """first_conv output on [y0:y1, x0:x1], from the features of the tile plus a 2-px halo."""
        H, W = scaled.shape[-2:]
        ey0, ey1 = max(0, y0 - HALO), min(H, y1 + HALO)
        ex0, ex1 = max(0, x0 - HALO), min(W, x1 + HALO)
        feats = self.fourier_feat[1](scaled[:, :, ey0:ey1, ex0:ex1], rows_all[ey0:ey1], cols_all[ex0:ex1])
        feats = self.first_conv[0](feats)
        # Outside the image the dense convs see zero padding: rebuild exactly that.
        pad = (HALO - (x0 - ex0), HALO - (ex1 - x1), HALO - (y0 - ey0), HALO - (ey1 - y1))
        feats = F.pad(feats, pad).contiguous(memory_format=torch.channels_last)
        (w1, b1), (w2, b2) = convs
        mid = torch.relu_(F.conv2d(feats, w1, b1))
        # mid covers the tile plus 1 px; its out-of-image ring must be zero for conv2.
        if y0 == 0:
            mid[:, :, 0] = 0
        if y1 == H:
            mid[:, :, -1] = 0
        if x0 == 0:
            mid[:, :, :, 0] = 0
        if x1 == W:
            mid[:, :, :, -1] = 0
        return torch.relu_(F.conv2d(mid, w2, b2))


class LoftUp(nn.Module):
    """LoftUp upsampler: ``model(lr_feats, image, output_size=None) -> (B, C, H', W')``.

    ``lr_feats`` (B, C, h, w) are raw backbone features on any grid; ``image``
    (B, 3, H, W) is ImageNet-normalised. ``output_size`` (int or (H', W')) resizes the
    image (bilinear, no antialias) for the query path; by default the output has the
    image's size. ``image_scaling="batch"`` reproduces the released module (min/max over
    the batch); the default scales each image on its own.

    ``query_chunk``/``conv_tile``: None = automatic (eval-mode outputs above 224*224
    pixels use the bounded path), 0 = off, > 0 = chunk length / tile side. Training mode,
    and inputs that require grad, always take the dense path; bounded outputs carry no
    autograd graph.
    """

    def __init__(self, dim: int, num_freqs_img: int = 20, freq_range: Sequence[float] = (-2, 10),
                 num_freqs_lr: int = 5, extra: int = 20, heads: int = 4, blocks: int = 2,
                 dropout: float = 0.0, image_scaling: str = "image", query_chunk: int | None = None,
                 conv_tile: int | None = None):
        super().__init__()
        if extra != 4 * num_freqs_lr:
            raise ValueError(f"extra (the grid-encoding width) must be 4 * num_freqs_lr = {4 * num_freqs_lr}, "
                             f"got {extra}")
        if (dim + extra) % heads:
            raise ValueError(f"dim + extra = {dim + extra} is not divisible by heads = {heads}")
        self.config = {
            "dim": int(dim), "num_freqs_img": int(num_freqs_img),
            "freq_range": [float(freq_range[0]), float(freq_range[1])],
            "num_freqs_lr": int(num_freqs_lr), "extra": int(extra), "heads": int(heads),
            "blocks": int(blocks), "dropout": float(dropout), "image_scaling": image_scaling,
        }
        self.dim = dim
        self.channelnorm = ChannelNorm(dim)
        self.upsampler = LoftUpCore(dim, num_freqs_img, freq_range, num_freqs_lr, heads, blocks, dropout,
                                    image_scaling)
        self.query_chunk = query_chunk
        self.conv_tile = conv_tile

    @property
    def image_scaling(self) -> str:
        return self.upsampler.fourier_feat[0].mode

    @image_scaling.setter
    def image_scaling(self, mode: str) -> None:
        self.upsampler.fourier_feat[0] = MinMaxScale(mode)
        self.config["image_scaling"] = mode

    def set_memory_bound(self, query_chunk: int | None = None, conv_tile: int | None = None) -> "LoftUp":
        """Pin the eval-mode execution: None = automatic, 0 = off, > 0 = chunk length / tile side."""
        for name, value in (("query_chunk", query_chunk), ("conv_tile", conv_tile)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be None, 0 or positive, got {value}")
        self.query_chunk = query_chunk
        self.conv_tile = conv_tile
        return self

    def plan(self, height: int, width: int) -> tuple[int, int] | None:
        """(conv_tile, query_chunk) the bounded path would use for this output, or None for dense."""
        if self.training:
            return None
        chunk, tile = self.query_chunk, self.conv_tile
        if chunk is None and tile is None:
            if height * width <= AUTO_BOUND_PIXELS:
                return None
            return DEFAULT_CONV_TILE, DEFAULT_QUERY_CHUNK
        if chunk == 0 and tile == 0:
            return None
        tile = DEFAULT_CONV_TILE if tile is None else (tile or max(height, width))
        chunk = DEFAULT_QUERY_CHUNK if chunk is None else (chunk or tile * tile)
        return tile, chunk

    def forward(self, lr_feats: torch.Tensor, image: torch.Tensor,
                output_size: int | Sequence[int] | None = None) -> torch.Tensor:
        if lr_feats.dim() != 4 or image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"expected lr_feats (B,C,h,w) and image (B,3,H,W), got {tuple(lr_feats.shape)} "
                             f"and {tuple(image.shape)}")
        if lr_feats.shape[1] != self.dim:
            raise ValueError(f"this LoftUp takes {self.dim}-d features, got {lr_feats.shape[1]}")
        if lr_feats.shape[0] != image.shape[0]:
            raise ValueError(f"batch sizes differ: {lr_feats.shape[0]} features vs {image.shape[0]} images")
        if output_size is not None:
            size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=False)
        image = image.to(lr_feats.dtype)
        lr = self.channelnorm(lr_feats)
        plan = self.plan(*image.shape[-2:])
        # The bounded path keeps no autograd graph: inputs that want gradients go dense.
        if torch.is_grad_enabled() and (lr_feats.requires_grad or image.requires_grad):
            plan = None
        if plan is None:
            return self.upsampler(lr, image)
        return self.upsampler.forward_bounded(lr, image, *plan)

    @classmethod
    def from_official(cls, state_dict, image_scaling: str = "image", heads: int = 4) -> "LoftUp":
        """Build from a state dict in the released layout (dim inferred); eval mode."""
        from loftup.training.checkpoint import from_official

        return from_official(state_dict, image_scaling=image_scaling, heads=heads)

    @classmethod
    def from_pretrained(cls, spec, device="cpu", image_scaling: str = "image") -> "LoftUp":
        """A released upsampler (``"dinov2s"``, ``"haiwen/loftup-dinov2s"``) from the local HF
        cache, or a checkpoint file (released layout or ours); never the network."""
        from loftup.training.checkpoint import resolve_upsampler

        return resolve_upsampler(spec, device=device, image_scaling=image_scaling)[0]

    def to_official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the released checkpoint's key names."""
        from loftup.training.checkpoint import to_official_state_dict

        return to_official_state_dict(self)
