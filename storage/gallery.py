"""A static HTML gallery of a store: job status per shard, and per image a thumbnail of its
masks (thinned to the largest, so 150 masks stay readable) and of its stored features (PCA),
each linking to a full-size picture. Plain files: open ``index.html`` in any browser, copy the
folder anywhere. numpy and Pillow only (no torch)."""

from __future__ import annotations

import html
import time
from pathlib import Path

from loftup.storage.errors import LoftupError

__all__ = ["write_gallery"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.done { background: #e3f4e1; } td.damaged { background: #fde9c8; } td.failed { background: #f8d3d0; }
.shard { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; } figure img { display: block; border: 1px solid #ccc; }
figcaption { font-size: 0.8em; color: #555; }
.pair { display: flex; gap: 0.3em; }
"""


def _shard_status(store) -> tuple[list[str], dict[int, dict[str, str]]]:
    """Jobs, and per shard each job's state: done, damaged (files changed since the commit) or
    failed (the whole shard, last run)."""
    jobs = sorted(store.summary())
    table: dict[int, dict[str, str]] = {}
    for job in jobs:
        for shard, marker in store.done_shards(job).items():
            table.setdefault(shard, {})[job] = "damaged" if store.shard_problems(job, shard, marker) else "done"
        for shard in store.failed_shards(job):
            table.setdefault(shard, {})[job] = "failed"
    return jobs, dict(sorted(table.items()))


def _save_jpeg(picture, path: Path) -> None:
    picture.save(path, format="JPEG", quality=88)


def _thumb(picture, side: int):
    from PIL import Image

    out = picture.copy()
    out.thumbnail((side, side), Image.BILINEAR)
    return out


def write_gallery(
    store,
    out_dir,
    shards=None,
    per_shard: int = 8,
    feature_set: str | None = None,
    top: int = 30,
    thumb: int = 192,
) -> dict:
    """Write ``out_dir/index.html`` with its pictures under ``out_dir/thumbs`` and ``out_dir/full``.

    ``shards``: shard numbers to show pictures of (default: every shard with committed images);
    ``per_shard``: images per shard; ``feature_set``: ``backbone@res`` whose PCA to draw
    (default: the store's first; ``""`` for none); ``top``: masks drawn per image (the largest).
    Full-size pictures are at the store's largest geometry. Returns the page's path, the number
    of pictures and the seconds spent drawing them.
    """
    from loftup.pictures import pca_picture, show_masks
    from loftup.storage.redact import redact_text

    out = Path(out_dir)
    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    (out / "full").mkdir(exist_ok=True)
    jobs, status = _shard_status(store)
    image_shards = sorted(store.done_shards("images"))
    mask_shards = set(store.done_shards("masks"))
    chosen = image_shards if shards is None else [int(s) for s in shards]
    missing = sorted(set(chosen) - set(image_shards))
    if missing:
        raise LoftupError(
            f"no committed images for shard(s) {', '.join(map(str, missing))} in {redact_text(store.url)}; "
            f"shards with images: {', '.join(map(str, image_shards)) or 'none'}"
        )
    sets = store.feature_sets()
    if feature_set is None:
        feature_set = sets[0] if sets else ""
    elif feature_set and feature_set not in sets:
        raise LoftupError(
            f"the store has no features of {feature_set} (it has {', '.join(sets) or 'none'}); "
            "pass one of those, or none"
        )
    features = None
    if feature_set:
        backbone, res = feature_set.rsplit("@", 1)
        features = store.features(backbone, int(res))
        feature_ids = set(features.image_ids().tolist())
    full_size, small = max(store.geometries), min(store.geometries)

    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>loftup store {esc(redact_text(store.url))}</title><style>{_CSS}</style></head><body>",
        f"<h1>loftup store <code>{esc(redact_text(store.url))}</code></h1>",
        "<h2>Jobs</h2><table><tr><th>job</th><th>shards done</th><th>damaged</th><th>failed</th>"
        "<th>images</th><th>failures</th></tr>",
    ]
    for job, s in store.summary().items():
        parts.append(
            f"<tr><td>{esc(job)}</td><td>{s['shards']}</td><td>{s['damaged_shards']}</td>"
            f"<td>{s['failed_shards']}</td><td>{s['images']}</td><td>{s['failures']}</td></tr>"
        )
    parts.append("</table><h2>Shards</h2><table><tr><th>shard</th>")
    parts += [f"<th>{esc(job)}</th>" for job in jobs]
    parts.append("</tr>")
    for shard, states in status.items():
        cells = "".join(f"<td class='{states.get(j, '')}'>{states.get(j, '-')}</td>" for j in jobs)
        parts.append(f"<tr><td><a href='#shard-{shard}'>{shard}</a></td>{cells}</tr>")
    parts.append("</table>")

    n_pictures, drawing = 0, 0.0
    for shard in chosen:
        ids = store.image_ids(shard)[: int(per_shard)].tolist()
        parts.append(f"<h2 id='shard-{shard}'>Shard {shard}</h2><div class='shard'>")
        for image_id in ids:
            t0 = time.perf_counter()
            cells = []
            image = store.image(image_id, full_size)
            if shard in mask_shards:
                rles = store.masks_for(image_id, size=full_size)
                picture = show_masks(image, rles, top=top)
                title = f"{min(len(rles), top)} of {len(rles)} masks"
            else:
                picture, title = image, "no committed masks"
            cells.append((picture, "masks", title))
            if features is not None and image_id in feature_ids:
                fmap = features.get(image_id)
                pca = pca_picture(fmap, size=full_size)
                cells.append((pca, "pca", f"{feature_set} PCA, {fmap.shape[1]}x{fmap.shape[2]}"))
            links = []
            for picture, kind, title in cells:
                name = f"{image_id}_{kind}.jpg"
                _save_jpeg(picture, out / "full" / name)
                small_pic = _thumb(picture, thumb)
                _save_jpeg(small_pic, out / "thumbs" / name)
                links.append(
                    f"<a href='full/{name}' title='{esc(title)}'><img src='thumbs/{name}' "
                    f"width='{small_pic.width}' height='{small_pic.height}' alt='{esc(title)}'></a>"
                )
                n_pictures += 2
            drawing += time.perf_counter() - t0
            caption = f"image {image_id}" + (f" &middot; {esc(cells[0][2])}" if shard in mask_shards else "")
            parts.append(f"<figure><div class='pair'>{''.join(links)}</div><figcaption>{caption}</figcaption></figure>")
        parts.append("</div>")
        if not ids:
            parts.append("<p>no images</p>")
    parts.append(f"<p>geometry {small}-{full_size} px; thumbnails link to {full_size} px pictures.</p></body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return {
        "path": page,
        "pictures": n_pictures,
        "images": sum(1 for p in parts if p.startswith("<figure>")),
        "seconds": round(drawing, 3),
        "seconds_per_picture": round(drawing / n_pictures, 4) if n_pictures else 0.0,
    }
