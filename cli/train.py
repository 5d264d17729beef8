"""``loftup-train``: Stage 1, Stage 2, evaluation and inference. Thin: parse, call the library, print.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N $(which loftup-train) stage1 ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loftup.cli.common import console, run

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _ints(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    from loftup.pipeline.shards import parse_shards

    return parse_shards(text)


def _summary(title: str, result: dict) -> None:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("field")
    t.add_column("value", justify="right")
    for k, v in result.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        t.add_row(k, str(v))
    console.print(t)


def _config_command(name: str, module: str, config: str, doc: str, summary=None):
    """Register ``loftup-train NAME``: one option per field of the stage's config dataclass (declared
    once, with its help, in training/loop.py and the stage's module), then train and print a summary."""
    import dataclasses
    import importlib
    import inspect
    import typing

    mod = importlib.import_module(f"loftup.training.{module}")
    cls = getattr(mod, config)
    hints = typing.get_type_hints(cls)
    params, parsers = [], {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind, flag = hints[f.name], f"--{f.name.replace('_', '-')}"
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...  # required
        if f.metadata.get("parse") == "ints":
            parsers[f.name] = _ints
            kind, default = Optional[str], ",".join(map(str, default)) if isinstance(default, list) else default
        if kind in (bool, Optional[bool]):
            opt = typer.Option(default, f"{flag}/--no-{flag[2:]}", help=f.metadata["help"])
        else:
            opt = typer.Option(default, flag, help=f.metadata["help"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind))

    def command(**kwargs):
        kwargs = {k: parsers[k](v) if k in parsers else v for k, v in kwargs.items()}
        result = mod.train(cls(**kwargs))
        if summary is not None:
            summary(result)
        _summary(name.replace("stage", "stage "), result)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    command.__name__ = name
    app.command(name=name)(command)


def _stage2_summary(result: dict) -> None:
    result["timings"] = {k: round(v, 2) for k, v in result.get("timings", {}).items()}


_config_command("stage1", "stage1", "Stage1Config",
                "Stage 1: mask-refined bicubic pseudo-GT built on the fly from stored features and masks.")
_config_command("stage2", "stage2", "Stage2Config",
                "Stage 2: self-distillation from an EMA teacher on HR crops, the VFM run live.", _stage2_summary)


@app.command()
def evaluate(
    store: str = typer.Option(..., help="Store with images, masks and features."),
    shards: str = typer.Option(..., help="Held-out shards to evaluate on."),
    checkpoint: list[Path] = typer.Option([], help="Checkpoints to compare (repeatable)."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone of the stored features."),
    res: int = typer.Option(224, help="Backbone input size of the stored features."),
    size: int = typer.Option(224, help="Evaluation resolution."),
    limit: Optional[int] = typer.Option(None, help="At most this many images."),
):
    """Nearest-prototype mIoU against stored instance masks: checkpoints vs bilinear/bicubic."""
    import numpy as np

    from loftup.storage import open_store
    from loftup.training.checkpoint import load_model
    from loftup.training.evaluate import evaluate_store, standard_upsamplers

    st = open_store(store)
    ids = np.concatenate([st.image_ids(s) for s in _ints(shards)])[:limit]
    rows = {}
    projection = None
    ups = standard_upsamplers()
    for ck in checkpoint:
        model, meta = load_model(ck, with_meta=True)
        projection = meta.get("projection_module")
        ups[ck.stem] = (lambda m: (lambda f, img, sz: m.eval()(f, img, output_size=sz)))(model)
    rows = evaluate_store(st, ids, backbone, res, ups, size=size, projection=projection)
    _summary(f"prototype mIoU on {len(ids)} held-out images", rows)


@app.command()
def upsample(
    image: Path = typer.Argument(..., help="Image file to upsample the features of."),
    checkpoint: Optional[Path] = typer.Option(None, help="Our checkpoint (stage1/stage2 .safetensors)."),
    official: Optional[Path] = typer.Option(None, help="An officially released LoftUp checkpoint (.pth)."),
    backbone: str = typer.Option("dinov2_vits14", help="Backbone to compute the low-res features."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file."),
    random_init: bool = typer.Option(False, help="Random backbone weights (demos)."),
    backbone_res: int = typer.Option(224, help="Backbone input size."),
    size: int = typer.Option(448, help="Output feature resolution."),
    out: Path = typer.Option(Path("upsampled"), help="Output directory."),
    fmt: str = typer.Option("safetensors", help="Feature file format: safetensors or npy."),
):
    """Upsample one image's features; writes the HR features and a PCA picture (with bilinear)."""
    from loftup.training.inference import upsample_image

    result = upsample_image(
        image, checkpoint=checkpoint, official=official, backbone=backbone, weights=weights, random_init=random_init,
        backbone_res=backbone_res, size=size, out_dir=out, fmt=fmt,
    )
    _summary("upsample", {k: str(v) for k, v in result.items()})


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
