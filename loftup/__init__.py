"""LoftUp at scale: pipeline (loftup.pipeline), stores (loftup.storage), trainer (loftup.training)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loftup")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
