"""The LoftUp feature upsampler, laid out like the authors' released checkpoints.

Parameter names follow the released state dict one to one (``channelnorm.*`` and
``upsampler.*``), so an official checkpoint loads with ``strict=True`` and our own
weights export to the official layout without any renaming.

Two execution paths compute the same function:

* the dense path (training, and eval outputs that fit the device): whole-image
  convolutions and one attention call over all H*W queries, through the modules;
* the memory-bounded path (eval): the image is processed in tiles with a 2-pixel halo
  for the two 3x3 convolutions (BatchNorm folded in, channels-last), and each tile's
  queries go through the attention blocks in chunks; apart from the output tensor,
  memory does not grow with the output size. On a CPU the 3x3 convolutions run as
  Winograd F(2x2, 3x3) (training/winograd.py, 2.25x fewer multiplies, working buffers
  reused across tiles) and the output is written channels-last (no transposing copy).

:func:`plan_execution` picks between them from a :class:`DeviceSpec` (kind and free
memory): on a GPU the dense path whenever it fits, else the largest tiles and chunks
that fit; on a CPU cache-sized tiles at every size (no dense-sized intermediates).

Attention always goes through ``F.scaled_dot_product_attention`` with the packed
``in_proj`` weights of ``nn.MultiheadAttention`` (kept as the parameter holder, so
released state dicts load unchanged). The head width of the released model (101) is
not a multiple of 8, which rules out every fused CUDA kernel; on accelerators the heads
are zero-padded to a multiple of 8 (the scale stays 1/sqrt(101)), which leaves the
result unchanged and lets flash / memory-efficient attention run, in training too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loftup.training import model_files
from loftup.training.winograd import conv3x3_valid_nhwc, filter_transform

__all__ = [
    "ChannelLayerNorm",
    "ChannelNorm",
    "DeviceSpec",
    "FourierFeatures",
    "LoftUp",
    "LoftUpCore",
    "MinMaxScale",
    "ForwardSizes",
    "bounded_bytes",
    "dense_bytes",
    "plan_execution",
]

IMAGE_SCALINGS = ("image", "batch")
HALO = 2

# Plans on a CPU: tiles of this side keep the 3x3 convolutions near the matmul rate (whole
# 224 maps run slower); chunks this long keep the number of parallel regions (each one a
# barrier for the OpenMP threads, costly on a loaded machine) low.
CPU_CONV_TILE = 128
CPU_QUERY_CHUNK = 4096
# Plans on an accelerator: the dense path when it fits, else the largest of these that fit
# (few, large launches: per-tile overhead dominates there).
GPU_TILES = (4096, 2048, 1024, 512, 256, 128, 64)
GPU_MIN_CHUNK = 4096
# The bounded path's 3x3 convolutions on the CPU by Winograd F(2x2, 3x3) (training/winograd.py).
WINOGRAD = os.environ.get("LOFTUP_WINOGRAD", "1") != "0"
# Share of the free memory a plan may use (the rest: allocator slack, the caller's tensors).
MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class DeviceSpec:
    """What the planner needs to know about a device: its kind and free memory in bytes."""

    kind: str
    free_bytes: int
    name: str = ""

    @classmethod
    def of(cls, device: str | torch.device) -> DeviceSpec:
        device = torch.device(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return cls("cuda", int(free), torch.cuda.get_device_name(device))
        if device.type == "cpu":
            return cls("cpu", _host_available_bytes(), "cpu")
        return cls(device.type, _host_available_bytes(), device.type)


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class ForwardSizes:
    """What the working memory of one eval forward depends on, the released model's by default:
    ``channels`` the model's width (dim + 20), ``fourier`` its Fourier feature count, ``hidden``
    its dim, ``keys`` the number of low-res tokens; ``bytes_per_value`` 2 under bf16 autocast."""

    batch: int = 1
    channels: int = 404
    fourier: int = 203
    hidden: int = 384
    keys: int = 1024
    heads: int = 4
    bytes_per_value: int = 4


def dense_bytes(height: int, width: int, **sizes) -> int:
    """Working memory of a no-grad dense forward beyond its output (an upper estimate); ``sizes``
    as :class:`ForwardSizes`.

    Conv stage: the Fourier features and their norm, then conv output and BatchNorm output;
    attention stage: about seven token maps alive at once (residual stream, norm, q, attention
    output, projection, feed-forward hidden and output) with fused attention (no score matrix).
    """
    z = ForwardSizes(**sizes)
    conv = 2 * z.fourier + 2 * z.channels
    attention = 6 * z.channels + z.hidden
    return z.batch * height * width * max(conv, attention) * z.bytes_per_value


def bounded_bytes(tile: int, chunk: int, **sizes) -> int:
    """Working memory of the bounded path for one tile and chunk, beyond the output tensor."""
    z, t = ForwardSizes(**sizes), tile
    conv = 2 * (t + 2 * HALO) ** 2 * z.fourier + (t + HALO) ** 2 * z.channels + t * t * z.channels
    chunk = min(chunk, t * t)
    attention = chunk * (6 * z.channels + z.hidden + z.heads * min(z.keys, 512))
    tile_out = t * t * (z.hidden + z.channels)  # the tile's results before they reach the output
    return z.batch * (conv + attention + tile_out) * z.bytes_per_value


def plan_execution(device: DeviceSpec, height: int, width: int, *, allow_dense: bool = True, **sizes):
    """(conv_tile, query_chunk) for an eval forward of this size on ``device``, None = dense;
    ``sizes`` as :class:`ForwardSizes`. The output tensor itself is not counted: every path must
    hold it. ``allow_dense=False`` gives the bounded plan even where the dense path would fit.
    """
    z = ForwardSizes(**sizes)
    budget = MEMORY_FRACTION * device.free_bytes - z.batch * z.hidden * height * width * 4
    side = max(height, width)
    if device.kind == "cpu":
        tile, chunk = min(CPU_CONV_TILE, side), CPU_QUERY_CHUNK
        # Only a machine short of memory shrinks them further.
        while tile > 16 and bounded_bytes(tile, chunk, **sizes) > budget:
            tile, chunk = tile // 2, max(256, chunk // 4)
        return tile, chunk
    if allow_dense and dense_bytes(height, width, **sizes) <= budget:
        return None
    for tile in GPU_TILES:
        tile = min(tile, side)
        chunk = tile * tile
        while chunk > GPU_MIN_CHUNK and bounded_bytes(tile, chunk, **sizes) > budget:
            chunk //= 2
        if bounded_bytes(tile, chunk, **sizes) <= budget:
            return tile, chunk
    return GPU_TILES[-1], GPU_MIN_CHUNK


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

    def __init__(
        self,
        extra_channels: int,
        num_freqs: int,
        freq_range: Sequence[float] = (-2.0, 10.0),
        append_inputs: bool = True,
    ):
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

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
    ) -> torch.Tensor:
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

    def forward_nhwc(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The same features channels-last: ``x`` (B, H, W, extra) -> (B, H, W, out_channels)."""
        b, h, w, _ = x.shape
        grid = torch.stack(torch.broadcast_tensors(rows[:, None], cols[None, :]), dim=-1)
        inputs = torch.cat([grid.expand(b, h, w, 2), x], dim=-1) if self.extra_channels else grid.expand(b, h, w, 2)
        freqs = torch.exp(torch.linspace(*self.freq_range, self.num_freqs, device=x.device))
        scaled = inputs.unsqueeze(-2) * freqs[:, None]  # (B, H, W, F, n): channel f * n + i as in forward
        phase = self.biases.reshape(2, self.num_freqs, self.n_inputs)
        out = [torch.sin(scaled + phase[0]).flatten(-2), torch.cos(scaled + phase[1]).flatten(-2)]
        if self.append_inputs:
            out.append(x)
        return torch.cat(out, dim=-1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention from high-res queries to low-res tokens (no residual here).

    ``nn.MultiheadAttention`` only holds the parameters (released names, packed ``in_proj``);
    the computation calls ``scaled_dot_product_attention`` directly, because the module's own
    forward never reaches a fused CUDA kernel with 101-wide heads (see the module docstring).
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.attend(query, *self.project_kv(tokens))

    def _pad(self, device: torch.device) -> int:
        """Zero columns added to each head on accelerators, so fused kernels accept it."""
        head = self.attention.head_dim
        return 0 if device.type == "cpu" else -head % 8

    def _in_proj(self, x: torch.Tensor, part: int, pad: int) -> torch.Tensor:
        """One of q/k/v (part 0/1/2) from the packed weights, as (B, heads, n, head[+pad])."""
        width, heads = self.attention.embed_dim, self.attention.num_heads
        w = self.attention.in_proj_weight[part * width : (part + 1) * width]
        b = self.attention.in_proj_bias[part * width : (part + 1) * width]
        if pad:
            w = F.pad(w.view(heads, -1, width), (0, 0, 0, pad)).view(-1, width)
            b = F.pad(b.view(heads, -1), (0, pad)).view(-1)
        out = F.linear(x, w, b)
        return out.view(*x.shape[:-1], heads, -1).transpose(-3, -2)

    def project_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, S, head_dim[+pad]) of the low-res tokens."""
        kv = self.norm_kv(tokens)
        pad = self._pad(tokens.device)
        return self._in_proj(kv, 1, pad), self._in_proj(kv, 2, pad)

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``query`` (B, n, width) to precomputed keys/values, then out_proj."""
        mha = self.attention
        pad = k.shape[-1] - mha.head_dim
        q = self._in_proj(self.norm_q(query), 0, pad)
        dropout = mha.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=mha.head_dim**-0.5)
        out = out.transpose(-3, -2).flatten(-2)
        w = mha.out_proj.weight
        if pad:
            w = F.pad(w.view(mha.embed_dim, mha.num_heads, -1), (0, pad)).view(mha.embed_dim, -1)
        return F.linear(out, w, mha.out_proj.bias)


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
        """``forward`` with precomputed keys/values; no autograd: ``query`` is updated in place."""
        for (attn, ff), (k, v) in zip(self.layers, kvs):
            query.add_(attn.attend(query, k, v))
            query.add_(ff(query))
        return self.norm(query)


class LoftUpCore(nn.Module):
    """The released ``upsampler`` module: takes channel-normalised low-res features."""

    def __init__(
        self,
        dim: int,
        num_freqs_img: int = 20,
        freq_range: Sequence[float] = (-2.0, 10.0),
        num_freqs_lr: int = 5,
        heads: int = 4,
        blocks: int = 2,
        dropout: float = 0.0,
        image_scaling: str = "image",
    ):
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
        self.head = None  # another output head (training/heads.py) replaces final_conv
        self._compiled: dict = {}  # torch.compile'd pieces of the bounded path (LoftUp.enable_compile)

    def tokens(self, lr_feats: torch.Tensor) -> torch.Tensor:
        """Low-res features with their grid encoding, as (B, h*w, width) tokens."""
        kv = torch.cat([lr_feats, self.lr_pe(lr_feats)], dim=1)
        return kv.flatten(2).transpose(1, 2)

    def forward(self, lr_feats: torch.Tensor, image: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``values``: the raw low-res features, for a head that outputs their combinations."""
        return self.decode(self.first_conv(self.fourier_feat(image)), lr_feats, values)

    def decode(
        self, x: torch.Tensor, lr_feats: torch.Tensor, values: torch.Tensor | None = None, where=None
    ) -> torch.Tensor:
        """Everything after the full-resolution convs, from their output ``x`` (B, width, h, w).

        Per pixel (no spatial mixing), so any crop of ``x`` gives that crop of the output: the
        bounded training path (training/memory.py) runs it tile by tile, with ``where`` = (y0, x0,
        H, W) the crop's corner in the (H, W) output (a head's positional prior needs it). Keep
        new per-pixel heads in here so that path covers them.
        """
        b, c, h, w = x.shape
        tokens = self.tokens(lr_feats)
        q = self.ca_transformer(x.flatten(2).transpose(1, 2), tokens)
        if self.head is None:
            return self.final_conv(q.transpose(1, 2).reshape(b, c, h, w))
        if where is None:
            return self.head(q, tokens, values, (h, w))
        y0, x0, H, W = where
        ys, xs = torch.arange(y0, y0 + h, device=x.device), torch.arange(x0, x0 + w, device=x.device)
        pixels = (ys[:, None] * W + xs[None]).flatten()
        out = self.head.attend(q, self.head.context(tokens, values, (H, W)), pixels)
        return out.transpose(1, 2).reshape(b, -1, h, w)

    @torch.no_grad()
    def forward_bounded(
        self, lr_feats: torch.Tensor, image: torch.Tensor, conv_tile: int, query_chunk: int, values=None
    ) -> torch.Tensor:
        """Eval-mode forward in tiles (2-px halo) and query chunks; equals ``forward``.

        Tiles are balanced (a 224 image with tile 128 runs as 2 x 2 tiles of 112) and kept
        channels-last from the Fourier features to the token view, so no tile is copied
        between the convolutions and the attention.
        """
        b, _, H, W = image.shape
        th = math.ceil(H / math.ceil(H / conv_tile))
        tw = math.ceil(W / math.ceil(W / conv_tile))
        # The halo's values outside the image do not matter: those pixels are zeroed after the norm.
        rgb = F.pad(self.fourier_feat[0](image), (HALO,) * 4).permute(0, 2, 3, 1)
        rows = F.pad(torch.linspace(-1, 1, H, device=image.device), (HALO, HALO))
        cols = F.pad(torch.linspace(-1, 1, W, device=image.device), (HALO, HALO))
        tokens = self.tokens(lr_feats)
        kvs = self.ca_transformer.keys_values(tokens)
        ctx = self.head.context(tokens, values, (H, W)) if self.head is not None else None
        convs = self._fused_convs(winograd=image.device.type == "cpu" and WINOGRAD)
        conv_fn = self._compiled.get("tile", self._conv_tile)
        chunk_fn = self._compiled.get("chunk", self._chunk)
        # Channels-last, as the tiles come out of the attention: no transposing copy per tile.
        out = torch.empty(b, H, W, self.dim, dtype=lr_feats.dtype, device=lr_feats.device).permute(0, 3, 1, 2)
        ws = {} if "tile" not in self._compiled else None  # Winograd buffers, reused across tiles
        for y0 in range(0, H, th):
            y1 = min(H, y0 + th)
            for x0 in range(0, W, tw):
                x1 = min(W, x0 + tw)
                q = conv_fn(
                    rgb[:, y0 : y1 + 2 * HALO, x0 : x1 + 2 * HALO],
                    rows[y0 : y1 + 2 * HALO],
                    cols[x0 : x1 + 2 * HALO],
                    convs,
                    y0,
                    x0,
                    H,
                    W,
                    ws,
                )
                tokens = q.reshape(b, -1, self.width)
                n = tokens.shape[1]
                res = torch.empty(b, n, self.dim, dtype=out.dtype, device=out.device)
                pixels = None
                if ctx is not None:  # the flat output index of each query of the tile
                    ys = torch.arange(y0, y1, device=out.device)
                    pixels = (ys[:, None] * W + torch.arange(x0, x1, device=out.device)[None]).flatten()
                for s in range(0, n, query_chunk):
                    where = None if ctx is None else (ctx, pixels[s : s + query_chunk])
                    res[:, s : s + query_chunk] = chunk_fn(tokens[:, s : s + query_chunk], kvs, where)
                out[:, :, y0:y1, x0:x1] = res.view(b, y1 - y0, x1 - x0, self.dim).permute(0, 3, 1, 2)
        return out

    def _chunk(self, tokens: torch.Tensor, kvs, where=None) -> torch.Tensor:
        """Attention blocks and output head for (B, n, width) tokens -> (B, n, dim); ``where``:
        (head context, the tokens' flat output pixels) for a head of training/heads.py."""
        t = self.ca_transformer.run_chunk(tokens, kvs)
        if self.head is not None:
            return self.head.attend(t, *where)
        proj, norm = self.final_conv
        t = F.linear(t, proj.weight.view(proj.out_channels, proj.in_channels), proj.bias)
        return F.layer_norm(t, (self.dim,), norm.weight, norm.bias, norm.eps)

    def _fused_convs(self, winograd: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The two 3x3 convs with their eval-mode BatchNorm folded in: channels_last weights, or
        with ``winograd`` their F(2x2, 3x3) filter transforms (3-d)."""
        fused = []
        for conv, bn in ((self.first_conv[1], self.first_conv[2]), (self.first_conv[4], self.first_conv[5])):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weight = conv.weight * scale[:, None, None, None]
            weight = filter_transform(weight) if winograd else weight.contiguous(memory_format=torch.channels_last)
            bias = (conv.bias - bn.running_mean) * scale + bn.bias
            fused.append((weight, bias))
        return fused

    def _conv_tile(self, rgb, rows, cols, convs, y0: int, x0: int, H: int, W: int, ws=None) -> torch.Tensor:
        """first_conv output (B, h, w, width) of one tile, from its halo-padded inputs.

        ``rgb`` (B, h+4, w+4, 3), ``rows``/``cols`` are the tile's slices of the halo-padded
        image and coordinates; (y0, x0) is the tile's corner in the (H, W) image.
        """
        norm = self.first_conv[0].norm
        feats = self.fourier_feat[1].forward_nhwc(rgb, rows, cols)
        feats = F.layer_norm(feats, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        # Outside the image the dense convs see zero padding: rebuild exactly that.
        _zero_outside(feats, 1, y0 - HALO, H)
        _zero_outside(feats, 2, x0 - HALO, W)
        (w1, b1), (w2, b2) = convs
        if w1.dim() == 3:  # Winograd filters (CPU)
            mid = torch.relu_(conv3x3_valid_nhwc(feats, w1, b1, ws, "1"))
            _zero_outside(mid, 1, y0 - 1, H)
            _zero_outside(mid, 2, x0 - 1, W)
            return torch.relu_(conv3x3_valid_nhwc(mid, w2, b2, ws, "2"))
        mid = torch.relu_(F.conv2d(feats.permute(0, 3, 1, 2), w1, b1))
        # mid covers the tile plus 1 px; its out-of-image ring must be zero for conv2.
        _zero_outside(mid, 2, y0 - 1, H)
        _zero_outside(mid, 3, x0 - 1, W)
        return torch.relu_(F.conv2d(mid, w2, b2)).permute(0, 2, 3, 1)


def _zero_outside(x: torch.Tensor, dim: int, start: int, size: int) -> None:
    """Zero the entries of ``x`` along ``dim`` whose image index (``start`` + i) is outside [0, size)."""
    n = x.shape[dim]
    lo, hi = min(n, max(0, -start)), max(0, min(n, size - start))
    if lo:
        x.narrow(dim, 0, lo).zero_()
    if hi < n:
        x.narrow(dim, hi, n - hi).zero_()


class LoftUp(nn.Module):
    """LoftUp upsampler: ``model(lr_feats, image, output_size=None) -> (B, C, H', W')``.

    ``lr_feats`` (B, C, h, w) are raw backbone features on any grid; ``image``
    (B, 3, H, W) is ImageNet-normalised. ``output_size`` (int or (H', W')) resizes the
    image (bilinear, no antialias) for the query path; by default the output has the
    image's size. ``image_scaling="batch"`` reproduces the released module (min/max over
    the batch); the default scales each image on its own.

    ``query_chunk``/``conv_tile``: None = planned for the device (:func:`plan_execution`),
    0 = off, > 0 = chunk length / tile side. Training mode, and inputs that require grad,
    always take the dense path; bounded outputs carry no autograd graph.

    ``autocast``: dtype of the autocast an eval forward on an accelerator runs under when
    the caller has not opened one (bf16 by default, as in training; None = full precision).
    The output keeps the features' dtype.
    """

    def __init__(
        self,
        dim: int,
        num_freqs_img: int = 20,
        freq_range: Sequence[float] = (-2, 10),
        num_freqs_lr: int = 5,
        extra: int = 20,
        heads: int = 4,
        blocks: int = 2,
        dropout: float = 0.0,
        image_scaling: str = "image",
        query_chunk: int | None = None,
        conv_tile: int | None = None,
        autocast: torch.dtype | None = torch.bfloat16,
        head: str = "loftup",
        head_options: dict | None = None,
    ):
        super().__init__()
        if extra != 4 * num_freqs_lr:
            raise ValueError(
                f"extra (the grid-encoding width) must be 4 * num_freqs_lr = {4 * num_freqs_lr}, got {extra}"
            )
        if (dim + extra) % heads:
            raise ValueError(f"dim + extra = {dim + extra} is not divisible by heads = {heads}")
        self.config = {
            "dim": int(dim),
            "num_freqs_img": int(num_freqs_img),
            "freq_range": [float(freq_range[0]), float(freq_range[1])],
            "num_freqs_lr": int(num_freqs_lr),
            "extra": int(extra),
            "heads": int(heads),
            "blocks": int(blocks),
            "dropout": float(dropout),
            "image_scaling": image_scaling,
        }
        if head != "loftup":  # released-layout configs stay as they were
            self.config |= {"head": head, "head_options": dict(head_options or {})}
        self.dim = dim
        self.channelnorm = ChannelNorm(dim)
        self.upsampler = LoftUpCore(dim, num_freqs_img, freq_range, num_freqs_lr, heads, blocks, dropout, image_scaling)
        from loftup.training.heads import attach_head

        attach_head(self.upsampler, head, head_options)
        self.query_chunk = query_chunk
        self.conv_tile = conv_tile
        self.autocast = autocast

    @property
    def image_scaling(self) -> str:
        return self.upsampler.fourier_feat[0].mode

    @image_scaling.setter
    def image_scaling(self, mode: str) -> None:
        self.upsampler.fourier_feat[0] = MinMaxScale(mode)
        self.config["image_scaling"] = mode

    def set_memory_bound(self, query_chunk: int | None = None, conv_tile: int | None = None) -> LoftUp:
        """Pin the eval-mode execution: None = planned, 0 = off, > 0 = chunk length / tile side."""
        for name, value in (("query_chunk", query_chunk), ("conv_tile", conv_tile)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be None, 0 or positive, got {value}")
        self.query_chunk = query_chunk
        self.conv_tile = conv_tile
        return self

    def plan(
        self,
        height: int,
        width: int,
        batch: int = 1,
        device: DeviceSpec | str | torch.device | None = None,
        lr_tokens: int = 1024,
    ) -> tuple[int, int] | None:
        """(conv_tile, query_chunk) of an eval forward of this size, or None for the dense path.

        ``device``: a :class:`DeviceSpec` or a device (default: the model's); pinned sizes
        (:meth:`set_memory_bound`) win over the planner.
        """
        if self.training:
            return None
        chunk, tile = self.query_chunk, self.conv_tile
        if chunk == 0 and tile == 0:
            return None
        if chunk is None or tile is None:
            if not isinstance(device, DeviceSpec):
                device = DeviceSpec.of(device if device is not None else self.channelnorm.norm.weight.device)
            amp = device.kind != "cpu" and self.autocast is not None and self.autocast.itemsize == 2
            auto = plan_execution(
                device,
                height,
                width,
                batch=batch,
                channels=self.upsampler.width,
                fourier=self.upsampler.fourier_feat[1].out_channels,
                hidden=self.dim,
                keys=lr_tokens,
                heads=self.config["heads"],
                bytes_per_value=2 if amp else 4,
            )
            if chunk is None and tile is None:
                return auto
            auto_tile, auto_chunk = auto or (max(height, width), height * width)
            tile = auto_tile if tile is None else tile
            chunk = auto_chunk if chunk is None else chunk
        tile = tile or max(height, width)
        chunk = chunk or tile * tile
        return tile, chunk

    def enable_compile(self, **kwargs) -> LoftUp:
        """``torch.compile`` the dense forward and the bounded path's tile and chunk steps
        (off by default; ``kwargs`` go to ``torch.compile``). Parameter names are unchanged."""
        core = self.upsampler
        core.compile(**kwargs)
        core._compiled = {
            "tile": torch.compile(core._conv_tile, **kwargs),
            "chunk": torch.compile(core._chunk, **kwargs),
        }
        return self

    def forward(
        self, lr_feats: torch.Tensor, image: torch.Tensor, output_size: int | Sequence[int] | None = None
    ) -> torch.Tensor:
        if lr_feats.dim() != 4 or image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(
                f"expected lr_feats (B,C,h,w) and image (B,3,H,W), got {tuple(lr_feats.shape)} and {tuple(image.shape)}"
            )
        if lr_feats.shape[1] != self.dim:
            raise ValueError(f"this LoftUp takes {self.dim}-d features, got {lr_feats.shape[1]}")
        if lr_feats.shape[0] != image.shape[0]:
            raise ValueError(f"batch sizes differ: {lr_feats.shape[0]} features vs {image.shape[0]} images")
        if output_size is not None:
            size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=False)
        image = image.to(lr_feats.dtype)
        device = lr_feats.device
        if (
            not self.training
            and self.autocast is not None
            and device.type != "cpu"
            and not torch.is_autocast_enabled(device.type)
        ):
            with torch.autocast(device.type, dtype=self.autocast):
                return self._forward(lr_feats, image).to(lr_feats.dtype)
        return self._forward(lr_feats, image)

    def _forward(self, lr_feats: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        lr = self.channelnorm(lr_feats)
        plan = None
        # The bounded path keeps no autograd graph: inputs that want gradients go dense.
        if not (torch.is_grad_enabled() and (lr_feats.requires_grad or image.requires_grad)):
            plan = self.plan(*image.shape[-2:], batch=image.shape[0], lr_tokens=lr_feats.shape[-2] * lr_feats.shape[-1])
        values = lr_feats if self.upsampler.head is not None else None
        if plan is None:
            return self.upsampler(lr, image, values)
        return self.upsampler.forward_bounded(lr, image, *plan, values=values)

    @classmethod
    def from_official(cls, state_dict, image_scaling: str = "image", heads: int = 4) -> LoftUp:
        """Build from a state dict in the released layout (dim inferred); eval mode."""
        return model_files.from_official(cls, state_dict, image_scaling=image_scaling, heads=heads)

    @classmethod
    def from_pretrained(cls, spec, device="cpu", image_scaling: str = "image") -> "LoftUp":
        """A released upsampler (``"dinov2s"``, ``"haiwen/loftup-dinov2s"``) from the local HF
        cache, or a checkpoint file (released layout or ours); never the network."""
        return model_files.resolve_upsampler(cls, spec, device=device, image_scaling=image_scaling)[0]

    def to_official_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the released checkpoint's key names."""
        return model_files.to_official_state_dict(self)
