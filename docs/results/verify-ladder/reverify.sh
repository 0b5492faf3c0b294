#!/usr/bin/env bash
# Verify every model of the instance-base and own-data ladders again with `diffunlearn verify` (the same verdicts
# `unlearn` wrote when it saved them), at the fast budget. Usage: reverify.sh LADDER
set -euo pipefail
root=$1
for log in "$root"/instance/siss-*.log; do
  t=${log##*/siss-}; t=${t%.log}
  for m in siss naive; do
    diffunlearn verify --model "$root/instance/$m-$t" --before instance-base --data instance-digits --forget "$t" \
      --threads 1 --out "$root/instance/$m-$t-verify" --overwrite > "$root/instance/$m-$t-verify.log" 2>&1 || true
  done
  diffunlearn verify --model "$root/instance/retrain-$t" --before instance-base --data instance-digits --forget "$t" \
    --threads 1 --out "$root/instance/retrain-$t-verify" --overwrite > "$root/instance/retrain-$t-verify.log" 2>&1 || true
done
own=$root/own
for m in base naive siss retrain; do
  diffunlearn verify --model "$own/$m" --before "$own/base" --data "$own/digits-dup.npz" --forget 0,255-270 \
    --threads 1 --out "$own/$m-verify" --overwrite > "$own/$m-verify.log" 2>&1 || true
done
