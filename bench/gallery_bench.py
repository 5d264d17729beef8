"""Seconds per picture: the gallery's pictures beside the previous `loftup-store show`.

Builds a store of SA-1B-sized sample images (1500 px, 100-170 masks each; random-weight DINOv2-S
features), then per image and geometry times:

- before (the `show` of issue 24's report): decode every mask, blend mask by mask (a float pass
  over the image and four shifted ANDs per mask), PCA by a full ``eigh`` of the covariance,
  a PNG of the panels; and the process around it, which imported torch to convert the features;
- now: ``loftup.show_masks`` (the 30 largest masks, painted straight from the RLE runs),
  ``loftup.pca_picture`` (subspace iteration), JPEG, as ``loftup-store gallery`` draws them;
- the gallery end to end (thumbnails and full-size pictures), and one `loftup-store show`
  process now, wall clock.

    python bench/gallery_bench.py [--images 4] [--short-side 1500]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def before_overlay(image, masks, alpha=0.5):
    """The previous ``overlay_masks``, kept here as the baseline."""
    from loftup.pictures import palette

    out = np.asarray(image)[..., :3].astype(np.float32)
    for mask, color in zip(masks, palette(len(masks))):
        if not mask.any():
            continue
        out[mask] = (1 - alpha) * out[mask] + alpha * color.astype(np.float32)
        edge = mask.copy()
        edge[1:-1, 1:-1] = mask[1:-1, 1:-1] & ~(mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:])
        out[edge] = 0.6 * color.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def before_pca(fmap):
    """The previous PCA fit: every eigenvector of the C x C covariance."""
    c = fmap.shape[0]
    x = np.asarray(fmap, np.float64).reshape(c, -1).T
    x = x - x.mean(0)
    _, vecs = np.linalg.eigh(x.T @ x)
    return vecs[:, ::-1][:, :3]


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--short-side", type=int, default=1500)
    args = ap.parse_args()

    import loftup
    from loftup.pictures import save_panels
    from loftup.sample_data import build_sample_store
    from loftup.storage import rle
    from loftup.storage.gallery import write_gallery

    work = Path(tempfile.mkdtemp(prefix="gallery_bench_"))
    store = build_sample_store(
        work / "store", tars=1, images_per_tar=args.images, short_side=args.short_side, sizes=(224, 896)
    )
    feats = store.features("dinov2_vits14", 224)
    ids = store.image_ids(0).tolist()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    torch_import = time.perf_counter() - t0

    print(f"{len(ids)} images of {args.short_side} px, masks per image: {[len(store.masks_for(i)) for i in ids]}")
    print(f"`import torch` in a fresh process (paid by every `show` before): {torch_import:.2f} s\n")
    print(
        "| geometry | masks | before: decode | before: blend | before: PCA (eigh) | before: PNG | before, total | before + import torch | now: masks picture | now: PCA picture | now: JPEG | now, total |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in (224, 896):
        rows = []
        for image_id in ids:
            img = store.image(image_id, size)
            rles = store.masks_for(image_id, size=size)
            fmap = feats.get(image_id)
            decoded = rle.decode_many(rles)
            t_decode = timed(lambda: rle.decode_many(rles))
            t_blend = timed(lambda: before_overlay(img, decoded))
            t_eigh = timed(lambda: before_pca(fmap))
            panel = [np.asarray(img), before_overlay(img, decoded), np.asarray(loftup.pca_picture(fmap, size=size))]
            t_png = timed(lambda: save_panels(panel, ["image", "masks", "PCA"], work / "before.png"))
            t_masks = timed(lambda: loftup.show_masks(img, rles, top=30))
            t_pca = timed(lambda: loftup.pca_picture(fmap, size=size))
            pic = loftup.show_masks(img, rles, top=30)
            t_jpeg = timed(lambda: pic.save(io.BytesIO(), format="JPEG", quality=88))
            rows.append((len(rles), t_decode, t_blend, t_eigh, t_png, t_masks, t_pca, t_jpeg))
        m = np.mean(np.asarray(rows, float), axis=0)
        before = m[1] + m[2] + m[3] + m[4]
        now = m[5] + m[6] + 2 * m[7]
        print(
            f"| {size} | {m[0]:.0f} | {m[1]:.3f} s | {m[2]:.3f} s | {m[3]:.3f} s | {m[4]:.3f} s | {before:.2f} s "
            f"| {before + torch_import:.2f} s | {m[5]:.3f} s | {m[6]:.3f} s | {m[7]:.3f} s | {now:.2f} s |"
        )

    r = write_gallery(store, work / "gallery")
    print(
        f"\ngallery: {r['images']} images, {r['pictures']} pictures (thumbnail + 896 px each) in "
        f"{r['seconds']:.2f} s: {r['seconds_per_picture']:.3f} s per picture, {r['seconds'] / r['images']:.2f} s per image"
    )
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "loftup.cli.store", "show", store.url, "--image-id", str(ids[0]), "--size", "896",
         "--backbone", "dinov2_vits14", "--out", str(work / "show.png")],
        check=True,
        capture_output=True,
    )  # fmt: skip
    print(f"`loftup-store show --size 896` now, one process, wall clock: {time.perf_counter() - t0:.2f} s")
    print(f"(work files in {work})")


if __name__ == "__main__":
    main()
