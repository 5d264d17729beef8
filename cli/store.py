"""``loftup-store``: inspect and query a store (manifest, job status, errors, masks, features).

Analysts can do the same from Python: ``loftup.storage.open_store(path).masks_dataset()``
(pyarrow), ``.masks_dask()``, ``.features(backbone, res).dask()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from loftup.cli.common import console, run

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
StoreArg = typer.Argument(..., help="Store root: a local path or an fsspec URL.")


def _open(store: str):
    from loftup.storage import open_store

    return open_store(store)


def print_status(st) -> None:
    from loftup.pipeline.progress import _human

    from loftup.storage.redact import redact_text

    t = Table(title=f"jobs in {redact_text(st.url)}")
    for col in (
        "job",
        "shards done",
        "damaged shards",
        "failed shards",
        "images",
        "masks",
        "failures",
        "bytes",
        "seconds",
        "images/s",
    ):
        t.add_column(col, justify="right" if col != "job" else "left")
    for job, s in sorted(st.summary().items()):
        secs = s.get("seconds", 0.0)
        rate = s.get("images", 0) / secs if secs else 0.0
        t.add_row(
            job,
            str(s.get("shards", 0)),
            str(s.get("damaged_shards", 0)),
            str(s.get("failed_shards", 0)),
            str(s.get("images", 0)),
            str(s.get("masks", "") or ""),
            str(s.get("failures", 0)),
            _human(s.get("bytes", 0)),
            f"{secs:.1f}",
            f"{rate:.2f}",
        )
    console.print(t)


@app.command()
def info(store: str = StoreArg):
    """The manifest: schema version, geometry, backbones, jobs and their configs."""
    console.print_json(json.dumps(_open(store).manifest, default=str))


@app.command()
def status(store: str = StoreArg):
    """Per job: shards done, damaged shards (files missing or resized since their commit; `verify
    --deep` also re-hashes them), failed shards, images, per-image failures, bytes, throughput."""
    print_status(_open(store))


@app.command()
def errors(
    store: str = StoreArg,
    job: Optional[str] = typer.Option(None, help="Only this job."),
    limit: int = typer.Option(50, help="Rows to print."),
):
    """Per-image failures, and shards that failed as a whole (stage 'shard'), recorded by the jobs."""
    table = _open(store).errors(job)
    t = Table(title=f"{table.num_rows} errors")
    for name in table.column_names:
        t.add_column(name)
    for row in table.slice(0, limit).to_pylist():
        t.add_row(*[str(row[c]) for c in table.column_names])
    console.print(t)


@app.command()
def masks(
    store: str = StoreArg,
    image_id: Optional[int] = typer.Option(None, help="Only this image."),
    shard: Optional[int] = typer.Option(None, help="Only this shard."),
    min_area: Optional[int] = typer.Option(None, help="Only masks at least this large (original pixels)."),
    columns: str = typer.Option(
        "image_id,ann_id,order,area,bbox,predicted_iou,stability_score,source", help="Columns to show."
    ),
    out: Optional[Path] = typer.Option(None, help="Write the selection to this Parquet file instead of printing."),
    limit: int = typer.Option(20, help="Rows to print."),
):
    """Query the mask store with pyarrow filters."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    expr = None
    for cond in (
        ds.field("image_id") == image_id if image_id is not None else None,
        ds.field("shard") == shard if shard is not None else None,
        ds.field("area") >= min_area if min_area is not None else None,
    ):
        if cond is not None:
            expr = cond if expr is None else expr & cond
    cols = [c.strip() for c in columns.split(",") if c.strip()]
    st = _open(store)
    unknown = [c for c in cols if c not in st.mask_schema.names and c != "shard"]
    if unknown:
        raise typer.BadParameter(
            f"unknown column(s) {', '.join(unknown)}; the mask table has {', '.join(st.mask_schema.names)}, shard",
            param_hint="--columns",
        )
    table = st.masks_dataset().to_table(columns=cols, filter=expr)
    if out:
        pq.write_table(table, out)
        console.print(f"wrote {table.num_rows} rows to {out}")
        return
    t = Table(title=f"{table.num_rows} masks")
    for c in cols:
        t.add_column(c)
    for row in table.slice(0, limit).to_pylist():
        t.add_row(*[str(row[c]) for c in cols])
    console.print(t)


@app.command()
def verify(
    store: str = StoreArg,
    deep: bool = typer.Option(
        False, "--deep", help="Also re-hash every file and read every page and chunk (checksums)."
    ),
):
    """Check every committed shard against its marker (files, sizes, rows) and find uncommitted data. Exit 1 on any problem."""
    from loftup.storage.verify import verify_store

    problems = verify_store(_open(store), deep=deep)
    if problems:
        for p in problems:
            console.print(f"[red]{p}")
        raise typer.Exit(1)
    console.print(
        "[green]store verified"
        + (" (deep: every checksum)" if deep else "")
        + ": every committed shard is complete and consistent"
    )


@app.command()
def show(
    store: str = StoreArg,
    image_id: int = typer.Option(..., help="Image to render."),
    out: Path = typer.Option(Path("show.png"), help="PNG to write."),
    size: int = typer.Option(224, help="Stored geometry to render."),
    backbone: Optional[str] = typer.Option(None, help="Also render this backbone's stored features (PCA colours)."),
    res: int = typer.Option(224, help="Backbone resolution of the stored features."),
):
    """Render an image with its masks overlaid (and its stored features as PCA colours)."""
    import numpy as np
    import torch

    from loftup.storage import rle
    from loftup.training.visualize import overlay_masks, pca_rgb, save_panels

    st = _open(store)
    img = np.asarray(st.image(image_id, size))
    rles = st.masks_for(image_id, size=size)
    panels, titles = [img], ["image"]
    if rles:
        panels.append(overlay_masks(img, rle.decode_many(rles)))
        titles.append(f"{len(rles)} masks")
    if backbone:
        feats = torch.from_numpy(np.asarray(st.features(backbone, res).get(image_id))).float()
        panels.append(pca_rgb([feats])[0])
        titles.append(f"{backbone}@{res} PCA")
    save_panels(panels, titles, out)
    console.print(f"wrote {out}")


@app.command()
def report(
    store: str = StoreArg,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the table as JSON to this path."),
    png: Optional[Path] = typer.Option(
        None, "--png", help="Also write a log-scale chart (both methods against number of images)."
    ),
    backbone: Optional[str] = typer.Option(None, help="Which per-image-optimised feature set (default: the first)."),
    res: Optional[int] = typer.Option(None, help="Its backbone input size."),
):
    """Scalability: one-pass pseudo-GT vs per-image optimisation, from the markers and files."""
    from loftup.storage.report import report_rows, scalability_report, write_png

    rep = scalability_report(_open(store), backbone=backbone, res=res)
    per = rep["per_image_optimisation"]
    t = Table(title=f"scalability of {rep['features']} in {rep['store']}")
    for col in (
        "",
        "one-pass pseudo-GT (ours, measured)",
        "per-image optimisation (ours, measured)",
        "paper (A100), reference",
    ):
        t.add_column(col)
    for row in report_rows(rep):
        t.add_row(*row)
    console.print(t)
    console.print(
        f"per-image seconds: {per['seconds_basis']}; devices {', '.join(per['device_names'] or per['devices'])}"
    )
    if json_out:
        json_out.write_text(json.dumps(rep, indent=1, default=str) + "\n")
        console.print(f"wrote {json_out}")
    if png:
        write_png(rep, png)
        console.print(f"wrote {png}")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
