"""The documentation runs as written: the Python blocks of README.md and docs/*.md marked
runnable, and the MkDocs site builds with ``--strict``.

A block is runnable when the line before its ```python fence is ``<!-- test -->`` or
``<!-- test {JSON} -->`` with ``"replace"`` (text -> text, applied to the block before it
runs; ``{store}``, ``{photo}``, ``{checkpoint}`` in a replacement name the fixtures below) and
``"needs"`` (modules; the block is skipped, with the reason, where one is not installed).
Readers see the code as written; the replacements point it at small local data and tiny
settings (a random-weight backbone, a small output). A page's blocks run in order in one
namespace, in a fresh folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*test(?:\s+(\{.*\}))?\s*-->\s*$")


def runnable_blocks(path: Path) -> list[dict]:
    """[{"line", "code", "replace", "needs"}] of a page's marked ```python blocks."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines[:-1]):
        m = MARK.match(line.strip())
        if not m or lines[i + 1].strip() != "```python":
            continue
        spec = json.loads(m.group(1)) if m.group(1) else {}
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        blocks.append(
            {
                "line": i + 3,
                "code": "\n".join(lines[i + 2 : end]),
                "replace": spec.get("replace", {}),
                "needs": spec.get("needs", []),
            }
        )
    return blocks


PAGES_WITH_BLOCKS = [p for p in PAGES if runnable_blocks(p)]


@pytest.fixture(scope="module")
def doc_fixtures(tmp_path_factory, read_only_store):
    """The small store of conftest.py, a photo, and a LoftUp checkpoint for DINOv2-S (random
    weights)."""
    from PIL import Image
    from skimage import data

    from loftup.training.checkpoint import save_model
    from loftup.training.model import LoftUp

    base = tmp_path_factory.mktemp("docs")
    store = read_only_store
    photo = base / "photo.jpg"
    Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC).save(photo)
    ckpt = save_model(LoftUp(384).eval(), base / "dinov2s.safetensors", extra={"backbone": "dinov2_vits14"})
    return {"store": store.url, "photo": str(photo), "checkpoint": str(ckpt)}


def test_the_quickstart_and_the_store_page_have_runnable_blocks():
    names = {p.name for p in PAGES_WITH_BLOCKS}
    assert {"quickstart.md", "store.md"} <= names, names


@pytest.mark.timeout(180)
@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS, ids=lambda p: p.name)
def test_python_blocks_run_as_written(page, doc_fixtures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    skipped = []
    for block in runnable_blocks(page):
        missing = [m for m in block["needs"] if importlib.util.find_spec(m) is None]
        if missing:
            skipped.append(f"{page.name}:{block['line']} needs {', '.join(missing)}")
            continue
        code = block["code"]
        for old, new in block["replace"].items():
            assert old in code, f"{page.name}:{block['line']}: the replacement {old!r} no longer matches the block"
            code = code.replace(old, new.format(**doc_fixtures))
        exec(compile(code, f"{page.name}:{block['line']}", "exec"), namespace)
    if skipped:
        pytest.skip("; ".join(skipped))


def test_store_page_examples_computed_what_they_say(doc_fixtures, tmp_path, monkeypatch):
    """The analyst examples' values, checked here independently of the page's own asserts."""
    import numpy as np

    from loftup.storage import open_store, rle

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in runnable_blocks(ROOT / "docs" / "store.md")[:3]:
        code = block["code"]
        for old, new in block["replace"].items():
            code = code.replace(old, new.format(**doc_fixtures))
        exec(code, namespace)
    store = open_store(doc_fixtures["store"])
    image_id = int(store.image_ids(0)[0])
    assert namespace["image_id"] == image_id
    np.testing.assert_array_equal(namespace["masks"], rle.decode_many(store.masks_for(image_id, 224)))
    assert namespace["f"].shape == (384, 16, 16)
    np.testing.assert_array_equal(
        namespace["first_rows"], store.features("dinov2_vits14", 224).get_many(store.image_ids(0)[:2])
    )
    areas = store.masks_dataset().to_table(columns=["area"]).column(0).to_numpy()
    assert namespace["big"].num_rows == int((areas > 1000).sum())


def _mkdocs_build(project: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def test_mkdocs_builds_strict_and_a_broken_link_fails_it(tmp_path):
    import shutil

    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
    assert "not_found" not in (ROOT / "mkdocs.yml").read_text()  # missing pages and links are errors
    run = _mkdocs_build(ROOT, tmp_path / "site")
    assert run.returncode == 0, run.stdout + run.stderr
    for page in (ROOT / "docs").glob("*.md"):
        built = tmp_path / "site" / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.exists(), page.name
    # the same site with one broken link does not build: CI's strict build catches it
    broken = tmp_path / "broken"
    shutil.copytree(ROOT / "docs", broken / "docs")
    shutil.copy(ROOT / "mkdocs.yml", broken / "mkdocs.yml")
    with open(broken / "docs" / "store.md", "a") as f:
        f.write("\nSee [the missing page](nosuch.md).\n")
    run = _mkdocs_build(broken, tmp_path / "site2")
    assert run.returncode != 0 and "nosuch.md" in run.stdout + run.stderr
