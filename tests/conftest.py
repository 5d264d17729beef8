"""Shared fixtures. Tests build every dataset they need from installed packages."""

from __future__ import annotations

import os
import sys

# The fault-injection tests share faultlib.py (pytest runs with --import-mode=importlib).
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEPT_CLUSTER_DEFAULTS", "1")

import pytest


def pytest_configure(config):
    try:
        import torch

        # Two cores shared by pytest and any Ray/DDP workers a test starts.
        torch.set_num_threads(2)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory):
    from loftup.sample_data import write_sample_shards

    out = tmp_path_factory.mktemp("sa1b")
    write_sample_shards(out, tars=2, images_per_tar=4, seed=0)
    return out


@pytest.fixture
def tmp_store(tmp_path):
    from loftup.storage import open_store

    return open_store(tmp_path / "store", create=True)


@pytest.fixture(scope="session")
def read_only_store(tmp_path_factory):
    """A complete small store that tests only read: 2 images of the package photos (256 px),
    their masks and images at 224, random-weight DINOv2-S features at 224."""
    from loftup.sample_data import build_sample_store

    root = tmp_path_factory.mktemp("read_only") / "store"
    return build_sample_store(root, tars=1, images_per_tar=2, short_side=256, sizes=(224,))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Tiny tars and a store with masks, images and features of shards 0-1 (faultlib.make_world).
    Tests copy the store before damaging it."""
    from faultlib import make_world

    return make_world(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A small real photo (scikit-image's astronaut at 120 x 90) as a PNG file."""
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((120, 90), Image.BICUBIC).save(path)
    return path
