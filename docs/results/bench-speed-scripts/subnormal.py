"""Exact SISS steps on the shipped model with and without zeroing negligible importance weights, side by side.

    PYTHONPATH=src python docs/results/bench-speed-scripts/subnormal.py [steps] [rounds] [batch] [threads]

Variants (interleaved over rounds, every run the same seeded steps from the same model; step 1 of each run dropped
as warm-up): "unflushed" puts every weight into the backward pass as it was before (drop_negligible replaced by the
identity), "unflushed + set_flush_denormal" does so with torch.set_flush_denormal(True) on the calling thread, and
"drop_negligible" is the shipped code. Each step is timed twice: wall-clock seconds, and the process's CPU seconds
(which another job sharing the machine inflates much less).
"""

import statistics
import sys
import time

import torch

from diffunlearn.bench.speed import _load, _sets
from diffunlearn.methods import make_method, siss
from diffunlearn.unlearn import UnlearnConfig, unlearn

steps, rounds, batch, threads = (int(a) for a in (sys.argv[1:] + ["13", "2", "32", "1"][len(sys.argv) - 1:]))
torch.set_num_threads(threads)
model = _load("mnist-tshirt-base")
kept, forget = _sets(model)
shipped = siss.drop_negligible
variants = {"unflushed": (lambda w, loss: w, False), "unflushed + set_flush_denormal": (lambda w, loss: w, True),
            "drop_negligible": (shipped, False)}
times = {k: {"wall": [], "cpu": []} for k in variants}
per_step = {k: [] for k in variants}
for r in range(rounds):
    for name, (rule, ftz) in variants.items():
        siss.drop_negligible = rule
        torch.set_flush_denormal(ftz)
        marks = [(time.perf_counter(), time.process_time())]
        unlearn(model, kept, forget, make_method("siss", lam=0.5, scaling_norm=5.0),
                UnlearnConfig(steps=steps, batch_size=batch),
                callback=lambda step, unet: marks.append((time.perf_counter(), time.process_time())))
        for i, kind in enumerate(("wall", "cpu")):
            times[name][kind] += [b[i] - a[i] for a, b in zip(marks[1:], marks[2:])]  # step 1 is warm-up
        per_step[name].append([b[1] - a[1] for a, b in zip(marks[1:], marks[2:])])
torch.set_flush_denormal(False)
print(f"mnist-tshirt-base, exact SISS (lambda 0.5, norm 5), batch {batch}, {threads} thread(s), "
      f"{rounds} rounds x {steps - 1} timed steps per variant\n")
print("| variant | median s (wall / CPU) | mean s (wall / CPU) | slowest s (wall / CPU) |")
print("|---|---|---|---|")
for name, ts in times.items():
    w, c = ts["wall"], ts["cpu"]
    print(f"| {name} | {statistics.median(w):.3f} / {statistics.median(c):.3f} | "
          f"{statistics.mean(w):.3f} / {statistics.mean(c):.3f} | {max(w):.3f} / {max(c):.3f} |")
print("\nCPU seconds of each step, round 1:")
for name in variants:
    print(f"{name}: " + " ".join(f"{t:.2f}" for t in per_step[name][0]))
