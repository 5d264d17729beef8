"""Winograd F(2x2, 3x3): the bounded path's 3x3 convolutions on the CPU with 2.25x fewer multiplies.

A direct 3x3 convolution spends 36 multiplies per 2x2 output block and channel pair; Winograd's
minimal filtering algorithm spends 16 (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016). Each 4x4 input tile d becomes V = B^T d B, each filter g becomes
U = G g G^T, the 16 positions of V and U are multiplied as 16 batched matrix products over the
channels (where the time goes, at the matmul rate), and Y = A^T M A gives the 2x2 outputs.
``F.conv2d`` on the CPU (oneDNN) ran these layers by the direct algorithm; cuDNN chooses
Winograd by itself, so only the CPU path uses this (``LOFTUP_WINOGRAD=0`` turns it off).
The transforms are memory-bound: with fresh buffers per call they cost as much as the saved
multiplies (large allocations come from mmap and fault in page by page), so the bounded path
passes one workspace dict for all its tiles. F(2x2, 3x3) is the variant whose
transforms have only 0 and +-1 (and 1/2 in G), so float32 results stay within a few 1e-7 of the
direct convolution; the larger tiles F(4x4, 3x3) would save more and lose digits.
"""

from __future__ import annotations

import torch

_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


def filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) conv weights -> U, (16, Cin, Cout): G g G^T for each channel pair."""
    g = _G.to(weight.device)
    u = torch.einsum("ak,oikj,bj->abio", g, weight.double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _buffer(ws: dict | None, key: str, like: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised tensor of ``shape``, reused from ``ws`` when one of that shape is there:
    fresh buffers of this size come from mmap and cost a page fault per 4 KB on first touch."""
    shape = tuple(shape)
    if ws is not None and key in ws and ws[key].shape == shape and ws[key].dtype == like.dtype:
        return ws[key]
    t = like.new_empty(shape)
    if ws is not None:
        ws[key] = t
    return t


def _input_transform(x: torch.Tensor, ty: int, tx: int, ws: dict | None = None, key: str = "") -> torch.Tensor:
    """B^T d B of every 4x4 tile d of ``x`` (B, 2 ty + 2, 2 tx + 2, C) at stride 2: (4, 4, B, ty, tx, C).

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], applied first to the rows
    of the whole map (tile row t reads rows 2t..2t+3) and then to the columns, so every step
    reads evenly strided slices instead of gathering the overlapping tiles.
    """
    b, _, w, c = x.shape
    r = _buffer(ws, key + "r", x, (4, b, ty, w, c))
    x0, x1, x2, x3 = (x[:, i : i + 2 * ty : 2] for i in range(4))
    torch.sub(x0, x2, out=r[0])
    torch.add(x1, x2, out=r[1])
    torch.sub(x2, x1, out=r[2])
    torch.sub(x1, x3, out=r[3])
    v = _buffer(ws, key + "v", x, (4, 4, b, ty, tx, c))
    c0, c1, c2, c3 = (r[:, :, :, j : j + 2 * tx : 2] for j in range(4))
    torch.sub(c0, c2, out=v[:, 0])
    torch.add(c1, c2, out=v[:, 1])
    torch.sub(c2, c1, out=v[:, 2])
    torch.sub(c1, c3, out=v[:, 3])
    return v


def conv3x3_valid_nhwc(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor, ws: dict | None = None, key: str = ""
) -> torch.Tensor:
    """The valid ('no padding') 3x3 convolution of channels-last ``x`` (B, H, W, Cin) with the
    filters ``u`` of :func:`filter_transform`, plus ``bias``: (B, H - 2, W - 2, Cout).

    ``ws`` (a dict kept across calls of the same shapes) reuses the working buffers, including
    the returned tensor's: it is valid until the next call with the same ``ws`` and ``key``."""
    b, h, w, c = x.shape
    ho, wo = h - 2, w - 2
    ty, tx = -(-ho // 2), -(-wo // 2)
    if 2 * ty != ho or 2 * tx != wo:  # an odd output side: one more zero row/column, cropped after
        x = torch.nn.functional.pad(x, (0, 0, 0, 2 * tx - wo, 0, 2 * ty - ho))
    v = _input_transform(x, ty, tx, ws, key)
    cout = u.shape[-1]
    m = _buffer(ws, key + "m", x, (16, b * ty * tx, cout))
    torch.bmm(v.view(16, b * ty * tx, c), u, out=m)
    m = m.view(4, 4, b, ty, tx, cout)
    # Every output of a tile sums M[1, 1] once (column 1 of A^T is all ones): the bias goes there.
    m[1, 1] += bias
    # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], along the rows of M, then its columns.
    p = _buffer(ws, key + "p", m, (2, *m.shape[1:]))
    torch.add(m[0], m[1], out=p[0])
    p[0] += m[2]
    torch.sub(m[1], m[2], out=p[1])
    p[1] -= m[3]
    y = _buffer(ws, key + "y", m, (b, ty, 2, tx, 2, cout))
    for a in range(2):
        y0, y1 = y[:, :, a, :, 0], y[:, :, a, :, 1]
        torch.add(p[a, 0], p[a, 1], out=y0)
        y0 += p[a, 2]
        torch.sub(p[a, 1], p[a, 2], out=y1)
        y1 -= p[a, 3]
    y = y.view(b, 2 * ty, 2 * tx, -1)
    return y[:, :ho, :wo] if (2 * ty, 2 * tx) != (ho, wo) else y
