"""Store layer: manifest, masks, images, features, errors and summaries, on local and memory://."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from loftup.storage import (
    IMAGE_SCHEMA,
    MASK_SCHEMA,
    SCHEMA_VERSION,
    FeatureStore,
    Store,
    errors,
    geometry,
    open_store,
    rle,
)
from loftup.storage.errors import StoreError


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    url = f"memory://loftup-test-{uuid.uuid4().hex}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def store(store_url) -> Store:
    return open_store(store_url, create=True, geometries=(16, 32))


def mask_rows(image_ids, per_image, seed, sizes=(16, 32), h=24, w=40):
    """Mask rows shaped like the pipeline's: real RLEs of small blobs, shuffled."""
    rng = np.random.default_rng(seed)
    rows = []
    for image_id in image_ids:
        for order in range(per_image):
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 6)
            m[y : y + rng.integers(1, 5), x : x + rng.integers(1, 7)] = True
            r = rle.encode(m)
            row = {
                "image_id": int(image_id),
                "ann_id": int(image_id) * 1000 + order,
                "order": order,
                "height": h,
                "width": w,
                "counts": r["counts"],
                "area": int(m.sum()),
                "bbox": [float(x), float(y), 6.0, 4.0],
                "predicted_iou": 1.0 + order / 100,
                "stability_score": 0.95,
                "crop_box": [0.0, 0.0, float(w), float(h)],
                "point": [x + 0.5, y + 0.5],
                "source": "sa1b",
            }
            for s in sizes:
                row[f"rle_{s}"] = rle.to_geometry(r, s)["counts"]
            rows.append(row)
    rng.shuffle(rows)
    return rows


def mask_table(store, image_ids, per_image, seed):
    return pa.Table.from_pylist(mask_rows(image_ids, per_image, seed, store.geometries), schema=store.mask_schema)


# -- manifest / open ---------------------------------------------------------------------------
def test_create_writes_manifest_and_reopens(store_url):
    st = open_store(store_url, create=True, geometries=(896, 224, 224))
    m = json.loads(st.fs.cat_file(st.path("manifest.json")))
    assert m["schema_version"] == SCHEMA_VERSION == 1
    assert m["geometry"] == {
        "transform": "resize_short_side+center_crop",
        "sizes": [224, 896],
        "mask_resample": "nearest-exact",
        "image_resample": "bicubic",
    }
    assert m["created_by"].startswith("loftup ")
    assert m["backbones"] == {} and m["jobs"] == {}
    again = open_store(store_url)
    assert again.geometries == (224, 896)
    assert again.mask_schema.names[6:8] == ["rle_224", "rle_896"]
    # create=True on an existing store opens it as it is
    assert open_store(store_url, create=True, geometries=(64,)).geometries == (224, 896)
    # no temp file left behind
    assert [p.rsplit("/", 1)[-1] for p in st.fs.ls(st.root, detail=False)] == ["manifest.json"]


def test_default_schemas_match_the_contract():
    assert MASK_SCHEMA.names == [
        "image_id", "ann_id", "order", "height", "width", "counts", "rle_224", "rle_896",
        "area", "bbox", "predicted_iou", "stability_score", "crop_box", "point", "source",
    ]  # fmt: skip
    assert MASK_SCHEMA.field("order").type == pa.int32()
    assert MASK_SCHEMA.field("bbox").type == pa.list_(pa.float64())
    assert MASK_SCHEMA.field("predicted_iou").type == pa.float32()
    assert IMAGE_SCHEMA.names == ["image_id", "file_name", "height", "width", "jpeg_224", "jpeg_896"]
    assert IMAGE_SCHEMA.field("jpeg_896").type == pa.binary()


def test_open_errors_are_one_clear_line(tmp_path):
    with pytest.raises(StoreError, match=r"^no store at .*missing \(path does not exist\)$"):
        open_store(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.txt").write_text("x")
    with pytest.raises(StoreError, match=r"is not a loftup store \(no manifest.json\)$"):
        open_store(tmp_path / "plain")
    with pytest.raises(StoreError, match="directory is not empty"):
        open_store(tmp_path / "plain", create=True)
    with pytest.raises(StoreError, match="it is a file"):
        open_store(tmp_path / "plain" / "data.txt", create=True)

    st = open_store(tmp_path / "v2", create=True)
    m = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    m["schema_version"] = 2
    (tmp_path / "v2" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError) as exc:
        open_store(tmp_path / "v2")
    assert str(exc.value) == f"store at {tmp_path / 'v2'} has schema version 2; this loftup reads version 1"
    assert isinstance(exc.value, errors.LoftupError)

    (tmp_path / "v2" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable manifest.json"):
        open_store(tmp_path / "v2")
    with pytest.raises(StoreError, match="positive"):
        open_store(tmp_path / "neg", create=True, geometries=(0,))
    del st


def test_update_manifest_records_jobs_and_backbones(store, store_url):
    def add(m):
        m["jobs"]["masks"] = {"config_hash": "abc", "config": {"source": "sa1b"}}
        m["backbones"]["dinov2_vits14@224"] = {"dim": 384, "patch": 14}

    out = store.update_manifest(add)
    assert out["jobs"]["masks"]["config_hash"] == "abc"
    assert store.manifest["backbones"] == {"dinov2_vits14@224": {"dim": 384, "patch": 14}}
    reopened = open_store(store_url)
    assert reopened.manifest["jobs"] == {"masks": {"config_hash": "abc", "config": {"source": "sa1b"}}}
    # a returned dict replaces the manifest
    store.update_manifest(lambda m: {**m, "note": "hello"})
    assert open_store(store_url).manifest["note"] == "hello"
    with pytest.raises(StoreError, match="geometry"):
        store.update_manifest(lambda m: m["geometry"].update(sizes=[8]))
    with pytest.raises(StoreError, match="schema version"):
        store.update_manifest(lambda m: m.update(schema_version=2))
    assert open_store(store_url).manifest["geometry"]["sizes"] == [16, 32]


def test_store_pickles_by_url(tmp_path):
    st = open_store(tmp_path / "s", create=True)
    st.features("bb", 224)  # populates a cache holding a lock
    copy = pickle.loads(pickle.dumps(st))
    assert isinstance(copy, Store) and copy.url == st.url and copy.geometries == st.geometries
    fstore = pickle.loads(pickle.dumps(st.features("bb", 224)))
    assert isinstance(fstore, FeatureStore) and fstore.path == st.features("bb", 224).path


def test_storage_never_imports_torch():
    code = "import sys, loftup.storage, loftup.storage.rle; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- masks -------------------------------------------------------------------------------------
def test_masks_write_sorted_zstd_and_read_back(store):
    table = mask_table(store, [40, 7, 19], 5, seed=0)
    nbytes = store.write_masks(3, table)
    store.write_marker("masks", 3, {})  # readers see committed shards only
    path = store.path("masks", "shard=000003", "part-0.parquet")
    assert nbytes == store.fs.size(path) > 0
    back = store.masks_table(3)
    assert back.schema == store.mask_schema
    keys = list(zip(back.column("image_id").to_pylist(), back.column("order").to_pylist()))
    assert keys == sorted(keys) and len(keys) == 15
    expected = sorted(table.to_pylist(), key=lambda r: (r["image_id"], r["order"]))
    assert back.to_pylist() == expected
    md = pq.read_metadata(store.fs.open(path))
    assert md.row_group(0).column(0).compression == "ZSTD"


def test_masks_row_groups_of_20k(tmp_path):
    st = open_store(tmp_path / "s", create=True, geometries=(4,))
    n = 45_000
    image_id = np.repeat(np.arange(n // 90), 90)
    order = np.tile(np.arange(90, dtype=np.int32), n // 90)
    perm = np.random.default_rng(0).permutation(n)
    cols = {f.name: pa.nulls(n, f.type) for f in st.mask_schema}
    cols["image_id"] = pa.array(image_id[perm])
    cols["order"] = pa.array(order[perm])
    cols["rle_4"] = pa.array([f"{i}:{o}" for i, o in zip(image_id[perm], order[perm])])
    st.write_masks(0, pa.table(cols, schema=st.mask_schema))
    st.write_marker("masks", 0, {})
    md = pq.read_metadata(tmp_path / "s" / "masks" / "shard=000000" / "part-0.parquet")
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [20_000, 20_000, 5_000]
    # image 222 has rows 19980..20069: it straddles the first row-group boundary
    assert [r["counts"] for r in st.masks_for(222, 4)] == [f"222:{o}" for o in range(90)]
    assert all(r["size"] == [4, 4] for r in st.masks_for(222, 4))
    got = st.masks_for_many([499, 222, 0], 4)
    assert [len(g) for g in got] == [90, 90, 90]
    assert got[0][-1]["counts"] == "499:89" and got[2][0]["counts"] == "0:0"
    with pytest.raises(errors.NotInStore, match=f"image {10**9} is not in the store"):
        st.masks_for_many([499, 10**9], 4)


def test_masks_dataset_dask_and_random_access(store):
    a = mask_table(store, [5, 3, 9], 4, seed=1)
    b = mask_table(store, [100, 101], 3, seed=2)
    store.write_masks(7, a)
    store.write_masks(12, b)
    assert store.masks_dataset().count_rows() == 0  # nothing committed yet: nothing served
    store.write_marker("masks", 7, {})
    store.write_marker("masks", 12, {})

    dset = store.masks_dataset()
    assert isinstance(dset, ds.Dataset)
    assert dset.schema.field("shard").type == pa.int32()
    assert dset.count_rows() == 18
    only = dset.to_table(filter=ds.field("shard") == 12, columns=["image_id", "shard"])
    assert sorted(set(only.column("image_id").to_pylist())) == [100, 101]
    assert set(only.column("shard").to_pylist()) == {12}
    nine = dset.to_table(filter=(ds.field("image_id") == 9) & (ds.field("order") >= 2))
    assert nine.column("order").to_pylist() == [2, 3]

    df = store.masks_dask(["image_id", "order", "bbox", "shard"]).compute()
    assert str(df["shard"].dtype) == "int32"
    assert sorted(df["shard"].unique().tolist()) == [7, 12]
    assert len(df) == 18
    first = df[(df.image_id == 3) & (df.order == 0)].iloc[0]
    ref = [r for r in a.to_pylist() if r["image_id"] == 3 and r["order"] == 0][0]
    assert list(first["bbox"]) == ref["bbox"]
    full = store.masks_dask().compute()
    assert list(full.columns) == store.mask_schema.names + ["shard"]

    for size in (16, 32):
        got = store.masks_for(9, size=size)
        want = [r[f"rle_{size}"] for r in sorted(a.to_pylist(), key=lambda r: r["order"]) if r["image_id"] == 9]
        assert [g["counts"] for g in got] == want
        assert all(g["size"] == [size, size] for g in got)
        # the stored geometry RLE is the original mask through the geometry transform
        orig = store.masks_for(9, size=None)
        assert orig[0]["size"] == [24, 40]
        rows, cols = geometry.source_index(24, 40, size)
        np.testing.assert_array_equal(rle.decode(got[0]), rle.decode(orig[0])[rows][:, cols])
    with pytest.raises(errors.NotInStore, match="image 123456 is not in the store"):
        store.masks_for(123456, size=16)
    many = store.masks_for_many([101, 5, 101], size=32)
    assert [len(m) for m in many] == [3, 4, 3] and many[0] == many[2]
    with pytest.raises(StoreError, match="geometries are \\[16, 32\\]"):
        store.masks_for(9, size=224)


def test_masks_empty_store_and_bad_tables(store):
    assert store.masks_dataset().count_rows() == 0
    assert store.masks_dataset().schema.names[-1] == "shard"
    assert len(store.masks_dask(["image_id"]).compute()) == 0
    with pytest.raises(errors.NotInStore, match="image 1 is not in the store"):
        store.masks_for(1, size=16)
    bad = mask_table(store, [1], 2, seed=0).drop_columns(["rle_32"])
    with pytest.raises(StoreError, match=r"missing \['rle_32'\]"):
        store.write_masks(0, bad)
    with pytest.raises(StoreError, match="unknown masks columns"):
        store.masks_dask(["nope"])
    assert store.masks_dataset().count_rows() == 0


# -- images ------------------------------------------------------------------------------------
def jpeg_rows(sizes, ids):
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    rows = []
    for k, image_id in enumerate(ids):
        img = Image.fromarray(photos[k % len(photos)])
        row = {"image_id": image_id, "file_name": f"sa_{image_id}.jpg", "height": img.height, "width": img.width}
        for s in sizes:
            buf = io.BytesIO()
            geometry.resize_image(img, s).save(buf, format="JPEG", quality=90)
            row[f"jpeg_{s}"] = buf.getvalue()
        rows.append(row)
    return rows


def test_images_round_trip(store):
    rows_a = jpeg_rows(store.geometries, [30, 10, 20])
    rows_b = jpeg_rows(store.geometries, [5])
    assert store.write_images(1, pa.Table.from_pylist(rows_a, schema=store.image_schema)) > 0
    store.write_images(0, pa.Table.from_pylist(rows_b, schema=store.image_schema))
    store.write_marker("images", 0, {})
    store.write_marker("images", 1, {})
    np.testing.assert_array_equal(store.image_ids(1), [10, 20, 30])
    assert store.image_ids(1).dtype == np.int64
    by_id = {r["image_id"]: r for r in rows_a + rows_b}
    for image_id, row in by_id.items():
        for s in store.geometries:
            assert store.image_bytes(image_id, s) == row[f"jpeg_{s}"]
    img = store.image(20, 32)
    assert img.size == (32, 32) and img.mode == "RGB"
    ref = np.asarray(Image.open(io.BytesIO(by_id[20]["jpeg_32"])).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), ref)
    dset = store.images_dataset()
    t = dset.to_table(columns=["image_id", "shard", "height"])
    assert sorted(zip(t.column("shard").to_pylist(), t.column("image_id").to_pylist())) == [
        (0, 5), (1, 10), (1, 20), (1, 30)
    ]  # fmt: skip
    assert dset.to_table(filter=ds.field("shard") == 0).column("file_name").to_pylist() == ["sa_5.jpg"]
    assert store.images_table(1, columns=["image_id", "height"]).column("height").to_pylist() == [300, 400, 512]
    with pytest.raises(KeyError):
        store.image_bytes(999, 16)
    with pytest.raises(StoreError):
        store.image_bytes(10, 224)
    dup = pa.Table.from_pylist(rows_b + rows_b, schema=store.image_schema)
    with pytest.raises(StoreError, match="repeats image ids"):
        store.write_images(2, dup)


# -- features ----------------------------------------------------------------------------------
def special_fp16(rng, shape):
    """Random fp16 with the awkward values: subnormals, +-0, inf, nan, max."""
    x = rng.standard_normal(shape).astype(np.float16)
    flat = x.reshape(-1)
    flat[:8] = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 6.0e-8, -6.0e-8, 65504.0], np.float16)
    return x


def test_features_round_trip_bit_identical(store):
    rng = np.random.default_rng(0)
    fstore = store.features("dinov2_vits14", 224)
    assert fstore.shards() == [] and fstore.info == {}
    a = special_fp16(rng, (5, 12, 4, 4))
    b = special_fp16(rng, (3, 12, 4, 4))
    a[1] = 0.0  # an all-fill-value chunk (zarr may skip storing it)
    b[1] = np.float16(-0.0)  # equal to the fill value, but not bit-identical
    nbytes = fstore.write_shard(8, a, np.array([50, 10, 40, 30, 20]), info={"dim": 12, "patch": 14, "res": 224})
    assert nbytes > 0
    fstore.write_shard(2, b, np.array([7, 9, 8]))
    assert fstore.shards() == []  # written, not committed: never served
    with pytest.raises(errors.NotInStore, match="dinov2_vits14@224 has no committed shard yet"):
        fstore.dask()
    store.write_marker(fstore.job, 8, {})
    store.write_marker(fstore.job, 2, {})
    assert fstore.shards() == [2, 8]
    np.testing.assert_array_equal(fstore.image_ids(), [7, 9, 8, 50, 10, 40, 30, 20])
    assert fstore.info == {"dim": 12, "grid": [4, 4], "patch": 14, "res": 224}
    assert fstore.dim == 12 and fstore.grid == (4, 4)

    got = fstore.get(40)
    assert got.dtype == np.float16 and got.shape == (12, 4, 4)
    np.testing.assert_array_equal(got.view(np.uint16), a[2].view(np.uint16))
    many = fstore.get_many([20, 7, 20, 8])
    np.testing.assert_array_equal(many.view(np.uint16), np.stack([a[4], b[0], a[4], b[2]]).view(np.uint16))
    assert fstore.get_many([]).shape == (0, 12, 4, 4)
    with pytest.raises(KeyError):
        fstore.get(11)

    arr = fstore.dask()
    assert arr.shape == (8, 12, 4, 4) and arr.dtype == np.float16
    assert arr.chunks[0] == (3, 5)
    both = np.concatenate([b, a])
    np.testing.assert_array_equal(arr.compute().view(np.uint16), both.view(np.uint16))
    assert fstore.dask(chunks="image").chunks[0] == (1,) * 8
    assert fstore.dask(chunks=2).chunks[0] == (2, 1, 2, 2, 1)

    # a second handle (other process, say) sees the same data
    other = open_store(store.url).features("dinov2_vits14", 224)
    np.testing.assert_array_equal(other.get(30).view(np.uint16), a[3].view(np.uint16))
    assert store.feature_sets() == ["dinov2_vits14@224"]
    # An absent set is one error naming the sets there are, whichever read comes first.
    absent = store.features("dinov2_vits14", 448)
    for read in (
        absent.dask,
        absent.image_ids,
        lambda: absent.dim,
        lambda: absent.get(40),
        lambda: absent.get_many([]),
    ):
        with pytest.raises(errors.NotInStore, match=r"no features of dinov2_vits14@448 \(it has dinov2_vits14@224;"):
            read()


def test_features_zarr_layout(tmp_path):
    import zarr

    st = open_store(tmp_path / "s", create=True)
    fstore = st.features("hed_vgg16", 224)
    feats = np.random.default_rng(1).standard_normal((6, 8, 3, 5)).astype(np.float16)
    fstore.write_shard(123, feats, np.arange(6) + 1000)
    group = zarr.open_group(str(tmp_path / "s" / "features" / "hed_vgg16@224"), mode="r")
    assert group.metadata.zarr_format == 3
    arr = zarr.open_array(str(tmp_path / "s" / "features" / "hed_vgg16@224" / "shard=000123" / "features"), mode="r")
    assert arr.shape == (6, 8, 3, 5) and arr.dtype == np.float16
    assert arr.chunks == (1, 8, 3, 5) and arr.shards == (6, 8, 3, 5)
    codecs = json.loads((tmp_path / "s/features/hed_vgg16@224/shard=000123/features/zarr.json").read_text())
    inner = codecs["codecs"][0]["configuration"]["codecs"]
    blosc = [c for c in inner if c["name"] == "blosc"][0]["configuration"]
    assert blosc["cname"] == "zstd" and blosc["clevel"] == 3 and blosc["shuffle"] in ("shuffle", "bitshuffle")
    # one Zarr shard file for the whole block
    assert sorted(
        p.name for p in (tmp_path / "s/features/hed_vgg16@224/shard=000123/features/c").rglob("*") if p.is_file()
    ) == ["0"]
    ids = zarr.open_array(str(tmp_path / "s/features/hed_vgg16@224/shard=000123/image_ids"), mode="r")
    np.testing.assert_array_equal(ids[:], np.arange(6) + 1000)


def test_features_rewrite_empty_and_conflicts(store):
    fstore = store.features("bb", 112)
    rng = np.random.default_rng(2)
    first = rng.standard_normal((4, 6, 2, 2)).astype(np.float16)
    second = rng.standard_normal((2, 6, 2, 2)).astype(np.float16)
    fstore.write_shard(1, first, np.arange(4))
    store.write_marker(fstore.job, 1, {})
    fstore.write_shard(1, second, np.array([10, 11]))  # replaces the shard as a whole
    np.testing.assert_array_equal(fstore.image_ids(), [10, 11])
    with pytest.raises(KeyError):
        fstore.get(0)
    np.testing.assert_array_equal(fstore.get(11), second[1])
    fstore.write_shard(0, np.zeros((0, 6, 2, 2), np.float16), np.zeros(0, np.int64))
    store.write_marker(fstore.job, 0, {})
    assert fstore.shards() == [0, 1]
    assert fstore.dask().shape == (2, 6, 2, 2)
    with pytest.raises(StoreError, match="dim"):
        fstore.write_shard(2, np.zeros((1, 7, 2, 2), np.float16), np.array([99]))
    with pytest.raises(ValueError, match="repeat"):
        fstore.write_shard(2, np.zeros((2, 6, 2, 2), np.float16), np.array([5, 5]))
    assert fstore.shards() == [0, 1]
    leftovers = [p for p in store.fs.find(store.root, withdirs=True) if ".tmp" in p]
    assert leftovers == []


# -- errors and summary ------------------------------------------------------------------------
def test_errors_table(store):
    empty = store.errors()
    assert empty.num_rows == 0
    assert empty.schema.names == ["image_id", "member", "stage", "reason", "job", "shard"]
    store.write_errors("masks", 3, [{"image_id": 5, "member": "sa_5.json", "stage": "json", "reason": "broken"}])
    store.write_errors("masks", 1, [{"image_id": None, "member": "sa_x.jpg", "stage": "tar", "reason": "no pair"}])
    store.write_errors("features/bb@224", 1, [{"image_id": 9, "member": "", "stage": "forward", "reason": "nan"}])
    store.write_errors("images", 4, [])
    t = store.errors()
    rows = sorted(t.to_pylist(), key=lambda r: (r["job"], r["shard"]))
    assert rows == [
        {"image_id": 9, "member": "", "stage": "forward", "reason": "nan", "job": "features/bb@224", "shard": 1},
        {"image_id": None, "member": "sa_x.jpg", "stage": "tar", "reason": "no pair", "job": "masks", "shard": 1},
        {"image_id": 5, "member": "sa_5.json", "stage": "json", "reason": "broken", "job": "masks", "shard": 3},
    ]
    assert t.schema.field("shard").type == pa.int32()
    assert store.errors("masks").num_rows == 2 and store.errors("images").num_rows == 0
    assert store.fs.exists(store.path("_errors", "features__bb@224", "shard=000001.parquet"))
    store.write_errors("masks", 3, [])  # a clean redo leaves no stale rows
    assert store.errors("masks").column("shard").to_pylist() == [1]


def test_markers_and_summary(store):
    assert store.summary() == {}
    assert store.marker("masks", 0) is None
    base = {"config_hash": "h", "versions": {"loftup": "0.1"}, "finished_at": "2024-01-01T00:00:00Z"}
    store.write_marker("masks", 0, {**base, "images": 10, "masks": 900, "errors": 1, "bytes": 1000, "seconds": 1.25})
    store.write_marker("masks", 1, {**base, "images": 12, "masks": 1100, "errors": 0, "bytes": 2000, "seconds": 2.5})
    job = "features/dinov2_vits14@224"
    store.write_marker(job, 0, {**base, "images": 10, "errors": 0, "bytes": 1966080, "seconds": 3.0})
    assert store.fs.exists(store.path("_status", "features__dinov2_vits14@224", "shard=000000.json"))
    m = store.marker("masks", 1)
    assert m["job"] == "masks" and m["shard"] == 1 and m["masks"] == 1100 and m["versions"] == {"loftup": "0.1"}
    assert list(store.done_shards("masks")) == [0, 1]
    assert store.summary() == {
        "masks": {
            "shards": 2,
            "damaged_shards": 0,
            "failed_shards": 0,
            "images": 22,
            "failures": 1,
            "bytes": 3000,
            "seconds": 3.75,
            "masks": 2000,
        },
        job: {
            "shards": 1,
            "damaged_shards": 0,
            "failed_shards": 0,
            "images": 10,
            "failures": 0,
            "bytes": 1966080,
            "seconds": 3.0,
        },
    }
    with pytest.raises(ValueError):
        store.write_marker("masks", 2, {"job": "images"})
    with pytest.raises(StoreError, match="invalid job name"):
        store.write_marker("../evil", 0, {})
