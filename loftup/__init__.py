"""LoftUp at scale: pipeline (loftup.pipeline), stores (loftup.storage), trainer (loftup.training).

``loftup.upsample(image, upsampler=...)`` gives an image's high-resolution features in memory;
``loftup.pca_picture`` and ``loftup.show_masks`` draw features and masks as PIL images.
Every name here imports lazily, so ``import loftup`` stays light and reading a store or drawing
a picture never pulls in torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loftup")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "LoftUp": "loftup.training.model",
    "create_backbone": "loftup.pipeline.backbones",
    "list_backbones": "loftup.pipeline.backbones",
    "backbone_info": "loftup.pipeline.backbones",
    "open_store": "loftup.storage",
    "RELEASES": "loftup.training.releases",
    "upsample": "loftup.training.inference",
    "load_upsampler": "loftup.training.inference",
    "pca_picture": "loftup.pictures",
    "show_masks": "loftup.pictures",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loftup' has no attribute {name!r}")
