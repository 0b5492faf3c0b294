"""What each verification budget costs at 28x28, 128x128 and 256x256: seconds per UNet evaluation measured here
(one thread, batch 16, the median of 3 calls after a warm-up, random weights: cost does not depend on them) times the
evaluations each budget makes (`Budget.network_evaluations`, one item of A). The NLL (full budget only) is not in
the sum: its ODE's steps depend on the model; docs/results/verify-ladder gives its measured seconds at 28x28.

    python docs/results/verify-ladder/cost.py
"""

import json
import statistics
import time

import torch

from diffunlearn.bench.scale_models import ddpm_unet
from diffunlearn.model import build_unet
from diffunlearn.verification import BUDGETS

torch.set_num_threads(1)
SHAPES = {
    "28x28x1 (mnist-small, 1.1 M)": lambda: build_unet("mnist-small", 28, 1),
    "128x128x3 (toy arch, 2 levels)": lambda: build_unet("toy", 128, 3),
    "256x256x3 (google/ddpm-celebahq-256's shape, 113.7 M)": lambda: ddpm_unet(),
}


def per_eval(unet, shape, batch):
    x = torch.randn(batch, *shape)
    t = torch.full((batch,), 500)
    times = []
    with torch.inference_mode():
        unet(x, t)
        for _ in range(3):
            t0 = time.perf_counter()
            unet(x, t)
            times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


rows = {}
for name, build in SHAPES.items():
    torch.manual_seed(0)
    unet = build().eval()
    c = unet.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    s = per_eval(unet, shape, 16 if c.sample_size < 256 else 2)
    rows[name] = {"seconds_per_evaluation": s}
    for b in ("fast", "full"):
        ev = BUDGETS[b].network_evaluations()
        first = sum(ev.values())
        again = first - ev["search (model before, once)"]
        rows[name][b] = {"evaluations": ev, "minutes_first": first * s / 60, "minutes_search_cached": again * s / 60}
    print(json.dumps({name: rows[name]}), flush=True)
