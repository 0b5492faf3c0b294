#!/bin/sh
# The default command of `unlearn --until removed` on MNIST T-Shirt at three seeds, each stopped model's copy rate
# then measured apart from verify (2,048 ancestral DDPM samples, truth.py).
#   sh docs/results/until-default/run.sh runs/until-default
set -e
out=${1:-runs/until-default}
mkdir -p "$out"
for seed in 0 1 2; do
  /usr/bin/time -v diffunlearn unlearn --model mnist-tshirt-base --data mnist-tshirt --forget default \
    --until removed --seed $seed --threads 1 --log-every 50 --out "$out/seed$seed" > "$out/seed$seed.log" 2>&1 \
    || echo "seed $seed exit status $?" >> "$out/status.txt"
  python docs/results/verify-ladder/truth.py mnist-tshirt default "$out/seed$seed/model" >> "$out/truth.jsonl"
done
