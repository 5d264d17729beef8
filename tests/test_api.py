"""The public in-memory API: ``loftup.upsample``, ``loftup.pca_picture``, ``loftup.show_masks``,
each checked against a computation written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from standins import PatchConv

import loftup
from loftup.storage.errors import LoftupError


def _crop(path, size):
    """The store geometry, written out: short side to ``size`` (bicubic), centre crop."""
    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255).permute(
        2, 0, 1
    )[None]


def test_bilinear_is_the_backbones_features_interpolated_for_every_image_type(photo):
    net = PatchConv()
    with torch.no_grad():
        expect = F.interpolate(net(_crop(photo, 32)), size=(40, 40), mode="bilinear", align_corners=False)[0]
    rgb = np.array(Image.open(photo).convert("RGB"))
    for image in (photo, str(photo), Image.open(photo), rgb, torch.from_numpy(rgb).permute(2, 0, 1)):
        got = loftup.upsample(image, "bilinear", backbone=net, size=40, res=35)
        assert got.shape == (16, 40, 40) and got.dtype == torch.float32
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)
    # A float image in [0, 1] goes through the same 8-bit geometry.
    torch.testing.assert_close(
        loftup.upsample(rgb.astype(np.float32) / 255, "bilinear", backbone=net, size=40, res=32),
        expect,
        atol=1e-5,
        rtol=0,
    )
    nearest = loftup.upsample(photo, "nearest", backbone=net, size=40, res=32)
    torch.testing.assert_close(nearest, F.interpolate(net(_crop(photo, 32)), size=(40, 40))[0].detach())


def test_our_checkpoint_gives_what_the_model_gives_directly(photo, tmp_path):
    from loftup.training.checkpoint import save_model
    from loftup.training.data import IMAGENET_MEAN, IMAGENET_STD
    from loftup.training.inference import load_upsampler
    from loftup.training.model import LoftUp
    from loftup.training.projection import FeatureProjection

    torch.manual_seed(0)
    net = PatchConv(dim=16)
    with torch.no_grad():
        proj = FeatureProjection.fit(net(_crop(photo, 64)), 8)
    model = LoftUp(8).eval()
    ckpt = save_model(model, tmp_path / "m.safetensors", extra={"backbone": "patchconv"}, projection=proj)
    with torch.no_grad():
        lr = proj(net(_crop(photo, 32)))
        expect = model(lr, (_crop(photo, 48) - IMAGENET_MEAN) / IMAGENET_STD)[0]

    got = loftup.upsample(photo, ckpt, backbone=net, size=48, res=32)
    assert got.shape == (8, 48, 48) and got.is_contiguous()
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # Loaded once, used for many images: the same numbers.
    loaded = load_upsampler(ckpt)
    assert loaded[2] == "patchconv"
    torch.testing.assert_close(loftup.upsample(photo, loaded, backbone=net, size=48, res=32), expect, atol=1e-5, rtol=0)
    # The bare module carries no projection, so it is fed the projected features' width only.
    with pytest.raises(LoftupError, match="takes 8-d features but patchconv gives 16"):
        loftup.upsample(photo, model, backbone=net, size=48, res=32)
    # The checkpoint records its backbone: a different name is refused before any work.
    with pytest.raises(LoftupError, match="trained on backbone 'patchconv', not 'hed_vgg16'"):
        loftup.upsample(photo, ckpt, backbone="hed_vgg16")


def test_upsample_user_errors(photo, tmp_path):
    net = PatchConv()
    with pytest.raises(LoftupError, match="no upsampler"):
        loftup.upsample(photo, None, backbone=net)
    with pytest.raises(LoftupError, match="unknown LoftUp release or missing checkpoint 'nosuch'"):
        loftup.upsample(photo, "nosuch", backbone=net)
    with pytest.raises(LoftupError, match="not found"):
        loftup.upsample(tmp_path / "missing.jpg", "bilinear", backbone=net)
    with pytest.raises(LoftupError, match="HxWx3"):
        loftup.upsample(np.zeros((5, 6, 7, 8)), "bilinear", backbone=net)
    with pytest.raises(LoftupError, match="smaller than its patch size 8"):
        loftup.upsample(photo, "bilinear", backbone=net, res=7)


def test_import_loftup_stays_light():
    import subprocess
    import sys

    code = "import sys, loftup; loftup.pca_picture; loftup.show_masks; print(sorted({'torch', 'ray', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- pictures ----------------------------------------------------------------------------------


def test_pca_picture_colours_follow_the_leading_component():
    # Features that vary along x in one direction of channel space (and little otherwise): the
    # first principal component is x, so the red channel is a monotone function of x.
    g = np.random.default_rng(0)
    h, w, c = 12, 20, 32
    direction = g.standard_normal(c)
    x = np.linspace(-1, 1, w)
    feats = direction[:, None, None] * x[None, None, :] + 0.01 * g.standard_normal((c, h, w))
    pic = loftup.pca_picture(torch.from_numpy(feats).float())
    assert isinstance(pic, Image.Image) and pic.size == (w, h)
    red = np.asarray(pic)[..., 0].astype(float)
    assert abs(np.corrcoef(red.mean(0), x)[0, 1]) > 0.99
    # Two maps, one fit: a 2x subsampled copy keeps its pixels' colours; ``size`` scales by blocks.
    big, small = loftup.pca_picture([feats, feats[:, ::2, ::2]], size=(24, 40))
    assert big.size == small.size == (40, 24)
    np.testing.assert_array_equal(np.asarray(small)[::4, ::4], np.asarray(big)[::4, ::4])


def test_show_masks_thins_and_tints_like_the_formula():
    from loftup.pictures import palette
    from loftup.storage import rle

    img = np.full((30, 40, 3), 200, np.uint8)
    masks = np.zeros((4, 30, 40), bool)
    masks[0, 2:28, 2:38] = True  # large
    masks[1, 5:10, 5:10] = True  # small, inside mask 0
    masks[2, 15:25, 20:35] = True  # medium, inside mask 0
    masks[3, 0:3, 0:3] = True  # tiny, at the corner
    rles = [rle.encode(m) for m in masks]

    top2 = np.asarray(loftup.show_masks(img, masks, top=2))
    colours = palette(4).astype(float)  # overlays round half up: floor(x + 0.5)
    # the two largest (0, then 2 on top of it): interior pixels are (image + colour) / 2
    assert np.array_equal(top2[4, 20], np.floor(0.5 * 200 + 0.5 * colours[0] + 0.5).astype(np.uint8))
    assert np.array_equal(top2[20, 27], np.floor(0.5 * 200 + 0.5 * colours[2] + 0.5).astype(np.uint8))
    assert np.array_equal(top2[7, 7], top2[4, 20])  # mask 1 was thinned away
    assert np.array_equal(top2[1, 1], img[1, 1]) and np.array_equal(top2[29, 39], img[29, 39])
    # RLEs give the same picture as arrays, without decoding the masks that are thinned away
    assert np.array_equal(np.asarray(loftup.show_masks(img, rles, top=2)), top2)
    # chosen ids, drawn in the order given; min_area drops the small ones
    only = np.asarray(loftup.show_masks(img, rles, ids=[1]))
    assert np.array_equal(only[7, 7], np.floor(100 + 0.5 * colours[1] + 0.5).astype(np.uint8))
    assert np.array_equal(only[20, 27], img[20, 27])
    assert loftup.pictures.thin_masks(rles, top=None, min_area=30) == [0, 2]
    assert loftup.pictures.thin_masks(masks, top=None) == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="out of range"):
        loftup.show_masks(img, rles, ids=[4])
