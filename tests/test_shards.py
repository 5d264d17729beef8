import os

import pytest

from loftup.pipeline.shards import parse_shards, resolve_shards, tar_path
from loftup.storage.errors import LoftupError, ShardSpecError


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0-3,120,200-202", [0, 1, 2, 3, 120, 200, 201, 202]),
        ("5", [5]),
        (" 7 , 2 - 4 ,3", [2, 3, 4, 7]),
        ("9,9,8-9", [8, 9]),
        ("999999", [999999]),
        ("0-0", [0]),
        ("010", [10]),
    ],
)
def test_parse_good(spec, expected):
    assert parse_shards(spec) == expected


@pytest.mark.parametrize(
    "spec, named",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1,,2", "''"),
        ("1,", "''"),
        ("9-5", "'9-5'"),
        ("-3", "'-3'"),
        ("2--4", "'2--4'"),
        ("abc", "'abc'"),
        ("1.5", "'1.5'"),
        ("1-", "'1-'"),
        ("1000000", "'1000000'"),
        ("5-1000000", "'5-1000000'"),
        ("0x10", "'0x10'"),
        ("1-2-3", "'1-2-3'"),
    ],
)
def test_parse_bad_names_the_part(spec, named):
    with pytest.raises(ShardSpecError) as info:
        parse_shards(spec)
    msg = str(info.value)
    assert named in msg
    assert "\n" not in msg
    assert isinstance(info.value, LoftupError)


def test_tar_path_local_and_url(tmp_path):
    assert tar_path(tmp_path, 123) == os.path.join(str(tmp_path), "sa_000123.tar")
    assert tar_path("s3://bucket/sa1b/", 5) == "s3://bucket/sa1b/sa_000005.tar"


def _touch(root, shards):
    for s in shards:
        (root / f"sa_{s:06d}.tar").write_bytes(b"x")


def test_resolve_ok(tmp_path):
    _touch(tmp_path, [0, 1, 2, 7])
    got = resolve_shards("0-2,7", tmp_path)
    assert got == [(s, os.path.join(str(tmp_path), f"sa_{s:06d}.tar")) for s in (0, 1, 2, 7)]


def test_resolve_lists_all_missing_compressed(tmp_path):
    _touch(tmp_path, [0, 2, 3, 4])
    (tmp_path / "sa_000010.tar").mkdir()  # a directory is not a tar
    with pytest.raises(ShardSpecError) as info:
        resolve_shards("0-12", tmp_path)
    msg = str(info.value)
    assert "sa_000001.tar" in msg
    assert "sa_000005.tar ... sa_000012.tar" in msg
    assert "(9 missing)" in msg
    assert "sa_000000.tar" not in msg and "sa_000003.tar" not in msg
    assert str(tmp_path) in msg


def test_resolve_two_missing_listed_both(tmp_path):
    _touch(tmp_path, [0])
    with pytest.raises(ShardSpecError, match=r"sa_000001\.tar, sa_000002\.tar \(2 missing\)"):
        resolve_shards("0-2", tmp_path)


def test_resolve_missing_root(tmp_path):
    with pytest.raises(ShardSpecError, match="not a directory"):
        resolve_shards("0", tmp_path / "nope")


def test_resolve_bad_spec_before_listing(tmp_path):
    with pytest.raises(ShardSpecError, match="reversed"):
        resolve_shards("3-1", tmp_path / "nope")


def test_resolve_fsspec_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "memory://loftup-test-shards"
    for s in (3, 4):
        with fs.open(f"{root}/sa_{s:06d}.tar", "wb") as f:
            f.write(b"x")
    try:
        assert resolve_shards("3,4", root) == [(3, f"{root}/sa_000003.tar"), (4, f"{root}/sa_000004.tar")]
        with pytest.raises(ShardSpecError, match=r"sa_000005\.tar \(1 missing\)"):
            resolve_shards("3-5", root)
    finally:
        fs.rm("/loftup-test-shards", recursive=True)
