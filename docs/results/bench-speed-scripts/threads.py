# 1 and 2 threads, alternating: matmul rate and plain / SISS step times
# PYTHONPATH=src python docs/results/bench-speed-scripts/threads.py   (measured output: docs/results/bench-speed.md)
import time, statistics, torch, importlib
from diffunlearn.bench.speed import _load, _sets, matmul_gflops
from diffunlearn.methods import make_method
U = importlib.import_module("diffunlearn.unlearn")
model = _load("mnist-tshirt-base"); kept, forget = _sets(model)
for th in (1, 2, 1, 2):
    torch.set_num_threads(th)
    out = [f"{th} thread(s): matmul {matmul_gflops(2048):.0f} GFLOP/s"]
    for name in ("naive", "siss"):
        marks = [(time.perf_counter(), time.process_time())]
        U.unlearn(model, kept, forget, make_method(name), U.UnlearnConfig(steps=6, batch_size=32),
                  callback=lambda s, u: marks.append((time.perf_counter(), time.process_time())))
        wall = [b[0]-a[0] for a, b in zip(marks[1:], marks[2:])]; cpu = [b[1]-a[1] for a, b in zip(marks[1:], marks[2:])]
        out.append(f"{name} median wall {statistics.median(wall):.3f} s, CPU {statistics.median(cpu):.3f} s")
    print("; ".join(out), flush=True)
