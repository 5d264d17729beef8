"""The authors' seven released upsamplers: each loads strictly, offline, through every path
(name, repo id, file, official:NAME, hubconf, the upsample CLI) and gives the same output as a
plain ``load_state_dict(strict=True)`` of the released tensors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from loftup.storage.errors import LoftupError, WeightsError
from loftup.training.checkpoint import resolve_upsampler
from loftup.training.model import LoftUp
from loftup.training.releases import RELEASES, find_release

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "loftup_official_state_dict_dinov2s.json"
EXPECT = {
    "dinov2s": ("dinov2_vits14", 384),
    "dinov2s_reg": ("dinov2_vits14_reg", 384),
    "dinov2b": ("dinov2_vitb14", 768),
    "dinov2b_reg": ("dinov2_vitb14_reg", 768),
    "clip": ("clip_vitb16", 512),
    "siglip": ("siglip_vitb16", 768),
    "siglip2": ("siglip2_vitb16", 768),
}


def _released_state(dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors in the released layout, from the DINOv2-S reference: widths 384 -> dim,
    404 -> dim + 20 (features + grid encoding), 1212 -> 3 (dim + 20); the rest is fixed."""
    g = torch.Generator().manual_seed(seed)
    resize = {384: dim, 404: dim + 20, 1212: 3 * (dim + 20)}
    out = {}
    for e in json.loads(REFERENCE.read_text())["entries"]:
        shape = [resize.get(s, s) for s in e["shape"]]
        if e["dtype"] == "int64":
            out[e["key"]] = torch.tensor(7)
        elif e["key"].endswith("running_var"):
            out[e["key"]] = 0.5 + torch.rand(shape, generator=g)
        else:
            out[e["key"]] = 0.1 * torch.randn(shape, generator=g) + (1.0 if e["key"].endswith("norm.weight") else 0.0)
    return out


def _hf_cache_file(cache: Path, repo_id: str, filename: str) -> Path:
    """Where huggingface_hub keeps a downloaded file (models--org--name/snapshots/<rev>/...)."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    path = repo / "snapshots" / rev / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """Every release, as random tensors in its layout, in a private HF cache."""
    cache = tmp_path_factory.mktemp("hf")
    states = {}
    for i, (name, r) in enumerate(RELEASES.items()):
        states[name] = _released_state(r.dim, seed=i)
        torch.save(states[name], _hf_cache_file(cache, r.repo_id, r.filename))
    return cache, states


@pytest.fixture
def offline_cache(hf_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache[0]))
    return hf_cache


def test_the_release_table():
    assert {n: (r.backbone, r.dim) for n, r in RELEASES.items()} == EXPECT
    for name, r in RELEASES.items():
        assert (r.repo_id, r.filename, r.hub_entry) == (f"haiwen/loftup-{name}", "pytorch_model.bin", f"loftup_{name}")
        for spec in (name, f"loftup_{name}", r.repo_id, f"official:{name}"):
            assert find_release(spec) is r
    assert find_release("dinov3s") is None
    from loftup.pipeline.backbones import backbone_info

    assert all(backbone_info(r.backbone)["dim"] == r.dim for r in RELEASES.values())


def test_every_release_loads_strictly_through_every_path(offline_cache):
    import hubconf

    cache, states = offline_cache
    g = torch.Generator().manual_seed(5)
    for name, r in RELEASES.items():
        ref = LoftUp(r.dim, image_scaling="image")
        ref.load_state_dict(states[name], strict=True)  # torch's own strict loading, not ours
        ref.eval()
        lr = torch.randn(1, r.dim, 2, 3, generator=g)
        img = torch.randn(1, 3, 4, 6, generator=g)
        with torch.no_grad():
            expect = ref(lr, img)
        path = next(cache.glob(f"models--haiwen--loftup-{name}/snapshots/*/pytorch_model.bin"))
        models = {
            "name": LoftUp.from_pretrained(name),
            "repo id": LoftUp.from_pretrained(r.repo_id),
            "path": LoftUp.from_pretrained(path),
            "torch.hub": torch.hub.load(str(ROOT), f"loftup_{name}", source="local"),
        }
        if name == "clip":  # the other hubconf spellings once: a direct call, path=
            models["hubconf"] = hubconf.loftup_clip()
            models["torch.hub path="] = torch.hub.load(str(ROOT), "loftup_clip", source="local", path=str(path))
        model, projection, backbone = resolve_upsampler(f"official:{name}")
        models["official:"] = model
        assert projection is None and backbone == r.backbone
        for how, m in models.items():
            assert isinstance(m, LoftUp) and not m.training and m.dim == r.dim, (name, how)
            with torch.no_grad():
                assert torch.equal(m(lr, img), expect), (name, how)
    untrained = torch.hub.load(str(ROOT), "loftup_clip", source="local", pretrained=False)
    assert untrained.dim == 512


def test_missing_and_wrong_releases_are_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsError) as err:
        LoftUp.from_pretrained("siglip2")
    msg = str(err.value)
    assert "\n" not in msg and "haiwen/loftup-siglip2/pytorch_model.bin is not in the local HF cache" in msg
    assert "huggingface-cli download haiwen/loftup-siglip2 pytorch_model.bin" in msg
    with pytest.raises(LoftupError, match="unknown LoftUp release or missing checkpoint 'dinov3s'; releases: dinov2s"):
        LoftUp.from_pretrained("dinov3s")
    with pytest.raises(LoftupError, match="unknown LoftUp release 'official:nope'; known: official:dinov2s"):
        resolve_upsampler("official:nope")
    with pytest.raises(WeightsError, match=r"checkpoint .*absent\.pth not found"):
        resolve_upsampler(tmp_path / "absent.pth")
    # A 384-d file stored under the 768-d release's name.
    torch.save(
        _released_state(384, 0), _hf_cache_file(tmp_path / "empty", "haiwen/loftup-dinov2b", "pytorch_model.bin")
    )
    with pytest.raises(WeightsError, match="holds a 384-d upsampler, but dinov2b is 768-d"):
        LoftUp.from_pretrained("dinov2b")


def _cli(argv, monkeypatch, capsys, script="loftup-train"):
    """``loftup-train ARGV`` (or ``loftup ARGV``) in this process: its exit code, stdout and stderr."""
    from loftup.cli import infer, train

    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    try:
        (infer if script == "loftup" else train).main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_upsample_cli_with_official_name_uses_its_backbone(offline_cache, tmp_path, monkeypatch, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    from loftup.pipeline.backbones import create_backbone
    from loftup.storage.geometry import resize_image
    from loftup.training.data import normalise_float

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    code, _, err = _cli(
        [
            "upsample",
            tmp_path / "im.png",
            "--official",
            "dinov2s",
            "--random-init",
            "--backbone-res",
            28,
            "--size",
            32,
            "--out",
            tmp_path / "out",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "im_loftup32.safetensors"))["features"]
    # The same computation by hand: dinov2_vits14 (the release's backbone) on the 28 px crop.
    net = create_backbone("dinov2_vits14", random_init=True)
    src = Image.open(tmp_path / "im.png").convert("RGB")

    def tensor(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]

    ref = LoftUp(384)
    ref.load_state_dict(offline_cache[1]["dinov2s"], strict=True)
    with torch.no_grad():
        expect = ref.eval()(net(tensor(resize_image(src, 28))), normalise_float(tensor(resize_image(src, 32))))[0]
    assert got.shape == (384, 32, 32)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4)
    # `loftup-train upsample --backbone-res` above is the old spelling of `loftup upsample --res`.
    new = ["upsample", tmp_path / "im.png", "--official", "dinov2s", "--random-init", "--res", 28, "--size", 32]
    code, out, err = _cli([*new, "--out", tmp_path / "new", "--json"], monkeypatch, capsys, script="loftup")
    assert code == 0, err
    assert json.loads(out)["backbone_res"] == 28 and json.loads(out)["backbone"] == "dinov2_vits14"
    torch.testing.assert_close(load_file(str(tmp_path / "new" / "im_loftup32.safetensors"))["features"], got)
    code, _, err = _cli(
        ["upsample", tmp_path / "im.png", "--official", "dinov2s", "--backbone", "clip_vitb16", "--random-init"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and err.strip().count("\n") == 0
    assert "dinov2s was trained on backbone 'dinov2_vits14', not 'clip_vitb16'" in err
    code, _, err = _cli(["upsample", tmp_path / "im.png", "--official", "dinov4", "--random-init"], monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "unknown LoftUp release or missing checkpoint 'dinov4'" in err


def test_public_imports_are_lazy():
    import subprocess

    code = (
        "import sys, loftup; assert 'torch' not in sys.modules, 'import loftup pulled torch'; "
        "from loftup import open_store; assert 'torch' not in sys.modules, 'open_store pulled torch'; "
        "from loftup import LoftUp, create_backbone; from loftup.training import LoftUp as L2; "
        "assert L2 is LoftUp and callable(create_backbone); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_evaluate_checkpoint_official_name_goes_through_the_resolver(offline_cache):
    from loftup.training.evaluation.upsamplers import resolve_checkpoint

    up = resolve_checkpoint("official:siglip2")
    assert (up.name, up.trained_on, up.projection) == ("loftup_siglip2", "siglip2_vitb16", None)
    ref = LoftUp(768)
    ref.load_state_dict(offline_cache[1]["siglip2"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), up.module.state_dict().values()))


def test_backbones_command_lists_every_entry_with_patch_dim_and_weights(monkeypatch, capsys):
    import io

    from rich.console import Console

    from loftup.cli import common, pipeline
    from loftup.pipeline.backbones import backbone_info, list_backbones

    buf = io.StringIO()  # the listing is a result: stdout, as a table where it fits
    monkeypatch.setattr(common, "stdout", Console(file=buf, width=600))
    monkeypatch.setattr(sys, "argv", ["loftup-pipeline", "backbones"])
    with pytest.raises(SystemExit) as done:
        pipeline.main()
    assert done.value.code in (0, None)
    rows = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
        for line in buf.getvalue().splitlines()
        if line.startswith("│")
    }
    assert set(rows) == set(list_backbones()) and len(rows) == 11
    for name, cells in rows.items():
        info = backbone_info(name)
        assert cells[:2] == [str(info["patch"]), str(info["dim"])] and cells[3] == info["weights_hint"]
    assert "ViT-B-16.pt" in rows["clip_vitb16"][3] and "timm/ViT-B-16-SigLIP2" in rows["siglip2_vitb16"][3]
