"""``diffunlearn bench instance``: forgetting one non-duplicated training image, the SISS paper's CelebA-HQ protocol
(its Table 1 and Figure 3) at CPU scale, with the measures of :mod:`diffunlearn.protocols.instance`.

The shipped model ``instance-base`` is a small DDPM trained on ``instance-digits`` (64 distinct real 8x8 digits)
long enough to memorise its individual images: noised to step ``similarity_t`` and denoised again, a training digit
comes back as itself, a held-out digit as some other digit (the numbers are in the model's README.md). For each of
``targets`` training images drawn at random, every row of the preset ``presets/bench/instance.yaml`` removes that
one image from the shipped model with the same budget (``steps`` steps, AdamW, constant ``lr``, betas 0.95/0.999,
weight decay 1e-6, gradient clipped to 1.0, uniform timesteps, batch ``batch_size``), and the model before and
after is measured. ``scaling_norm: auto`` is the paper's rule (10% of ||G_x||, measured for the variant at the
shipped model on this target). For the first ``strip_targets`` targets a callback of the trainer records the
noise-and-denoised target every ``strip_every`` steps (``strip.png``, the paper's Figure 3).

References: ``pretrained`` (the shipped model, no unlearning) and the held-out reference (the shipped model on images
it never saw: the retrain gold standard without the cost of a retrain per target). The optional row ``retrain``
(``--rows ...,retrain``) trains a model from scratch on X \\ A with the shipped model's own recipe (its
``config.yaml``) for each target.

Cells (row x target) are cached under ``cells/``: a re-run with the same settings loads them and runs only what is
missing (more targets, more rows). Writes ``results.md``, ``results.json`` and ``strip.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..config import run_field
from ..errors import UserError
from ..protocols.instance import InstanceSetup, Strip, evaluate, held_out_reference, strip_png
from ..runs import read_json, write_json
from .harness import (
    Cell,
    CellResult,
    aggregate,
    check_bench_dir,
    command_line,
    load_rows,
    open_bench_dir,
    per_process,
    pm,
    run_cells,
    select,
    stat,
    weights_stamp,
    write_results,
)

PRESET = "bench/instance"
REFERENCES = ("pretrained", "retrain")
#: settings that may change between runs into the same directory (they select work, not how a cell is computed)
FREE_SETTINGS = ("out", "rows", "preset", "targets", "workers")


@dataclass
class InstanceBenchConfig:
    out: str = run_field("bench_out", "runs/bench-instance")
    model: str = field(default="instance-base", metadata={"help": "shipped model name or diffusers model directory"})
    data: str = field(default="instance-digits", metadata={"help": "data SPEC of X (the model's training set)"})
    held_out: str = field(default="", metadata={"help": "data SPEC of images never trained on (default: the data "
                                                        "set's own)"})
    targets: int = field(default=5, metadata={"help": "training images to forget, one per run, drawn at random"})
    target_seed: int = field(default=0, metadata={"help": "seed of the target draw"})
    rows: str = field(default="", metadata={"help": "comma-separated rows of the preset (default: those not marked "
                                                    "default: false)"})
    preset: str = field(default=PRESET, metadata={"help": "the rows: a YAML preset (built-in name or file)"})
    steps: int = field(default=60, metadata={"help": "unlearning steps per target (the paper's CelebA budget)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant)"})
    batch_size: int = field(default=32, metadata={"help": "rows per step"})
    seed: int = field(default=0, metadata={"help": "seed of the unlearning runs"})
    scaling_norm_fraction: float = field(default=0.1, metadata={"help": "SISS 'auto' scaling_norm: this fraction "
                                                                        "of ||G_x|| at the shipped model"})
    similarity_t: int = field(default=100, metadata={"help": "noise-and-denoise: noise to this step, denoise back "
                                                             "(100 suits 8x8 images: see the model's README)"})
    similarity_seed: int = field(default=0, metadata={"help": "noise-and-denoise seed"})
    sscd: str = field(default="", metadata={"help": "local SSCD TorchScript file (default: weight-free pixel cosine)"})
    nll_probes: int = field(default=2, metadata={"help": "Hutchinson probes per NLL"})
    nll_tol: float = field(default=1e-3, metadata={"help": "RK45 rtol = atol of the NLL"})
    quality_images: int = field(default=16, metadata={"help": "held-out images whose NLL is the quality measure"})
    kept_images: int = field(default=16, metadata={"help": "other training images whose similarity is measured"})
    membership_draws: int = field(default=32, metadata={"help": "(t, eps) draws per image for the membership AUC"})
    strip_targets: int = field(default=1, metadata={"help": "targets whose noise-and-denoised image is recorded "
                                                            "during unlearning (strip.png)"})
    strip_every: int = field(default=10, metadata={"help": "record the strip every N steps"})
    workers: int = field(default=2, metadata={"help": "worker processes, one torch thread each"})


def _validate(cfg: InstanceBenchConfig) -> None:
    if cfg.targets < 1 or cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("--targets, --steps and --batch-size must be at least 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.nll_probes < 1 or not cfg.nll_tol > 0 or cfg.membership_draws < 1:
        raise UserError("--nll-probes and --membership-draws must be at least 1 and --nll-tol positive")
    if cfg.quality_images < 2 or cfg.kept_images < 1:
        raise UserError("--quality-images must be at least 2 and --kept-images at least 1")
    if cfg.strip_targets < 0 or cfg.strip_every < 1 or cfg.workers < 1:
        raise UserError("--strip-targets must be >= 0, --strip-every and --workers >= 1")
    if not 0 < cfg.scaling_norm_fraction:
        raise UserError("--scaling-norm-fraction must be positive")


def _setup(cfg: InstanceBenchConfig) -> InstanceSetup:
    """The set-up of this process for ``cfg`` (loaded once per worker, reloaded when the model's weights change)."""
    from ..model import resolve_model_dir

    model_dir = Path(resolve_model_dir(cfg.model))
    key = (json.dumps(asdict(cfg), sort_keys=True), str(model_dir.resolve()), weights_stamp(model_dir))
    return per_process("instance", key, lambda: InstanceSetup.load(cfg))


def _retrain(setup: InstanceSetup, target: int, run_dir: Path) -> tuple[object, dict]:
    import yaml

    from ..data import load_data
    from ..model import load_model
    from ..scratch import TrainConfig, train

    recipe = Path(setup.model_dir).parent / "config.yaml"
    if not recipe.is_file():
        raise UserError(f"row 'retrain' needs the model's training recipe: no config.yaml beside {setup.model_dir}")
    known = set(TrainConfig.__dataclass_fields__)
    rc = {k: v for k, v in (yaml.safe_load(recipe.read_text()) or {}).items() if k in known}
    rc.update(forget=str(target), out=str(run_dir), overwrite=True, threads=1, log_every=max(1, rc.get("steps", 1)))
    if not torch.equal(load_data(rc.get("data", "")).images.load(), setup.data.images.load()):
        raise UserError(f"the model's recipe trains on {rc.get('data')!r}, not on the benchmark's data "
                        f"{setup.cfg.data!r}")
    summary = train(TrainConfig(**rc))
    return load_model(summary["model_dir"]), {"recipe": rc, "train_seconds": summary["train_seconds"]}


def run_cell(cfg: InstanceBenchConfig, cell: Cell) -> CellResult:
    """Unlearn (or train, or just evaluate) one row for one target; returns the cell's result."""
    from ..data import split_kept
    from ..protocols.calibration import calibrated
    from ..trainer import TrainerConfig, unlearn

    torch.set_num_threads(1)
    c0, t0 = time.process_time(), time.time()
    setup = _setup(cfg)
    base, row, target = setup.model, cell.row, cell.key
    kept, forget = split_kept(setup.data, [target])
    forget = forget.load()  # the one target image, as a tensor (the measures below take tensors)
    details: dict = {"target_name": setup.data.names[target]}
    hyperparameters, steps = {}, None
    strip = None
    if row.reference == "pretrained":
        model, steps = base, 0
    elif row.reference == "retrain":
        model, details["retrain"] = _retrain(setup, target, cell.dir / "run")
        steps = details["retrain"]["recipe"].get("steps")
    else:
        spec, calib = calibrated(base, kept, forget, row.method, cfg.batch_size, cfg.scaling_norm_fraction, cfg.seed)
        if calib:
            details["scaling_norm_calibration"] = calib
        method = spec.build()
        hyperparameters = method.hyperparameters()
        ucfg = row.trainer_config(TrainerConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                                                threads=1))
        if target in setup.targets[:cfg.strip_targets]:
            strip = Strip(setup, forget, base.scheduler, cfg.strip_every, ucfg.steps)
            strip.record(0, base.unet)
        logs: list[dict] = []
        t1 = time.time()
        model = unlearn(base, kept, forget, method, ucfg, log=logs.append, callback=strip)
        details["unlearn_seconds"] = round(time.time() - t1, 2)
        steps = ucfg.steps
        details["last_log"] = {k: v for k, v in logs[-1].items() if isinstance(v, (int, float))} if logs else {}
    metrics = evaluate(model, setup, target)
    details["strip"] = strip.points if strip else []
    details["seconds"] = round(time.time() - t0, 2)
    details["cpu_seconds"] = round(time.process_time() - c0, 2)
    return cell.result(method=row.method.name if row.method else None, hyperparameters=hyperparameters, steps=steps,
                       metrics=metrics, details=details)


def _reference_job(cfg: InstanceBenchConfig, root: str) -> dict:
    torch.set_num_threads(1)
    c0 = time.process_time()
    ref = held_out_reference(_setup(cfg))
    ref["cpu_seconds"] = round(time.process_time() - c0, 2)
    write_json(Path(root) / "reference.json", ref)
    return ref


def run_instance_bench(cfg: InstanceBenchConfig) -> dict:
    _validate(cfg)
    preset = load_rows(cfg.preset, REFERENCES)[0]
    rows = select(preset, cfg.rows)
    root = Path(cfg.out)
    check_bench_dir(root, cfg, FREE_SETTINGS)
    setup = _setup(cfg)  # every input is checked before anything is written
    open_bench_dir(root, cfg)
    t_start = time.time()
    cells = [Cell.of(root, row, target, "target{:04d}") for target in setup.targets for row in rows]
    ref_path = root / "reference.json"
    also = [] if ref_path.exists() else [(_reference_job, (cfg, str(root)))]
    results, ran, extra = run_cells(cells, partial(run_cell, cfg), cfg.workers, _progress, also)
    ref = extra[0] if also else read_json(ref_path)
    labels = [r.label for r in rows]
    summary = {"benchmark": "instance", "config": asdict(cfg), "model_dir": setup.model_dir,
               "targets": [{"index": t, "name": setup.data.names[t]} for t in setup.targets],
               "held_out_reference": _reference_summary(ref), "rows": aggregate(results, labels, _summariser(results)),
               "timings": {"wall_seconds": round(time.time() - t_start, 1), "cells_run": ran,
                           "cells_cached": len(cells) - ran,
                           "cpu_seconds": round(sum(r.details["cpu_seconds"] for r in results), 1)},
               "cells": [r.to_dict() for r in results]}
    write_results(root, summary, markdown(summary))
    stripped = [c for c in results if c.details["strip"]]
    if stripped:
        from ..data import load_data

        first = [c for c in stripped if c.key == stripped[0].key]
        strip_png([c.to_dict() for c in first], load_data(cfg.data).images[first[0].key], cfg.similarity_t,
                  root / "strip.png")
    return summary


def _progress(r: CellResult) -> None:
    m = r.metrics
    print(f"[{r.label} target {r.key}] {r.details['seconds']:.0f}s  similarity {m['similarity']:.3f}  "
          f"NLL {m['nll_bpd']:.2f}  AUC {m['membership_auc']:.2f}  quality NLL {m['quality_nll_bpd']:.2f}", flush=True)


METRICS = ("quality_nll_bpd", "kept_similarity", "nll_bpd", "similarity", "membership_auc")


def _summariser(results: list[CellResult]):
    """Mean and standard deviation over targets of every measure, per row; ``similarity_before`` from the shipped
    model on the same targets."""
    before = {r.key: r.metrics["similarity"] for r in results if r.label == "pretrained"}

    def summarise(rs: list[CellResult]) -> dict:
        row = {k: stat(r.metrics[k] for r in rs) for k in METRICS}
        row["steps"] = rs[0].steps
        row["targets"] = [r.key for r in rs]
        if all(r.key in before for r in rs):
            row["similarity_before"] = stat(before[r.key] for r in rs)
        secs = [r.details["unlearn_seconds"] for r in rs if "unlearn_seconds" in r.details]
        row["unlearn_seconds"] = stat(secs) if secs else None
        return row

    return summarise


def _reference_summary(ref: dict) -> dict:
    return {"n": ref["n"], "similarity": stat(ref["similarity"]), "nll_bpd": stat(ref["nll_bpd"]),
            "membership_auc": stat(ref["membership_auc"]), "train_similarity": stat(ref["train_similarity"]),
            "similarity_backend": ref["similarity_backend"]}


def markdown(summary: dict) -> str:
    cfg, rows, ref = summary["config"], summary["rows"], summary["held_out_reference"]
    backend = ref["similarity_backend"]
    head = ["method", "steps", "quality: held-out NLL (bpd) ↓", "other training images: similarity ↑",
            "target NLL (bpd) ↑", "target similarity before", "target similarity after ↓", "membership AUC ↓ (→0.5)",
            "unlearning s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['steps'] or '—'} | {pm(r['quality_nll_bpd'])} | "
                     f"{pm(r['kept_similarity'], '{:.3f}')} | {pm(r['nll_bpd'])} | "
                     f"{pm(r.get('similarity_before'), '{:.3f}')} | {pm(r['similarity'], '{:.3f}')} | "
                     f"{pm(r['membership_auc'])} | {pm(r['unlearn_seconds'], '{:.0f}')} |")
    lines.append(f"| held-out reference (never trained on) | — | {pm(ref['nll_bpd'])} | — | {pm(ref['nll_bpd'])} | — | "
                 f"{pm(ref['similarity'], '{:.3f}')} | {pm(ref['membership_auc'])} | — |")
    targets = ", ".join(f"{t['index']} ({t['name']})" for t in summary["targets"])
    tm = summary["timings"]
    notes = [
        "",
        f"Model `{cfg['model']}`, data `{cfg['data']}`. Mean ± std over {len(summary['targets'])} target(s), each a "
        f"single training image drawn with seed {cfg['target_seed']}: {targets}. Each method removes one target "
        f"(A = 1 image) in {cfg['steps']} steps from the shipped weights: AdamW lr {cfg['lr']:g} (constant; betas "
        f"0.95/0.999, wd 1e-6), batch {cfg['batch_size']}, gradient clipped to 1.0, uniform timesteps, seed "
        f"{cfg['seed']}. SISS scaling_norm = {cfg['scaling_norm_fraction']:.0%} of ||G_x|| measured at the shipped "
        "model for each variant and target (the paper's rule).",
        f"Similarity ({backend}): noise the image to step t = {cfg['similarity_t']} (seeded by the image, seed "
        f"{cfg['similarity_seed']}), denoise with ancestral DDPM back to 0, compare with the image. "
        f"Quality (the paper uses FID): NLL of {cfg['quality_images']} held-out digits, and the similarity of "
        f"{cfg['kept_images']} other training images (not deleted, so they should stay reproduced). NLL: "
        f"probability-flow ODE, rtol = atol = {cfg['nll_tol']:g}, {cfg['nll_probes']} Hutchinson probes. "
        f"Membership AUC: the target's denoising loss ({cfg['membership_draws']} shared (t, eps) draws) against every "
        "held-out image: the fraction of held-out images denoised worse than the target (1: looks like training "
        "data; 0.5 on average for an image never trained on).",
        "held-out reference: the shipped model on held-out digits it never saw (similarity, NLL, leave-one-out AUC "
        "among held-out images): what a model that never trained on the target would give it, standing in for a "
        "retrain per target" + (" (the `retrain` row is that retrain, with the shipped recipe)." if "retrain" in rows
                                else " (add `--rows ...,retrain` for a real retrain per target; costly)."),
        f"For comparison, the shipped model on the first {ref['n']} training images: similarity "
        f"{pm(ref['train_similarity'], '{:.3f}')}; on held-out images: {pm(ref['similarity'], '{:.3f}')}.",
        f"Wall time {tm['wall_seconds']:.0f} s for {tm['cells_run']} cell(s) run ({tm['cells_cached']} cached) with "
        f"{cfg['workers']} worker process(es), 1 thread each; CPU time of all cells {tm['cpu_seconds']:.0f} s "
        f"(~{tm['cpu_seconds'] / cfg['workers']:.0f} s of wall time on {cfg['workers']} idle core(s)).",
        "",
        f"Command: `{command_line('instance', cfg, InstanceBenchConfig)}`",
    ]
    return "\n".join(lines + notes) + "\n"


__all__ = ["InstanceBenchConfig", "markdown", "run_cell", "run_instance_bench"]
