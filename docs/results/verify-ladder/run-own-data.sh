#!/usr/bin/env bash
# The kept-image reference: a data set made here with no held-out images. 255 of scikit-learn's 8x8 digits (1000-1254,
# none of them in instance-digits) plus 16 more copies of digit 1000, so that the model memorises that digit more
# than the rest; A = all 17 copies (indices 0 and 255-270). A base model with instance-base's recipe, then naive
# deletion and SISS (the tutorial's settings), a retrained model, each verified at the fast budget (the reference is
# the kept images), and each model's copy rate from 2,048 DDPM samples. One thread. Usage: run-own-data.sh OUT
set -euo pipefail
out=$1
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
python - "$out/digits-dup.npz" <<'PY'
import sys
import numpy as np
from sklearn.datasets import load_digits
x = load_digits().images[1000:1255]
x = np.concatenate([x, np.repeat(x[:1], 16, axis=0)])
np.savez(sys.argv[1], images=np.clip(x * 16, 0, 255).astype(np.uint8),
         names=np.array([f"digit-{i:03d}" for i in range(255)] + [f"copy-{i:02d}" for i in range(16)]))
PY
data=$out/digits-dup.npz; forget=0,255-270
recipe=(--data "$data" --arch toy-small --steps 2500 --batch-size 64 --lr 0.002 --warmup 100 --weight-decay 1e-6
        --ema-max-decay 0.9999 --timesteps 1000 --seed 0 --threads 1 --overwrite)
[ -d "$out/base/model" ] || diffunlearn train "${recipe[@]}" --out "$out/base" > "$out/base.log" 2>&1
common=(--model "$out/base" --data "$data" --forget "$forget" --lr 1e-3 --batch-size 32 --steps 60 --threads 1 --overwrite)
diffunlearn unlearn "${common[@]}" --method naive --out "$out/naive" > "$out/naive.log" 2>&1 || true
diffunlearn unlearn "${common[@]}" --method siss --lambda 0.5 --scaling-norm 1.5 --out "$out/siss" > "$out/siss.log" 2>&1 || true
[ -d "$out/retrain/model" ] || diffunlearn train "${recipe[@]}" --forget "$forget" --out "$out/retrain" > "$out/retrain.log" 2>&1
for m in base retrain; do
  diffunlearn verify --model "$out/$m" --before "$out/base" --data "$data" --forget "$forget" --threads 1 \
    --out "$out/$m-verify" --overwrite > "$out/$m-verify.log" 2>&1 || true
done
python "$here/truth.py" "$data" "$forget" "$out/base" "$out/naive" "$out/siss" "$out/retrain" > "$out/truth.jsonl"
for f in naive siss base-verify retrain-verify; do echo "$f: $(grep '^verification' "$out/$f.log")"; done
