"""Rebuild the MNIST T-Shirt models of the power table whose T-shirt rates are known from 2,048 samples, and save
them as diffusers directories for `diffunlearn verify` (the calibration ladder of docs/results/verify-ladder).

Each model is the power table's cell of the same method and seed (bench mnist-tshirt's settings: AdamW 5e-5, batch
64, the cell's seed); its first logged losses are checked against the cell's recorded log, so the model verified is
the model whose rate the table measured. SISS lambda 0.5 seed 0 runs once to 900 steps and is saved at 200, 300 and
900 (the learning rate is constant, so step k of the long run is the k-step run).

    python docs/results/verify-ladder/make_models.py OUT ROW [ROW ...]   # rows: naive, siss, siss-nois, retrack
"""

import json
import sys
from pathlib import Path

import torch

from diffunlearn import TrainerConfig, load_data, load_model, make_method, resolve_forget, save_model, split_kept, unlearn
from diffunlearn.model import DiffusionModel

POWER = Path(__file__).resolve().parents[1] / "bench-mnist-tshirt-power" / "cells"
ROWS = {  # name: (method, params, seed, steps, batch, save at, power-table cell)
    "naive": ("naive", {}, 0, 300, 64, (300,), "naive-seed0"),
    "siss": ("siss", {"lam": 0.5, "scaling_norm": 5.0}, 0, 900, 64, (200, 300, 900), "siss-lambda0.5-seed0"),
    "siss-nois": ("siss-nois", {"scaling_norm": 5.0}, 2, 300, 64, (300,), "siss-nois-seed2"),
    "retrack": ("retrack", {"lambda_r": 0.005, "knn": 10}, 0, 50, 128, (50,), "retrack-seed0"),
}


def main(out: str, rows: list[str]) -> None:
    torch.set_num_threads(1)
    base = load_model("mnist-tshirt-base")
    data = load_data("mnist-tshirt")
    kept, forget = split_kept(data, resolve_forget("default", data))
    kept, forget = kept.load(), forget.load()
    for name in rows:
        method, params, seed, steps, batch, save_at, cell = ROWS[name]
        cfg = TrainerConfig(steps=steps, batch_size=batch, lr=5e-5, beta1=0.95, beta2=0.999, weight_decay=1e-6,
                            clip_norm=1.0, grad_accum=1, seed=seed, threads=1, checkpoint_every=0)
        recorded = json.loads((POWER / cell / "result.json").read_text())["log"]
        log = []

        def save(step, unet):
            if step in save_at:
                path = Path(out) / f"{name}-{step}"
                save_model(DiffusionModel(unet, base.scheduler), path / "model", overwrite=True)
                mine = [{k: r[k] for k in ("loss_x", "loss_a") if k in r} for r in log[:5]]
                theirs = [{k: r[k] for k in ("loss_x", "loss_a") if k in r} for r in recorded[:5]]
                (path / "made.json").write_text(json.dumps({"row": name, "method": method, "params": params,
                                                            "seed": seed, "step": step, "cell": cell,
                                                            "first_losses_match_cell": mine == theirs,
                                                            "first_losses": mine}, indent=1))
                print(f"{name} step {step} saved; first losses match the cell's: {mine == theirs}", flush=True)

        unlearn(base, kept, forget, make_method(method, **params), cfg, log=log.append, callback=save)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
