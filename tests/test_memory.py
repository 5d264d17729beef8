"""The bounded training path (training/memory.py) against the plain one, on small shapes."""

from __future__ import annotations

import copy

import pytest
import torch

from loftup.training.memory import GIB, Part, TiledRunner, combine, plan_step, stream
from loftup.training.model import LoftUp


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_equal(plain: dict, bounded: dict, rtol: float) -> None:
    assert plain.keys() == bounded.keys()
    scale = max(g.abs().max() for g in plain.values())
    for name, g in plain.items():
        # conv biases in front of a BatchNorm have a true gradient of 0 (rounding noise only)
        atol = rtol * max(g.abs().max(), 1e-3 * scale)
        torch.testing.assert_close(bounded[name], g, rtol=0, atol=float(atol), msg=name)


# the convex head's softmax runs in float32 (training/heads.py): float32 rounding, not float64's
@pytest.mark.parametrize(
    "scaling,head,tol", [("image", "loftup", 1e-10), ("batch", "loftup", 1e-10), ("image", "convex", 1e-5)]
)
def test_tiled_runner_equals_the_dense_model_outputs_gradients_and_batchnorm_statistics(scaling, head, tol):
    """The convex head's positional prior and window depend on where a pixel is in the whole
    output: each tile must pass its place (a tile placed at the origin would differ here)."""
    torch.manual_seed(0)
    plain = LoftUp(16, heads=2, image_scaling=scaling, head=head).double().train()
    plain.upsampler.first_conv[5].momentum = None  # cumulative average: counts batches too
    bounded = copy.deepcopy(plain)
    lr = torch.randn(3, 16, 5, 6, dtype=torch.float64)
    image = torch.randn(3, 3, 20, 24, dtype=torch.float64)
    grad = torch.randn(3, 16, 20, 24, dtype=torch.float64)

    out = plain(lr, image)
    (out * grad).sum().backward()
    runner = TiledRunner(bounded, tile=8).begin(lr, image)  # 3 x 3 tiles with halos across edges
    assert len(runner.tiles) == 9
    for i in range(3):
        torch.testing.assert_close(runner.forward(i), out[i : i + 1].detach(), rtol=tol, atol=tol)
        runner.backward(i, grad[i : i + 1])
    runner.finish()
    _assert_grads_equal(_grads(plain), _grads(bounded), rtol=tol)
    # running statistics moved once, as one plain forward moves them
    for (name, a), b in zip(plain.named_buffers(), bounded.buffers()):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * 1e-2, msg=name)
    assert int(bounded.upsampler.first_conv[2].num_batches_tracked) == 1

    # without the gradient through the batch statistics the parameters' gradients are wrong:
    # the comparison above would catch a path that treated them as constants
    again = copy.deepcopy(plain)
    again.zero_grad()
    r = TiledRunner(again, tile=8).begin(lr, image)
    for i in range(3):
        r.backward(i, grad[i : i + 1])
    w = "upsampler.first_conv.1.weight"
    gap = (_grads(again)[w] - _grads(plain)[w]).abs().max() / _grads(plain)[w].abs().max()
    assert gap > 1e-3


def test_tiled_runner_without_grad_in_train_mode_is_the_teachers_forward():
    torch.manual_seed(1)
    teacher = LoftUp(16, heads=2).train().requires_grad_(False)
    twin = copy.deepcopy(teacher)
    lr, image = torch.randn(4, 16, 4, 4), torch.randn(4, 3, 15, 17)
    with torch.no_grad():
        out = teacher(lr, image)
        runner = TiledRunner(twin, tile=7).begin(lr, image)
        got = torch.cat([runner.forward(i) for i in range(4)])
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-4)
    for a, b in zip(teacher.buffers(), twin.buffers()):
        torch.testing.assert_close(b, a)


def _clamped_loss(values_i):
    return {"mean": values_i.mean(), "shifted": values_i.mean() + 0.2, "neg": values_i.mean() - 5.0}


@pytest.mark.parametrize("bounds", [None, {"neg": -1.0, "shifted": 0.0}])
def test_stream_applies_the_batch_clamp_before_any_backward(bounds):
    """A part clamped at >= 0 on its batch mean: "neg" is below 0 (no gradient), "shifted" is
    above. With a lower bound >= 0 the sign is taken as known; else a pass without gradients
    finds it. Either way the gradients are the plain combination's."""
    torch.manual_seed(2)
    plain = LoftUp(16, heads=2).double().train()
    bounded = copy.deepcopy(plain)
    lr, image = torch.randn(2, 16, 4, 4, dtype=torch.float64), torch.randn(2, 3, 12, 12, dtype=torch.float64)
    parts = {
        "mean": Part("a", 2.0),
        "shifted": Part("b", 0.5, clamp=True),
        "neg": Part("b", 3.0, clamp=True),
    }
    out = plain(lr, image)
    terms = combine([_clamped_loss(out[i : i + 1]) for i in range(2)], parts)
    sum(terms.values()).backward()
    runner = TiledRunner(bounded, tile=8).begin(lr, image)
    got = stream(runner, lambda i, o, names: _clamped_loss(o), parts, bounds)
    for k in terms:
        assert float(got[k]) == pytest.approx(float(terms[k]), rel=1e-9)
    _assert_grads_equal(_grads(plain), _grads(bounded), rtol=1e-10)


def test_plan_takes_plain_when_it_fits_bounded_when_not_and_refuses_the_rest():
    from loftup.storage.errors import LoftupError

    est = {"plain": {"x": 6 * GIB}, "bounded": {"y": 1 * GIB}}
    assert plan_step(est, base=GIB, budget=8 * GIB).path == "plain"
    plan = plan_step(est, base=GIB, budget=4 * GIB, tile=64)
    assert (plan.path, plan.estimate, plan.tile) == ("bounded", 2 * GIB, 64)
    with pytest.raises(LoftupError, match=r"stage1 needs about 2.0 GiB even on the bounded path.*1.5 GiB"):
        plan_step(est, base=GIB, budget=int(1.5 * GIB), what="stage1")
    with pytest.raises(LoftupError, match=r"needs about 7.0 GiB, more than --max-memory 4.0 GiB"):
        plan_step(est, base=GIB, budget=4 * GIB, path="plain")
