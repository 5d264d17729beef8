"""Per-image optimisation baseline: FeatUp's implicit upsampler, written for this project.

One image at a time: featurise many jittered views of it with the live backbone, project the
views' features onto a 128-d PCA fitted on the first views, and fit a small per-pixel network
(Fourier features of y, x, r, g, b) whose high-resolution output, put through the same jitter
and a learned attention downsampler, reproduces every view's low-resolution features
(Gaussian NLL with a learned per-pixel uncertainty, plus FeatUp's magnitude, magnitude-TV and
blur-pin terms). What is kept per image is the network and the PCA un-projector (about
0.5 MB); the full-resolution map is rebuilt by :func:`render`.

Every number of the recipe is a field of :class:`ImplicitConfig`, with the value of FeatUp's
``configs/implicit_upsampler.yaml`` and ``train_implicit_upsampler.py`` as its default, so a CPU
test shrinks views and steps while a GPU runs the real recipe. No device is hard-coded.

Where this differs from FeatUp's code (documented in the README, "Scalability"):
- the attention downsampler is the one the training losses use, as its ``"implicit"`` variant
  (training/losses.py says how it differs from FeatUp's: keep mask in training mode only,
  logit dropout per pixel, window sums row by row with recomputation);
- the zoomed jitter is computed by sampling exactly the cropped window (``grid_sample`` at the
  coordinates ``F.interpolate(scale_factor=zoom, mode="bilinear")`` uses) instead of zooming
  the whole padded map and cropping it: the same values up to float rounding (~2e-5), less memory;
- the random streams are per image (seeded from ``seed`` and the image id), so an image's
  result does not depend on which other images ran before it in the same process.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from loftup.training.losses import (
    AttentionDownsampler,
    Jitter,
    ScaleNet,
    apply_jitter,
    gaussian_blur,
    reconstruction_loss,
    total_variation,
)
from loftup.training.model import ChannelNorm
from loftup.training.projection import FeatureProjection

FORMAT = "loftup-implicit/1"


@dataclass
class ImplicitConfig:
    # views (datasets/JitteredImage.py)
    views: int = 3000  # n_images
    max_pad: int = 30  # reflect padding on each side
    max_zoom: float = 1.8
    zoom_prob: float = 0.5  # "apply_zoom = random() > .5"
    flips: bool = True
    featurize_batch: int = 64
    channel_norm: bool = True  # use_norm: a LayerNorm over the backbone's channels first
    # PCA (util.PCAUnprojector with TorchPCA)
    pca_views: int = 50  # pca_batch
    proj_dim: int = 128
    pca_niter: int = 4
    # per-pixel network (layers.ImplicitFeaturizer + the Sequential in train_implicit_upsampler.py)
    n_freqs: int = 30
    freq_log_min: float = -2.0
    freq_log_max: float = 10.0
    dropout: float = 0.2
    # attention downsampler (downsamplers.AttentionDownsampler)
    kernel_size: int = 29
    blur_attn: bool = True
    attn_dropout: float = 0.2  # Dropout before the logit Linear
    attn_keep: float = 0.8  # Bernoulli keep probability on the logits ("rand > 0.2")
    # uncertainty ("outlier_detection"): s = exp(conv(target) + 0.1) >= 1e-4, conv init scaled by 0.1
    outlier_detection: bool = True
    scale_init: float = 0.1
    scale_offset: float = 0.1
    scale_min: float = 1e-4
    # loss weights
    mag_weight: float = 0.001
    mag_tv_weight: float = 0.05
    blur_pin: float = 0.1
    blur_kernel: int = 5
    blur_sigma: float = 1.0
    # optimisation
    steps: int = 1200
    views_per_step: int = 10  # batch_size = inner_batch = 10
    lr: float = 2e-3  # torch.optim.NAdam's default, which FeatUp uses
    seed: int = 0

    def resolved(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImplicitConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------
# jitter


def sample_jitter(n: int, size: tuple[int, int], cfg: ImplicitConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` jitters of an ``h x w`` map: zoom (1, or U[1, max_zoom] with p zoom_prob), crop
    offsets (x rows, y columns) into the padded and zoomed map, horizontal flip."""
    h, w = size
    u = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    zoom = torch.where(
        u[:, 0] < cfg.zoom_prob, 1.0 + u[:, 1] * (cfg.max_zoom - 1.0), torch.ones(n, dtype=torch.float64)
    )
    flip = (u[:, 2] < 0.5) & cfg.flips
    span_h = ((h + 2 * cfg.max_pad) * zoom).floor().long() - h + 1
    span_w = ((w + 2 * cfg.max_pad) * zoom).floor().long() - w + 1
    r = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    x = (r[:, 0] * span_h).floor().long().clamp(max=span_h - 1)
    y = (r[:, 1] * span_w).floor().long().clamp(max=span_w - 1)
    return {"zoom": zoom, "x": x, "y": y, "flip": flip}


def view_jitter(params: dict, i: int, pad: int) -> Jitter:
    """View ``i`` of ``params`` as a :class:`~loftup.training.losses.Jitter`: pad, zoom, crop the
    map-sized window (FeatUp's x is the row), flip."""
    zoom = float(params["zoom"][i])
    return Jitter(pad, pad, zoom, zoom, (int(params["x"][i]), int(params["y"][i])), bool(params["flip"][i]))


def jitter_batch(maps: torch.Tensor, params: dict, idx, pad: int) -> torch.Tensor:
    """The jitters ``idx`` of ``params`` applied to one map (1, C, H, W) -> (len(idx), C, H, W)."""
    return torch.cat([apply_jitter(maps, view_jitter(params, i, pad)) for i in idx])


# ---------------------------------------------------------------------------------------------
# modules


def magnitude(t: torch.Tensor) -> torch.Tensor:
    return t.square().sum(1, keepdim=True).sqrt()


class ImplicitNetwork(nn.Module):
    """Per-pixel network on Fourier features of (y, x, r, g, b): 5 * n_freqs * 2 + 3 inputs
    (303 for 30 frequencies) -> width -> width -> width, dropout and channel norms as FeatUp."""

    def __init__(
        self,
        out_dim: int = 128,
        n_freqs: int = 30,
        freq_log_min: float = -2.0,
        freq_log_max: float = 10.0,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.n_freqs = n_freqs
        self.register_buffer("freqs", torch.exp(torch.linspace(freq_log_min, freq_log_max, n_freqs)), persistent=False)
        self.phases = nn.Parameter(torch.randn(2, 5, n_freqs))
        in_dim = 5 * n_freqs * 2 + 3
        self.in_dim = in_dim
        self.mlp = nn.Sequential(
            ChannelNorm(in_dim),
            nn.Dropout2d(dropout),
            nn.Conv2d(in_dim, out_dim, 1),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            ChannelNorm(out_dim),
            nn.Conv2d(out_dim, out_dim, 1),
            nn.ReLU(),
            nn.Conv2d(out_dim, out_dim, 1),
        )

    def fourier(self, image: torch.Tensor) -> torch.Tensor:
        b, _, h, w = image.shape
        # Min-max scaling per channel over the batch: any per-channel affine normalisation of
        # the input (ImageNet or none) gives the same features.
        flat = image.transpose(0, 1).reshape(3, -1)
        lo = flat.min(1).values.view(1, 3, 1, 1)
        hi = flat.max(1).values.view(1, 3, 1, 1)
        rgb = (image - lo) / (hi - lo).clamp_min(1e-4) - 0.5
        gy, gx = torch.meshgrid(
            torch.linspace(-1, 1, h, device=image.device), torch.linspace(-1, 1, w, device=image.device), indexing="ij"
        )
        coords = torch.stack([gy, gx])[None].expand(b, 2, h, w)
        five = torch.cat([coords, rgb], 1).unsqueeze(1)  # (b, 1, 5, h, w)
        scaled = five * self.freqs.view(1, -1, 1, 1, 1)  # (b, F, 5, h, w)
        # FeatUp reshapes its (2, 5, F) phases to (F, 5) without transposing; kept as is.
        ph = self.phases.reshape(2, 1, self.n_freqs, 5, 1, 1)
        sin = torch.sin(scaled + ph[0]).reshape(b, -1, h, w)
        cos = torch.cos(scaled + ph[1]).reshape(b, -1, h, w)
        return torch.cat([sin, cos, rgb], 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.fourier(image))


class Unprojector(FeatureProjection):
    """PCA of the views' features: ``project`` (C -> k, the trainer's projection) and its
    inverse ``forward`` (k -> C)."""

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        return FeatureProjection.forward(self, feats)

    def forward(self, red: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bkhw,kc->bchw", red, self.components) + self.mean.view(1, -1, 1, 1)

    @classmethod
    def fit(cls, feats: torch.Tensor, dim: int, niter: int, gen_seed: int) -> Unprojector:
        c = feats.shape[1]
        if dim >= c:
            return cls(c, c)  # identity: nothing to reduce
        x = feats.permute(0, 2, 3, 1).reshape(-1, c).float()
        mean = x.mean(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(gen_seed)
            _, _, v = torch.pca_lowrank(x - mean, q=dim, center=False, niter=niter)
        u = cls(c, dim)
        u.mean.copy_(mean)
        u.components.copy_(v.T)
        return u


# ---------------------------------------------------------------------------------------------
# one image


@dataclass
class FitResult:
    network: ImplicitNetwork
    unprojector: Unprojector
    downsampler: AttentionDownsampler
    losses: list[float]  # total loss per step
    rec_losses: list[float]  # uncertainty-weighted reconstruction term per step
    featurize_seconds: float
    optimise_seconds: float
    views: torch.Tensor  # (V, k, h, w) projected view features (CPU)
    params: dict  # the views' jitters

    @property
    def seconds(self) -> float:
        return self.featurize_seconds + self.optimise_seconds


def image_seed(cfg: ImplicitConfig, image_id: int) -> int:
    return (int(cfg.seed) * 1_000_003 + int(image_id)) % (2**63 - 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def featurize_views(image01: torch.Tensor, backbone, cfg: ImplicitConfig, gen: torch.Generator, seed: int):
    """Jittered views of ``image01`` (1, 3, H, W) through the backbone; returns the projected
    features (V, k, h, w) on the CPU, their jitters and the fitted un-projector."""
    h, w = image01.shape[-2:]
    params = sample_jitter(cfg.views, (h, w), cfg, gen)
    unproj, out = None, []
    pending = []
    with torch.no_grad():
        for start in range(0, cfg.views, cfg.featurize_batch):
            idx = range(start, min(start + cfg.featurize_batch, cfg.views))
            feats = backbone(jitter_batch(image01, params, idx, cfg.max_pad)).float()
            if cfg.channel_norm:
                feats = F.layer_norm(feats.permute(0, 2, 3, 1), feats.shape[1:2]).permute(0, 3, 1, 2)
            if unproj is None:
                # The PCA is fitted on the first pca_views views, then every view is projected.
                pending.append(feats)
                if sum(p.shape[0] for p in pending) < min(cfg.pca_views, cfg.views):
                    continue
                first = torch.cat(pending)
                unproj = Unprojector.fit(first[: cfg.pca_views], cfg.proj_dim, cfg.pca_niter, seed).to(feats.device)
                feats, pending = first, []
            out.append(unproj.project(feats).cpu())
    return torch.cat(out), params, unproj


def build_modules(
    dim: int, grid: tuple[int, int], cfg: ImplicitConfig, device
) -> tuple[ImplicitNetwork, AttentionDownsampler, nn.Module | None]:
    net = ImplicitNetwork(dim, cfg.n_freqs, cfg.freq_log_min, cfg.freq_log_max, cfg.dropout).to(device)
    blur = (cfg.blur_kernel, cfg.blur_sigma) if cfg.blur_attn else None
    down = AttentionDownsampler(dim + 1, cfg.kernel_size, cfg.attn_dropout, cfg.attn_keep, blur, "implicit").to(device)
    scale = None
    if cfg.outlier_detection:
        scale = ScaleNet(dim, cfg.scale_init, cfg.scale_offset, cfg.scale_min).to(device)
    return net, down, scale


def step_loss(
    net, down, scale, image01, views, params, idx, cfg: ImplicitConfig, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's loss on the views ``idx``: (total, reconstruction term)."""
    hr = net(image01)
    hr_mag = magnitude(hr)
    both = torch.cat([hr_mag, hr], 1)
    target = views[idx].to(device, non_blocking=True)
    out = down(jitter_batch(both, params, idx.tolist(), cfg.max_pad), target.shape[-2:])
    out_mag, out_feats = out[:, :1], out[:, 1:]
    s = scale(target) if scale is not None else torch.ones_like(target[:, :1])
    rec = reconstruction_loss(out_feats, target, None, s, clamp=False)
    loss = rec
    if cfg.mag_weight > 0:
        loss = loss + cfg.mag_weight * (out_mag - magnitude(target)).square().mean()
    if cfg.mag_tv_weight > 0:
        loss = loss + cfg.mag_tv_weight * total_variation(hr_mag)
    if cfg.blur_pin > 0:
        loss = loss + cfg.blur_pin * (gaussian_blur(hr, cfg.blur_kernel, cfg.blur_sigma) - hr).square().mean()
    return loss, rec


def fit_image(
    image01: torch.Tensor, backbone, cfg: ImplicitConfig, image_id: int = 0, device="cpu", log=None
) -> FitResult:
    """Optimise FeatUp's implicit representation of one image ``image01`` (1, 3, H, W) in [0, 1]
    (the backbone's input size). ``log(step, loss)`` is called every 10 steps when given."""
    device = torch.device(device)
    image01 = image01.to(device).float()
    seed = image_seed(cfg, image_id)
    gen = torch.Generator().manual_seed(seed)
    _sync(device)
    t0 = time.perf_counter()
    views, params, unproj = featurize_views(image01, backbone, cfg, gen, seed)
    _sync(device)
    t1 = time.perf_counter()
    grid = tuple(views.shape[-2:])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net, down, scale = build_modules(unproj.out_dim, grid, cfg, device)
        params_all = [*net.parameters(), *down.parameters(), *(scale.parameters() if scale is not None else [])]
        opt = torch.optim.NAdam(params_all, lr=cfg.lr)
        views_dev = views.to(device) if device.type == "cuda" else views
        losses, recs = [], []
        net.train()
        down.train()
        for step in range(cfg.steps):
            idx = torch.randint(cfg.views, (cfg.views_per_step,), generator=gen)
            loss, rec = step_loss(net, down, scale, image01, views_dev, params, idx, cfg, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            recs.append(float(rec.detach()))
            if log is not None and (step % 10 == 9 or step == cfg.steps - 1):
                log(step + 1, losses[-1])
    net.eval()
    down.eval()
    _sync(device)
    t2 = time.perf_counter()
    return FitResult(net, unproj, down, losses, recs, t1 - t0, t2 - t1, views, params)


@torch.no_grad()
def render(network: ImplicitNetwork, unprojector: Unprojector, image01: torch.Tensor) -> torch.Tensor:
    """The full-resolution feature map (C, H, W) of the image from its stored network."""
    network.eval()
    dev = next(network.parameters()).device
    return unprojector(network(image01.to(dev).float()))[0]


@torch.no_grad()
def reconstruction_error(network, downsampler, image01, views, params, idx, max_pad: int) -> float:
    """MSE between the downsampled jittered HR output and the views' low-res features (eval
    mode, no uncertainty weighting): how well the HR map explains what the backbone saw."""
    network.eval()
    downsampler.eval()
    dev = next(network.parameters()).device
    hr = network(image01.to(dev).float())
    both = torch.cat([magnitude(hr), hr], 1)
    idx = list(idx)
    out = downsampler(jitter_batch(both, params, idx, max_pad), views.shape[-2:])[:, 1:]
    return float((out - views[idx].to(dev)).square().mean())


# ---------------------------------------------------------------------------------------------
# compact per-image format


def to_compact(
    network: ImplicitNetwork, unprojector: Unprojector, cfg: ImplicitConfig, extra: dict | None = None
) -> bytes:
    """safetensors bytes: ``network.*`` and ``unprojector.*`` tensors (float32) with the recipe
    and shapes as metadata. About 0.5 MB for C = 384..512 (FeatUp saves the same two parts)."""
    from safetensors.torch import save

    tensors = {f"network.{k}": v.detach().float().cpu().contiguous() for k, v in network.state_dict().items()}
    tensors |= {f"unprojector.{k}": v.detach().float().cpu().contiguous() for k, v in unprojector.state_dict().items()}
    meta = {
        "format": FORMAT,
        "config": json.dumps(cfg.resolved(), sort_keys=True),
        "out_dim": str(unprojector.out_dim),
        "in_dim": str(unprojector.mean.numel()),
        **{k: json.dumps(v) for k, v in (extra or {}).items()},
    }
    return save(tensors, metadata=meta)


def from_compact(blob: bytes, device="cpu") -> tuple[ImplicitNetwork, Unprojector, dict]:
    """Rebuild (network, unprojector, metadata) from :func:`to_compact` bytes."""
    from safetensors.torch import load

    meta = compact_metadata(blob)
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} blob (format {meta.get('format')!r})")
    cfg = ImplicitConfig.from_dict(json.loads(meta["config"]))
    tensors = load(blob)
    net = ImplicitNetwork(int(meta["out_dim"]), cfg.n_freqs, cfg.freq_log_min, cfg.freq_log_max, cfg.dropout)
    net.load_state_dict({k[len("network.") :]: v for k, v in tensors.items() if k.startswith("network.")})
    unproj = Unprojector(int(meta["in_dim"]), int(meta["out_dim"]))
    unproj.load_state_dict({k[len("unprojector.") :]: v for k, v in tensors.items() if k.startswith("unprojector.")})
    return net.to(device).eval(), unproj.to(device), meta


def compact_metadata(blob: bytes) -> dict:
    """The metadata of a compact blob (safetensors: 8-byte header length, JSON header)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})


def full_recipe_seconds(seconds_per_view: float, seconds_per_step: float, cfg: ImplicitConfig | None = None) -> float:
    """Per-image time of FeatUp's full recipe (its views and steps) from measured rates."""
    cfg = cfg or ImplicitConfig()
    return cfg.views * seconds_per_view + cfg.steps * seconds_per_step


__all__ = [
    "FitResult",
    "ImplicitConfig",
    "ImplicitNetwork",
    "Unprojector",
    "compact_metadata",
    "fit_image",
    "from_compact",
    "full_recipe_seconds",
    "reconstruction_error",
    "render",
    "sample_jitter",
    "to_compact",
]
