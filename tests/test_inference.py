"""Inference command library and the shared pictures (PCA colours, panels, mask overlays)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from standins import PatchConv

from loftup.pictures import overlay_masks, pca_rgb, save_panels
from loftup.storage.errors import LoftupError
from loftup.training.checkpoint import save_model
from loftup.training.data import IMAGENET_MEAN, IMAGENET_STD
from loftup.training.inference import upsample_image
from loftup.training.model import LoftUp


def test_without_weights_it_says_what_to_pass(photo, tmp_path):
    with pytest.raises(LoftupError, match="--checkpoint .*--official"):
        upsample_image(photo, out_dir=tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_upsample_with_our_checkpoint(photo, tmp_path, fmt):
    torch.manual_seed(0)
    model = LoftUp(16).eval()
    ckpt = save_model(model, tmp_path / "m.safetensors", extra={"backbone": "patchconv"})
    net = PatchConv()
    res = upsample_image(
        photo, checkpoint=ckpt, backbone=net, size=48, backbone_res=35, out_dir=tmp_path / "o", fmt=fmt
    )
    assert res["shape"] == (16, 48, 48) and res["lr_grid"] == (4, 4) and res["backbone_res"] == 32
    if fmt == "npy":
        feats = torch.from_numpy(np.load(res["features"]))
    else:
        from safetensors.torch import load_file

        feats = load_file(str(res["features"]))["features"]
    # Same numbers as running the pieces by hand on the stored geometry.
    from loftup.storage.geometry import resize_image

    src = Image.open(photo).convert("RGB")
    to_t = lambda im: torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)[None]  # noqa: E731
    with torch.no_grad():
        lr = net(to_t(resize_image(src, 32)))
        guide = (to_t(resize_image(src, 48)) - IMAGENET_MEAN) / IMAGENET_STD
        expect = model(lr, guide)[0]
    assert torch.allclose(feats, expect, atol=1e-5)
    png = Image.open(res["picture"])
    assert png.width > 4 * 48 and png.height > 48
    with pytest.raises(LoftupError, match="dim|16-d"):
        upsample_image(photo, checkpoint=ckpt, backbone=PatchConv(dim=8), size=48, out_dir=tmp_path)


def test_upsample_with_registered_backbone(photo, tmp_path):
    backbones = pytest.importorskip("loftup.pipeline.backbones")
    assert "dinov2_vits14" in backbones.list_backbones()
    torch.manual_seed(0)
    official = tmp_path / "official.pth"
    torch.save({"state_dict": LoftUp(384).state_dict()}, official)
    res = upsample_image(
        photo, official=official, backbone="dinov2_vits14", random_init=True, size=56, backbone_res=56, out_dir=tmp_path
    )
    assert res["shape"] == (384, 56, 56) and res["lr_grid"] == (4, 4)
    assert res["picture"].exists()


# -- pictures -----------------------------------------------------------------------------------


def test_pca_rgb_shares_one_fit_and_upsamples_small_maps():
    g = torch.Generator().manual_seed(0)
    hr = torch.randn(8, 20, 30, generator=g)
    lr = hr[:, ::5, ::5].clone()
    a, b, c = pca_rgb([hr, lr, hr.numpy().astype(np.float16)], fit_on=0)
    assert a.shape == b.shape == c.shape == (20, 30, 3) and a.dtype == np.uint8
    # One fit: the low-res pixels keep the colours they have at full resolution.
    assert np.array_equal(b[::5, ::5], a[::5, ::5])
    assert np.array_equal(b[:5, :5], np.broadcast_to(a[0, 0], (5, 5, 3)))
    assert np.abs(c.astype(int) - a.astype(int)).max() <= 2  # float16 copy
    assert a.std() > 20  # colours spread over the range


def test_save_panels_and_overlay(tmp_path):
    img = np.full((40, 50, 3), 100, np.uint8)
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 5:20, 5:20] = True
    masks[1, 25:35, 30:45] = True
    over = overlay_masks(img, masks)
    assert over.shape == img.shape and over.dtype == np.uint8
    assert np.array_equal(over[~masks.any(0)], img[~masks.any(0)])
    assert not np.array_equal(over[10, 10], over[30, 35])  # two colours
    small = Image.fromarray(np.zeros((20, 25, 3), np.uint8))
    path = save_panels([img, over, small], ["image", "masks", "small"], tmp_path / "p.png")
    out = Image.open(path)
    assert out.height > 40 and out.width >= 50 + 50 + 50 + 4 * 6
    arr = np.asarray(out.convert("RGB"))
    assert (arr < 50).any()  # titles drawn in black
    with pytest.raises(ValueError):
        save_panels([img], ["a", "b"], tmp_path / "q.png")
    # Small outputs are drawn at least 224 px high, each pixel a nearest-neighbour block.
    tiny = np.arange(56 * 56 * 3, dtype=np.uint8).reshape(56, 56, 3)
    big = np.asarray(Image.open(save_panels([tiny], None, tmp_path / "t.png", gap=0)).convert("RGB"))
    assert big.shape == (224, 224, 3)
    np.testing.assert_array_equal(big[::4, ::4], tiny)
    np.testing.assert_array_equal(big[3::4, 3::4], tiny)
