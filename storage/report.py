"""Scalability report: one-pass pseudo-GT (stored factors) against per-image optimisation.

Every figure of ours is read from the store: seconds from the jobs' commit markers, bytes from
the files on disk (sizes of the shards' outputs), counts from both. The paper's figures appear
only in the separate ``paper`` block, labelled as such. No torch.

One-pass pseudo-GT, per image:
    seconds = features job seconds / images + masks job seconds / images
              + measured pseudo-GT build seconds / images (``pseudogt`` job markers)
    bytes   = stored low-res features + stored masks (the factors the trainer reads)
Per-image optimisation, per image:
    seconds = the implicit job's marker seconds / images (as run), and FeatUp's full recipe
              extrapolated from the measured per-view and per-step rates when the run used
              fewer views or steps
    bytes   = compact (network + un-projector) and dense (fp16 Zarr) files / images
"""

from __future__ import annotations

from loftup.storage.commit import shard_name
from loftup.storage.errors import StoreError
from loftup.storage.layout import feature_set, job_key

SCALES = (50_000, 1_000_000, 11_000_000)  # 50K (the paper's example), 1M, all of SA-1B (~11M)
SCALE_NAMES = {50_000: "50K", 1_000_000: "1M", 11_000_000: "SA-1B (11M)"}

# The LoftUp paper's own figures (Sec. "scalability"; A100): reference only, never used in ours.
PAPER = {
    "source": "LoftUp paper, scalability paragraph and Table 1 (A100)",
    "per_image_optimisation": {
        "seconds_per_image": 54.3,
        "bytes_per_image": 74e6,
        "note": "about 1 min and 74 MB (224x224x384 fp32) per image",
    },
    "one_pass": {"seconds_per_image": 0.1, "note": "under 0.1 s per image"},
    "extrapolation": {"50000": {"gpu_days": 35, "bytes": 3.5e12}},
}


def _sum(markers, key) -> float:
    return float(sum((m.get(key) or 0) for m in markers))


def _du(fs, path: str) -> int:
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def _hours_label(devices: set[str]) -> str:
    if devices and all(d.startswith("cuda") for d in devices):
        return "GPU-hours"
    if devices and not any(d.startswith("cuda") for d in devices):
        return "CPU-hours"
    return "device-hours (mixed CPU/GPU)"


def scalability_report(store, backbone: str | None = None, res: int | None = None) -> dict:
    """The report as a dict: ``one_pass``, ``per_image_optimisation``, ``ratios``,
    ``extrapolation`` (keys "50000", "1000000", "11000000") and ``paper``."""
    from loftup.storage.implicit import implicit_sets, implicit_store

    sets = implicit_sets(store)
    if backbone is not None:
        sets = [s for s in sets if s.split("@")[0] == backbone and (res is None or s == feature_set(backbone, res))]
    if not sets:
        want = f" for {backbone}" if backbone else ""
        raise StoreError(f"no per-image optimisation{want} in {store.url}: run `loftup-pipeline implicit` first")
    name = sets[0]
    bb, r = name.rsplit("@", 1)
    r = int(r)
    feats_job, pgt_job, impl_job = (job_key(kind, bb, r) for kind in ("features", "pseudogt", "implicit"))
    need = {
        "masks": "loftup-pipeline masks",
        feats_job: f"loftup-pipeline features --backbone {bb} --res {r}",
        pgt_job: f"loftup-pipeline pseudogt --backbone {bb} --res {r} (it measures the pseudo-GT build time)",
    }
    markers = {}
    for job, cmd in need.items():
        done = store.done_shards(job)
        if not done:
            raise StoreError(f"store {store.url} has no finished {job} job; run `{cmd}` first")
        markers[job] = done
    impl = store.done_shards(impl_job)

    # -- one pass ----------------------------------------------------------------------------
    fm = list(markers[feats_job].values())
    mm = list(markers["masks"].values())
    pm = list(markers[pgt_job].values())
    f_images, m_images, p_images = _sum(fm, "images"), _sum(mm, "images"), _sum(pm, "images")
    if not (f_images and m_images and p_images):
        raise StoreError(f"store {store.url}: the features, masks and pseudogt jobs must each have processed images")
    f_bytes = sum(_du(store.fs, store.path("features", name, shard_name(s))) for s in markers[feats_job])
    m_bytes = sum(_du(store.fs, store.path("masks", shard_name(s))) for s in markers["masks"])
    one = {
        "images": int(f_images),
        "features_seconds_per_image": _sum(fm, "seconds") / f_images,
        "masks_seconds_per_image": _sum(mm, "seconds") / m_images,
        "pseudogt_seconds_per_image": _sum(pm, "pseudogt_seconds") / p_images,
        "features_bytes_per_image": f_bytes / f_images,
        "masks_bytes_per_image": m_bytes / m_images,
        "devices": sorted({str(m.get("device", "cpu")) for m in fm + pm} | {"cpu"}),
    }
    one["seconds_per_image"] = (
        one["features_seconds_per_image"] + one["masks_seconds_per_image"] + one["pseudogt_seconds_per_image"]
    )
    one["bytes_per_image"] = one["features_bytes_per_image"] + one["masks_bytes_per_image"]

    # -- per-image optimisation ----------------------------------------------------------------
    im = list(impl.values())
    n = _sum(im, "images")
    if not n:
        raise StoreError(f"store {store.url}: the {impl_job} job has no optimised image yet")
    istore = implicit_store(store, bb, r)
    compact = sum(istore.compact_bytes(s) for s in impl)
    dense = sum(istore.dense_bytes(s) for s in impl)
    dense_images = _sum(im, "dense_images")
    shapes = [istore.dense_shape(s) for s in impl if istore.has_dense(s)]
    views, steps = _sum(im, "views_total"), _sum(im, "steps_total")
    full = im[0].get("full_recipe") or {}
    per = {
        "images": int(n),
        "seconds_per_image_as_run": _sum(im, "seconds") / n,
        "fit_seconds_per_image": _sum(im, "fit_seconds") / n,
        "seconds_per_view": _sum(im, "featurize_seconds") / views if views else None,
        "seconds_per_step": _sum(im, "optimise_seconds") / steps if steps else None,
        "recipe_as_run": sorted({(int(m["recipe"]["views"]), int(m["recipe"]["steps"])) for m in im if "recipe" in m}),
        "full_recipe": full,
        "bytes_per_image": compact / n,
        "dense_bytes_per_image": dense / dense_images if dense_images else None,
        "dense_fp32_bytes_per_image": (4 * shapes[0][1] * shapes[0][2] * shapes[0][3]) if shapes else None,
        "devices": sorted({str(m.get("device", "cpu")) for m in im}),
        "device_names": sorted({str(m.get("device_name", "")) for m in im} - {""}),
    }
    as_full = all((v, s) == (full.get("views"), full.get("steps")) for v, s in per["recipe_as_run"])
    if as_full or per["seconds_per_view"] is None or per["seconds_per_step"] is None:
        per["seconds_per_image"] = per["seconds_per_image_as_run"]
        per["seconds_basis"] = "measured: FeatUp's full recipe as run"
    else:
        # Overheads outside featurisation and the steps (backbone build, writes) are added as measured.
        overhead = per["seconds_per_image_as_run"] - per["fit_seconds_per_image"]
        per["seconds_per_image"] = (
            full["views"] * per["seconds_per_view"] + full["steps"] * per["seconds_per_step"] + overhead
        )
        per["seconds_basis"] = (
            f"extrapolated to FeatUp's {full['views']} views x {full['steps']} steps from the measured "
            f"seconds per view and per step of runs at (views, steps) = {per['recipe_as_run']}"
        )

    # -- ratios and extrapolation -------------------------------------------------------------
    ratios = {
        "seconds": per["seconds_per_image"] / one["seconds_per_image"],
        "seconds_as_run": per["seconds_per_image_as_run"] / one["seconds_per_image"],
        "bytes_compact": per["bytes_per_image"] / one["bytes_per_image"],
        "bytes_dense": per["dense_bytes_per_image"] / one["bytes_per_image"] if per["dense_bytes_per_image"] else None,
        "bytes_dense_fp32": per["dense_fp32_bytes_per_image"] / one["bytes_per_image"]
        if per["dense_fp32_bytes_per_image"]
        else None,
    }
    label_one, label_per = _hours_label(set(one["devices"])), _hours_label(set(per["devices"]))
    extrapolation = {}
    for count in SCALES:
        row = {
            "name": SCALE_NAMES[count],
            "one_pass": {
                "hours": count * one["seconds_per_image"] / 3600,
                "hours_unit": label_one,
                "bytes": count * one["bytes_per_image"],
            },
            "per_image_optimisation": {
                "hours": count * per["seconds_per_image"] / 3600,
                "hours_unit": label_per,
                "bytes_compact": count * per["bytes_per_image"],
            },
        }
        if per["dense_bytes_per_image"]:
            row["per_image_optimisation"]["bytes_dense"] = count * per["dense_bytes_per_image"]
        if per["dense_fp32_bytes_per_image"]:
            row["per_image_optimisation"]["bytes_dense_fp32"] = count * per["dense_fp32_bytes_per_image"]
        extrapolation[str(count)] = row
    return {
        "store": store.url,
        "features": name,
        "one_pass": one,
        "per_image_optimisation": per,
        "ratios": ratios,
        "extrapolation": extrapolation,
        "paper": PAPER,
    }


# ---------------------------------------------------------------------------------------------
# presentation


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


def report_rows(rep: dict) -> list[tuple[str, str, str, str]]:
    """(quantity, one-pass pseudo-GT, per-image optimisation, paper (A100)) rows for a table."""
    one, per, ratios = rep["one_pass"], rep["per_image_optimisation"], rep["ratios"]
    paper = rep["paper"]
    rows = [
        ("images measured", str(one["images"]), str(per["images"]), ""),
        (
            "seconds / image",
            human_seconds(one["seconds_per_image"]),
            human_seconds(per["seconds_per_image"]),
            f"{paper['one_pass']['seconds_per_image']} s | {paper['per_image_optimisation']['seconds_per_image']} s",
        ),
        (
            "  of which",
            f"features {human_seconds(one['features_seconds_per_image'])}, masks "
            f"{human_seconds(one['masks_seconds_per_image'])}, pseudo-GT {human_seconds(one['pseudogt_seconds_per_image'])}",
            f"as run {human_seconds(per['seconds_per_image_as_run'])} at (views, steps) {per['recipe_as_run']}; "
            f"{human_seconds(per['seconds_per_view'])}/view, {human_seconds(per['seconds_per_step'])}/step",
            "",
        ),
        (
            "bytes / image",
            f"{human_bytes(one['bytes_per_image'])} (features {human_bytes(one['features_bytes_per_image'])} "
            f"+ masks {human_bytes(one['masks_bytes_per_image'])})",
            f"compact {human_bytes(per['bytes_per_image'])}; dense fp16 {human_bytes(per['dense_bytes_per_image'])}; "
            f"dense fp32 raw {human_bytes(per['dense_fp32_bytes_per_image'])}",
            "- | 74 MB",
        ),
        (
            "ratio per-image / one-pass",
            "1",
            f"time x{ratios['seconds']:.0f}; bytes compact x{ratios['bytes_compact']:.1f}, "
            f"dense fp16 x{_fmt(ratios['bytes_dense'])}, dense fp32 x{_fmt(ratios['bytes_dense_fp32'])}",
            "time ~x540",
        ),
    ]
    for count, row in rep["extrapolation"].items():
        o, p = row["one_pass"], row["per_image_optimisation"]
        ref = "35 GPU-days, 3.5 TB" if count == "50000" else ""
        rows.append(
            (
                f"{row['name']} images",
                f"{o['hours']:.3g} {o['hours_unit']}, {human_bytes(o['bytes'])}",
                f"{p['hours']:.3g} {p['hours_unit']}, compact {human_bytes(p['bytes_compact'])}, "
                f"dense {human_bytes(p.get('bytes_dense'))}",
                ref,
            )
        )
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def write_png(rep: dict, path) -> None:
    """Log-log chart: hours and bytes against number of images, both methods (PIL only)."""
    import math

    from PIL import Image, ImageDraw

    one, per = rep["one_pass"], rep["per_image_optimisation"]
    counts = [10**k for k in range(0, 8)] + [11_000_000]
    counts = sorted(set(counts))
    panels = [
        (
            "hours",
            [c * one["seconds_per_image"] / 3600 for c in counts],
            [c * per["seconds_per_image"] / 3600 for c in counts],
        ),
        (
            "bytes",
            [c * one["bytes_per_image"] for c in counts],
            [c * (per["dense_bytes_per_image"] or per["bytes_per_image"]) for c in counts],
        ),
    ]
    w, h, m = 560, 420, 70
    img = Image.new("RGB", (2 * w, h + 40), "white")
    draw = ImageDraw.Draw(img)
    draw.text(
        (10, 8),
        f"Scalability ({rep['features']}): one-pass pseudo-GT (blue) vs per-image optimisation (red); "
        f"log-log, measured per-image figures x images",
        fill="black",
    )
    for k, (what, a, b) in enumerate(panels):
        ox = k * w
        lo = math.floor(math.log10(min(a + b)))
        hi = math.ceil(math.log10(max(a + b)))
        x0, y0, x1, y1 = ox + m, 40 + 10, ox + w - 20, 40 + h - m

        def px(c, v, lo=lo, hi=hi, x0=x0, y0=y0, x1=x1, y1=y1):
            fx = (math.log10(c) - 0) / (math.log10(counts[-1]) - 0)
            fy = (math.log10(v) - lo) / max(hi - lo, 1)
            return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

        draw.rectangle([x0, y0, x1, y1], outline="black")
        for e in range(lo, hi + 1):
            _, y = px(1, 10**e)
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.text((ox + 8, y - 6), f"1e{e}", fill="black")
        for c in counts:
            x, _ = px(c, 10**lo)
            draw.line([x, y1, x, y1 + 4], fill="black")
            if c in (1, 100, 10_000, 1_000_000, 11_000_000):
                draw.text((x - 14, y1 + 8), "11M" if c == 11_000_000 else f"1e{int(math.log10(c))}", fill="black")
        draw.text(
            (x0 + 120, y1 + 26),
            f"images   ({what}, "
            + (
                "dense fp16"
                if what == "bytes" and per["dense_bytes_per_image"]
                else "compact"
                if what == "bytes"
                else "total"
            )
            + " for per-image)",
            fill="black",
        )
        for series, colour in ((a, (30, 90, 200)), (b, (200, 40, 40))):
            pts = [px(c, v) for c, v in zip(counts, series)]
            draw.line(pts, fill=colour, width=3)
    img.save(path)
