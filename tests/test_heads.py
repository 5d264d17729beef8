"""The convex (backbone-space) output head of LoftUp: what it computes, checked against explicit
reference computations, and that it travels through checkpoints and evaluation like any LoftUp."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from loftup.storage.errors import WeightsError
from loftup.training.checkpoint import load_model, resolve_upsampler, save_model, to_official_state_dict
from loftup.training.inference import retention
from loftup.training.model import LoftUp


def convex_model(dim=8, seed=0, **options) -> LoftUp:
    torch.manual_seed(seed)
    model = LoftUp(dim, heads=2, num_freqs_img=6, head="convex", head_options=options)
    with torch.no_grad():
        # Content logits as large as the positional prior, so both shape the weights.
        model.upsampler.head.log_scale.fill_(math.log(0.5))
        for bn in (model.upsampler.first_conv[2], model.upsampler.first_conv[5]):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _reference(model: LoftUp, lr: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, weights) written out pixel by pixel in float64 from the head's description:
    logits = s <Wq q_p + bq, Wk LN(t_j) + bk> - d^2 / (2 sigma^2) inside the window, softmax,
    output = sum_j w_pj f_j with f_j the RAW low-res vector."""
    core, head = model.upsampler, model.upsampler.head
    captured = {}
    hook = core.ca_transformer.register_forward_hook(lambda m, a, out: captured.update(q=out, t=a[1]))
    with torch.no_grad():
        model.set_memory_bound(0, 0)(lr, img)
    hook.remove()
    d = lambda t: t.detach().double()  # noqa: E731
    q, t = d(captured["q"][0]), d(captured["t"][0])
    wq, bq, wk, bk = d(head.q_proj.weight), d(head.q_proj.bias), d(head.k_proj.weight), d(head.k_proj.bias)
    kn = F.layer_norm(t, t.shape[-1:], d(head.k_norm.weight), d(head.k_norm.bias), head.k_norm.eps)
    keys = kn @ wk.T + bk
    scale, sigma = math.exp(head.log_scale.item()), math.exp(head.log_sigma.item())
    h, w = lr.shape[-2:]
    H, W = img.shape[-2:]
    values = lr[0].double().reshape(lr.shape[1], -1)
    out = torch.zeros(lr.shape[1], H * W, dtype=torch.float64)
    weights = torch.zeros(H * W, h * w, dtype=torch.float64)
    for p in range(H * W):
        y, x = divmod(p, W)
        gy, gx = (y + 0.5) * h / H - 0.5, (x + 0.5) * w / W - 0.5  # position on the low-res grid
        ny, nx = min(h - 1, math.floor((y + 0.5) * h / H)), min(w - 1, math.floor((x + 0.5) * w / W))
        qp = q[p] @ wq.T + bq
        logits = {}
        for j in range(h * w):
            cy, cx = divmod(j, w)
            if head.radius >= 0 and (abs(cy - ny) > head.radius or abs(cx - nx) > head.radius):
                continue
            logits[j] = scale * float(qp @ keys[j]) - ((gy - cy) ** 2 + (gx - cx) ** 2) / (2 * sigma**2)
        top = max(logits.values())
        total = sum(math.exp(v - top) for v in logits.values())
        for j, v in logits.items():
            weights[p, j] = math.exp(v - top) / total
            out[:, p] += weights[p, j] * values[:, j]
    return out.reshape(-1, H, W), weights


@pytest.mark.parametrize("radius", [1, -1])
def test_output_is_a_convex_combination_of_the_raw_low_res_vectors(radius):
    model = convex_model(radius=radius)
    g = torch.Generator().manual_seed(1)
    lr = 3.0 * torch.randn(1, 8, 4, 5, generator=g) + 1.5  # raw features, far from layer-normalised
    img = torch.randn(1, 3, 10, 13, generator=g)
    expect, weights = _reference(model, lr, img)
    assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(130, dtype=torch.float64))
    # The weights are neither one-hot nor uniform: both terms act.
    assert 0.3 < weights.max(1).values.mean() < 0.95
    with torch.no_grad():
        dense = model.set_memory_bound(0, 0)(lr, img)[0]
        bounded = model.set_memory_bound(query_chunk=7, conv_tile=6)(lr, img)[0]
    torch.testing.assert_close(dense.double(), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bounded.double(), expect, rtol=1e-5, atol=1e-5)
    # Inside the convex hull: every channel between its low-res minimum and maximum.
    lo, hi = lr[0].amin((1, 2)), lr[0].amax((1, 2))
    assert ((dense >= lo[:, None, None] - 1e-5) & (dense <= hi[:, None, None] + 1e-5)).all()


def test_a_perfectly_local_attention_keeps_what_nearest_upsampling_keeps():
    """radius 0: each pixel attends only to its own cell, so the output is nearest upsampling
    and its retention is nearest's, at a size that tiles the grid and at one that does not."""
    model = convex_model(radius=0)
    g = torch.Generator().manual_seed(2)
    lr = torch.randn(2, 8, 5, 7, generator=g)
    for size in ((20, 28), (17, 23)):
        img = torch.randn(2, 3, *size, generator=g)
        with torch.no_grad():
            out = model(lr, img)
        nearest = F.interpolate(lr, size=size, mode="nearest-exact")
        torch.testing.assert_close(out, nearest, rtol=0, atol=0)
        assert retention(out, lr) == pytest.approx(retention(nearest, lr), abs=1e-7)
    assert retention(F.interpolate(lr, size=(20, 28), mode="nearest-exact"), lr) == pytest.approx(1.0, abs=1e-6)


def test_checkpoint_round_trip_records_the_head(tmp_path):
    from loftup.training.evaluation import resolve_checkpoint

    model = convex_model(radius=2, sigma=0.8)
    path = save_model(model, tmp_path / "c.safetensors", extra={"backbone": "toy"})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"]["head"] == "convex" and meta["config"]["head_options"] == {"radius": 2, "sigma": 0.8}
    again = load_model(path)
    assert again.upsampler.head.radius == 2 and again.upsampler.final_conv is None
    g = torch.Generator().manual_seed(3)
    lr, img = torch.randn(1, 8, 4, 4, generator=g), torch.randn(1, 3, 12, 12, generator=g)
    with torch.no_grad():
        assert torch.equal(model(lr, img), again(lr, img))
        assert torch.equal(model(lr, img), resolve_upsampler(path)[0](lr, img))
    assert resolve_checkpoint(path).target_space == "raw"  # evaluation compares it in the raw space
    # the released head's checkpoints carry no head entry (released configs stay as they were)
    plain = save_model(LoftUp(8, heads=2), tmp_path / "p.safetensors")
    assert "head" not in json.loads(plain.with_suffix(".json").read_text())["config"]
    with pytest.raises(WeightsError, match="no released layout"):
        to_official_state_dict(model)
