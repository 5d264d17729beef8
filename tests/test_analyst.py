"""The analyst side of a store: COCO export read back by pycocotools, the HTML gallery in a real
browser, the store CLI's reading commands with torch and Ray unimportable, and the small
fixes (credential redaction of harmless keys, ``errors --job`` for a job that never ran)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from loftup.cli import FULL_ONLY
from loftup.storage import rle
from loftup.storage.errors import NotInStore

HEAVY = sorted(FULL_ONLY)

# Runs console scripts (their entry points, in order) in one process where the full install's
# packages cannot be imported, as in a `pip install loftup` (store-reading) environment.
LIGHT_DRIVER = """
import contextlib, io, json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None  # `import name` now raises ImportError
import loftup.cli
results = []
for script, args in json.loads(sys.argv[2]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [f"loftup-{script}", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            getattr(loftup.cli, f"{script}_main")()
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def test_coco_export_opens_in_pycocotools_with_the_stores_masks(read_only_store, tmp_path):
    from pycocotools.coco import COCO

    from loftup.storage.coco import export_coco

    store = read_only_store
    ids = store.image_ids(0).tolist()
    rows = store.masks_table(0).to_pylist()
    for size in (None, 224):
        out = export_coco(store, 0, tmp_path / str(size), size=size)
        coco = COCO(str(out["path"]))
        assert out["images"] == len(ids) and out["annotations"] == len(rows) == len(coco.anns)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["object"]
        for image_id in ids:
            meta = coco.imgs[image_id]
            want = store.masks_for(image_id, size=size)
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["order"])
            assert len(anns) == len(want) > 0
            assert (meta["height"], meta["width"]) == tuple(want[0]["size"])
            decoded = np.stack([coco.annToMask(a).astype(bool) for a in anns])
            np.testing.assert_array_equal(decoded, rle.decode_many(want))
            for a, m in zip(anns, decoded):
                ys, xs = np.nonzero(m)
                assert a["area"] == m.sum() and a["iscrowd"] == 0
                # a small mask can vanish at a geometry: COCO's box of an empty mask is zeros
                box = (
                    [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] if len(xs) else [0, 0, 0, 0]
                )
                assert a["bbox"] == box
        if size is None:
            names = dict(zip(*store.images_table(0, ["image_id", "file_name"]).to_pydict().values()))
            assert {i: coco.imgs[i]["file_name"] for i in ids} == names
        else:  # the stored crops are written beside the JSON, where file_name points
            from PIL import Image

            crop = Image.open(out["path"].parent / coco.imgs[ids[0]]["file_name"])
            assert crop.size == (224, 224)
            assert np.array_equal(np.asarray(crop), np.asarray(store.image(ids[0], 224)))
    with pytest.raises(NotInStore, match="no committed masks shard 7"):
        export_coco(store, 7, tmp_path / "x")


def test_store_cli_reads_without_torch_or_ray(read_only_store, tmp_path):
    s = str(read_only_store.url)
    image_id = str(int(read_only_store.image_ids(0)[0]))
    needs_full = "which the full install has: pip install 'loftup[full]'"
    cases = [
        ("store", ["info", s], 0, '"schema_version"'),
        ("store", ["status", s], 0, "features/dinov2_vits14@224"),
        ("store", ["errors", s], 0, "0 errors"),
        ("store", ["errors", s, "--job", "nosuch"], 2, "error: no job 'nosuch' has run on this store; its jobs: "),
        ("store", ["masks", s, "--limit", "2", "--columns", "image_id,area"], 0, "masks"),
        ("store", ["verify", s, "--deep"], 0, "store verified"),
        ("store", ["export-coco", "--store", s, "--out", str(tmp_path / "coco")], 0, "shard=000000.json"),
        ("store", ["export-coco", s, "--out", str(tmp_path / "coco"), "--shards", "3"], 2, "no committed masks for shard(s) 3"),
        ("store", ["gallery", s, "--out", str(tmp_path / "gallery"), "--per-shard", "1"], 0, "index.html"),
        ("store", ["show", s, "--image-id", image_id, "--out", str(tmp_path / "s.png"), "--backbone", "dinov2_vits14",
                   "--top", "5"], 0, "wrote"),
        # what needs the full install says so in one line
        ("train", ["--help"], 2, f"error: this command needs torch, {needs_full}"),
        ("pipeline", ["features", "--shards", "0", "--store", s, "--random-init"], 2, needs_full),
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    run = subprocess.run(
        [sys.executable, "-c", LIGHT_DRIVER, json.dumps(HEAVY), json.dumps([c[:2] for c in cases])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    for (_, args, rc, text), got in zip(cases, json.loads(run.stdout)):
        both = got["out"] + got["err"]
        assert got["rc"] == rc and text in both, (args, got)
        assert "Traceback" not in both, (args, both)
        if rc == 2:
            assert len(got["err"].strip().splitlines()) == 1, got["err"]
    assert (tmp_path / "gallery" / "index.html").exists() and (tmp_path / "coco" / "shard=000000.json").exists()


def test_redaction_keeps_descriptions_and_masks_credentials(read_only_store):
    from loftup.storage.redact import redact

    tokens = read_only_store.manifest["backbones"]["dinov2_vits14@224"]["tokens"]
    assert tokens != "***" and "patch tokens" in tokens
    got = redact(
        {
            "tokens": "last-layer patch tokens",
            "authors": "Huang et al.",
            "aws_secret_access_key": "A",
            "SessionToken": "B",
            "apiKey": "C",
            "sastoken": "D",
            "client_kwargs": {"region_name": "eu-west-1", "key": "E"},
        }
    )
    assert got == {
        "tokens": "last-layer patch tokens",
        "authors": "Huang et al.",
        "aws_secret_access_key": "***",
        "SessionToken": "***",
        "apiKey": "***",
        "sastoken": "***",
        "client_kwargs": {"region_name": "eu-west-1", "key": "***"},
    }


CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  document.body.setAttribute('data-images', JSON.stringify([...document.images].map(
    i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight, i.width])));
});
</script>"""


@pytest.mark.timeout(120)
def test_gallery_renders_in_headless_chromium(read_only_store, tmp_path):
    import html as html_lib

    from PIL import Image

    from loftup.pictures import show_masks
    from loftup.storage.gallery import _save_jpeg, write_gallery

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    store = read_only_store
    out = write_gallery(store, tmp_path / "g", top=10)
    ids = store.image_ids(0).tolist()
    assert out["images"] == len(ids) and out["pictures"] == 4 * len(ids)  # masks + PCA, thumb + full
    page = out["path"].read_text()
    for image_id in ids:
        assert f"href='full/{image_id}_masks.jpg'" in page and f"href='full/{image_id}_pca.jpg'" in page
        full = np.asarray(Image.open(tmp_path / "g" / "full" / f"{image_id}_masks.jpg"))
        want = show_masks(store.image(image_id, 224), store.masks_for(image_id, 224), top=10)
        encoded = io.BytesIO()
        _save_jpeg(want, encoded)  # the gallery's JPEG settings: the same decoded pixels
        assert np.array_equal(full, np.asarray(Image.open(encoded)))
    # The page's own shard table, cell by cell: every job committed shard 0.
    row = page[page.index("<td><a href='#shard-0'>0</a></td>") :].split("</tr>")[0]
    assert row.count("class='done'") == len(store.jobs()) == 3

    check = out["path"].with_name("check.html")  # the page plus a probe, next to it for relative paths
    check.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1000,900",
            f"--screenshot={shot}",
            "--dump-dom",
            check.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(html_lib.unescape(run.stdout.split('data-images="', 1)[1].split('"', 1)[0]))
    assert len(found) == 2 * len(ids)
    for src, complete, natural_w, natural_h, shown_w in found:
        thumb = Image.open(tmp_path / "g" / src)
        assert complete and (natural_w, natural_h) == thumb.size and shown_w == thumb.width, src
    pixels = np.asarray(Image.open(shot).convert("RGB"), float)
    assert pixels.std() > 20  # not a blank page
    # The thumbnails' colours are on screen: the share of strongly coloured pixels (text and
    # table borders are grey) is at least what the thumbnails' own area gives.
    saturated = (pixels.max(2) - pixels.min(2)) > 60
    assert saturated.mean() > 0.02, saturated.mean()
