"""``diffunlearn bench sampler``: faster samplers against 50-step ancestral DDPM on the shipped MNIST T-Shirt model.

Every sampler draws the same ``n`` images (image ``i`` from generator ``(0, i)``) in one process, one after the
other, so their times are comparable; each is judged by the MNIST T-Shirt measures a rate needs (the T-shirt rate
with its exact interval, classifier FID against the kept digits, classifier IS). A faster sampler may replace DDPM
for rates only if its T-shirt rate lies within DDPM's interval (and DDPM's within its) and its FID is close; the
table says so per sampler, and the paired counts say whether the same starting noises give the T-shirt.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import run_field
from ..errors import UserError


@dataclass
class SamplerBenchConfig:
    out: str = field(default="runs/bench-sampler", metadata={"help": "output directory"})
    n_samples: int = field(default=2048, metadata={"help": "images per sampler (the same seeds for every sampler)"})
    samplers: str = field(default="ddpm:50,dpm++:12,dpm++:20,dpm++sde:20",
                          metadata={"help": "comma list of SAMPLER:STEPS; the first is the reference"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    threads: int = run_field("threads")
    overwrite: bool = run_field("overwrite")


def parse_samplers(spec: str) -> list[tuple[str, int]]:
    from ..model.sampling import SAMPLERS

    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, steps = part.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise UserError(f"--samplers item {part!r} must be SAMPLER:STEPS with SAMPLER one of {', '.join(SAMPLERS)}")
        out.append((name, int(steps)))
    if len(out) < 2:
        raise UserError("--samplers needs a reference and at least one sampler to compare with it")
    return out


def run_sampler_bench(cfg: SamplerBenchConfig) -> dict:
    from ..data import to_uint8
    from ..metrics.rates import paired_hits
    from ..model import load_model
    from ..model.sampling import ddpm_sample, save_grid
    from ..protocols.mnist_tshirt import MnistTshirtProtocol
    from ..runs import RunDir, prepare_out_dir

    samplers = parse_samplers(cfg.samplers)
    if cfg.n_samples < 10 or cfg.batch_size < 1:
        raise UserError("--n-samples >= 10 and --batch-size >= 1 are required")
    prepare_out_dir(cfg.out, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_model("mnist-tshirt-base")
    protocol = MnistTshirtProtocol.load()
    run = RunDir(cfg.out, {"command": "bench sampler", **asdict(cfg)}, cfg.overwrite)
    rows = []
    for name, steps in samplers:
        t0 = time.time()
        x = ddpm_sample(model, cfg.n_samples, steps, 0, cfg.batch_size, sampler=name)
        seconds = time.time() - t0
        m = protocol.sample_metrics(x)
        m.pop("_is_target")
        row = {"sampler": name, "steps": steps, "seconds": round(seconds, 1),
               "images_per_second": cfg.n_samples / seconds, **m}
        rows.append(row)
        run.log({"sampler": name, "steps": steps, "seconds": row["seconds"], "tshirt": m["tshirt_rate"]["count"]})
        save_grid(x[:64], Path(cfg.out) / f"samples-{name}-{steps}.png", ncol=8,
                  title=f"{name}, {steps} steps: samples 0-63")
        import numpy as np

        np.save(Path(cfg.out) / f"samples-{name}-{steps}.npy", to_uint8(x))
        print(f"{name} {steps} steps: {seconds:.0f} s, T-shirts {m['tshirt_rate']['count']}/{cfg.n_samples}, "
              f"FID {m['classifier_fid']['value']:.2f}", flush=True)
    ref = rows[0]
    for r in rows:
        r["speedup"] = ref["seconds"] / r["seconds"]
        lo, hi = ref["tshirt_rate"]["ci95"]
        rlo, rhi = r["tshirt_rate"]["ci95"]
        r["rate_agrees"] = bool(lo <= r["tshirt_rate"]["rate"] <= hi and rlo <= ref["tshirt_rate"]["rate"] <= rhi)
        r["paired_with_reference"] = paired_hits(r["tshirt_rate"]["indices"], ref["tshirt_rate"]["indices"])
    md = [f"Command: `diffunlearn bench sampler --n-samples {cfg.n_samples} --samplers {cfg.samplers}`; the shipped "
          f"`mnist-tshirt-base`, image i from generator (0, i), all samplers in one process"
          f"{f' at {cfg.threads} thread(s)' if cfg.threads else ''}.\n",
          "| sampler | steps | seconds | images/s | speed-up | T-shirts (95% CI) | rate within the reference's "
          "interval and back | classifier FID | classifier IS | T-shirt here only / in the reference only / both "
          "(McNemar p) |",
          "|" + "---|" * 10]
    for r in rows:
        t, p = r["tshirt_rate"], r["paired_with_reference"]
        md.append(f"| {r['sampler']} | {r['steps']} | {r['seconds']:.0f} | {r['images_per_second']:.2f} | "
                  f"{r['speedup']:.2f}x | {t['count']}/{t['n']} = {100 * t['rate']:.2f}% ({100 * t['ci95'][0]:.2f}–"
                  f"{100 * t['ci95'][1]:.2f}%) | {'yes' if r['rate_agrees'] else 'no'} | "
                  f"{r['classifier_fid']['value']:.2f} | {r['classifier_is']['mean']:.2f} | {p['only_a']} / "
                  f"{p['only_b']} / {p['both']} (p = {p['p_value']:.3g}) |")
    text = "\n".join(md) + "\n"
    summary = {"command": "bench sampler", "config": asdict(cfg), "rows": rows}
    (Path(cfg.out) / "results.md").write_text(text)
    run.finish(summary)
    print(text)
    return summary
