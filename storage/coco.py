"""COCO instance JSON of a shard's masks, for tools that read COCO (pycocotools, FiftyOne, CVAT).

One file per shard: ``images`` (id, file_name, width, height), ``annotations`` (id, image_id,
category_id 1, RLE ``segmentation``, area, bbox [x, y, w, h], iscrowd 0, plus the store's
``predicted_iou``, ``stability_score`` and ``order``) and one category, ``object``: the masks
are class-agnostic. The annotations are written as they are read, a row batch at a time, so a
real shard (1.4 M masks) never sits in memory as Python objects.

At the original resolution (``size=None``) ``file_name`` is the tar member's name, so the file
sits beside SA-1B's own images; at a stored geometry (``size=224``) the stored crops are written
next to the JSON and ``file_name`` points at them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from loftup.storage.commit import shard_name
from loftup.storage.errors import NotInStore

__all__ = ["export_coco", "CATEGORY"]

CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
_BATCH_ROWS = 20_000


def _images(store, shard: int, size: int | None) -> tuple[list[dict], bool]:
    """The shard's image records, and whether they came from the image table (else from the
    masks' own sizes: no file name is known then, nor any stored crop)."""
    if shard in store.done_shards("images"):
        table = store.images_table(shard, ["image_id", "file_name", "height", "width"])
        rows = table.to_pylist()
        return [
            {
                "id": int(r["image_id"]),
                "file_name": r["file_name"],
                "height": int(size or r["height"]),
                "width": int(size or r["width"]),
            }
            for r in rows
        ], True
    seen: dict[int, tuple[int, int]] = {}
    for batch in store.mask_batches(shard, ["image_id", "height", "width"], _BATCH_ROWS):
        ids, hs, ws = (batch.column(i).to_numpy() for i in range(3))
        first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        for k in first.tolist():
            seen.setdefault(int(ids[k]), (int(hs[k]), int(ws[k])))
    return [
        {"id": i, "file_name": f"{i}.jpg", "height": int(size or h), "width": int(size or w)}
        for i, (h, w) in sorted(seen.items())
    ], False


def _annotations(store, shard: int, size: int | None):
    from loftup.storage import rle

    rle_cols = ["counts", "height", "width"] if size is None else [f"rle_{int(size)}"]
    cols = ["image_id", "ann_id", "order", "area", "bbox", "predicted_iou", "stability_score", *rle_cols]
    for batch in store.mask_batches(shard, cols, _BATCH_ROWS):
        d = batch.to_pydict()
        if size is None:
            segs = [{"size": [h, w], "counts": c} for c, h, w in zip(d["counts"], d["height"], d["width"])]
            areas = [float(a) for a in d["area"]]
            boxes = [[float(v) for v in b] for b in d["bbox"]]
        else:
            segs = [{"size": [int(size), int(size)], "counts": c} for c in d[rle_cols[0]]]
            # The stored area and box are the original mask's; at a geometry they are the RLE's own.
            measured = [rle.check(s) for s in segs]
            areas = [float(a) for a, _ in measured]
            boxes = [b for _, b in measured]
        for k in range(batch.num_rows):
            yield {
                "id": int(d["ann_id"][k]),
                "image_id": int(d["image_id"][k]),
                "category_id": CATEGORY["id"],
                "segmentation": segs[k],
                "area": areas[k],
                "bbox": boxes[k],
                "iscrowd": 0,
                "order": int(d["order"][k]),
                "predicted_iou": d["predicted_iou"][k],
                "stability_score": d["stability_score"][k],
            }


def export_coco(store, shard: int, out_dir, size: int | None = None) -> dict:
    """Write ``out_dir/shard=NNNNNN.json`` (COCO instances) for one committed masks shard.

    ``size``: None for the original resolution, or a stored geometry (then the stored crops are
    written to ``out_dir/shard=NNNNNN_<size>/`` and ``file_name`` points there). Returns the path
    and counts. Reads committed data only, like every reader of the store.
    """
    from fsspec.implementations.local import LocalFileSystem

    from loftup.storage.commit import atomic_writer
    from loftup.storage.redact import redact_text

    shard = int(shard)
    if shard not in store.done_shards("masks"):
        raise NotInStore(f"no committed masks shard {shard} in {store.url} (`loftup-store status` lists them)")
    if size is not None and int(size) not in store.geometries:
        raise NotInStore(f"no masks at size {size} in this store; its geometries are {list(store.geometries)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, from_table = _images(store, shard, size)
    if size is not None:
        if not from_table:
            raise NotInStore(
                f"shard {shard} has no committed images, so there are no stored {size} px crops to point at; "
                "export at the original size, or run `loftup-pipeline images` on it"
            )
        crops = out_dir / f"{shard_name(shard)}_{int(size)}"
        crops.mkdir(exist_ok=True)
        for record in images:
            name = f"{record['id']}.jpg"
            (crops / name).write_bytes(store.image_bytes(record["id"], int(size)))
            record["file_name"] = f"{crops.name}/{name}"
    path = out_dir / f"{shard_name(shard)}.json"
    n = 0
    with atomic_writer(LocalFileSystem(), str(path)) as raw:
        fh = io.TextIOWrapper(raw, encoding="utf-8")
        info = {"description": f"loftup store {redact_text(store.url)}, shard {shard}", "size": size or "original"}
        fh.write('{"info": ' + json.dumps(info) + ', "licenses": [], "categories": ' + json.dumps([CATEGORY]))
        fh.write(', "images": ' + json.dumps(images) + ', "annotations": [')
        for ann in _annotations(store, shard, size):
            fh.write((",\n" if n else "\n") + json.dumps(ann))
            n += 1
        fh.write("\n]}\n")
        fh.flush()
        fh.detach()
    return {"path": path, "shard": shard, "images": len(images), "annotations": n}
