"""``loftup``: use a trained upsampler (``loftup upsample``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loftup.cli.common import JsonOpt, VersionOpt, console, print_json, renamed, run, stdout

HELP = """Use a LoftUp upsampler: high-resolution features of an image, written as a file and a PCA
picture. Python: loftup.upsample(image, upsampler)."""
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)


@app.callback()
def _options(version: bool = VersionOpt) -> None:
    pass


@app.command()
def upsample(
    image: Path = typer.Argument(..., help="Image file to upsample the features of."),
    checkpoint: Optional[Path] = typer.Option(None, help="Our checkpoint (stage1/stage2 .safetensors)."),
    official: Optional[str] = typer.Option(
        None,
        help="A released LoftUp: dinov2s, dinov2s_reg, dinov2b, dinov2b_reg, clip, siglip, siglip2 (local HF cache) or its .bin path.",
    ),
    backbone: Optional[str] = typer.Option(
        None,
        help="Backbone for the low-res features (default: the one the upsampler was trained for, else dinov2_vits14).",
    ),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file."),
    random_init: bool = typer.Option(False, help="Random backbone weights (demos)."),
    res: int = typer.Option(224, help="Backbone input size."),
    backbone_res: Optional[int] = typer.Option(None, "--backbone-res", hidden=True),
    size: int = typer.Option(448, help="Output feature resolution."),
    out: Path = typer.Option(Path("upsampled"), help="Output directory."),
    fmt: str = typer.Option("safetensors", help="Feature file format: safetensors or npy."),
    as_json: bool = JsonOpt,
):
    """Upsample one image's features; writes the HR features and a PCA picture (with bilinear)."""
    from rich.table import Table

    from loftup.training.inference import upsample_image

    res = renamed(res, backbone_res, "--res", "--backbone-res", default=224)
    result = upsample_image(
        image,
        checkpoint=checkpoint,
        official=official,
        backbone=backbone,
        weights=weights,
        random_init=random_init,
        size=size,
        out_dir=out,
        fmt=fmt,
        backbone_res=res,
    )
    if as_json:
        print_json(result)
        return
    t = Table(title="upsample")
    t.add_column("field")
    t.add_column("value", overflow="fold")
    for k, v in result.items():
        t.add_row(k, str(v))
    stdout.print(t)
    console.print(f"wrote {result['features']} and {result['picture']}")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
