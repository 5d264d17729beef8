"""Training memory: a bounded training path with the plain path's results, and a plan that knows
a step's peak before the first step.

Where a plain step's memory goes (bench/train_memory_bench.py --breakdown; docs/performance.md):
autograd keeps, per image and per output pixel, every intermediate of the full-resolution query
path (Fourier features, two 3x3 convolutions at 203 -> 404 -> 404 channels with BatchNorm), of
the two cross-attention blocks and of the output head, and of each jittered reconstruction view
(the attention downsampler's windows, several full-size copies per view). All of it grows with
batch x pixels; the attention matrices themselves are not kept (fused attention).

The bounded path (:class:`TiledRunner` + :func:`stream`) never holds a batch's activations:

* the model runs one image and one tile at a time (a 2-pixel halo for the two 3x3 convs, the
  per-pixel rest through ``LoftUpCore.decode``), first without a graph; its backward recomputes
  each tile and back-propagates that tile's slice of the output gradient;
* BatchNorm still normalises with the statistics of the whole batch: they are computed first
  (tile passes without a graph), enter every tile as leaf tensors, collect those tiles'
  gradients, and are back-propagated last (the exact BatchNorm backward, term for term); the
  running statistics are updated once per step, as the plain forward does;
* the stage's loss is written per image (:class:`Part` says how the batch combines each value);
  each image's loss is back-propagated before the next image is computed, so a step holds one
  image's output, its gradient and that image's loss intermediates.

Gradients equal the plain path's to float rounding (tests/test_memory.py). The price is time:
the convolutions run about three times more (statistics passes, recomputation).
"""

from __future__ import annotations

import contextlib
import math
import resource
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- bounded model


class TiledRunner:
    """A LoftUp (``training/model.py``) run one image and one tile at a time, for training.

    ``begin(lr_feats, image, output_size)`` takes a batch (and, for BatchNorm layers in
    training mode, computes the batch statistics and updates the running ones once);
    ``forward(i)`` returns image i's output without a graph; ``backward(i, grad)`` adds the
    gradients of ``(output_i * grad).sum()`` to every parameter; ``finish()`` adds the part
    that flows through the batch statistics, once every image's backward has run.
    ``amp``: a context-manager factory the forward and its recomputation run under
    (the stage's autocast).
    """

    def __init__(self, model, tile: int, amp: Callable = contextlib.nullcontext):
        core = model.upsampler
        self.model, self.core, self.tile, self.amp = model, core, int(tile), amp
        self.convs = (core.first_conv[1], core.first_conv[4])
        self.bns = (core.first_conv[2], core.first_conv[5])
        if any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)) or any(
            getattr(m, "dropout", 0.0) > 0 for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)
        ):
            raise ValueError("the bounded training path needs dropout 0 (its recomputation would draw new masks)")

    # -- set-up ------------------------------------------------------------------------------
    def begin(self, lr_feats: torch.Tensor, image: torch.Tensor, output_size=None) -> TiledRunner:
        if output_size is not None:
            size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=False)
        image = image.to(lr_feats.dtype)
        self.lr_feats = lr_feats.detach()
        b, _, h, w = image.shape
        self.n, self.size = b, (h, w)
        dev = image.device
        self.rows, self.cols = torch.linspace(-1, 1, h, device=dev), torch.linspace(-1, 1, w, device=dev)
        th, tw = math.ceil(h / math.ceil(h / self.tile)), math.ceil(w / math.ceil(w / self.tile))
        self.tiles = [(y, min(h, y + th), x, min(w, x + tw)) for y in range(0, h, th) for x in range(0, w, tw)]
        with torch.no_grad():
            self.scaled = self.core.fourier_feat[0](image)  # min-max scaling: per image or over the batch
        self.batch_stats = [bn.training or bn.running_mean is None for bn in self.bns]
        wants_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k, bn in enumerate(self.bns):
            if self.batch_stats[k]:
                mean, var = self._batch_stats(k)
                self._update_running(bn, mean, var, self.n * h * w)
                self.stats.append((mean.requires_grad_(wants_grad), var.requires_grad_(wants_grad)))
            else:
                self.stats.append((bn.running_mean, bn.running_var))
        return self

    @torch.no_grad()
    def _batch_stats(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance of BatchNorm k's input over the batch (float64 sums)."""
        total = total_sq = None
        with self.amp():
            for i in range(self.n):
                for tile in self.tiles:
                    z = self._z(k, i, tile).double()
                    s, q = z.sum((0, 2, 3)), z.square().sum((0, 2, 3))
                    total, total_sq = (s, q) if total is None else (total + s, total_sq + q)
        count = self.n * self.size[0] * self.size[1]
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0)
        dtype = self.bns[k].weight.dtype if self.bns[k].weight is not None else torch.float32
        return mean.to(dtype), var.to(dtype)

    @staticmethod
    @torch.no_grad()
    def _update_running(bn, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """What one training-mode BatchNorm forward does to the running statistics."""
        if not (bn.training and bn.track_running_stats):
            return
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        bn.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)

    # -- the model, piece by piece -----------------------------------------------------------
    def _bn(self, z: torch.Tensor, k: int) -> torch.Tensor:
        bn, (mean, var) = self.bns[k], self.stats[k]
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        out = (z - mean[:, None, None]) * scale[:, None, None]
        return out + bn.bias[:, None, None] if bn.bias is not None else out

    def _clip(self, y0: int, y1: int, x0: int, x1: int) -> tuple[int, int, int, int]:
        h, w = self.size
        return max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)

    @staticmethod
    def _pad_to(x: torch.Tensor, clipped, wanted) -> torch.Tensor:
        """Zeros where the wanted region leaves the image: the convolutions' zero padding."""
        (cy0, cy1, cx0, cx1), (y0, y1, x0, x1) = clipped, wanted
        pads = (cx0 - x0, x1 - cx1, cy0 - y0, y1 - cy1)
        return F.pad(x, pads) if any(pads) else x

    def _z1(self, i: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """First conv's output on rows [y0, y1) x cols [x0, x1) of image i (inside the image)."""
        want = (y0 - 1, y1 + 1, x0 - 1, x1 + 1)
        cy0, cy1, cx0, cx1 = clipped = self._clip(*want)
        img = self.scaled[i : i + 1, :, cy0:cy1, cx0:cx1]
        f = self.core.fourier_feat[1](img, self.rows[cy0:cy1], self.cols[cx0:cx1])
        f = self._pad_to(self.core.first_conv[0](f), clipped, want)
        conv = self.convs[0]
        return F.conv2d(f, conv.weight, conv.bias)

    def _z2(self, i: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        want = (y0 - 1, y1 + 1, x0 - 1, x1 + 1)
        clipped = self._clip(*want)
        a = self._pad_to(torch.relu(self._bn(self._z1(i, *clipped), 0)), clipped, want)
        conv = self.convs[1]
        return F.conv2d(a, conv.weight, conv.bias)

    def _z(self, k: int, i: int, tile) -> torch.Tensor:
        return self._z1(i, *tile) if k == 0 else self._z2(i, *tile)

    def _out(self, i: int, tile):
        q = torch.relu(self._bn(self._z2(i, *tile), 1))
        lr = self.lr_feats[i : i + 1]
        values = lr if self.core.head is not None else None  # as LoftUp._forward: the raw features
        return self.core.decode(q, self.model.channelnorm(lr), values, (tile[0], tile[2], *self.size))

    # -- forward and backward ----------------------------------------------------------------
    @torch.no_grad()
    def forward(self, i: int):
        """Image i's output (1, C, H, W), at least in the features' precision (a tuple if the
        model has several heads)."""
        outs = None
        with self.amp():
            for y0, y1, x0, x1 in self.tiles:
                parts = _as_tuple(self._out(i, (y0, y1, x0, x1)))
                if outs is None:
                    dtype = torch.promote_types(parts[0].dtype, self.lr_feats.dtype)
                    outs = tuple(p.new_empty((1, p.shape[1], *self.size), dtype=dtype) for p in parts)
                for o, p in zip(outs, parts):
                    o[..., y0:y1, x0:x1] = p
        return outs if len(outs) > 1 else outs[0]

    def backward(self, i: int, grad) -> None:
        """Accumulate the parameter (and batch-statistics) gradients of image i's output."""
        grads = _as_tuple(grad)
        for y0, y1, x0, x1 in self.tiles:
            with torch.enable_grad(), self.amp():
                parts = _as_tuple(self._out(i, (y0, y1, x0, x1)))
            pairs = [(p, g[..., y0:y1, x0:x1].to(p.dtype)) for p, g in zip(parts, grads) if g is not None]
            if pairs:
                torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])

    def finish(self) -> None:
        """The gradient through the batch statistics (after every image's ``backward``).

        Treating mean and variance as inputs, the tiles gave dL/dmean and dL/dvar; since
        mean = sum(z)/n and var = sum((z - mean)^2)/n, each input pixel z gets
        (dL/dmean + 2 dL/dvar (z - mean)) / n: recompute z per tile and back-propagate that.
        BatchNorm 2's input depends on BatchNorm 1's statistics, so it goes first.
        """
        count = self.n * self.size[0] * self.size[1]
        for k in (1, 0):
            if not self.batch_stats[k]:
                continue
            mean, var = self.stats[k]
            if mean.grad is None and var.grad is None:
                continue
            g_mean = mean.grad if mean.grad is not None else torch.zeros_like(mean)
            g_var = var.grad if var.grad is not None else torch.zeros_like(var)
            for i in range(self.n):
                for tile in self.tiles:
                    with torch.enable_grad(), self.amp():
                        z = self._z(k, i, tile)
                    centred = z.detach().to(mean.dtype) - mean.detach()[:, None, None]
                    g = (g_mean[:, None, None] + 2 * g_var[:, None, None] * centred) / count
                    torch.autograd.backward(z, g.to(z.dtype))
        self.stats = []
        self.lr_feats = self.scaled = None


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


# --------------------------------------------------------------------------- per-image losses


@dataclass(frozen=True)
class Part:
    """How a batch combines one per-image loss value: term ``term`` gets ``weight`` x the mean
    over the batch's images, clamped at >= 0 first when ``clamp`` (the released reconstruction)."""

    term: str
    weight: float = 1.0
    clamp: bool = False


def combine(per_image: list[dict], parts: dict[str, Part]) -> dict[str, torch.Tensor]:
    """The batch's loss terms from each image's values (autograd flows through)."""
    terms: dict[str, torch.Tensor] = {}
    for name, part in parts.items():
        v = sum(x[name] for x in per_image) / len(per_image)
        if part.clamp:
            v = v.clamp(min=0.0)
        terms[part.term] = terms[part.term] + part.weight * v if part.term in terms else part.weight * v
    return terms


def stream(
    runner: TiledRunner,
    image_terms: Callable,
    parts: dict[str, Part],
    lower_bounds: dict[str, float] | None = None,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """One batch through the bounded path: gradients of ``scale`` x the combined loss land in
    ``.grad``; returns the (detached) terms.

    ``image_terms(i, out_i, names)`` gives image i's values (all when ``names`` is None) from
    its output ``out_i``. A clamped part needs the sign of its batch mean before any image's
    backward: ``lower_bounds`` (a bound on that mean known up front, e.g. the log-scales of an
    uncertainty NLL) settles it when >= 0; otherwise a pass without gradients computes it.
    """
    n = runner.n
    active = {k: True for k, p in parts.items() if p.clamp}
    unknown = [k for k in active if (lower_bounds or {}).get(k, -math.inf) < 0]
    if unknown:
        sums = dict.fromkeys(unknown, 0.0)
        with torch.no_grad():
            for i in range(n):
                values = image_terms(i, runner.forward(i), unknown)
                for k in unknown:
                    sums[k] += float(values[k])
        active.update({k: sums[k] / n >= 0 for k in unknown})  # clamp passes the gradient at 0
    totals: dict[str, float] = dict.fromkeys(parts, 0.0)
    for i in range(n):
        out = _as_tuple(runner.forward(i))
        for o in out:
            o.requires_grad_(True)
        with torch.enable_grad():
            values = image_terms(i, out if len(out) > 1 else out[0], None)
            objective = sum(scale * p.weight / n * values[k] for k, p in parts.items() if not p.clamp or active[k])
        if isinstance(objective, torch.Tensor) and objective.requires_grad:
            objective.backward()
        runner.backward(i, tuple(o.grad for o in out))
        for k in parts:
            totals[k] += float(values[k].detach())
        del out, values, objective
    runner.finish()
    return combine([{k: torch.tensor(v / n, dtype=torch.float64) for k, v in totals.items()}], parts)


@dataclass
class MemoryPlan:
    """How a step runs: ``path`` plain or bounded, ``micro_batch`` images per group (None: the
    whole per-rank batch at once), ``tile`` the bounded path's tile side; the estimates (bytes,
    the process's peak) and the budget they were checked against."""

    path: str = "plain"
    micro_batch: int | None = None
    tile: int = 0
    estimate: int = 0
    plain_estimate: int = 0
    bounded_estimate: int = 0
    budget: int = 0
    base: int = 0

    def groups(self, n: int) -> list[list[int]]:
        size = self.micro_batch or n
        return [list(range(a, min(n, a + size))) for a in range(0, n, size)]

    def describe(self) -> dict:
        gb = 1 << 30
        return {
            "memory_path": self.path,
            "micro_batch": self.micro_batch,
            "tile": self.tile if self.path == "bounded" else None,
            "estimated_peak_gib": round(self.estimate / gb, 2),
            "plain_estimate_gib": round(self.plain_estimate / gb, 2),
            "bounded_estimate_gib": round(self.bounded_estimate / gb, 2),
            "memory_budget_gib": round(self.budget / gb, 2),
        }


def run_groups(plan: MemoryPlan, n: int, parts: dict[str, Part], plain, bounded, ddp, d) -> dict:
    """A stage's step under ``plan``. ``plain(g)`` returns the terms of images ``g`` with their
    graph; ``bounded(g)`` returns (runner set up on ``g``, image_terms, lower_bounds).

    The plain path over the whole batch returns terms with a graph (the loop back-propagates);
    micro-batches and the bounded path back-propagate here (each group weighted by its share of
    the batch) and return detached terms."""
    groups = plan.groups(n)
    if plan.path == "plain" and len(groups) == 1:
        return plain(groups[0])
    totals: dict[str, torch.Tensor] = {}
    for k, g in enumerate(groups):
        scale = len(g) / n
        # DDP: gradients are averaged once per step (the last plain group; by hand when bounded)
        quiet = d.enabled and (plan.path == "bounded" or k < len(groups) - 1)
        with ddp.no_sync() if quiet else contextlib.nullcontext():
            if plan.path == "plain":
                terms = plain(g)
                (sum(terms.values()) * scale).backward()
            else:
                runner, image_terms, bounds = bounded(g)
                terms = stream(runner, image_terms, parts, bounds, scale)
        for name, v in terms.items():
            totals[name] = totals.get(name, 0.0) + scale * v.detach().double().cpu()
    return totals


# --------------------------------------------------------------------------- estimates and plan

GIB = 1 << 30
# Share of the device's (or, on a CPU, the host's available) memory the default budget leaves free.
MARGIN = 0.10
# The bounded path's tile side on a CPU (cache-sized; a GPU takes the largest tile that fits).
CPU_TILE = 64
GPU_TILES = (1024, 512, 256, 128, 64, 32)
# Allocator slack, thread pools and first-step allocations not modelled below.
SLACK = 256 << 20


def model_floats(dim: int, width: int, fourier: int, sincos: int, blocks: int) -> dict[str, int]:
    """Floats per output pixel autograd keeps for a training forward of LoftUp, by part.

    Counted from the ops (checked against saved-tensor hooks, docs/performance.md): the sin/cos
    inputs of the Fourier features, their LayerNorm's input and output, each conv's and each
    BatchNorm's input and the ReLU outputs (4 x width); per block the attention's norm, query,
    output and residual (4 x width), the feed-forward's norm and input (2 x width) and its
    hidden layer before and after the GELU (2 x dim); the final norm (width) and the output head
    (1x1 conv, channel LayerNorm: 3 x dim)."""
    return {
        "fourier features + full-res convs": sincos + 2 * fourier + 4 * width,
        "cross-attention blocks": blocks * (4 * width + 2 * width + 2 * dim),
        "output head": width + 3 * dim,
    }


def _px_bytes(floats: float, pixels: float) -> int:
    return int(floats * pixels * 4)


def estimate_stage1(
    *,
    batch: int,
    size: int,
    jitters: int,
    max_masks: int,
    mask_side: int,
    tile: int,
    params: int,
    dims: dict[str, int],
) -> dict[str, dict[str, int]]:
    """Bytes of one Stage 1 step beyond the process's baseline, by part, for ``batch`` images
    on the plain path and on the bounded path (which holds one image at a time); ``dims`` are
    the model's sizes (:func:`model_dims`)."""
    dim, width, floats = dims["dim"], dims["width"], model_floats(**dims)
    px = size * size
    fixed = {
        "parameters' gradients + optimizer state": 3 * params * 4,
        "masks (unpacked)": batch * max_masks * mask_side**2,
        "slack (allocator, threads)": SLACK,
    }
    plain = {k: _px_bytes(v, batch * px) for k, v in floats.items()}
    plain["reconstruction views (jitter, downsampler windows)"] = _px_bytes(jitters * 6 * dim, batch * px)
    plain["prediction, target, loss maps"] = _px_bytes(4 * dim, batch * px)
    plain["backward's gradient maps"] = _px_bytes(3 * width, batch * px)
    tile_px = (min(tile, size) + 4) ** 2
    per_model = sum(floats.values())
    bounded = {
        "one image: prediction + its gradient": _px_bytes(2 * dim, px),
        **_largest(
            {
                "a reconstruction view recomputed": _px_bytes(6 * dim, px),
                "the target and the MSE": _px_bytes(2 * dim, px),
                TILE: _px_bytes(per_model + 3 * width, tile_px),
            }
        ),
    }
    return {"plain": {**plain, **fixed}, "bounded": {**bounded, **fixed}}


TILE = "one tile recomputed with its graph"


def _largest(phases: dict[str, int]) -> dict[str, int]:
    """The bounded path's phases follow one another: only the largest counts."""
    name = max(phases, key=phases.get)
    return {f"largest phase: {name}": phases[name]}


def estimate_stage2(
    *,
    batch: int,
    s: int,
    hr: int,
    crops: int,
    jitters: int,
    max_masks: int,
    tile: int,
    params: int,
    vfm_dim: int,
    patch: int,
    dims: dict[str, int],
) -> dict[str, dict[str, int]]:
    """Bytes of one Stage 2 step at student size ``s`` beyond the baseline, by part (``dims``: the
    student's sizes, :func:`model_dims`)."""
    dim, width, floats = dims["dim"], dims["width"], model_floats(**dims)
    px, k = s * s, batch * crops
    n = int(s * s / hr)  # student pixels a crop covers per side
    tokens = (s // patch) ** 2
    fixed = {
        "parameters' gradients + optimizer state + teacher": 4 * params * 4,
        "HR images": batch * 3 * hr * hr * 5,
        "live backbone on the student images and HR crops": (batch + k) * tokens * vfm_dim * 4 * 12,
        "slack (allocator, threads)": SLACK,
    }
    conv_live = 2 * dims["fourier"] + 2 * width
    teacher_dense = max(conv_live, 6 * width + dim)
    plain = {k2: _px_bytes(v, batch * px) for k2, v in floats.items()}
    plain["teacher on the crops (no graph) + its output, refined"] = _px_bytes(teacher_dense + 2 * dim, k * px)
    plain["crop masks (unpacked)"] = k * max_masks * px
    plain["affinity (crop regions, targets, unit vectors)"] = _px_bytes(7 * dim, k * n * n)
    plain["reconstruction views + TV"] = _px_bytes(jitters * 6 * dim + 2 * dim, batch * px)
    plain["backward's gradient maps"] = _px_bytes(3 * width + dim, batch * px)
    tile_px = (min(tile, s) + 4) ** 2
    per_model = sum(floats.values())
    bounded = {
        "one image: prediction + its gradient": _px_bytes(2 * dim, px),
        **_largest(
            {
                "a crop's teacher output, refined, and the affinity": _px_bytes(3 * dim, px) + max_masks * px,
                "a reconstruction view recomputed": _px_bytes(6 * dim, px),
                TILE: _px_bytes(per_model + 3 * width, tile_px),
            }
        ),
    }
    return {"plain": {**plain, **fixed}, "bounded": {**bounded, **fixed}}


def default_budget(device: torch.device) -> int:
    """What the device has, less a margin: a GPU's total memory; on a CPU this process's
    resident memory plus the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * (1 - MARGIN))
    from loftup.training.model import _host_available_bytes

    return int(current_bytes(device) + _host_available_bytes() * (1 - MARGIN))


def current_bytes(device: torch.device) -> int:
    """The baseline the estimates add to: allocated GPU memory, or this process's resident set."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMeter:
    """The measured peak since ``reset()``: ``torch.cuda.max_memory_allocated`` on a GPU, the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs) on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:  # not resettable here: the peak then includes the set-up
            pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status_bytes("VmHWM")


def choose_tile(device: torch.device, per_pixel_bytes: int, room: int, side: int) -> int:
    """The bounded path's tile: cache-sized on a CPU; on a GPU the largest that uses at most half
    of what the budget leaves (few, large launches)."""
    if device.type != "cuda":
        return min(CPU_TILE, side)
    for t in GPU_TILES:
        t = min(t, side)
        if (t + 4) ** 2 * per_pixel_bytes <= room / 2:
            return t
    return GPU_TILES[-1]


def plan_step(
    estimates: dict[str, dict[str, int]],
    *,
    base: int,
    budget: int,
    path: str = "auto",
    micro_batch: int | None = None,
    tile: int = 0,
    what: str = "",
) -> MemoryPlan:
    """Plain when it fits the budget, else bounded; a step that fits neither is refused (a
    LoftupError naming the figures). ``estimates`` as from :func:`estimate_stage1` (the plain
    part for one group of ``micro_batch`` images)."""
    from loftup.storage.errors import LoftupError

    if path not in ("auto", "plain", "bounded"):
        raise LoftupError(f"--memory-path must be auto, plain or bounded, got {path!r}")
    plain = base + sum(estimates["plain"].values())
    bounded = base + sum(estimates["bounded"].values())
    plan = MemoryPlan(
        micro_batch=micro_batch, tile=tile, plain_estimate=plain, bounded_estimate=bounded, budget=budget, base=base
    )
    if path == "plain" or (path == "auto" and plain <= budget):
        plan.path, plan.estimate = "plain", plain
    else:
        plan.path, plan.estimate = "bounded", bounded
    if plan.estimate > budget:
        hint = "" if plan.path == "plain" and path == "plain" else " even on the bounded path"
        raise LoftupError(
            f"{what} needs about {plan.estimate / GIB:.1f} GiB{hint}, more than --max-memory "
            f"{budget / GIB:.1f} GiB; lower --batch-size or the size, or raise --max-memory"
        )
    return plan


def model_dims(model) -> dict[str, int]:
    """The sizes the estimates need, read off a LoftUp."""
    core = model.upsampler
    ff = core.fourier_feat[1]
    return {
        "dim": model.dim,
        "width": core.width,
        "fourier": ff.out_channels,
        "sincos": 2 * ff.n_inputs * ff.num_freqs,
        "blocks": len(core.ca_transformer.layers),
    }


def plan_for(recipe, cfg, d) -> MemoryPlan:
    """The step's plan, before any step: budget (``cfg.max_memory`` GiB, else
    :func:`default_budget`), baseline (what the process holds now), the recipe's estimates
    (``recipe.memory_estimates(batch, tile)``, at its largest output side ``recipe.memory_side``)."""
    from loftup.storage.errors import LoftupError

    per_rank, micro = recipe.per_rank, cfg.micro_batch
    if micro is not None and (micro < 1 or per_rank % micro):
        raise LoftupError(f"--micro-batch {micro} must divide the per-rank batch {per_rank}")
    if micro == per_rank:
        micro = None
    if cfg.max_memory is not None and cfg.max_memory <= 0:
        raise LoftupError(f"--max-memory must be positive (GiB), got {cfg.max_memory}")
    budget = int(cfg.max_memory * GIB) if cfg.max_memory is not None else default_budget(d.device)
    base = current_bytes(d.device)
    group = micro or per_rank
    dims = model_dims(getattr(recipe, "student", None) or recipe.model)  # the model trained
    per_px = 4 * (sum(model_floats(**dims).values()) + 3 * dims["width"])
    rest = recipe.memory_estimates(group, 1)["bounded"]  # a 1-pixel tile: the rest of the step
    room = budget - base - sum(rest.values())
    tile = choose_tile(d.device, per_px, room, recipe.memory_side)
    what = f"{recipe.name} at batch {per_rank}" + (f" (micro-batches of {micro})" if micro else "")
    what += f", {recipe.memory_side} px output"
    return plan_step(
        recipe.memory_estimates(group, tile),
        base=base,
        budget=budget,
        path=cfg.memory_path,
        micro_batch=micro,
        tile=tile,
        what=what,
    )


def memory_line(plan: MemoryPlan) -> str:
    """One console line: which path, why, and the estimate."""
    why = (
        f"plain would need {plan.plain_estimate / GIB:.1f} GiB"
        if plan.path == "bounded"
        else f"bounded would need {plan.bounded_estimate / GIB:.1f} GiB"
    )
    micro = f", micro-batches of {plan.micro_batch}" if plan.micro_batch else ""
    return (
        f"memory: {plan.path} path{micro}, estimated peak {plan.estimate / GIB:.2f} GiB of a "
        f"{plan.budget / GIB:.1f} GiB budget ({why})"
    )
