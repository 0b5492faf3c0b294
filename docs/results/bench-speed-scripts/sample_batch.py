# sampling batch sizes 32-256, two interleaved rounds, CPU and wall seconds
# PYTHONPATH=src OMP_NUM_THREADS=1 python docs/results/bench-speed-scripts/sample_batch.py   (measured output: docs/results/bench-speed.md)
import time, statistics, torch
torch.set_num_threads(1)
from diffunlearn.bench.speed import _load
from diffunlearn.model.sampling import ddpm_sample
model = _load("mnist-tshirt-base")
N, STEPS = 256, 10
ddpm_sample(model, 64, steps=2, batch_size=64)
res = {bs: [] for bs in (32, 64, 128, 256)}
outs = {}
for r in range(2):
    for bs in res:
        c0 = time.process_time(); w0 = time.perf_counter()
        outs[bs] = ddpm_sample(model, N, steps=STEPS, batch_size=bs)
        res[bs].append((time.process_time() - c0, time.perf_counter() - w0))
for bs, v in res.items():
    print(f"batch {bs}: cpu {[round(c, 2) for c, w in v]} wall {[round(w, 2) for c, w in v]}  "
          f"bitwise equal to batch 256: {torch.equal(outs[bs], outs[256])}", flush=True)
