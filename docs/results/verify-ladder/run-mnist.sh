#!/usr/bin/env bash
# The MNIST T-Shirt calibration ladder: every model verified at the given budget (default fast) against the shipped
# base model. Models: the shipped base and retrained models, and the power table's runs rebuilt by make_models.py
# into $MODELS. One thread per job. Usage: run-mnist.sh MODELS OUT [BUDGET]
set -euo pipefail
models=$1; out=$2; budget=${3:-fast}
mkdir -p "$out"
run() {  # name model
  diffunlearn verify --model "$2" --before mnist-tshirt-base --data mnist-tshirt --forget default \
    --budget "$budget" --threads 1 --out "$out/$1" --overwrite > "$out/$1.log" 2>&1 || true
  tail -3 "$out/$1.log" | head -1
}
run base mnist-tshirt-base
run retrained mnist-tshirt-retrain
for m in naive-300 siss-200 siss-300 siss-900 siss-nois-300 retrack-50; do run "$m" "$models/$m"; done
