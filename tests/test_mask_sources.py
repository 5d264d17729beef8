"""Mask sources: one registry, one row layout; sa1b keeps the JSON, felzenszwalb partitions the
image exactly, sam runs segment-anything (randomly initialised here) and rows become a table
of the store's mask schema."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from loftup.pipeline.mask_sources import (
    ANN_ID_STRIDE,
    MASK_FIELDS,
    SamSettings,
    add_geometry_rles,
    create_mask_source,
    list_mask_sources,
    mask_source_config,
    rows_to_table,
    sam_records_to_rows,
    segments_to_masks,
)
from loftup.storage.errors import LoftupError, WeightsError
from loftup.storage.geometry import source_index

# pycocotools' decode trips a numpy 2 deprecation warning inside the library itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _decode(counts: str, h: int, w: int) -> np.ndarray:
    return mask_utils.decode({"size": [h, w], "counts": counts.encode("ascii")}).astype(bool)


def _sam_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]


def _synthetic_sa1b(h=40, w=60):
    """Three overlapping masks with SA-1B's quirks: int/float mix, predicted_iou > 1, odd ids."""
    yy, xx = np.mgrid[:h, :w]
    masks = [(xx - 30) ** 2 + (yy - 20) ** 2 < 150, (xx > 5) & (xx < 25) & (yy > 3), (yy + xx) % 7 == 0]
    anns = [
        {
            "id": 901,
            "segmentation": _encode(masks[0]),
            "area": int(masks[0].sum()),
            "bbox": [18, 8.0, 24, 24.5],
            "predicted_iou": 1.0234,
            "stability_score": 0.97,
            "crop_box": [0, 0, w, h],
            "point_coords": [[30, 20.5]],
        },
        {
            "id": 17,
            "segmentation": _encode(masks[1]),
            "area": int(masks[1].sum()),
            "bbox": [6.0, 4, 18, 35],
            "predicted_iou": 0.91,
            "stability_score": 1,
            "crop_box": [0.0, 0.0, 30.5, 20],
            "point_coords": [[10.25, 9]],
        },
        {
            "id": 5000,
            "segmentation": _encode(masks[2]),
            "area": int(masks[2].sum()),
            "bbox": [0, 0, 59, 39],
            "predicted_iou": 0.88,
            "stability_score": 0.951,
            "crop_box": [15, 10, 30, 20],
            "point_coords": [[14, 0]],
        },
    ]
    return {"image": {"image_id": 42, "width": w, "height": h, "file_name": "sa_42.jpg"}, "annotations": anns}, masks


# ---------------------------------------------------------------------------------- registry
def test_registry_and_errors():
    assert {"sa1b", "sam", "felzenszwalb"} <= set(list_mask_sources())
    with pytest.raises(LoftupError, match=r"unknown mask source 'sam2'; known: sa1b, .*felzenszwalb"):
        create_mask_source("sam2")
    with pytest.raises(LoftupError, match=r"unknown option\(s\) max_mask; known: max_masks"):
        create_mask_source("sa1b", max_mask=3)
    with pytest.raises(LoftupError, match=r"unknown option\(s\) points_per_sid"):
        create_mask_source("sam", random_init=True, points_per_sid=4)
    with pytest.raises(LoftupError, match=r"unknown option\(s\) points_per_sid"):
        mask_source_config("sam", points_per_sid=4)


# ---------------------------------------------------------------------------------------- sa1b
def test_sa1b_rows_equal_the_json_in_annotation_order():
    ann, masks = _synthetic_sa1b()
    src = create_mask_source("sa1b")
    rows = src.masks_for(None, ann, 42)
    assert [r["order"] for r in rows] == [0, 1, 2]
    assert [r["ann_id"] for r in rows] == [901, 17, 5000]
    for row, a, m in zip(rows, ann["annotations"], masks):
        assert set(row) == set(MASK_FIELDS)
        assert row["counts"] == a["segmentation"]["counts"]
        assert np.array_equal(_decode(row["counts"], row["height"], row["width"]), m)
        assert (row["image_id"], row["height"], row["width"], row["source"]) == (42, 40, 60, "sa1b")
        assert row["area"] == a["area"] and isinstance(row["area"], int)
        for key, src_key in (("bbox", "bbox"), ("crop_box", "crop_box")):
            assert row[key] == [float(v) for v in a[src_key]] and all(type(v) is float for v in row[key])
        assert row["point"] == [float(v) for v in a["point_coords"][0]]
        assert row["predicted_iou"] == a["predicted_iou"] and type(row["stability_score"]) is float
    assert rows[0]["predicted_iou"] > 1.0  # kept as is, like the real files
    first_two = create_mask_source("sa1b", max_masks=2).masks_for(None, ann, 42)
    assert [r["ann_id"] for r in first_two] == [901, 17]
    assert src.config() == mask_source_config("sa1b") == {"source": "sa1b", "version": 1, "max_masks": None}
    with pytest.raises(ValueError, match="no annotation"):
        src.masks_for(None, None, 42)
    with pytest.raises(ValueError, match="no 'annotations' list"):
        src.masks_for(None, {"image": ann["image"]}, 42)
    broken = {"image": ann["image"], "annotations": [dict(ann["annotations"][0], bbox=[1, 2, 3])]}
    with pytest.raises(ValueError, match="bbox must have 4 values"):
        src.masks_for(None, broken, 42)


def test_geometry_rles_and_table_match_the_store_schema():
    from loftup.storage import MASK_SCHEMA
    from loftup.storage.masks import mask_schema

    ann, masks = _synthetic_sa1b()
    rows = add_geometry_rles(create_mask_source("sa1b").masks_for(None, ann, 42), (224, 896))
    for row, m in zip(rows, masks):
        for size in (224, 896):
            r, c = source_index(40, 60, size)
            assert np.array_equal(_decode(row[f"rle_{size}"], size, size), m[r][:, c])
    table = rows_to_table(rows, (224, 896))
    assert table.schema.equals(MASK_SCHEMA)
    assert table.num_rows == 3
    assert table.column("ann_id").to_pylist() == [901, 17, 5000]
    assert table.column("bbox").to_pylist()[0] == [18.0, 8.0, 24.0, 24.5]
    assert abs(table.column("predicted_iou").to_pylist()[0] - 1.0234) < 1e-6
    assert rows_to_table([], (224, 896)).schema.equals(MASK_SCHEMA)
    one = add_geometry_rles(create_mask_source("sa1b").masks_for(None, ann, 42), (448,))
    assert rows_to_table(one, (448,)).schema.equals(mask_schema((448,)))
    with pytest.raises(ValueError, match="add_geometry_rles"):
        rows_to_table(create_mask_source("sa1b").masks_for(None, ann, 42), (224,))


# -------------------------------------------------------------------------------- felzenszwalb
def test_segments_to_masks_is_canonical_coco_rle():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (13, 11))
    labels[:, 2:5] = 6  # a segment made of runs that wrap from one column into the next
    labels[-1, -1] = 9  # one that touches the last pixel
    segs = segments_to_masks(labels)
    assert sorted(s["label"] for s in segs) == sorted(np.unique(labels).tolist())
    assert [s["area"] for s in segs] == sorted((s["area"] for s in segs), reverse=True)
    for s in segs:
        m = labels == s["label"]
        assert s["counts"] == _encode(m)["counts"]
        assert s["area"] == m.sum() and s["bbox"] == _sam_bbox(m)
        x, y = s["point"]
        assert m[int(y), int(x)] and x % 1 == 0.5 and y % 1 == 0.5


def test_felzenszwalb_masks_partition_the_image_exactly():
    from skimage import data

    image = Image.fromarray(data.coffee()).resize((150, 100), Image.BILINEAR)  # 100 x 150
    src = create_mask_source("felzenszwalb", scale=100, min_size=20, max_side=64)
    labels = src.label_map(image)
    assert labels.shape == (100, 150)
    rows = src.masks_for(image, None, 3)
    assert len(rows) == len(np.unique(labels)) > 3
    cover = np.zeros((100, 150), np.int32)
    for k, row in enumerate(rows):
        m = _decode(row["counts"], 100, 150)
        x, y = row["point"]
        assert np.array_equal(m, labels == labels[int(y), int(x)])
        assert row["area"] == m.sum() and row["bbox"] == _sam_bbox(m)
        assert (row["order"], row["ann_id"], row["source"]) == (k, 3 * ANN_ID_STRIDE + k, "felzenszwalb")
        assert math.isnan(row["predicted_iou"]) and math.isnan(row["stability_score"])
        assert row["crop_box"] == [0.0, 0.0, 150.0, 100.0]
        cover += m
    assert (cover == 1).all()  # disjoint and covering
    assert [r["area"] for r in rows] == sorted((r["area"] for r in rows), reverse=True)
    capped = create_mask_source("felzenszwalb", scale=100, min_size=20, max_side=64, max_masks=2).masks_for(
        image, None, 3
    )
    assert [r["counts"] for r in capped] == [r["counts"] for r in rows[:2]]
    with pytest.raises(ValueError, match="needs the decoded image"):
        src.masks_for(None, {"annotations": []}, 3)


# ------------------------------------------------------------------------------------------ sam
def test_sam_settings_defaults_follow_sa1b_recipe():
    s = SamSettings()
    assert (s.points_per_side, s.crop_n_layers, s.crop_n_points_downscale_factor) == (32, 2, 2)
    assert (s.pred_iou_thresh, s.stability_score_thresh, s.box_nms_thresh, s.crop_nms_thresh) == (0.88, 0.95, 0.7, 0.7)
    lib = SamSettings.library_defaults()
    assert (lib.crop_n_layers, lib.crop_n_points_downscale_factor, lib.points_per_side) == (0, 1, 32)


def test_sam_checkpoint_errors(tmp_path):
    import torch

    with pytest.raises(WeightsError, match=r"no SAM checkpoint: pass --sam-checkpoint PATH \(sam_vit_h_4b8939.pth"):
        create_mask_source("sam")
    with pytest.raises(WeightsError, match="weights file not found"):
        create_mask_source("sam", checkpoint=str(tmp_path / "sam_vit_b_01ec64.pth"))
    torch.save({"something.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="is not a SAM checkpoint"):
        create_mask_source("sam", checkpoint=str(tmp_path / "other.pth"))


def test_sam_random_vit_b_one_small_image():
    import torch
    from skimage import data

    torch.manual_seed(0)
    src = create_mask_source(
        "sam",
        random_init=True,
        device="cpu",
        points_per_side=4,
        crop_n_layers=0,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )
    gen = src.generator
    assert (gen.pred_iou_thresh, gen.stability_score_thresh, gen.crop_n_layers) == (0.0, 0.0, 0)
    assert gen.point_grids[0].shape == (16, 2) and gen.output_mode == "coco_rle"
    assert src.model_type == "vit_b"
    opts = dict(random_init=True, points_per_side=4, crop_n_layers=0, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert src.config() == mask_source_config("sam", device="cuda", **opts)  # no model built there
    assert src.config()["points_per_side"] == 4 and src.config()["crop_n_points_downscale_factor"] == 2
    assert mask_source_config("sam", **{**opts, "points_per_side": 8}) != src.config()
    image = Image.fromarray(data.astronaut()).resize((128, 96), Image.BILINEAR)
    rows = src.masks_for(image, None, 11)
    # Random weights still give masks at zero thresholds (NMS leaves few of them).
    assert len(rows) >= 1
    for k, row in enumerate(rows):
        m = _decode(row["counts"], row["height"], row["width"])
        assert m.shape == (96, 128) and (row["height"], row["width"]) == (96, 128)
        assert (row["order"], row["ann_id"], row["source"]) == (k, 11 * ANN_ID_STRIDE + k, "sam")
        assert row["area"] == m.sum() and row["bbox"] == _sam_bbox(m)
        assert row["crop_box"] == [0.0, 0.0, 128.0, 96.0] and len(row["point"]) == 2
        assert 0 <= row["point"][0] <= 128 and 0 <= row["point"][1] <= 96
    table = rows_to_table(add_geometry_rles(rows), (224, 896))
    assert table.num_rows == len(rows) and set(table.column("source").to_pylist()) == {"sam"}


def test_sam_records_from_a_shrunk_image_are_scaled_back():
    small = np.zeros((20, 30), bool)
    small[5:12, 3:9] = True
    empty = np.zeros((20, 30), bool)
    records = [
        {
            "segmentation": _encode(small),
            "area": int(small.sum()),
            "bbox": _sam_bbox(small),
            "predicted_iou": 0.9,
            "point_coords": [[5.0, 8.0]],
            "stability_score": 0.96,
            "crop_box": [0, 0, 30, 20],
        },
        {
            "segmentation": _encode(empty),
            "area": 0,
            "bbox": [0, 0, 0, 0],
            "predicted_iou": 0.1,
            "point_coords": [[1.0, 1.0]],
            "stability_score": 0.0,
            "crop_box": [0, 0, 30, 20],
        },
    ]
    same = sam_records_to_rows(records, 5, (20, 30))
    assert same[0]["counts"] == records[0]["segmentation"]["counts"] and same[0]["bbox"] == _sam_bbox(small)
    rows = sam_records_to_rows(records, 5, (40, 60))
    big = _decode(rows[0]["counts"], 40, 60)
    assert np.array_equal(big, np.repeat(np.repeat(small, 2, 0), 2, 1))
    assert rows[0]["area"] == big.sum() == 4 * small.sum() and rows[0]["bbox"] == _sam_bbox(big)
    assert rows[0]["point"] == [10.0, 16.0] and rows[0]["crop_box"] == [0.0, 0.0, 60.0, 40.0]
    assert rows[1]["area"] == 0 and rows[1]["bbox"] == [0.0, 0.0, 0.0, 0.0]
    assert [r["ann_id"] for r in rows] == [5000, 5001] and rows[0]["predicted_iou"] == 0.9
    assert sam_records_to_rows([], 5, (40, 60)) == []  # an image where SAM finds nothing
