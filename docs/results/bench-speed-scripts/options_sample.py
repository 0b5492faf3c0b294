# sampling: batch sizes, channels_last, bf16 autocast; with the argument 'compile': torch.compile
# PYTHONPATH=src OMP_NUM_THREADS=1 python docs/results/bench-speed-scripts/options_sample.py   (measured output: docs/results/bench-speed.md)
import sys, time, statistics, traceback, copy
import torch
torch.set_num_threads(1)
from diffunlearn.bench.speed import _load, _count_cpu_attention
from diffunlearn.model.sampling import ddpm_sample
import diffunlearn.model.sampling as S
from torch.utils.flop_counter import FlopCounterMode

model = _load("mnist-tshirt-base")
N, STEPS = 256, 10
_count_cpu_attention()
c = FlopCounterMode(display=False)
with c:
    ddpm_sample(model, 32, steps=1, batch_size=32)
F_img_step = c.get_total_flops() / 32
print(f"{F_img_step/1e6:.1f} MFLOP per image per denoising step", flush=True)

def timed(fn):
    fn()  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out

ref = None
def report(name, fn):
    global ref
    try:
        w, cpu, out = timed(fn)
        F = F_img_step * N * STEPS
        diff = "" if ref is None else f" max |x - fp32 batch 256| {float((out - ref).abs().max()):.2e}"
        print(f"  {name:34s} wall {w:.2f} s cpu {cpu:.2f} s  {N / cpu:.0f} images/s (cpu)  {F/1e9/w:.1f} GFLOP/s (wall) {F/1e9/cpu:.1f} (cpu){diff}", flush=True)
        return out
    except Exception as e:
        print(f"  {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
        traceback.print_exc(limit=3)

mode = sys.argv[1] if len(sys.argv) > 1 else "basic"
if mode == "basic":
    ref = report("fp32 batch 256 (default)", lambda: ddpm_sample(model, N, steps=STEPS, batch_size=256))
    for bs in (16, 64, 1024):
        report(f"fp32 batch {bs}", lambda: ddpm_sample(model, N, steps=STEPS, batch_size=bs))
    cl = copy.deepcopy(model); cl.unet = cl.unet.to(memory_format=torch.channels_last)
    report("channels_last batch 256", lambda: ddpm_sample(cl, N, steps=STEPS, batch_size=256))
    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ddpm_sample(model, N, steps=STEPS, batch_size=256).float()
    report("bf16 autocast batch 256", bf16)
    def bf16cl():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ddpm_sample(cl, N, steps=STEPS, batch_size=256).float()
    report("bf16 autocast + channels_last", bf16cl)
else:
    ref = report("fp32 batch 256 (default)", lambda: ddpm_sample(model, N, steps=STEPS, batch_size=256))
    cm = copy.deepcopy(model); cm.unet = torch.compile(cm.unet)
    t0 = time.perf_counter(); ddpm_sample(cm, 8, steps=1, batch_size=256); print(f"  compile (first call) {time.perf_counter()-t0:.0f} s")
    report("torch.compile batch 256", lambda: ddpm_sample(cm, N, steps=STEPS, batch_size=256))
