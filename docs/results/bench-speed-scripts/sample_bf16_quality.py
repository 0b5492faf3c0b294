# 256 samples of 50 steps in float32 and under bf16 autocast, scored by the T-shirt protocol
# PYTHONPATH=src OMP_NUM_THREADS=1 python docs/results/bench-speed-scripts/sample_bf16_quality.py   (measured output: docs/results/bench-speed.md)
import time, torch
torch.set_num_threads(1)
from diffunlearn.bench.speed import _load
from diffunlearn.model.sampling import ddpm_sample
from diffunlearn.commands.evaluate import MnistTshirtProtocol
model = _load("mnist-tshirt-base"); proto = MnistTshirtProtocol.load()
N = 256
res = {}
for name in ("fp32", "bf16"):
    c0 = time.process_time(); w0 = time.perf_counter()
    if name == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = ddpm_sample(model, N, steps=50, seed=0, batch_size=64).float()
    else:
        x = ddpm_sample(model, N, steps=50, seed=0, batch_size=64)
    c, w = time.process_time() - c0, time.perf_counter() - w0
    m = proto.sample_metrics(x); m.pop("_is_target")
    res[name] = x
    print(name, f"cpu {c:.1f} s wall {w:.1f} s", m["tshirt_rate"]["count"], "T-shirts of", N,
          f"IS {m['classifier_is']['mean']:.3f} FID {m['classifier_fid']['value']:.3f}", flush=True)
d = (res["fp32"] - res["bf16"]).abs().flatten(1)
print("per-image max |diff|: median", float(d.max(1).values.median()), "fraction of images with max diff > 0.5:", float((d.max(1).values > 0.5).float().mean()))
