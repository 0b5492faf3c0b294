"""The copy rate of a model measured apart from `verify`: 2,048 samples by 50-step ancestral DDPM (the protocol's
sampler) at seed 1 (verify samples at seed 0), each counted as a near-copy of A by the same rule as verify (0.85 x
the distance from each item of A to its nearest other image of the data set, all of them).

    python docs/results/verify-ladder/truth.py DATA FORGET MODEL [MODEL ...] > truth.jsonl
"""

import json
import sys

import torch

from diffunlearn import ddpm_sample, load_data, load_model, resolve_forget
from diffunlearn.metrics.rates import binomial_ci, pixel_distances
from diffunlearn.verification.verdicts import copy_hits, near_copy_thresholds

torch.set_num_threads(1)
data = load_data(sys.argv[1])
idx = resolve_forget(sys.argv[2], data)
images = torch.as_tensor(data.images[list(range(len(data)))])
items = torch.unique(images[idx], dim=0)
others = [images[[i for i in range(len(data)) if i not in set(idx)]]]
if data.held_out is not None:
    others.append(torch.as_tensor(data.held_out[list(range(len(data.held_out)))]))
others = torch.cat(others)
_, th = near_copy_thresholds(items, others)
for path in sys.argv[3:]:
    model = load_model(path)
    x = ddpm_sample(model, 2048, 50, seed=1)
    d = pixel_distances(x, items).numpy()
    k = int(copy_hits(d, th).sum())
    print(json.dumps({"model": path, "forget": sys.argv[2], "count": k, "n": 2048, "ci95": binomial_ci(k, 2048),
                      "threshold": [float(t) for t in th], "nearest": float(d.min())}), flush=True)
