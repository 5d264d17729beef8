"""``loftup-store``: inspect and query a store (manifest, job status, errors, masks, features),
export its masks as COCO and browse it as an HTML gallery.

Analysts can do the same from Python: ``loftup.storage.open_store(path).masks_dataset()``
(pyarrow), ``.masks_dask()``, ``.features(backbone, res).dask()``. Reading commands need neither
torch nor Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from loftup.cli.common import JsonOpt, VersionOpt, console, print_json, print_table, renamed, run, stdout
from loftup.storage.errors import LoftupError

HELP = """Inspect and query a store: manifest, job status, errors, masks and features; export its masks
as COCO; browse it as an HTML gallery. Needs neither torch nor Ray. From Python:
loftup.storage.open_store(path)."""
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)


@app.callback()
def _options(version: bool = VersionOpt) -> None:
    pass


def _open(store: str):
    from loftup.storage import open_store

    return open_store(store)


StoreOpt = typer.Option(None, "--store", help="Store root: a local path or an fsspec URL.", show_default=False)
# The store as a positional argument, as these commands took it before --store: kept working, not shown.
StorePos = typer.Argument(None, metavar="STORE", hidden=True, show_default=False)


def _either(positional: Optional[str], option: Optional[str]) -> str:
    if positional and option and positional != option:
        raise typer.BadParameter(f"two stores given: {positional} and {option}", param_hint="--store")
    if not (positional or option):
        raise typer.BadParameter("give the store: --store STORE", param_hint="--store")
    return positional or option


def _cell(value) -> str:
    """A value as short as it reads: 0.9710, [37, 45, 7, 14], not 0.97101628780364 or [37.0, 45.0, ...]."""
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_cell, value)) + "]"
    return str(value)


def _print_rows(title: str, table, columns: list[str], limit: int) -> None:
    shown = min(limit, table.num_rows)
    caption = f"showing {shown} of {table.num_rows} rows (--limit N for more)" if shown < table.num_rows else None
    t = Table(title=title, caption=caption)
    rows = [[_cell(row[c]) for c in columns] for row in table.slice(0, shown).to_pylist()]
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*row)
    print_table(t, ["  ".join(f"{c}={v}" for c, v in zip(columns, row)) for row in rows])


# What "seconds" means in `status`: each shard's own work, summed (wall time of a job is in its summary).
STATUS_SECONDS = "task s: seconds of shard work, summed over shards (not wall time)"


def print_status(st) -> None:
    """The status table, or at narrow widths one line per job."""
    from loftup.pipeline.progress import _human

    t = status_table(st)
    lines = [
        f"{job}: {s.get('shards', 0)} done, {s.get('damaged_shards', 0)} damaged, {s.get('failed_shards', 0)} failed "
        f"shards; {s.get('images', 0)} images"
        + (f", {s['masks']} masks" if s.get("masks") else "")
        + f", {s.get('failures', 0)} failures; {_human(s.get('bytes', 0))}; task {s.get('seconds', 0.0):.1f} s"
        for job, s in sorted(st.summary().items())
    ]
    print_table(t, lines)


def status_table(st) -> Table:
    from loftup.pipeline.progress import _human
    from loftup.storage.redact import redact_text

    t = Table(title=f"jobs in {redact_text(st.url)}", caption=STATUS_SECONDS)
    t.add_column("job", overflow="fold")
    for col in ("done", "damaged", "failed", "images", "masks", "failures", "bytes", "task s", "images/s"):
        t.add_column(col, justify="right", no_wrap=True)
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
    return t


def status_json(st) -> dict:
    from loftup.storage.redact import redact_text

    return {"store": redact_text(st.url), "seconds": "shard work summed over shards", "jobs": st.summary()}


@app.command()
def info(store_pos: Optional[str] = StorePos, store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """The manifest: schema version, geometry, backbones, jobs and their configs."""
    manifest = _open(_either(store_pos, store)).manifest
    if as_json:
        print_json(manifest)
    else:
        stdout.print_json(json.dumps(manifest, default=str))


@app.command()
def status(store_pos: Optional[str] = StorePos, store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    """Per job: shards done, damaged shards (files missing or resized since their commit; `verify
    --deep` also re-hashes them), failed shards, images, per-image failures, bytes, throughput."""
    st = _open(_either(store_pos, store))
    if as_json:
        print_json(status_json(st))
    else:
        print_status(st)


@app.command()
def errors(
    store_pos: Optional[str] = StorePos,
    store: Optional[str] = StoreOpt,
    job: Optional[str] = typer.Option(None, help="Only this job."),
    limit: Optional[int] = typer.Option(None, help="Rows to show (default: 50 in the table, all with --json)."),
    as_json: bool = JsonOpt,
):
    """Per-image failures, and shards that failed as a whole (stage 'shard'), recorded by the jobs."""
    st = _open(_either(store_pos, store))
    if job is not None and job not in st.jobs():
        raise LoftupError(f"no job {job!r} has run on this store; its jobs: {', '.join(st.jobs()) or 'none'}")
    table = st.errors(job)
    if as_json:
        rows = table.slice(0, limit if limit is not None else table.num_rows).to_pylist()
        print_json({"errors": table.num_rows, "rows": rows})
        return
    _print_rows(f"{table.num_rows} errors", table, table.column_names, 50 if limit is None else limit)


@app.command()
def masks(
    store_pos: Optional[str] = StorePos,
    store: Optional[str] = StoreOpt,
    image_id: Optional[int] = typer.Option(None, help="Only this image."),
    shards: Optional[str] = typer.Option(None, help="Only these shards, e.g. 0-3,7."),
    shard: Optional[int] = typer.Option(None, "--shard", hidden=True),  # the old name of --shards N
    min_area: Optional[int] = typer.Option(None, help="Only masks at least this large (original pixels)."),
    columns: str = typer.Option(
        "image_id,ann_id,order,area,bbox,predicted_iou,stability_score,source", help="Columns to show."
    ),
    out_file: Optional[Path] = typer.Option(
        None, "--out", help="Write the selection to this Parquet file instead of printing."
    ),
    limit: Optional[int] = typer.Option(None, help="Rows to show (default: 20 in the table, all with --json)."),
    as_json: bool = JsonOpt,
):
    """Query the mask store with pyarrow filters."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from loftup.pipeline.shards import parse_shards

    spec = renamed(shards, None if shard is None else str(shard), "--shards", "--shard")
    wanted = parse_shards(spec) if spec else None
    expr = None
    for cond in (
        ds.field("image_id") == image_id if image_id is not None else None,
        ds.field("shard").isin(wanted) if wanted else None,
        ds.field("area") >= min_area if min_area is not None else None,
    ):
        if cond is not None:
            expr = cond if expr is None else expr & cond
    cols = [c.strip() for c in columns.split(",") if c.strip()]
    st = _open(_either(store_pos, store))
    unknown = [c for c in cols if c not in st.mask_schema.names and c != "shard"]
    if unknown:
        raise typer.BadParameter(
            f"unknown column(s) {', '.join(unknown)}; the mask table has {', '.join(st.mask_schema.names)}, shard",
            param_hint="--columns",
        )
    table = st.masks_dataset().to_table(columns=cols, filter=expr)
    if out_file:
        pq.write_table(table, out_file)
        console.print(f"wrote {table.num_rows} rows to {out_file}")
        return
    if as_json:
        rows = table.slice(0, limit if limit is not None else table.num_rows).to_pylist()
        print_json({"masks": table.num_rows, "rows": rows})
        return
    _print_rows(f"{table.num_rows} masks", table, cols, 20 if limit is None else limit)


@app.command()
def verify(
    store_pos: Optional[str] = StorePos,
    store: Optional[str] = StoreOpt,
    deep: bool = typer.Option(
        False, "--deep", help="Also re-hash every file and read every page and chunk (checksums)."
    ),
    as_json: bool = JsonOpt,
):
    """Check every committed shard against its marker (files, sizes, rows) and find uncommitted data. Exit 1 on any problem."""
    from loftup.storage.verify import verify_store

    problems = verify_store(_open(_either(store_pos, store)), deep=deep)
    if as_json:
        print_json({"ok": not problems, "deep": deep, "problems": problems})
    elif problems:
        for p in problems:
            stdout.print(f"[red]{p}", highlight=False, soft_wrap=True)
    else:
        stdout.print(
            "[green]store verified"
            + (" (deep: every checksum)" if deep else "")
            + ": every committed shard is complete and consistent"
        )
    if problems:
        raise typer.Exit(1)


@app.command()
def show(
    store_pos: Optional[str] = StorePos,
    store: Optional[str] = StoreOpt,
    image_id: int = typer.Option(..., help="Image to render."),
    out: Path = typer.Option(Path("show.png"), help="PNG to write."),
    geometry: int = typer.Option(224, help="Stored geometry to render."),
    size: Optional[int] = typer.Option(None, "--size", hidden=True),  # the old name of --geometry
    backbone: Optional[str] = typer.Option(
        None, help="Also render this backbone's stored features as PCA colours (default: the store's one feature set)."
    ),
    res: Optional[int] = typer.Option(None, help="Backbone input size of those features (default: from the store)."),
    top: int = typer.Option(30, help="Masks drawn: the largest this many (0: all)."),
    min_area: int = typer.Option(0, help="Masks drawn: only those of at least this many pixels at --geometry."),
):
    """Render an image with its largest masks overlaid (and its stored features as PCA colours)."""
    from loftup.cli.common import feature_set
    from loftup.pictures import pca_picture, save_panels, show_masks, thin_masks

    size = renamed(geometry, size, "--geometry", "--size", default=224)
    st = _open(_either(store_pos, store))
    img = st.image(image_id, size)
    rles = st.masks_for(image_id, size=size)
    panels, titles = [img], ["image"]
    if rles:
        chosen = thin_masks(rles, top=top or None, min_area=min_area)
        panels.append(show_masks(img, rles, ids=chosen))
        titles.append(f"{len(chosen)} of {len(rles)} masks")
    if backbone or res or st.feature_sets():
        backbone, res = feature_set(st, backbone, res)
        panels.append(pca_picture(st.features(backbone, res).get(image_id)))
        titles.append(f"{backbone}@{res} PCA")
    save_panels(panels, titles, out)
    console.print(f"wrote {out}: " + ", ".join(titles))


@app.command("export-coco")
def export_coco(
    store_pos: Optional[str] = StorePos,
    store: Optional[str] = StoreOpt,
    out: Path = typer.Option(..., help="Folder for one COCO instances JSON per shard (shard=NNNNNN.json)."),
    shards: Optional[str] = typer.Option(
        None, help="Shards to export, e.g. 0-9,12 (default: every committed masks shard)."
    ),
    geometry: Optional[int] = typer.Option(
        None,
        help="A stored geometry (e.g. 224): its masks, with the stored crops written beside the JSON. Default: original size.",
    ),
    size: Optional[int] = typer.Option(None, "--size", hidden=True),  # the old name of --geometry
):
    """Masks as COCO instance JSON (category 'object', RLE segmentations), one file per shard,
    for pycocotools, FiftyOne or CVAT."""
    from loftup.pipeline.shards import parse_shards
    from loftup.storage.coco import export_coco as export

    st = _open(_either(store_pos, store))
    done = sorted(st.done_shards("masks"))
    chosen = parse_shards(shards) if shards else done
    missing = sorted(set(chosen) - set(done))
    if missing:
        raise LoftupError(
            f"no committed masks for shard(s) {', '.join(map(str, missing))}; committed: {', '.join(map(str, done)) or 'none'}"
        )
    size = renamed(geometry, size, "--geometry", "--size")
    for shard in chosen:
        r = export(st, shard, out, size=size)
        console.print(f"wrote {r['path']}: {r['images']} images, {r['annotations']} masks")


@app.command()
def gallery(
    store_pos: Optional[str] = StorePos,
    store: Optional[str] = StoreOpt,
    out: Path = typer.Option(..., help="Folder for index.html and its pictures."),
    shards: Optional[str] = typer.Option(None, help="Shards to show pictures of, e.g. 0-3 (default: all with images)."),
    per_shard: int = typer.Option(8, help="Images per shard."),
    features: Optional[str] = typer.Option(
        None, help="Feature set to draw as PCA, backbone@res (default: the store's first; 'none' for none)."
    ),
    top: int = typer.Option(30, help="Masks drawn per image: the largest this many."),
):
    """A static HTML page: job status per shard, and thumbnails of masks and feature PCA linking
    to full-size pictures. Open OUT/index.html in a browser."""
    from loftup.pipeline.shards import parse_shards
    from loftup.storage.gallery import write_gallery

    st = _open(_either(store_pos, store))
    r = write_gallery(
        st,
        out,
        shards=parse_shards(shards) if shards else None,
        per_shard=per_shard,
        feature_set="" if features == "none" else features,
        top=top,
    )
    console.print(
        f"wrote {r['path']}: {r['images']} images, {r['pictures']} pictures in {r['seconds']:.1f} s "
        f"({r['seconds_per_picture']:.3f} s each)"
    )


@app.command()
def report(
    store_pos: Optional[str] = StorePos,
    store: Optional[str] = StoreOpt,
    as_json: bool = JsonOpt,
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write the report as JSON to this file."),
    png: Optional[Path] = typer.Option(
        None, "--png", help="Also write a log-scale chart (both methods against number of images)."
    ),
    backbone: Optional[str] = typer.Option(None, help="Which per-image-optimised feature set (default: the first)."),
    res: Optional[int] = typer.Option(None, help="Its backbone input size."),
):
    """Scalability: one-pass pseudo-GT vs per-image optimisation, from the markers and files."""
    from loftup.storage.report import report_rows, scalability_report, write_png

    rep = scalability_report(_open(_either(store_pos, store)), backbone=backbone, res=res)
    per = rep["per_image_optimisation"]
    if as_json:
        print_json(rep)
    else:
        t = Table(title=f"scalability of {rep['features']} in {rep['store']}")
        for col in ("", "one-pass pseudo-GT (ours)", "per-image optimisation (ours)", "paper (A100)"):
            t.add_column(col, overflow="fold")
        for row in report_rows(rep):
            t.add_row(*row)
        stdout.print(t)
        stdout.print(
            f"ours: measured on this store; paper: reference. per-image seconds: {per['seconds_basis']}; "
            f"devices {', '.join(per['device_names'] or per['devices'])}",
            highlight=False,
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
