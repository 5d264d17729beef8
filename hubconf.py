"""torch.hub entries named like the authors' (``loftup_dinov2s``, ...), working offline.

    model = torch.hub.load("/path/to/this/clone", "loftup_dinov2s", source="local")
    model = torch.hub.load(..., "loftup_clip", source="local", path="loftup_clip.bin")

``pretrained=True`` reads the release from the local Hugging Face cache (never the network)
or from ``path``; ``pretrained=False`` gives an untrained LoftUp of the right width. Works
from an installed ``loftup`` or from a plain clone that was never installed.
"""

dependencies = ["torch", "safetensors"]


def _ensure_importable() -> None:
    # A clone that was never pip-installed has loftup/ and the four package folders side by
    # side; map them onto the loftup namespace the way pyproject's package-dir does.
    import importlib.util
    import sys
    from pathlib import Path

    try:
        import loftup.training.model  # noqa: F401

        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parent
    for name in [k for k in sys.modules if k == "loftup" or k.startswith("loftup.")]:
        del sys.modules[name]
    packages = {
        "loftup": "loftup",
        "loftup.storage": "storage",
        "loftup.pipeline": "pipeline",
        "loftup.training": "training",
        "loftup.cli": "cli",
    }
    for mod, folder in packages.items():
        spec = importlib.util.spec_from_file_location(
            mod, root / folder / "__init__.py", submodule_search_locations=[str(root / folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod] = module
        spec.loader.exec_module(module)
        if "." in mod:
            setattr(sys.modules["loftup"], mod.split(".", 1)[1], module)


def _entry(name: str):
    def load(pretrained: bool = True, path=None, image_scaling: str = "image", device="cpu", **kwargs):
        _ensure_importable()
        from loftup.training.model import LoftUp
        from loftup.training.releases import RELEASES

        if not pretrained:
            return LoftUp(RELEASES[name].dim, image_scaling=image_scaling, **kwargs).eval()
        return LoftUp.from_pretrained(path or name, device=device, image_scaling=image_scaling)

    load.__name__ = f"loftup_{name}"
    load.__doc__ = (
        f"The released LoftUp for {name} (haiwen/loftup-{name}); path= a local copy of its "
        f"pytorch_model.bin, else the local HF cache."
    )
    return load


loftup_dinov2s = _entry("dinov2s")
loftup_dinov2s_reg = _entry("dinov2s_reg")
loftup_dinov2b = _entry("dinov2b")
loftup_dinov2b_reg = _entry("dinov2b_reg")
loftup_clip = _entry("clip")
loftup_siglip = _entry("siglip")
loftup_siglip2 = _entry("siglip2")
