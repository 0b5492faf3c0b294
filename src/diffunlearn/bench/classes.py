"""``diffunlearn bench class``: forget a whole class (EraseDiff's Tables 1 and 3 at CPU scale).

``--variant conditional`` (default): the shipped class-conditional MNIST model ``mnist-class-base`` forgets every
training 7; the retrained reference is ``mnist-class-retrain`` (the same recipe without the 7s). ``--variant
unconditional``: the shipped unconditional model ``mnist-tshirt-base`` forgets every training 7 of its data (no
retrained reference: the rate of 7s among its samples is the measure). Rows are the preset ``presets/bench/class.yaml``
(the unconditional variant skips the rows it cannot run); cells (row x seed) are cached on disk, so a re-run
resumes. Measures: :mod:`diffunlearn.protocols.classes`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import run_field
from ..errors import UserError
from .harness import (
    Cell,
    CellResult,
    aggregate,
    check_bench_dir,
    command_line,
    load_rows,
    open_bench_dir,
    pm,
    run_cells,
    select,
    stat,
    write_results,
)

PRESET = "bench/class"
REFERENCES = ("pretrained", "retrain")
PER_RUN = ("rows", "preset", "seeds", "threads", "out")
MODELS = {"conditional": ("mnist-class-base", "mnist-class-retrain", "mnist"),
          "unconditional": ("mnist-tshirt-base", None, "mnist-tshirt")}

#: EraseDiff's CIFAR-10 figures (Wu et al. 2024, Table 3: forgetting birds and ships; FID columns are the two
#: forgotten classes' FIDs and the mean over the eight remaining classes' FIDs, Inception-based)
PAPER = {
    "pretrained": {"fid_forgotten": "19.62 / 12.05", "accuracy_forgotten": 0.8622, "fid_remaining": 15.26, "wd": None},
    "retrain": {"fid_forgotten": "152.39 / 139.62", "accuracy_forgotten": 0.0135, "fid_remaining": 15.27, "wd": 0.0},
    "naive": {"fid_forgotten": "31.64 / 21.22", "accuracy_forgotten": 0.7001, "fid_remaining": 18.55, "wd": 1.3616},
    "neggrad": {"fid_forgotten": "322.67 / 229.08", "accuracy_forgotten": 0.4358, "fid_remaining": 306.88,
                "wd": 1.3533},
    "erasediff": {"fid_forgotten": "256.27 / 294.08", "accuracy_forgotten": 0.0026, "fid_remaining": 26.71,
                  "wd": 1.3534},
}


@dataclass
class ClassBenchConfig:
    out: str = run_field("bench_out", "runs/bench-class")
    variant: str = field(default="conditional", metadata={"help": "conditional (the class-conditional model) or "
                                                                   "unconditional (the unconditional MNIST model)"})
    forget_class: int = field(default=7, metadata={"help": "the digit to forget"})
    seeds: int = field(default=1, metadata={"help": "seeds per method"})
    rows: str = field(default="", metadata={"help": "comma-separated rows of the preset (default: every row)"})
    preset: str = field(default=PRESET, metadata={"help": "the rows: a YAML preset (built-in name or file)"})
    steps_scale: float = field(default=1.0, metadata={"help": "multiply every method's steps (quick runs)"})
    per_class: int = field(default=64, metadata={"help": "conditional: samples per class"})
    n_samples: int = field(default=1024, metadata={"help": "unconditional: samples per model"})
    sample_steps: int = field(default=50, metadata={"help": "DDPM sampling steps"})
    guidance: float = field(default=1.0, metadata={"help": "conditional: classifier-free guidance scale"})
    measure_images: int = field(default=128, metadata={"help": "training images per class group for the noise KL "
                                                               "and membership"})
    threads: int = run_field("threads")


def _run_cell(cell: Cell, cfg: ClassBenchConfig, protocol, base, retrain) -> CellResult:
    from ..metrics.classes import weight_distance
    from ..model.sampling import save_grid
    from ..protocols.classes import class_grid
    from ..trainer import TrainerConfig, unlearn

    row, seed = cell.row, cell.key
    log: list = []
    seconds, steps = 0.0, 0
    if row.reference:
        model = base if row.reference == "pretrained" else retrain
    else:
        ucfg = row.trainer_config(TrainerConfig(seed=seed))
        steps = max(1, int(round(ucfg.steps * cfg.steps_scale)))
        ucfg = dataclasses.replace(ucfg, steps=steps)
        kept, forget, kept_y, forget_y = protocol.split()
        t0 = time.time()
        model = unlearn(base, kept, forget, row.method.build(), ucfg, log=log.append,
                        labels=(kept_y, forget_y) if base.conditional else None)
        seconds = time.time() - t0
    metrics, samples, labels = protocol.evaluate(model, cfg.per_class, cfg.n_samples, cfg.sample_steps, cfg.guidance,
                                                 seed=0, measure_images=cfg.measure_images)
    if retrain is not None:
        metrics["weight_distance"] = weight_distance(model.unet, retrain.unet)
    keep = (cfg.forget_class + 1) % 10
    tiles, names = class_grid(samples, labels, cfg.forget_class, keep)
    cell.dir.mkdir(parents=True, exist_ok=True)
    save_grid(tiles, cell.dir / "samples.png", ncol=8, labels=names if labels is not None else None,
              title=f"{row.label}: class {cfg.forget_class} (forgotten) then class {keep}" if labels is not None
              else f"{row.label}: unconditional samples")
    return cell.result(method=row.method.name if row.method else None,
                       hyperparameters=dict(row.method.params) if row.method else {}, steps=steps, metrics=metrics,
                       details={"unlearn_seconds": round(seconds, 1), "models": _hashes(base, retrain), "log": log})


def _hashes(base, retrain) -> dict:
    from ..model import state_hash

    return {"base": state_hash(base.unet), "retrain": state_hash(retrain.unet) if retrain is not None else None}


def _progress(r: CellResult) -> None:
    m = r.metrics
    what = (f"acc forgotten {m['accuracy_forgotten']['accuracy']:.3f} remaining {m['accuracy_remaining']['mean']:.3f}"
            if "accuracy_forgotten" in m else
            f"rate of the class {m['class_rate']['count']}/{m['class_rate']['n']}")
    print(f"[{r.label} seed {r.key}] {r.details['unlearn_seconds']:.0f}s unlearning  {what}  membership AUC "
          f"{m['membership_auc']['value']:.3f}", flush=True)


def _summarise(rs: list[CellResult]) -> dict:
    from ..metrics.rates import binomial_ci, rate_summary

    m0 = rs[0].metrics
    out = {"steps": rs[0].steps, "seeds": len(rs), "unlearn_seconds": stat(r.details["unlearn_seconds"] for r in rs),
           "membership_auc": stat(r.metrics["membership_auc"]["value"] for r in rs),
           "kl_forgotten": stat(r.metrics["noise_kl"]["forgotten"] for r in rs),
           "kl_remaining": stat(r.metrics["noise_kl"]["remaining"] for r in rs)}
    if "accuracy_forgotten" in m0:
        k = sum(r.metrics["accuracy_forgotten"]["correct"] for r in rs)
        n = sum(r.metrics["accuracy_forgotten"]["n"] for r in rs)
        out.update(accuracy_forgotten={"correct": k, "n": n, "accuracy": k / n, "ci95": list(binomial_ci(k, n))},
                   accuracy_remaining=stat(r.metrics["accuracy_remaining"]["mean"] for r in rs),
                   fid_forgotten=stat(r.metrics["fid_forgotten"] for r in rs),
                   fid_remaining=stat(r.metrics["fid_remaining"] for r in rs))
    else:
        out.update(class_rate=rate_summary(sum(r.metrics["class_rate"]["count"] for r in rs),
                                           sum(r.metrics["class_rate"]["n"] for r in rs)),
                   fid_kept=stat(r.metrics["fid_kept"] for r in rs),
                   # samples the classifier puts outside the ten digits (mnist-tshirt: the T-shirt class)
                   not_digits=sum(sum(r.metrics["predicted_histogram"][10:]) for r in rs))
    if "weight_distance" in m0:
        out["weight_distance"] = stat(r.metrics["weight_distance"]["l2"] for r in rs)
        out["weight_distance_relative"] = stat(r.metrics["weight_distance"]["relative"] for r in rs)
    return out


def _markdown(rows: dict[str, dict], cfg: ClassBenchConfig) -> str:
    c = cfg.forget_class
    lines = []
    if cfg.variant == "conditional":
        lines.append(f"| method | steps | accuracy on class {c} (95% CI) ↓ | accuracy on the other classes ↑ | FID "
                     f"class {c} ↑ | FID other classes ↓ | membership AUC of the {c}s (→ 0.5) | noise KL: class {c} / "
                     "others | weight distance to retrain (relative) | unlearning s | paper (CIFAR-10): accuracy, "
                     "FID forgotten, FID remaining, WD |\n|" + "---|" * 11)
        for label, r in rows.items():
            one = r["seeds"] == 1
            a = r["accuracy_forgotten"]
            wd = (f"{pm(r['weight_distance'], mean_alone=one)} ({pm(r['weight_distance_relative'], '{:.3f}', one)})"
                  if "weight_distance" in r else "—")
            p = PAPER.get(label)
            paper = (f"{p['accuracy_forgotten']:.4f}, {p['fid_forgotten']}, {p['fid_remaining']:.2f}, "
                     f"{'—' if p['wd'] is None else p['wd']}") if p else "—"
            lines.append(
                f"| {label} | {r['steps'] or '—'} | {a['correct']}/{a['n']} = {a['accuracy']:.3f} ({a['ci95'][0]:.3f}"
                f"–{a['ci95'][1]:.3f}) | {pm(r['accuracy_remaining'], '{:.3f}', one)} | "
                f"{pm(r['fid_forgotten'], '{:.1f}', one)} | {pm(r['fid_remaining'], '{:.1f}', one)} | "
                f"{pm(r['membership_auc'], '{:.3f}', one)} | {pm(r['kl_forgotten'], '{:.4f}', True)} / "
                f"{pm(r['kl_remaining'], '{:.4f}', True)} | {wd} | {r['unlearn_seconds']['mean']:.0f} | {paper} |")
        lines.append(f"\n{cfg.per_class} samples per class ({cfg.sample_steps}-step DDPM, guidance {cfg.guidance:g}, "
                     "sample i seeded by i); accuracy = the fraction of samples conditioned on the class that the "
                     "shipped domain classifier assigns to it; FID = classifier FID (the domain classifier's "
                     "features, not Inception) of the class's samples against its training images (other classes: "
                     "pooled); membership AUC of the forgotten class's training images against its held-out images "
                     "(denoising loss, 8 shared (t, eps) pairs); noise KL = KL of a Gaussian fitted to the noise "
                     "prediction from N(0, 1), mean over images and pairs. The paper's figures are Inception FIDs "
                     "on CIFAR-10 (two forgotten classes, the remaining classes' mean), EraseDiff's Table 3: "
                     "compare directions, not values.")
    else:
        lines.append(f"| method | steps | rate of {c}s among samples (95% CI) ↓ | samples classified as no digit | "
                     f"classifier FID vs kept digits ↓ | membership AUC of the {c}s (→ 0.5) | noise KL: class {c} / "
                     "others | unlearning s |\n|" + "---|" * 8)
        for label, r in rows.items():
            one = r["seeds"] == 1
            k = r["class_rate"]
            lines.append(f"| {label} | {r['steps'] or '—'} | {k['count']}/{k['n']} = {100 * k['rate']:.2f}% "
                         f"({100 * k['ci95'][0]:.2f}–{100 * k['ci95'][1]:.2f}%) | {r['not_digits']} | "
                         f"{pm(r['fid_kept'], '{:.1f}', one)} | "
                         f"{pm(r['membership_auc'], '{:.3f}', one)} | {pm(r['kl_forgotten'], '{:.4f}', True)} / "
                         f"{pm(r['kl_remaining'], '{:.4f}', True)} | {r['unlearn_seconds']['mean']:.0f} |")
        lines.append(f"\n{cfg.n_samples} unconditional samples per model ({cfg.sample_steps}-step DDPM, sample i "
                     "seeded by i); rate = the fraction the shipped domain classifier assigns to the forgotten "
                     "digit; samples classified as no digit: the classifier's T-shirt class (the model's data holds "
                     "T-shirt copies); classifier FID of all samples against the kept training digits, which those "
                     "samples dominate; other measures as in the conditional table.")
    lines.append(f"\n{cfg.seeds} seed(s) per method; ± is the standard deviation over seeds (none with one seed). "
                 "Seconds are each cell's own wall time on a shared 2-core machine.")
    return "\n".join(lines) + "\n"


def run_class_bench(cfg: ClassBenchConfig) -> dict:
    from ..model import load_model
    from ..pretrained import pretrained_dir
    from ..protocols.classes import ClassProtocol

    if cfg.variant not in MODELS:
        raise UserError(f"--variant must be one of {', '.join(MODELS)}, got {cfg.variant!r}")
    if not 0 <= cfg.forget_class <= 9:
        raise UserError(f"--forget-class must be a digit 0-9, got {cfg.forget_class}")
    if cfg.seeds < 1 or cfg.per_class < 2 or cfg.n_samples < 10 or cfg.steps_scale <= 0 or cfg.measure_images < 2:
        raise UserError("--seeds >= 1, --per-class >= 2, --n-samples >= 10, --measure-images >= 2 and "
                        "--steps-scale > 0 are required")
    if not cfg.guidance >= 0:
        raise UserError(f"--guidance must be >= 0, got {cfg.guidance}")
    base_name, retrain_name, data = MODELS[cfg.variant]
    preset = load_rows(cfg.preset, REFERENCES)[0]
    rows = [r for r in select(preset, cfg.rows) if not (r.reference == "retrain" and retrain_name is None)]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = Path(cfg.out)
    check_bench_dir(root, cfg, PER_RUN)
    base = load_model(pretrained_dir(base_name) / "model")
    retrain = load_model(pretrained_dir(retrain_name) / "model") if retrain_name else None
    if retrain is not None and cfg.forget_class != 7:
        raise UserError("the shipped retrained model is retrained without the 7s: --forget-class 7 (or train a "
                        "retrained model for another class with `diffunlearn train --forget class=N`)")
    protocol = ClassProtocol.load(cfg.forget_class, data)
    open_bench_dir(root, cfg)
    cells = [Cell.of(root, row, seed) for row in rows for seed in range(cfg.seeds if row.method else 1)]
    now = _hashes(base, retrain)
    for c in cells:  # a cell of other shipped models (a newer release of them) is not reused
        done = c.load()
        if done is not None and done.details.get("models", now) != now:
            raise UserError(f"{c.dir} was computed with other {base_name} / {retrain_name} weights: choose another "
                            "--out")
    results, _, _ = run_cells(cells, lambda c: _run_cell(c, cfg, protocol, base, retrain), progress=_progress)
    labels = [label for label in preset if label in {r.label for r in rows}]
    table = aggregate(results, labels, _summarise)
    md = f"Command: `{command_line('class', asdict(cfg), ClassBenchConfig)}`\n\n" + _markdown(table, cfg)
    write_results(root, {"config": asdict(cfg), "rows": table, "cells": [r.to_dict() for r in results]}, md)
    return table
