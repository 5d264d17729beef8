"""Names in the store's layout that several rooms build: a backbone's feature set and the key of
a per-backbone job (its marker directory and its group in the store)."""

from __future__ import annotations


def feature_set(backbone: str, res: int) -> str:
    """A backbone's features at an input resolution: ``backbone@res``."""
    return f"{backbone}@{int(res)}"


def job_key(kind: str, backbone: str, res: int) -> str:
    """The job writing ``kind`` (features, pseudogt, implicit) of a feature set: ``kind/backbone@res``."""
    return f"{kind}/{feature_set(backbone, res)}"
