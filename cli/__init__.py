"""The console scripts. Each runs its typer app through :func:`_entry`, so that a command of the
full install, started from a store-reading install (``pip install loftup``), says in one line
what to install instead of ending in a traceback. (``*_main``: the submodules own the plain names.)"""

from __future__ import annotations

# The packages of the ``[full]`` extra, by import name.
FULL_ONLY = frozenset(
    ("torch", "torchvision", "ray", "timm", "segment_anything", "skimage", "sklearn", "h5py", "imgviz", "safetensors")
)


def _entry(name: str) -> None:
    import importlib
    import sys

    try:
        importlib.import_module(f"loftup.cli.{name}").main()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in FULL_ONLY:
            raise
        print(
            f"error: this command needs {exc.name}, which the full install has: pip install 'loftup[full]'",
            file=sys.stderr,
        )
        sys.exit(2)


def loftup_main() -> None:
    _entry("infer")


def pipeline_main() -> None:
    _entry("pipeline")


def train_main() -> None:
    _entry("train")


def store_main() -> None:
    _entry("store")
