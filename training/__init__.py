"""The trainer: model, losses, Stage 1 / Stage 2, checkpoints, releases (``loftup.training.LoftUp``)."""


def __getattr__(name: str):
    # Lazy, so importing a training submodule does not build the model module first.
    if name in ("LoftUp", "from_pretrained"):
        from loftup.training.model import LoftUp

        return LoftUp if name == "LoftUp" else LoftUp.from_pretrained
    raise AttributeError(f"module 'loftup.training' has no attribute {name!r}")
