"""``diffunlearn bench instance``: forgetting one non-duplicated training image, the SISS paper's CelebA-HQ protocol
(its Table 1 and Figure 3) at CPU scale.

The shipped model ``instance-base`` is a small DDPM trained on ``instance-digits`` (64 distinct real 8x8 digits)
long enough to memorise its individual images: noised to step ``similarity_t`` and denoised again, a training digit
comes back as itself, a held-out digit as some other digit (the numbers are in the model's README.md). For each of
``targets`` training images drawn at random (fixed ``target_seed``), every method removes that one image (A = {a},
X \\ A = the other 63) from the shipped model with the same budget, and the run measures, for the model before and
after:

- *similarity*: the noise-and-denoise similarity of the target (``metrics.similarity``: forward noise to step
  ``similarity_t``, ancestral DDPM back to 0, both seeded by the image; pixel cosine, or SSCD with ``--sscd``).
  A model that still holds the image returns it (high); the paper's SSCD went 0.87 -> 0.36 under SISS.
- *NLL* of the target in bits/dim (``metrics.nll``, probability-flow ODE): higher = more forgotten.
- *membership AUC* of the target against every held-out image by per-image denoising loss (``metrics.membership``):
  the fraction of held-out images the model denoises worse than the target. A memorised image scores near 1; an
  image the model never saw is a uniform draw among held-out ones (0.5 on average).
- *quality* (the paper's FID): the NLL in bits/dim of ``quality_images`` held-out digits (lower is better: the model
  still describes unseen digits), and the noise-and-denoise similarity of ``kept_images`` other training images
  (higher is better: what was not deleted is still reproduced).

References: ``pretrained`` (the shipped model, no unlearning) and ``held-out`` (the shipped model's numbers on
images it never saw: the similarity, NLL and leave-one-out membership AUC of the ``quality_images`` held-out digits;
what a model that never trained on the target would give it, i.e. the retrain gold standard without the cost of a
retrain per target). The optional row ``retrain`` (``--rows ...,retrain``) trains a model from scratch on X \\ A
with the shipped model's own recipe (its ``config.yaml``) for each target.

Every method runs ``steps`` steps from the shipped weights with the same optimiser (AdamW, constant lr, betas
0.95/0.999, weight decay 1e-6, gradient clipped to 1.0, uniform timesteps, batch ``batch_size``); per-method
hyperparameters are in :data:`ROWS`. ``scaling_norm="auto"`` is the paper's rule (10% of ||G_x||, measured for the
variant at the shipped model on this target). For the first ``strip_targets`` targets a callback of the trainer
records the noise-and-denoised target every ``strip_every`` steps (``strip.png``, the paper's Figure 3).

Cells (row x target) are cached under ``cells/``: a re-run with the same settings loads them and runs only what is
missing (more targets, more rows). Writes ``results.md``, ``results.json`` and ``strip.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..runs import read_json, write_json
from . import check_bench_dir

#: label -> (method, hyperparameters); ``None`` rows are references. "auto": 10% of ||G_x|| at the shipped model.
ROWS: dict[str, tuple[str | None, dict]] = {
    "pretrained": (None, {}),
    "siss-lambda0.5": ("siss", {"lam": 0.5, "scaling_norm": "auto"}),
    "siss-nois": ("siss-nois", {"scaling_norm": "auto"}),
    "naive": ("naive", {}),
    "erasediff": ("erasediff", {"inner_steps": 2, "lambda_e": 0.1}),
    "erasediff-light": ("erasediff-light", {"eta": 1e-3}),
    "neggrad": ("neggrad", {}),
    "retrack": ("retrack", {"lambda_r": 0.005, "knn": 10}),
    "siss-lambda0": ("siss", {"lam": 0.0, "scaling_norm": "auto"}),
    "siss-lambda1": ("siss", {"lam": 1.0, "scaling_norm": "auto"}),
    "retrain": (None, {}),
}
DEFAULT_ROWS = [label for label in ROWS if label != "retrain"]
#: settings that may change between runs into the same directory (they select work, not how a cell is computed)
FREE_SETTINGS = ("out", "rows", "targets", "workers")


@dataclass
class InstanceBenchConfig:
    out: str = field(default="runs/bench-instance", metadata={"help": "benchmark directory (re-runs resume)"})
    model: str = field(default="instance-base", metadata={"help": "shipped model name or diffusers model directory"})
    data: str = field(default="instance-digits", metadata={"help": "data SPEC of X (the model's training set)"})
    held_out: str = field(default="", metadata={"help": "data SPEC of images never trained on (default: the data "
                                                        "set's own)"})
    targets: int = field(default=5, metadata={"help": "training images to forget, one per run, drawn at random"})
    target_seed: int = field(default=0, metadata={"help": "seed of the target draw"})
    rows: str = field(default=",".join(DEFAULT_ROWS), metadata={"help": "comma-separated rows: " + ", ".join(ROWS)})
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


# ---------------------------------------------------------------- set-up shared by every cell


@dataclass
class _Setup:
    cfg: InstanceBenchConfig
    model_dir: str
    model: object
    data: object
    held: torch.Tensor
    targets: list[int]


def _rows(cfg: InstanceBenchConfig) -> list[str]:
    labels = [x.strip() for x in cfg.rows.split(",") if x.strip()]
    unknown = [x for x in labels if x not in ROWS]
    if unknown:
        raise UserError(f"unknown benchmark row {unknown[0]!r}: rows are {', '.join(ROWS)}")
    if not labels:
        raise UserError("--rows names no row")
    return list(dict.fromkeys(labels))


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
    _rows(cfg)


def choose_targets(n: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices of X drawn at random with ``seed``; the draw for ``k + 1`` extends the one for ``k``."""
    if not 1 <= k < n:
        raise UserError(f"--targets must lie in [1, {n - 1}] for a data set of {n} images, got {k}")
    return [int(i) for i in np.random.default_rng(int(seed)).permutation(n)[:k]]


def _setup(cfg: InstanceBenchConfig) -> _Setup:
    from ..data import load_data
    from ..models import load_model
    from ..models import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model)
    model = load_model(model_dir)
    data = load_data(cfg.data)
    model.check_data(data.shape, "data")
    if cfg.held_out:
        held = load_data(cfg.held_out).images
    elif data.held_out is not None:
        held = data.held_out
    else:
        raise UserError(f"data {cfg.data!r} has no held-out images: pass --held-out SPEC")
    model.check_data(tuple(held.shape[1:]), "held-out")
    if len(held) < cfg.quality_images:
        raise UserError(f"--quality-images {cfg.quality_images} exceeds the {len(held)} held-out images")
    if not 0 <= cfg.similarity_t <= model.num_train_timesteps:
        raise UserError(f"--similarity-t must lie in [0, {model.num_train_timesteps}], got {cfg.similarity_t}")
    if cfg.kept_images > len(data) - 1:
        raise UserError(f"--kept-images must be at most {len(data) - 1}")
    return _Setup(cfg, model_dir, model, data, held, choose_targets(len(data), cfg.targets, cfg.target_seed))


_STATE: dict = {}


def _cached_setup(cfg: InstanceBenchConfig) -> _Setup:
    """The set-up of this process for ``cfg`` (loaded once per worker, reloaded when the model's weights change)."""
    from ..models import resolve_model_dir

    model_dir = Path(resolve_model_dir(cfg.model))
    stamp = [(str(p), p.stat().st_mtime_ns) for p in sorted(model_dir.rglob("*.safetensors"))] \
        if model_dir.is_dir() else []
    key = (json.dumps(asdict(cfg), sort_keys=True), str(model_dir.resolve()), stamp)
    if _STATE.get("key") != key:
        _STATE.clear()
        _STATE.update(key=key, setup=_setup(cfg))
    return _STATE["setup"]


def kept_subset(n: int, target: int, k: int, seed: int) -> list[int]:
    """The ``k`` other training images whose similarity is measured alongside target ``target`` (fixed per target)."""
    rng = np.random.default_rng([int(seed), int(target), 17])
    return [int(i) for i in rng.permutation([i for i in range(n) if i != target])[:k]]


def _backend(cfg: InstanceBenchConfig):
    from ..metrics.similarity import load_similarity

    return load_similarity(cfg.sscd or None)


# ---------------------------------------------------------------- evaluation


def evaluate(model, setup: _Setup, target: int) -> dict:
    """Every measure of one model for one target (the model may be the shipped one, an unlearned or a retrained one)."""
    from ..metrics.membership import denoising_losses, loss_auc
    from ..metrics.nll import nll_bits_per_dim
    from ..metrics.similarity import noise_and_denoise_similarity

    cfg = setup.cfg
    x = setup.data.images
    a = x[target:target + 1]
    backend = _backend(cfg)
    sim = noise_and_denoise_similarity(model, a, backend, cfg.similarity_t, cfg.similarity_seed)
    others = x[kept_subset(len(x), target, cfg.kept_images, cfg.seed)]
    kept_sim = noise_and_denoise_similarity(model, others, backend, cfg.similarity_t, cfg.similarity_seed)
    q = setup.held[:cfg.quality_images]
    both = torch.cat([a, q])  # one ODE solve for every (image, probe) copy
    nll = nll_bits_per_dim(model, both, cfg.nll_probes, cfg.nll_tol, cfg.nll_tol, seed=0,
                           batch_size=len(both) * cfg.nll_probes)
    la = denoising_losses(model, a, cfg.membership_draws, seed=0)
    lh = denoising_losses(model, setup.held, cfg.membership_draws, seed=0)
    return {
        "similarity": float(sim.scores[0]), "similarity_backend": sim.similarity,
        "denoised": [round(float(v), 5) for v in sim.denoised[0].flatten()],
        "nll_bpd": float(nll.bpd[0]), "quality_nll_bpd": float(nll.bpd[1:].mean()),
        "kept_similarity": float(kept_sim.scores.mean()),
        "membership_auc": loss_auc(la, lh), "target_loss": float(la[0]), "held_out_loss": float(lh.mean()),
    }


def held_out_reference(setup: _Setup) -> dict:
    """The shipped model on images it never saw: per held-out image its similarity, NLL, and membership AUC against
    the other held-out images (leave one out). What a model that never trained on the target would give it."""
    from ..metrics.membership import denoising_losses, loss_auc
    from ..metrics.nll import nll_bits_per_dim
    from ..metrics.similarity import noise_and_denoise_similarity

    cfg, model = setup.cfg, setup.model
    q = setup.held[:cfg.quality_images]
    sim = noise_and_denoise_similarity(model, q, _backend(cfg), cfg.similarity_t, cfg.similarity_seed)
    nll = nll_bits_per_dim(model, q, cfg.nll_probes, cfg.nll_tol, cfg.nll_tol, seed=0,
                           batch_size=len(q) * cfg.nll_probes)
    lh = denoising_losses(model, setup.held, cfg.membership_draws, seed=0)
    aucs = [loss_auc(lh[i:i + 1], torch.cat([lh[:i], lh[i + 1:]])) for i in range(len(q))]
    x = setup.data.images
    train_sim = noise_and_denoise_similarity(model, x[:len(q)], _backend(cfg), cfg.similarity_t, cfg.similarity_seed)
    return {"n": len(q), "similarity": [float(s) for s in sim.scores], "nll_bpd": [float(b) for b in nll.bpd],
            "membership_auc": aucs, "similarity_backend": sim.similarity,
            "train_similarity": [float(s) for s in train_sim.scores],
            "denoised": [[round(float(v), 5) for v in d.flatten()] for d in sim.denoised[:4]]}


# ---------------------------------------------------------------- one cell (row x target)


def _cell_dir(root: Path, label: str, target: int) -> Path:
    return root / "cells" / f"{label}-target{target:04d}"


def calibrate_scaling_norm(model, kept: torch.Tensor, forget: torch.Tensor, method_name: str, params: dict,
                           batch: int, fraction: float, seed: int, batches: int = 4) -> dict:
    """The paper's rule, scaling_norm = ``fraction`` of ||G_x||: the gradient norm of the batch mean of the variant's
    own ``x`` term at the shipped model, averaged over a few batches."""
    import copy

    from ..methods import Context, make_method
    from ..methods.base import global_norm
    from ..trainer import RowSampler

    unet = copy.deepcopy(model.unet).train()
    method = make_method(method_name, **{k: (1.0 if v == "auto" else v) for k, v in params.items()})
    T = model.num_train_timesteps
    sampler = RowSampler(kept, forget, method, 0, T - 1, seed + 777)
    ctx = Context(model.alphas_cumprod(), kept, forget, 0, T - 1, torch.device("cpu"), sampler.generator, unet=unet,
                  batch_size=batch, draw=sampler.draw)
    method.setup(ctx)
    ps = [p for p in unet.parameters() if p.requires_grad]
    norms = []
    for _ in range(batches):
        grads = torch.autograd.grad(method.terms(unet, sampler.draw(batch), ctx).losses["x"].mean(), ps,
                                    allow_unused=True)
        norms.append(float(global_norm([g for g in grads if g is not None])))
    gx = sum(norms) / len(norms)
    return {"grad_norm_x": gx, "fraction": fraction, "scaling_norm": fraction * gx}


def _retrain(setup: _Setup, target: int, run_dir: Path) -> tuple[object, dict]:
    import yaml

    from ..models import load_model
    from ..train import TrainConfig, train

    recipe = Path(setup.model_dir).parent / "config.yaml"
    if not recipe.is_file():
        raise UserError(f"row 'retrain' needs the model's training recipe: no config.yaml beside {setup.model_dir}")
    known = set(TrainConfig.__dataclass_fields__)
    rc = {k: v for k, v in (yaml.safe_load(recipe.read_text()) or {}).items() if k in known}
    rc.update(forget=str(target), out=str(run_dir), overwrite=True, threads=1, log_every=max(1, rc.get("steps", 1)))
    from ..data import load_data

    if not torch.equal(load_data(rc.get("data", "")).images.load(), setup.data.images.load()):
        raise UserError(f"the model's recipe trains on {rc.get('data')!r}, not on the benchmark's data "
                        f"{setup.cfg.data!r}")
    summary = train(TrainConfig(**rc))
    return load_model(summary["model_dir"]), {"recipe": rc, "train_seconds": summary["train_seconds"]}


def run_cell(cfg: InstanceBenchConfig, label: str, target: int, root: str) -> dict:
    """Unlearn (or train, or just evaluate) one row for one target; writes and returns the cell's result."""
    from ..data import split_kept
    from ..methods import make_method
    from ..metrics.similarity import noise_and_denoise
    from ..models import DiffusionModel
    from ..trainer import TrainerConfig, unlearn

    torch.set_num_threads(1)
    c0, t0 = time.process_time(), time.time()
    setup = _cached_setup(cfg)
    base = setup.model
    kept, forget = split_kept(setup.data, [target])
    forget = forget.load()  # the one target image, as a tensor (the measures below take tensors)
    method_name, params = ROWS[label]
    res: dict = {"label": label, "method": method_name, "target": target, "target_name": setup.data.names[target]}
    cell = _cell_dir(Path(root), label, target)
    strip: list[dict] = []
    if label == "pretrained":
        model, res["steps"] = base, 0
    elif label == "retrain":
        model, res["retrain"] = _retrain(setup, target, cell / "run")
        res["steps"] = res["retrain"]["recipe"].get("steps")
    else:
        params = dict(params)
        if any(v == "auto" for v in params.values()):
            res["scaling_norm_calibration"] = calibrate_scaling_norm(
                base, kept, forget, method_name, params, cfg.batch_size, cfg.scaling_norm_fraction, cfg.seed)
            params = {k: (res["scaling_norm_calibration"]["scaling_norm"] if v == "auto" else v)
                      for k, v in params.items()}
        method = make_method(method_name, **params)
        res["hyperparameters"] = method.hyperparameters()
        ucfg = TrainerConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                             seed=cfg.seed, threads=1)
        with_strip = target in setup.targets[:cfg.strip_targets]
        backend = _backend(cfg) if with_strip else None

        def record(step: int, unet) -> None:
            m = DiffusionModel(unet, base.scheduler)
            d = noise_and_denoise(m, forget, cfg.similarity_t, cfg.similarity_seed)
            strip.append({"step": step, "similarity": float(backend(forget, d)[0]),
                          "denoised": [round(float(v), 5) for v in d[0].flatten()]})

        def callback(step: int, unet) -> None:
            if step % cfg.strip_every == 0 or step == cfg.steps:
                record(step, unet)

        if with_strip:
            record(0, base.unet)
        logs: list[dict] = []
        t1 = time.time()
        model = unlearn(base, kept, forget, method, ucfg, log=logs.append, callback=callback if with_strip else None)
        res["unlearn_seconds"] = round(time.time() - t1, 2)
        res["steps"] = cfg.steps
        res["last_log"] = {k: v for k, v in logs[-1].items() if isinstance(v, (int, float))} if logs else {}
    res["metrics"] = evaluate(model, setup, target)
    res["strip"] = strip
    res["seconds"] = round(time.time() - t0, 2)
    res["cpu_seconds"] = round(time.process_time() - c0, 2)
    cell.mkdir(parents=True, exist_ok=True)
    write_json(cell / "result.json", res, indent=1)  # the cell exists only when complete
    return res


def _reference_job(cfg: InstanceBenchConfig, root: str) -> dict:
    torch.set_num_threads(1)
    c0 = time.process_time()
    ref = held_out_reference(_cached_setup(cfg))
    ref["cpu_seconds"] = round(time.process_time() - c0, 2)
    path = Path(root) / "reference.json"
    write_json(path, ref)
    return ref


# ---------------------------------------------------------------- the benchmark


def _cost(label: str) -> float:
    return {"retrain": 100, "erasediff": 5, "siss-nois": 3, "retrack": 2.5, "siss-lambda0.5": 2.2,
            "siss-lambda0": 2.2, "siss-lambda1": 2.2, "erasediff-light": 2.2, "naive": 1.2, "neggrad": 1.2,
            "pretrained": 0.5}.get(label, 2)


def run_instance_bench(cfg: InstanceBenchConfig) -> dict:
    from .toy import _Pool

    _validate(cfg)
    labels = _rows(cfg)
    root = Path(cfg.out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} exists and is not a directory")
    check_bench_dir(root, cfg, FREE_SETTINGS)
    setup = _cached_setup(cfg)  # every input is checked before anything is written
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "config.json", asdict(cfg))
    t_start = time.time()
    results, jobs = [], []
    for target in setup.targets:
        for label in labels:
            path = _cell_dir(root, label, target) / "result.json"
            if path.exists():
                results.append(read_json(path))
            else:
                jobs.append((cfg, label, target, str(root)))
    cached = len(results)
    ref_path = root / "reference.json"
    need_ref = not ref_path.exists()
    print(f"{len(jobs)} cell(s) to run, {cached} cached; {cfg.workers} worker(s), 1 thread each", flush=True)
    pool = _Pool(min(cfg.workers, max(1, len(jobs) + need_ref)))
    try:
        order = sorted(jobs, key=lambda j: -_cost(j[1]))
        if pool.ex is None:
            ref = _reference_job(cfg, str(root)) if need_ref else read_json(ref_path)
            for job in order:
                results.append(run_cell(*job))
                _progress(results[-1])
        else:
            futures = [pool.ex.submit(run_cell, *job) for job in order]
            ref_future = pool.ex.submit(_reference_job, cfg, str(root)) if need_ref else None
            from concurrent.futures import as_completed

            for f in as_completed(futures):
                results.append(f.result())
                _progress(results[-1])
            ref = ref_future.result() if ref_future else read_json(ref_path)
    finally:
        pool.close()
    wall = time.time() - t_start
    results.sort(key=lambda r: (setup.targets.index(r["target"]) if r["target"] in setup.targets else 1 << 30,
                                labels.index(r["label"]) if r["label"] in labels else 1 << 30))
    results = [r for r in results if r["target"] in setup.targets and r["label"] in labels]
    rows = aggregate(results, labels)
    summary = {"benchmark": "instance", "config": asdict(cfg), "model_dir": setup.model_dir,
               "targets": [{"index": t, "name": setup.data.names[t]} for t in setup.targets],
               "held_out_reference": _reference_summary(ref), "rows": rows,
               "timings": {"wall_seconds": round(wall, 1), "cells_run": len(jobs), "cells_cached": cached,
                           "cpu_seconds": round(sum(r["cpu_seconds"] for r in results), 1)},
               "cells": results}
    table = markdown(summary)
    (root / "results.md").write_text(table)
    write_json(root / "results.json", summary)
    strip_png(summary, root / "strip.png")
    print(table)
    return summary


def _progress(r: dict) -> None:
    m = r["metrics"]
    print(f"[{r['label']} target {r['target']}] {r['seconds']:.0f}s  similarity {m['similarity']:.3f}  "
          f"NLL {m['nll_bpd']:.2f}  AUC {m['membership_auc']:.2f}  quality NLL {m['quality_nll_bpd']:.2f}", flush=True)


def _stat(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


METRICS = ("quality_nll_bpd", "kept_similarity", "nll_bpd", "similarity", "membership_auc")


def aggregate(results: list[dict], labels: list[str]) -> dict:
    """Mean and standard deviation over targets of every measure, per row; ``similarity_before`` from the shipped
    model on the same targets."""
    before = {r["target"]: r["metrics"]["similarity"] for r in results if r["label"] == "pretrained"}
    rows = {}
    for label in labels:
        rs = [r for r in results if r["label"] == label]
        if not rs:
            continue
        row = {k: _stat([r["metrics"][k] for r in rs]) for k in METRICS}
        row["steps"] = rs[0].get("steps")
        row["targets"] = [r["target"] for r in rs]
        if all(r["target"] in before for r in rs):
            row["similarity_before"] = _stat([before[r["target"]] for r in rs])
        secs = [r["unlearn_seconds"] for r in rs if "unlearn_seconds" in r]
        row["unlearn_seconds"] = _stat(secs) if secs else None
        rows[label] = row
    return rows


def _reference_summary(ref: dict) -> dict:
    return {"n": ref["n"], "similarity": _stat(ref["similarity"]), "nll_bpd": _stat(ref["nll_bpd"]),
            "membership_auc": _stat(ref["membership_auc"]), "train_similarity": _stat(ref["train_similarity"]),
            "similarity_backend": ref["similarity_backend"]}


def _pm(s: dict | None, spec: str = "{:.3f}") -> str:
    if not s:
        return "—"
    return (spec + " ± " + spec).format(s["mean"], s["std"])


def command_line(cfg: dict) -> str:
    """The ``diffunlearn bench instance`` command that reproduces ``cfg`` (``--out`` and the non-default settings)."""
    defaults = asdict(InstanceBenchConfig())
    parts = ["diffunlearn bench instance", "--out", str(cfg["out"])]
    for k, v in cfg.items():
        if k != "out" and v != defaults.get(k):
            parts += ["--" + k.replace("_", "-"), str(v)]
    return " ".join(parts)


def markdown(summary: dict) -> str:
    cfg, rows, ref = summary["config"], summary["rows"], summary["held_out_reference"]
    backend = ref["similarity_backend"]
    head = ["method", "steps", "quality: held-out NLL (bpd) ↓", "other training images: similarity ↑",
            "target NLL (bpd) ↑", "target similarity before", "target similarity after ↓", "membership AUC ↓ (→0.5)",
            "unlearning s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['steps'] or '—'} | {_pm(r['quality_nll_bpd'], '{:.2f}')} | "
                     f"{_pm(r['kept_similarity'])} | {_pm(r['nll_bpd'], '{:.2f}')} | {_pm(r.get('similarity_before'))} "
                     f"| {_pm(r['similarity'])} | {_pm(r['membership_auc'], '{:.2f}')} | "
                     f"{_pm(r['unlearn_seconds'], '{:.0f}')} |")
    lines.append(f"| held-out reference (never trained on) | — | {_pm(ref['nll_bpd'], '{:.2f}')} | — | "
                 f"{_pm(ref['nll_bpd'], '{:.2f}')} | — | {_pm(ref['similarity'])} | "
                 f"{_pm(ref['membership_auc'], '{:.2f}')} | — |")
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
        f"{_pm(ref['train_similarity'])}; on held-out images: {_pm(ref['similarity'])}.",
        f"Wall time {tm['wall_seconds']:.0f} s for {tm['cells_run']} cell(s) run ({tm['cells_cached']} cached) with "
        f"{cfg['workers']} worker process(es), 1 thread each; CPU time of all cells {tm['cpu_seconds']:.0f} s "
        f"(~{tm['cpu_seconds'] / cfg['workers']:.0f} s of wall time on {cfg['workers']} idle core(s)).",
        "",
        f"Command: `{command_line(cfg)}`",
    ]
    return "\n".join(lines + notes) + "\n"


def strip_png(summary: dict, path: Path) -> None:
    """The paper's Figure 3: per method (rows), the target and its noise-and-denoised reconstruction every
    ``strip_every`` unlearning steps (columns), with the similarity under each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in summary["cells"] if c["strip"]]
    if not cells:
        return
    target = cells[0]["target"]
    cells = [c for c in cells if c["target"] == target]
    steps = sorted({p["step"] for c in cells for p in c["strip"]})
    from ..data import load_data

    cfg = summary["config"]
    x = load_data(cfg["data"]).images[target]
    shape = tuple(x.shape)
    ncol = len(steps) + 1
    fig, axes = plt.subplots(len(cells), ncol, figsize=(1.25 * ncol + 1.6, 1.35 * len(cells) + 0.6), squeeze=False)

    def show(ax, img, title=None):
        a = ((np.asarray(img, dtype=np.float32).reshape(shape) + 1) / 2).clip(0, 1)
        a = a[0] if shape[0] == 1 else a.transpose(1, 2, 0)
        ax.imshow(a, cmap="gray" if shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        if title is not None:
            ax.set_xlabel(title, fontsize=7)

    for i, c in enumerate(cells):
        show(axes[i, 0], x.numpy(), "target")
        axes[i, 0].set_ylabel(c["label"], fontsize=8, rotation=0, ha="right", va="center")
        by_step = {p["step"]: p for p in c["strip"]}
        for j, s in enumerate(steps, 1):
            if s in by_step:
                show(axes[i, j], by_step[s]["denoised"], f"{by_step[s]['similarity']:.2f}")
            else:
                axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(f"step {s}", fontsize=8)
    fig.suptitle(f"Noise-and-denoise (t = {cfg['similarity_t']}) of target {target} during unlearning; number = "
                 f"similarity", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


__all__ = ["InstanceBenchConfig", "ROWS", "aggregate", "choose_targets", "evaluate", "held_out_reference",
           "run_cell", "run_instance_bench"]
