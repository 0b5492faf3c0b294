#!/usr/bin/env bash
# The instance-base calibration ladder: for each target, SISS (the tutorial's settings) and naive deletion through
# `diffunlearn unlearn` (which verifies at the fast budget against the shipped model), a model retrained without the
# target with the shipped model's own recipe, verified the same way, and each model's copy rate from 2,048 DDPM
# samples (truth.py). One thread. Usage: run-instance.sh OUT TARGET [TARGET ...]
set -euo pipefail
out=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
# the shipped model's recipe (src/diffunlearn/pretrained/instance-base/config.yaml)
recipe=(--data instance-digits --arch toy-small --steps 2500 --batch-size 64 --lr 0.002 --warmup 100 --weight-decay 1e-6
        --ema-max-decay 0.9999 --timesteps 1000 --seed 0)
mkdir -p "$out"
for t in "$@"; do
  common=(--model instance-base --data instance-digits --forget "$t" --lr 1e-3 --batch-size 32 --steps 60 --threads 1 --overwrite)
  diffunlearn unlearn "${common[@]}" --method siss --lambda 0.5 --scaling-norm 1.5 --out "$out/siss-$t" > "$out/siss-$t.log" 2>&1 || true
  diffunlearn unlearn "${common[@]}" --method naive --out "$out/naive-$t" > "$out/naive-$t.log" 2>&1 || true
  diffunlearn train "${recipe[@]}" --forget "$t" --threads 1 --out "$out/retrain-$t" --overwrite > "$out/retrain-$t.log" 2>&1 || true
  diffunlearn verify --model "$out/retrain-$t" --before instance-base --data instance-digits --forget "$t" --threads 1 \
    --out "$out/retrain-$t-verify" --overwrite > "$out/retrain-$t-verify.log" 2>&1 || true
  python "$here/truth.py" instance-digits "$t" instance-base "$out/siss-$t" "$out/naive-$t" "$out/retrain-$t" >> "$out/truth.jsonl" || true
  for m in siss naive; do grep "^verification" "$out/$m-$t.log" | sed "s/^/$m-$t: /" || true; done
  grep "^verification" "$out/retrain-$t-verify.log" | sed "s/^/retrain-$t: /" || true
done
