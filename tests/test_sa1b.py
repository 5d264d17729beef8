import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from loftup.pipeline.sa1b import (
    Sample,
    SampleError,
    count_members,
    decode_jpeg,
    iter_samples,
    normalise_annotation,
)
from loftup.storage.errors import LoftupError, ShardError


def _jpeg(seed=0, size=(24, 16), mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def _doc(image_id, h=16, w=24, n=2):
    anns = []
    for k in range(n):
        m = np.zeros((h, w), bool)
        m[k : k + 5, 2 * k : 2 * k + 7] = True
        anns.append(
            {
                "id": 1000 + 3 * k,
                "segmentation": _rle(m),
                "area": int(m.sum()),
                "bbox": [2 * k, k, 7.0, 5],
                "predicted_iou": 1.0123 if k == 0 else 0.9,
                "stability_score": 0.97,
                "crop_box": [0, 0, w, h],
                "point_coords": [[2 * k + 1.5, k + 1]],
            }
        )
    return {
        "image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"},
        "annotations": anns,
    }


def _js(doc):
    return json.dumps(doc).encode()


def _write_tar(path, members, mode="w"):
    """members: (name, bytes) for files, (name, None) for directories."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _collect(path):
    return list(iter_samples(path))


def test_pairs_with_prefix_any_order_and_ignores_others(tmp_path):
    j1, j2, j3 = _jpeg(1), _jpeg(2), _jpeg(3)
    members = [
        ("./", None),
        ("./sa_11.jpg", j1),
        ("./sa_11.json", _js(_doc(11))),
        ("./sa_25.json", _js(_doc(25))),  # json before its jpg
        ("README.txt", b"hello"),
        ("sub/", None),
        ("./sa_25.jpg", j2),
        ("sa_40.jpg", j3),  # no prefix in the same tar
        ("./sa_40.json", _js(_doc(40))),
    ]
    items = _collect(_write_tar(tmp_path / "sa_000000.tar", members))
    assert all(isinstance(s, Sample) for s in items)
    assert [(s.image_id, s.file_name) for s in items] == [(11, "sa_11.jpg"), (25, "sa_25.jpg"), (40, "sa_40.jpg")]
    assert [s.jpeg for s in items] == [j1, j2, j3]
    assert items[1].ann["image"]["image_id"] == 25
    assert len(items[2].ann["annotations"]) == 2


def test_image_id_from_json_wins_over_name(tmp_path):
    doc = _doc(77)
    items = _collect(_write_tar(tmp_path / "t.tar", [("sa_5.jpg", _jpeg()), ("sa_5.json", _js(doc))]))
    assert items[0].image_id == 77
    del doc["image"]["image_id"]
    items = _collect(_write_tar(tmp_path / "t.tar", [("sa_5.json", _js(doc)), ("sa_5.jpg", _jpeg())]))
    assert items[0].image_id == 5


def test_sample_errors_and_others_still_come_out(tmp_path):
    members = [
        ("sa_1.jpg", _jpeg(1)),
        ("sa_1.json", b'{"image": {"image_id": 1'),  # invalid JSON text
        ("sa_2.jpg", _jpeg(2)),  # no json at all
        ("sa_3.json", _js(_doc(3))),  # no jpg at all
        ("sa_4.jpg", _jpeg(4)),
        ("sa_4.json", _js({"image": {"image_id": 4}})),  # lacks annotations
        ("sa_5.jpg", _jpeg(5)),
        ("sa_5.json", _js(_doc(5))),
        ("sa_6.json", b"[1, 2]"),
        ("sa_6.jpg", _jpeg(6)),
    ]
    items = _collect(_write_tar(tmp_path / "sa_000003.tar", members))
    good = [s for s in items if isinstance(s, Sample)]
    errors = {e.image_id: e for e in items if isinstance(e, SampleError)}
    assert [s.image_id for s in good] == [5]
    assert set(errors) == {1, 2, 3, 4, 6}
    assert (errors[1].stage, errors[1].member) == ("json", "sa_1.json")
    assert errors[1].reason.startswith("invalid JSON")
    assert (errors[2].stage, errors[2].member, errors[2].reason) == ("pairing", "sa_2.jpg", "missing json")
    assert (errors[3].stage, errors[3].member, errors[3].reason) == ("pairing", "sa_3.json", "missing jpg")
    assert errors[4].stage == "json" and "annotations" in errors[4].reason
    assert errors[6].stage == "json"
    assert errors[2].as_row() == {"image_id": 2, "member": "sa_2.jpg", "stage": "pairing", "reason": "missing json"}


def _pairs(n):
    out = []
    for i in range(n):
        out += [(f"./sa_{i + 1}.jpg", _jpeg(i, size=(40, 30))), (f"./sa_{i + 1}.json", _js(_doc(i + 1, 30, 40)))]
    return out


def test_truncated_in_member_data_raises_after_earlier_samples(tmp_path):
    path = _write_tar(tmp_path / "sa_000001.tar", _pairs(3))
    with tarfile.open(path) as tf:
        third_jpg = [m for m in tf.getmembers() if m.name.endswith("sa_3.jpg")][0]
    raw = path.read_bytes()
    path.write_bytes(raw[: third_jpg.offset_data + third_jpg.size // 2])
    got = []
    with pytest.raises(ShardError) as info:
        for item in iter_samples(path):
            got.append(item)
    assert [s.image_id for s in got] == [1, 2]
    assert str(info.value).startswith("sa_000001.tar: truncated tar (")
    assert isinstance(info.value, LoftupError)


def test_every_truncation_point_is_detected(tmp_path):
    path = _write_tar(tmp_path / "sa_000002.tar", [("a.txt", b"z" * 700)] + _pairs(2))
    raw = path.read_bytes()
    with tarfile.open(path) as tf:
        end_of_data = max(m.offset_data + m.size for m in tf.getmembers())
    # Every cut before the end-of-archive marker: mid-header, mid-data (also of an ignored
    # member), and exactly at a member boundary (which tarfile alone takes for a clean end).
    cuts = sorted(set(range(1, end_of_data + 512, 97)) | {1024, end_of_data, -(-end_of_data // 512) * 512})
    for cut in cuts:
        (tmp_path / "cut.tar").write_bytes(raw[:cut])
        with pytest.raises(ShardError):
            _collect(tmp_path / "cut.tar")
    assert len(_collect(path)) == 2


def test_truncated_gzip_tar(tmp_path):
    path = _write_tar(tmp_path / "sa_000004.tar", _pairs(3), mode="w:gz")
    assert [s.image_id for s in _collect(path)] == [1, 2, 3]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ShardError, match="sa_000004.tar: truncated tar"):
        _collect(path)


def test_unreadable_and_missing_tar(tmp_path):
    bad = tmp_path / "sa_000009.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match="sa_000009.tar: unreadable tar"):
        _collect(bad)
    with pytest.raises(ShardError, match="sa_000008.tar"):
        _collect(tmp_path / "sa_000008.tar")
    empty = tmp_path / "sa_000007.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match="sa_000007.tar"):
        _collect(empty)


def test_fsspec_url(tmp_path):
    import fsspec

    path = _write_tar(tmp_path / "x.tar", _pairs(2))
    fs = fsspec.filesystem("memory")
    with fs.open("/loftup-sa1b-test/sa_000000.tar", "wb") as f:
        f.write(path.read_bytes())
    try:
        assert [s.image_id for s in _collect("memory://loftup-sa1b-test/sa_000000.tar")] == [1, 2]
    finally:
        fs.rm("/loftup-sa1b-test", recursive=True)


def test_count_members(tmp_path):
    assert count_members(_write_tar(tmp_path / "x.tar", _pairs(3) + [("b.txt", b"1")])) == 3


def test_decode_jpeg():
    img = decode_jpeg(_jpeg(3, size=(31, 17)))
    assert img.size == (31, 17) and img.mode == "RGB"
    gray = decode_jpeg(_jpeg(3, mode="L"))
    assert gray.mode == "RGB"
    data = _jpeg(4, size=(200, 150))
    for broken in (data[: len(data) // 2], b"\xff\xd8garbage" * 10, b""):
        with pytest.raises(ValueError, match="corrupt JPEG"):
            decode_jpeg(broken)


def test_normalise_annotation_types_and_order():
    doc = _doc(9, n=3)
    doc["annotations"][1]["segmentation"]["counts"] = doc["annotations"][1]["segmentation"]["counts"].encode()
    mask = np.zeros((16, 24), bool)
    mask[3:9, 4:6] = True
    runs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    # An uncompressed RLE (list counts) comes back compressed; missing area/bbox get computed.
    flat = mask.flatten(order="F").astype(int)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    doc["annotations"][2]["segmentation"] = {
        "size": ["16", 24],
        "counts": np.diff(np.concatenate([[0], change])).tolist(),
    }
    del doc["annotations"][2]["area"], doc["annotations"][2]["bbox"]
    out = normalise_annotation(doc)
    assert [a["id"] for a in out] == [1000, 1003, 1006]
    for a in out:
        assert type(a["id"]) is int and type(a["area"]) is int
        assert all(type(v) is float for v in a["bbox"] + a["crop_box"] + a["point_coords"][0])
        assert type(a["predicted_iou"]) is float and type(a["stability_score"]) is float
        assert a["segmentation"]["size"] == [16, 24] and isinstance(a["segmentation"]["counts"], str)
    assert out[0]["bbox"] == [0.0, 0.0, 7.0, 5.0]
    assert out[0]["predicted_iou"] == pytest.approx(1.0123)
    assert out[2]["segmentation"]["counts"] == runs["counts"].decode()
    assert out[2]["area"] == 12 and out[2]["bbox"] == [4.0, 3.0, 2.0, 6.0]
    assert normalise_annotation(doc["annotations"]) == out


def test_normalise_annotation_rejects_bad():
    doc = _doc(9)
    doc["annotations"][1]["segmentation"]["size"] = [8, 24]
    with pytest.raises(ValueError, match="annotation 1003.*size"):
        normalise_annotation(doc)
    doc = _doc(9)
    del doc["annotations"][0]["segmentation"]
    with pytest.raises(ValueError, match="annotation 1000: missing 'segmentation'"):
        normalise_annotation(doc)
    doc = _doc(9)
    doc["annotations"][0]["bbox"] = [1, 2, 3]
    with pytest.raises(ValueError, match="bbox"):
        normalise_annotation(doc)
