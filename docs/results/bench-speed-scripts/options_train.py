# training steps: fp32, channels_last, bf16 autocast (--mixed-precision bf16), both; with the argument 'compile': fp32 and torch.compile
# PYTHONPATH=src OMP_NUM_THREADS=1 python docs/results/bench-speed-scripts/options_train.py   (measured output: docs/results/bench-speed.md)
import copy, sys, time, statistics, traceback
import torch
torch.set_num_threads(1)
import importlib; U = importlib.import_module("diffunlearn.unlearn")
from diffunlearn.bench.speed import _load, _sets, _count_cpu_attention
from diffunlearn.methods import make_method
from torch.utils.flop_counter import FlopCounterMode

model = _load("mnist-tshirt-base"); kept, forget = _sets(model)
real_deepcopy = copy.deepcopy
def run(method, transform=None, mp="no", steps=9, batch=32, count=False):
    class C:  # deepcopy of the UNet inside the trainer, then the transform
        @staticmethod
        def deepcopy(x):
            y = real_deepcopy(x)
            return transform(y) if transform is not None and isinstance(x, torch.nn.Module) else y
    U.copy = C
    marks = [(time.perf_counter(), time.process_time())]
    U.unlearn(model, kept, forget, make_method(*method), U.UnlearnConfig(steps=steps, batch_size=batch, mixed_precision=mp),
              callback=lambda s, u: marks.append((time.perf_counter(), time.process_time())))
    U.copy = copy
    wall = [b[0]-a[0] for a, b in zip(marks[1:], marks[2:])]
    cpu = [b[1]-a[1] for a, b in zip(marks[1:], marks[2:])]
    return wall, cpu, marks[2][0]-marks[0][0]

def flops(method):
    _count_cpu_attention()
    c = FlopCounterMode(display=False); tot = []
    with c:
        U.unlearn(model, kept, forget, make_method(*method), U.UnlearnConfig(steps=2, batch_size=32),
                  callback=lambda s, u: tot.append(c.get_total_flops()))
    return tot[1]-tot[0]

cl = lambda u: u.to(memory_format=torch.channels_last)
comp = lambda u: torch.compile(u)
variants = {"fp32": (None, "no"), "channels_last": (cl, "no"), "bf16 autocast": (None, "bf16"),
            "bf16 + channels_last": (cl, "bf16")}
if "compile" in sys.argv:
    variants = {"fp32": (None, "no"), "torch.compile": (comp, "no")}
for method in (("naive",), ("siss",)):
    F = flops(method)
    print(f"{method[0]}: {F/1e9:.2f} GFLOP/step", flush=True)
    for name, (tr, mp) in variants.items():
        try:
            wall, cpu, first = run(method, tr, mp)
            print(f"  {name:24s} median wall {statistics.median(wall):.3f} s cpu {statistics.median(cpu):.3f} s "
                  f"mean cpu {statistics.mean(cpu):.3f} max cpu {max(cpu):.3f}  {F/1e9/statistics.median(wall):.1f} GFLOP/s (wall) "
                  f"{F/1e9/statistics.median(cpu):.1f} (cpu); first step incl. setup {first:.1f} s", flush=True)
        except Exception as e:
            print(f"  {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            traceback.print_exc(limit=3)
