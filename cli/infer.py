"""``loftup``: use a trained upsampler (``loftup upsample``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loftup.cli.common import JsonOpt, VersionOpt, console, print_json, renamed, run, stdout, with_options
from loftup.training.inference_options import UpsampleOptions

HELP = """Use a LoftUp upsampler: high-resolution features of an image, written as a file and a PCA
picture. Python: loftup.upsample(image, upsampler)."""
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)


@app.callback()
def _options(version: bool = VersionOpt) -> None:
    pass


# --backbone-res was the name of --res before the CLIs shared one vocabulary: still accepted, not shown.
_OLD_RES = typer.Option(None, "--backbone-res", hidden=True)


@app.command()
@with_options(UpsampleOptions, "options")
def upsample(
    image: Path = typer.Argument(..., help="Image file to upsample the features of."),
    options: UpsampleOptions = None,
    old_res: Optional[int] = _OLD_RES,
    as_json: bool = JsonOpt,
):
    """Upsample one image's features; writes the HR features and a PCA picture (with bilinear)."""
    from rich.table import Table

    from loftup.training.inference import upsample_image

    res = renamed(options.backbone_res, old_res, "--res", "--backbone-res", default=UpsampleOptions.backbone_res)
    result = upsample_image(image, options, backbone_res=res)
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
