"""LoftUp weights on disk: our safetensors + JSON checkpoints, and the released layout.

Our checkpoint is two files side by side: ``NAME.safetensors`` (weights) and
``NAME.json`` (the constructor config), so ``load_model(path)`` needs nothing else.
The released checkpoints use the key names ``upsampler.*`` plus ``channelnorm.norm.*`` (hub
models) or ``model.1.norm.*`` (the authors' Lightning training checkpoints).

The functions live in training/model_files.py for any model class (so training/model.py's
``LoftUp.from_pretrained`` and its kin need not import this module); here they build ``LoftUp``.
"""

from __future__ import annotations

from functools import partial

from loftup.training import model_files
from loftup.training.model import LoftUp
from loftup.training.model_files import (
    FORMAT,
    FORMAT_VERSION,
    OFFICIAL_SOURCE,
    PROJECTION_PREFIX,
    read_config,
    save_model,
    to_official_state_dict,
)

__all__ = [
    "save_model",
    "load_model",
    "read_config",
    "from_official",
    "to_official_state_dict",
    "load_official",
    "load_release",
    "resolve_upsampler",
    "OFFICIAL_SOURCE",
    "FORMAT",
    "FORMAT_VERSION",
    "PROJECTION_PREFIX",
]

load_model = partial(model_files.load_model, LoftUp)
from_official = partial(model_files.from_official, LoftUp)
load_official = partial(model_files.load_official, LoftUp)
load_release = partial(model_files.load_release, LoftUp)
resolve_upsampler = partial(model_files.resolve_upsampler, LoftUp)
