"""LoftUp model: released layout, released behaviour, bounded inference, checkpoints, baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loftup.storage.errors import LoftupError, WeightsError
from loftup.training import model as model_module
from loftup.training.baselines import create_upsampler, list_upsamplers
from loftup.training.checkpoint import from_official, load_model, load_official, save_model, to_official_state_dict
from loftup.training.model import (
    CPU_CONV_TILE,
    CPU_QUERY_CHUNK,
    MEMORY_FRACTION,
    DeviceSpec,
    LoftUp,
    bounded_bytes,
    dense_bytes,
    plan_execution,
)
from loftup.training.winograd import conv3x3_valid_nhwc, filter_transform

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "loftup_official_state_dict_dinov2s.json"


def make_model(dim=32, seed=0, **kwargs) -> LoftUp:
    """A model whose BatchNorm running statistics are not the identity, in eval mode."""
    torch.manual_seed(seed)
    model = LoftUp(dim, **kwargs)
    for idx in (2, 5):
        bn = model.upsampler.first_conv[idx]
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.shape[0] in (dim, dim + 20):
                p.add_(0.05 * torch.randn_like(p))  # LayerNorm affines away from 1/0
    return model.eval()


def inputs(b=2, dim=32, grid=(5, 7), size=(24, 30), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, dim, *grid, generator=g), torch.randn(b, 3, *size, generator=g)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# -- released layout -------------------------------------------------------------------------


def test_state_dict_equals_released_layout():
    entries = json.loads(REFERENCE.read_text())["entries"]
    expected = {e["key"]: (tuple(e["shape"]), e["dtype"]) for e in entries}
    got = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in LoftUp(384).state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in LoftUp(384).parameters()) == 4_303_894  # "adds 4.3M" in the paper


def _reference_forward(sd, lr, img, heads=4):
    """The released forward written out from its description with plain tensor ops
    (batch-wide min-max, (F, n) reading of the phases, explicit softmax attention)."""

    def ln(x, prefix, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)

    def fourier(inputs, biases):
        n, nf = inputs.shape[1], biases.shape[-1]
        freqs = torch.exp(torch.linspace(-2, 10, nf))
        out = []
        for s, fn in ((0, torch.sin), (1, torch.cos)):
            phase = biases[s].flatten().view(nf, n)
            out.append(torch.stack([fn(inputs[:, i] * freqs[f] + phase[f, i]) for f in range(nf) for i in range(n)], 1))
        return torch.cat(out, 1)

    def coords(b, h, w):
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        return torch.stack([yy, xx]).expand(b, 2, h, w)

    up = "upsampler."
    b, _, H, W = img.shape
    lr = ln(lr.permute(0, 2, 3, 1), "channelnorm.norm").permute(0, 3, 1, 2)
    lo, hi = img.amin(dim=(0, 2, 3), keepdim=True), img.amax(dim=(0, 2, 3), keepdim=True)
    rgb = (img - lo) / (hi - lo).clamp_min(1e-4) - 0.5
    x = torch.cat([fourier(torch.cat([coords(b, H, W), rgb], 1), sd[up + "fourier_feat.1.biases"]), rgb], 1)
    x = ln(x.permute(0, 2, 3, 1), up + "first_conv.0.norm").permute(0, 3, 1, 2)
    for conv, bn in ((1, 2), (4, 5)):
        c, n = f"{up}first_conv.{conv}.", f"{up}first_conv.{bn}."
        x = F.conv2d(x, sd[c + "weight"], sd[c + "bias"], padding=1)
        x = (x - sd[n + "running_mean"][:, None, None]) / torch.sqrt(sd[n + "running_var"][:, None, None] + 1e-5)
        x = torch.relu(x * sd[n + "weight"][:, None, None] + sd[n + "bias"][:, None, None])
    width = x.shape[1]
    q = x.flatten(2).transpose(1, 2)
    h, w = lr.shape[-2:]
    kv = torch.cat([lr, fourier(coords(b, h, w), sd[up + "lr_pe.biases"])], 1).flatten(2).transpose(1, 2)
    dh = width // heads
    for layer in range(len({k.split(".")[3] for k in sd if ".layers." in k})):
        p = f"{up}ca_transformer.layers.{layer}."
        wq, wk, wv = sd[p + "0.attention.in_proj_weight"].chunk(3)
        bq, bk, bv = sd[p + "0.attention.in_proj_bias"].chunk(3)
        qn, kn = ln(q, p + "0.norm_q"), ln(kv, p + "0.norm_kv")
        split = lambda t: t.view(b, -1, heads, dh).transpose(1, 2)  # noqa: E731
        qh, kh, vh = split(qn @ wq.T + bq), split(kn @ wk.T + bk), split(kn @ wv.T + bv)
        att = torch.softmax(qh @ kh.transpose(-1, -2) / dh**0.5, -1) @ vh
        att = att.transpose(1, 2).reshape(b, -1, width)
        q = q + att @ sd[p + "0.attention.out_proj.weight"].T + sd[p + "0.attention.out_proj.bias"]
        f = F.gelu(ln(q, p + "1.net.0") @ sd[p + "1.net.1.weight"].T + sd[p + "1.net.1.bias"])
        q = q + f @ sd[p + "1.net.4.weight"].T + sd[p + "1.net.4.bias"]
    q = ln(q, up + "ca_transformer.norm")
    y = q @ sd[up + "final_conv.0.weight"].flatten(1).T + sd[up + "final_conv.0.bias"]
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-6)
    y = y * sd[up + "final_conv.1.weight"] + sd[up + "final_conv.1.bias"]
    return y.transpose(1, 2).reshape(b, -1, H, W)


def test_batch_scaling_reproduces_the_released_forward():
    model = make_model(image_scaling="batch")
    lr, img = inputs(b=2, size=(13, 18))
    ref = _reference_forward(to_official_state_dict(model), lr, img)
    with torch.no_grad():
        dense = model.set_memory_bound(0, 0)(lr, img)
        bounded = model.set_memory_bound(11, 8)(lr, img)
    assert rel_err(dense, ref) < 1e-5
    assert rel_err(bounded, ref) < 1e-5


def test_official_round_trip_is_exact(tmp_path):
    model = make_model(image_scaling="batch")
    lr, img = inputs()
    official = to_official_state_dict(model)
    assert set(official) == set(model.state_dict())
    again = LoftUp.from_official(official, image_scaling="batch")
    assert not again.training and again.dim == 32
    with torch.no_grad():
        assert torch.equal(model(lr, img), again(lr, img))
    # A released file: a Lightning-style wrapper whose channel norm is ``model.1.norm``
    # beside other modules that are not the upsampler's.
    wrapped = {k.replace("channelnorm.", "model.1."): v for k, v in official.items()}
    wrapped["model.0.blocks.0.weight"] = torch.zeros(3)
    torch.save({"state_dict": wrapped, "epoch": 1}, tmp_path / "ckpt.pth")
    from safetensors.torch import save_file

    save_file(official, str(tmp_path / "ckpt.safetensors"))
    with torch.no_grad():
        for name in ("ckpt.pth", "ckpt.safetensors"):
            loaded = load_official(tmp_path / name, image_scaling="batch")
            assert torch.equal(loaded(lr, img), model(lr, img))


def test_official_mismatch_names_the_keys(tmp_path):
    state = to_official_state_dict(make_model())
    bad = dict(state)
    bad.pop("upsampler.first_conv.4.bias")
    bad["upsampler.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"missing: upsampler\.first_conv\.4\.bias.*unexpected: upsampler\.extra"):
        from_official(bad)
    with pytest.raises(WeightsError, match="andrehuang/loftup"):
        load_official(tmp_path / "absent.pth")


# -- image scaling, sizes, grids ----------------------------------------------------------------


def test_image_scaling_per_image_vs_batch():
    lr, img = inputs(b=3)
    img[1] = img[1] * 3 + 2  # a very different range for one image
    per_image = make_model(image_scaling="image")
    batch = make_model(image_scaling="batch")
    with torch.no_grad():
        together = per_image(lr, img)
        alone = torch.cat([per_image(lr[i : i + 1], img[i : i + 1]) for i in range(3)])
        assert rel_err(together, alone) < 1e-6
        released = batch(lr, img)
        released_alone = torch.cat([batch(lr[i : i + 1], img[i : i + 1]) for i in range(3)])
        # Same weights: single-image calls agree whatever the scaling mode...
        assert rel_err(released_alone, alone) < 1e-6
    # ...but batching changes the released module's output.
    assert rel_err(released, released_alone) > 1e-2


@pytest.mark.parametrize(
    "grid,size,output_size",
    [
        ((5, 7), (24, 30), None),
        ((16, 16), (28, 28), 23),
        ((3, 9), (20, 40), (19, 41)),
        ((8, 8), (32, 32), (64, 48)),
    ],
)
def test_any_grid_and_output_size(grid, size, output_size):
    model = make_model()
    lr, img = inputs(grid=grid, size=size)
    with torch.no_grad():
        out = model(lr, img, output_size=output_size)
        expect = size if output_size is None else ((output_size,) * 2 if isinstance(output_size, int) else output_size)
        assert out.shape == (2, 32, *expect)
        assert torch.isfinite(out).all()
        # output_size is the same as resizing the guidance image first.
        resized = F.interpolate(img, size=tuple(expect), mode="bilinear", align_corners=False, antialias=False)
        assert torch.equal(out, model(lr, resized))
        # Outputs are layer-normalised per pixel before the final affine.
        norm = model.upsampler.final_conv[1]
        z = (out - norm.bias[:, None, None]) / norm.weight[:, None, None]
        assert z.mean(1).abs().max() < 1e-4


@pytest.mark.parametrize(
    "size,tile,chunk",
    [
        ((16, 16), 8, 7),
        ((33, 47), 16, 37),
        ((64, 40), 32, 100),
        ((31, 17), 30, 1000),
        ((20, 21), 1, 5),
        ((40, 40), 0, 333),  # chunked attention without tiling
        ((40, 40), 13, 0),  # tiling with whole-tile attention
    ],
)
def test_bounded_equals_dense(size, tile, chunk):
    model = make_model()
    lr, img = inputs(size=size)
    with torch.no_grad():
        dense = model.set_memory_bound(0, 0)(lr, img)
        assert model.plan(*size) is None
        bounded = model.set_memory_bound(chunk, tile)(lr, img)
        assert model.plan(*size) is not None
    assert rel_err(bounded, dense) < 1e-5
    assert (bounded - dense).abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(1, 6, 6, 3, 4), (2, 9, 12, 5, 7), (1, 11, 8, 16, 9), (1, 3, 3, 2, 2)])
def test_winograd_conv_equals_direct_conv(shape):
    """F(2x2, 3x3) against F.conv2d (float64, so any slip in a transform shows), odd and even sides."""
    b, h, w, cin, cout = shape
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(b, h, w, cin, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    expect = F.conv2d(x.permute(0, 3, 1, 2), weight, bias).permute(0, 2, 3, 1)
    got = conv3x3_valid_nhwc(x, filter_transform(weight), bias)
    assert got.shape == expect.shape
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def test_bounded_path_on_cpu_uses_winograd_and_writes_channels_last(monkeypatch):
    model = make_model()
    lr, img = inputs(size=(33, 47))
    with torch.no_grad():
        dense = model.set_memory_bound(0, 0)(lr, img)
        outs = {}
        for flag in (True, False):
            monkeypatch.setattr(model_module, "WINOGRAD", flag)
            outs[flag] = model.set_memory_bound(37, 16)(lr, img)
    assert outs[True].is_contiguous(memory_format=torch.channels_last)
    assert rel_err(outs[True], dense) < 1e-5 and rel_err(outs[False], dense) < 1e-5
    assert not torch.equal(outs[True], outs[False])  # the two algorithms really both ran


def test_automatic_plan():
    model = make_model()
    cpu = DeviceSpec("cpu", 16 * 2**30)
    assert model.plan(224, 224, device=cpu) == (CPU_CONV_TILE, CPU_QUERY_CHUNK)
    assert model.plan(40, 30, device=cpu) == (40, CPU_QUERY_CHUNK)
    model.set_memory_bound(query_chunk=512)
    assert model.plan(32, 32, device=cpu) == (32, 512)
    model.set_memory_bound(conv_tile=8)
    assert model.plan(32, 32, device=cpu) == (8, CPU_QUERY_CHUNK)
    model.set_memory_bound(0, 0)
    assert model.plan(2048, 2048, device=cpu) is None
    model.set_memory_bound().train()
    assert model.plan(2048, 2048, device=cpu) is None


GB = 2**30


@pytest.mark.parametrize(
    "device,size,bpv,expect",
    [
        # CPU: cache-sized tiles whatever the memory; a starved machine halves them.
        (DeviceSpec("cpu", 16 * GB), 224, 4, (128, 4096)),
        (DeviceSpec("cpu", 16 * GB), 2048, 4, (128, 4096)),
        (DeviceSpec("cpu", 200 * 2**20), 224, 4, (32, 256)),
        # GPU: dense whenever it fits...
        (DeviceSpec("cuda", 22 * GB), 448, 4, None),
        (DeviceSpec("cuda", 22 * GB), 896, 4, None),
        (DeviceSpec("cuda", 75 * GB), 2048, 2, None),
        # ...else the largest tile and chunk that fit.
        (DeviceSpec("cuda", 22 * GB), 2048, 4, (512, 131072)),
        (DeviceSpec("cuda", 22 * GB), 2048, 2, (1024, 65536)),
        (DeviceSpec("cuda", 75 * GB), 4096, 4, (1024, 262144)),
        # Not even the output fits: the smallest GPU plan (the allocation will say so).
        (DeviceSpec("cuda", 1 * GB), 896, 4, (64, 4096)),
    ],
)
def test_plan_execution_sizes(device, size, bpv, expect):
    plan = plan_execution(device, size, size, bytes_per_value=bpv)
    assert plan == expect
    budget = MEMORY_FRACTION * device.free_bytes - 384 * size * size * 4
    if plan is None:
        assert dense_bytes(size, size, bytes_per_value=bpv) <= budget
    elif device.kind == "cuda" and budget > 0:
        assert dense_bytes(size, size, bytes_per_value=bpv) > budget
        assert bounded_bytes(*plan, bytes_per_value=bpv) <= budget


def test_plans_grow_with_free_memory():
    sizes = []
    for gb in (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128):
        plan = plan_execution(DeviceSpec("cuda", int(gb * GB)), 2048, 2048)
        sizes.append((4096, 2**30) if plan is None else plan)
    assert sizes == sorted(sizes)
    assert sizes[0] != sizes[-1]


@pytest.mark.parametrize(
    "device",
    [
        DeviceSpec("cpu", 2**40),
        DeviceSpec("cpu", 2**21),
        DeviceSpec("cuda", 2**40),
        DeviceSpec("cuda", 2**24),
        DeviceSpec("cuda", 2**22),
        DeviceSpec("cuda", 2**20),
    ],
)
def test_every_plan_equals_dense(device):
    """Whatever a device's plan (scaled down to test sizes by its memory), outputs equal dense."""
    model = make_model()
    lr, img = inputs(size=(37, 45))
    with torch.no_grad():
        dense = model.set_memory_bound(0, 0)(lr, img)
        model.set_memory_bound()
        plan = model.plan(37, 45, batch=2, device=device, lr_tokens=35)
        if plan is None:
            assert device.kind == "cuda"
            return
        out = model.set_memory_bound(plan[1], plan[0])(lr, img)
    assert rel_err(out, dense) < 1e-5


def test_attention_matches_multihead_attention_and_padded_heads():
    """The direct SDPA call equals nn.MultiheadAttention's forward on the same packed weights,
    in training mode too, and the accelerator layout (heads zero-padded to a multiple of 8)
    gives the same result."""
    from loftup.training.model import CrossAttentionBlock

    torch.manual_seed(0)
    block = CrossAttentionBlock(52, 4)
    with torch.no_grad():
        block.attention.in_proj_bias.normal_()
        block.attention.out_proj.bias.normal_()
    q, t = torch.randn(2, 30, 52), torch.randn(2, 12, 52)
    for mode in (block.train, block.eval):
        mode()
        ours = block(q, t)
        theirs = block.attention(block.norm_q(q), block.norm_kv(t), block.norm_kv(t), need_weights=False)[0]
        assert rel_err(ours, theirs) < 1e-6
    assert block._pad(torch.device("cpu")) == 0 and block._pad(torch.device("meta")) == 3
    block._pad = lambda device: 3  # the layout used off the CPU
    k, v = block.project_kv(t)
    assert k.shape == (2, 4, 12, 16)
    assert rel_err(block(q, t), theirs) < 1e-6
    ours = block(q.requires_grad_(True), t)
    ours.sum().backward()
    assert block.attention.in_proj_weight.grad.abs().sum() > 0


def test_compiled_model_equals_eager():
    # The "eager" backend runs TorchDynamo's capture without code generation (seconds, not minutes);
    # one tile and one chunk keep it to one capture per compiled function.
    model = make_model()
    lr, img = inputs(size=(20, 22))
    with torch.no_grad():
        eager_bounded = model.set_memory_bound(1000, 32)(lr, img)
        eager_dense = model.set_memory_bound(0, 0)(lr, img)
        model.enable_compile(backend="eager")
        assert set(model.state_dict()) == set(make_model().state_dict())
        assert rel_err(model(lr, img), eager_dense) < 1e-6
        assert rel_err(model.set_memory_bound(1000, 32)(lr, img), eager_bounded) < 1e-6


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = LoftUp(32, dropout=0.1).train()
    lr, img = inputs(size=(12, 14))
    lr.requires_grad_(True)
    out = model(lr, img)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert lr.grad.abs().sum() > 0
    assert int(model.upsampler.first_conv[2].num_batches_tracked) == 1
    # In eval mode a bounded plan still yields gradients when the inputs ask for them.
    model.eval().set_memory_bound(16, 8)
    lr.grad = None
    model(lr, img).sum().backward()
    assert lr.grad.abs().sum() > 0


# -- our checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    from loftup.training.projection import FeatureProjection

    model = make_model(heads=2, num_freqs_img=8, image_scaling="batch")
    projection = FeatureProjection(48, 32)
    projection.mean.normal_()
    path = save_model(model, tmp_path / "m.safetensors", extra={"backbone": "toy"}, projection=projection)
    assert path.exists() and path.with_suffix(".json").exists()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"]["heads"] == 2 and meta["config"]["image_scaling"] == "batch"
    again, meta = load_model(path, with_meta=True)
    assert meta["extra"] == {"backbone": "toy"}
    assert torch.equal(meta["projection_module"].mean, projection.mean)
    lr, img = inputs()
    with torch.no_grad():
        assert torch.equal(model(lr, img), again(lr, img))
    assert isinstance(load_model(path), LoftUp)
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nothing.safetensors")


# -- baselines ------------------------------------------------------------------------------------


def test_baselines_share_the_call_signature():
    lr, img = inputs()
    assert list_upsamplers() == ["bicubic", "bilinear", "loftup", "nearest"]
    for name in ("bilinear", "bicubic", "nearest"):
        up = create_upsampler(name)
        assert up(lr, img).shape == (2, 32, 24, 30)
        assert up(lr, img, output_size=(9, 11)).shape == (2, 32, 9, 11)
    bil = create_upsampler("bilinear")(lr, img, output_size=14)
    assert torch.equal(bil, F.interpolate(lr, size=(14, 14), mode="bilinear", align_corners=False))
    near = create_upsampler("nearest")(lr, img, output_size=(10, 14))
    assert torch.equal(near[..., ::2, ::2], lr)
    model = create_upsampler("loftup", dim=32)
    assert isinstance(model, LoftUp)
    with pytest.raises(LoftupError, match="unknown upsampler"):
        create_upsampler("featup")
