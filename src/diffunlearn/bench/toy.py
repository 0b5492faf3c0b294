"""``diffunlearn bench toy``: every unlearning method against an exact gold standard, in about two minutes on 2 cores.

The measures are those of :mod:`diffunlearn.protocols.toy` (noise predictions against the ideal denoisers of X and
X \\ A, A's likelihood, samples). Steps: train a small base DDPM (``toy-small``, 164 k parameters) on X and, with the
same recipe, the retrain gold standard on X \\ A (``train.train``: 800 steps, batch 64, AdamW lr 2e-3 with cosine
decay after 100 warm-up steps, EMA weights saved); run every method of :data:`diffunlearn.methods.METHODS` on the
base model (the registry's ``retrain``, which re-initialises the weights and trains only for the unlearning budget,
is replaced by that full-recipe retrain); evaluate every model (the retrained model is the reference of the
``d(retrain)`` distances; NLL at tolerance 1e-3 for speed, 4 Hutchinson probes, 8 held-out digits; A's loss at 512
draws; 128 DDPM samples of 25 steps).

Unlearning hyperparameters (chosen for this data and budget, the same for every method where shared): 100 steps,
batch 64, AdamW lr 1e-4 (constant; betas 0.95/0.999, weight decay 1e-6), gradient clipped to 1.0, uniform timesteps.
The paper's MNIST run used lr 5e-5 for 300 steps; with a third of the steps the rate is doubled. Each method's own
hyperparameters are the rows of the preset ``presets/bench/toy.yaml`` (with the reasons); SISS's ``scaling_norm`` is
``auto``, 10% of ||G_x|| measured for each variant at the base model (:mod:`diffunlearn.protocols.calibration`).
``--ablations`` adds the preset's SISS lambda = 0 and lambda = 1 rows.

Jobs run in ``workers`` spawned processes (one torch thread each): the base and retrain trainings in parallel, then
the methods, each unlearning and evaluating its own model. A script that calls :func:`run_toy_bench` with
``workers > 1`` must guard its entry point with ``if __name__ == "__main__":`` (spawned workers re-import it).
Writes ``results.json``, ``results.md`` and ``toy.png`` (and the models, under ``base/``, ``retrain/``, ``models/``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..protocols.toy import PROGRESS_MIN_GAP, ToyEvaluator
from .harness import Pool, Row, load_rows, per_process, weights_stamp, write_results

PRESET = "bench/toy"
#: Methods of the registry that are not fine-tuning runs on the base model (replaced by the honest retrain).
SKIPPED = {"retrain": "replaced by 'retrain': train.train on X \\ A with the base model's full recipe"}


@dataclass
class ToyBenchConfig:
    seed: int = 0
    quick: bool = False
    arch: str = "toy-small"
    # base model and retrain: the same recipe (train.train: AdamW, cosine with warm-up, EMA)
    base_steps: int = 800
    base_batch: int = 64
    base_lr: float = 2e-3
    warmup: int = 100
    # unlearning: the same budget and optimiser for every method (constant lr, clip 1.0, from the EMA weights)
    unlearn_steps: int = 100
    unlearn_lr: float = 1e-4
    unlearn_batch: int = 64
    ablations: bool = False  # also run SISS lambda = 0 and lambda = 1 (the paper's ablations; ~+15 s)
    scaling_norm_fraction: float = 0.10
    calibration_batches: int = 4
    # evaluation
    probe_timesteps: tuple[int, ...] = (50, 100, 200, 300, 400, 600, 800)
    probes_per_t: int = 128
    n_samples: int = 128
    sample_steps: int = 25
    nll: bool = True
    nll_probes: int = 4
    nll_heldout: int = 8
    nll_rtol: float = 1e-3
    nll_atol: float = 1e-3
    loss_draws: int = 512
    workers: int = 2
    save_models: bool = True
    methods: tuple[str, ...] | None = None  # None: every registered method
    preset: str = PRESET  # the rows: each method's hyperparameters

    @classmethod
    def quick_config(cls, **overrides) -> "ToyBenchConfig":
        """Tiny settings for tests and smoke runs (tens of seconds on one core): the preset's ``quick`` block."""
        from ..config import build_config

        quick = load_rows(overrides.get("preset", PRESET), extra=("quick",))[1].get("quick", {})
        cfg = build_config(cls, raw={**quick, "quick": True}, where=f"the quick block of {PRESET}")
        return dataclasses.replace(cfg, probe_timesteps=tuple(cfg.probe_timesteps), **overrides)


#: the base model and the retrain gold standard, trained by the benchmark itself (not preset rows)
REFERENCES = [Row("pretrained", reference="pretrained", cost=0.3), Row("retrain", reference="retrain", cost=0.3)]


def toy_rows(cfg: ToyBenchConfig) -> list[Row]:
    """The method rows: every registered method (or ``cfg.methods``) in registry order, with its preset row's
    hyperparameters (its own defaults when the preset has none), then the non-default rows with ``ablations``."""
    from ..methods import METHODS, MethodSpec

    rows = load_rows(cfg.preset, extra=("quick",))[0]
    names = list(cfg.methods) if cfg.methods is not None else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    out = [rows[n] if n in rows and rows[n].method else Row(n, MethodSpec(n)) for n in names if n not in SKIPPED]
    if cfg.ablations and cfg.methods is None:
        out += [r for r in rows.values() if not r.default and r.method is not None]
    return out


def method_list(cfg: ToyBenchConfig) -> list[tuple[str, str, dict]]:
    """(label, method, hyperparameters) of every method row, in the order of the results."""
    return [(r.label, r.method.name, dict(r.method.params)) for r in toy_rows(cfg)]


def _evaluator(cfg: ToyBenchConfig, abar: torch.Tensor, retrain_dir: str | None) -> ToyEvaluator:
    # the retrain model's outputs are cached: a model re-trained into the same folder invalidates them
    key = (json.dumps(asdict(cfg), sort_keys=True, default=str), retrain_dir,
           weights_stamp(retrain_dir) if retrain_dir else None)
    return per_process("toy", key, lambda: ToyEvaluator(cfg, abar, retrain_dir))


# ---------------------------------------------------------------- jobs (run inline or in worker processes)


def _train_job(cfg: ToyBenchConfig, out: str, forget: str) -> dict:
    from ..scratch import TrainConfig, train

    torch.set_num_threads(1)
    tc = TrainConfig(data="toy-digits", forget=forget, out=out, arch=cfg.arch, steps=cfg.base_steps,
                     batch_size=cfg.base_batch, lr=cfg.base_lr, warmup=cfg.warmup, seed=cfg.seed, threads=1,
                     log_every=max(1, cfg.base_steps), overwrite=True)
    t0, c0 = time.time(), time.process_time()
    summary = train(tc)
    return {"seconds": round(time.time() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2),
            "model_dir": summary["model_dir"], "recipe": asdict(tc)}


def _method_job(cfg: ToyBenchConfig, row: Row, base_dir: str, retrain_dir: str, out_dir: str | None) -> dict:
    from ..model import load_model, save_model
    from ..protocols.calibration import calibrated
    from ..trainer import TrainerConfig, unlearn

    torch.set_num_threads(1)
    c0 = time.process_time()
    base = load_model(base_dir)
    ev = _evaluator(cfg, base.alphas_cumprod(), retrain_dir)
    res: dict = {"label": row.label, "method": row.reference or row.method.name,
                 "hyperparameters": dict(row.method.params) if row.method else {}}
    if row.reference == "pretrained":
        model, res["steps"] = base, cfg.base_steps
    elif row.reference == "retrain":
        model, res["steps"] = load_model(retrain_dir), cfg.base_steps
        res["hyperparameters"] = {"from_scratch_on": "X \\ A", "steps": cfg.base_steps, "batch_size": cfg.base_batch,
                                  "lr": cfg.base_lr, "recipe": "train.train (as the base model)"}
    else:
        spec, calib = calibrated(base, ev.kept, ev.forget, row.method, cfg.unlearn_batch, cfg.scaling_norm_fraction,
                                 cfg.seed, cfg.calibration_batches)
        if calib:
            res["scaling_norm_calibration"] = calib
        method = spec.build()
        res["hyperparameters"] = method.hyperparameters()
        ucfg = row.trainer_config(TrainerConfig(steps=cfg.unlearn_steps, lr=cfg.unlearn_lr,
                                                batch_size=cfg.unlearn_batch, seed=cfg.seed, threads=1))
        logs: list[dict] = []
        t0 = time.time()
        model = unlearn(base, ev.kept, ev.forget, method, ucfg, log=logs.append)
        res["seconds"], res["steps"] = round(time.time() - t0, 2), ucfg.steps
        res["train_log"] = _summarise_log(logs)
        if out_dir:
            save_model(model, Path(out_dir) / row.label)
    res["metrics"] = ev.evaluate(model)
    res["cpu_seconds"] = round(time.process_time() - c0, 2)  # this job's CPU time (unlearning + evaluation)
    return res


def _summarise_log(logs: list[dict]) -> dict:
    """Means over the run of the logged statistics (||G_x||, ||G_a||, weights, losses), and the last step's values."""
    if not logs:
        return {}
    keys = [k for k in logs[0] if k not in ("step", "seconds", "lr") and isinstance(logs[0][k], (int, float))]
    return {"mean": {k: sum(float(r.get(k, 0.0)) for r in logs) / len(logs) for k in keys},
            "last": {k: logs[-1][k] for k in keys if k in logs[-1]}}


# ---------------------------------------------------------------- the benchmark


def run_toy_bench(out_dir: str | Path, seed: int = 0, quick: bool = False, overwrite: bool = False,
                  config: ToyBenchConfig | None = None, **overrides) -> dict:
    """Run the toy benchmark into ``out_dir``; returns the results (also written as JSON, Markdown and a PNG).

    ``overrides`` set :class:`ToyBenchConfig` fields (e.g. ``workers=1``, ``unlearn_steps=50``).
    """
    from ..runs import prepare_out_dir

    if config is None:
        config = ToyBenchConfig.quick_config(seed=seed) if quick else ToyBenchConfig(seed=seed)
    bad = [k for k in overrides if k not in {f.name for f in dataclasses.fields(ToyBenchConfig)}]
    if bad:
        raise UserError(f"unknown toy-bench setting(s): {', '.join(bad)}")
    cfg = dataclasses.replace(config, **overrides)
    out = prepare_out_dir(out_dir, overwrite)
    rows = toy_rows(cfg)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict = {}
    with Pool(cfg.workers) as pool:
        # 1. the base model on X and the retrain gold standard on X \ A, same recipe, in parallel
        t0 = time.time()
        base_info, retrain_info = pool.map(_train_job, [(cfg, str(out / "base"), ""),
                                                       (cfg, str(out / "retrain"), "default")])
        timings["train_base_and_retrain"] = round(time.time() - t0, 2)
        base_dir, retrain_dir = base_info["model_dir"], retrain_info["model_dir"]
        models = str(out / "models") if cfg.save_models else None
        jobs = [(cfg, r, base_dir, retrain_dir, models) for r in rows]
        jobs += [(cfg, r, base_dir, retrain_dir, None) for r in REFERENCES]
        # 2. every method (unlearn + evaluate), longest first so the two workers finish together
        t0 = time.time()
        done = pool.map(_method_job, sorted(jobs, key=lambda j: -j[1].cost))
        timings["methods_and_evaluation"] = round(time.time() - t0, 2)
    by_label = {r["label"]: r for r in done}
    by_label["retrain"]["seconds"] = retrain_info["seconds"]
    by_label["pretrained"]["seconds"] = base_info["seconds"]
    labels = [r.label for r in REFERENCES + rows]
    timings["total"] = round(time.time() - t_start, 2)
    # CPU seconds of the jobs: on a loaded machine, what the wall time would be on idle cores (one thread per job)
    cpu_jobs = sum(r["cpu_seconds"] for r in done)
    cpu_train = (base_info["cpu_seconds"], retrain_info["cpu_seconds"])
    timings["cpu_seconds"] = {"train_base": cpu_train[0], "train_retrain": cpu_train[1],
                              "methods_and_evaluation": round(cpu_jobs, 2)}
    timings["idle_estimate"] = round((max(cpu_train) if cfg.workers > 1 else sum(cpu_train))
                                     + cpu_jobs / max(1, min(cfg.workers, len(done))), 1)
    ev = _evaluator(cfg, _abar(base_dir), None)
    results = {
        "benchmark": "toy",
        "config": asdict(cfg),
        "data": {"source": "toy-digits", "n_X": len(ev.data), "n_kept": len(ev.kept), "n_forget": len(ev.forget),
                 "forget_is_copies_of_one_image": True},
        "recipe": {"base_and_retrain": base_info["recipe"], "unlearn": {"steps": cfg.unlearn_steps,
                   "lr": cfg.unlearn_lr, "batch_size": cfg.unlearn_batch, "optimizer": "AdamW (0.95, 0.999) wd 1e-6",
                   "clip_norm": 1.0}},
        "skipped": SKIPPED,
        "reference": ev.reference_gaps(),
        "rows": [by_label[label] for label in labels],
        "timings": timings,
        "threads_per_worker": 1,
        "workers": cfg.workers,
    }
    write_results(out, results, markdown_table(results))
    plot(results, out / "toy.png")
    return results


def _abar(model_dir: str) -> torch.Tensor:
    from ..model import load_model

    return load_model(model_dir).alphas_cumprod()


# ---------------------------------------------------------------- reporting

COLUMNS = [
    ("steps", "steps", "{:d}"),
    ("seconds", "time s", "{:.1f}"),
    ("near_A.progress", "near A: progress", "{:.2f}"),
    ("near_A.ideal_kept", "near A: d(eps*_X\\A)", "{:.3f}"),
    ("near_A.ideal_all", "near A: d(eps*_X)", "{:.3f}"),
    ("near_A.retrain", "near A: d(retrain)", "{:.3f}"),
    ("elsewhere.ideal_kept", "elsewhere: d(eps*_X\\A)", "{:.4f}"),
    ("elsewhere.ideal_all", "elsewhere: d(eps*_X)", "{:.4f}"),
    ("elsewhere.retrain", "elsewhere: d(retrain)", "{:.4f}"),
    ("nll_A_bpd", "NLL(A) bpd", "{:.2f}"),
    ("loss_A", "loss(A)/dim", "{:.3f}"),
    ("nll_heldout_bpd", "NLL(held-out) bpd", "{:.2f}"),
    ("target_frac", "samples = target", "{:.3f}"),
    ("nn_dist_kept", "NN dist to X\\A", "{:.2f}"),
]


def _get(row: dict, key: str):
    if key in ("steps", "seconds"):
        return row.get(key)
    v = row["metrics"]
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    try:
        return spec.format(v)
    except (ValueError, TypeError):
        return str(v)


def markdown_table(results: dict) -> str:
    """One row per model; distances are per-dimension squared errors averaged over the probe timesteps."""
    rows = results["rows"]
    cols = [c for c in COLUMNS if any(_get(r, c[0]) is not None for r in rows)]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |",
             "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(_get(r, k), spec) for k, _, spec in cols) + " |")
    ref = results["reference"]
    cfg = results["config"]
    notes = [
        "",
        f"d(.) = mean over t in {list(cfg['probe_timesteps'])} of ||eps_theta(x_t, t) - target||^2 / D (D = 64) on "
        "fixed probes: near A = gamma_t a + sigma_t eps, elsewhere = noised X \\ A items "
        f"({cfg['probes_per_t']} per t). "
        f"eps*_S = ideal (Bayes-optimal) denoiser of the finite set S. Scale: d(eps*_X, eps*_X\\A) = "
        f"{ref['near_A']['ideal_all_vs_ideal_kept']:.3f} near A, {ref['elsewhere']['ideal_all_vs_ideal_kept']:.2g} "
        "elsewhere.",
        "progress = least-squares position of eps_theta on the segment eps*_X (0) -> eps*_X\\A (1) near A, averaged "
        f"over the timesteps where the two ideals differ (gap >= {PROGRESS_MIN_GAP:g} per dim). Unlearning moves a "
        "row toward retrain's progress and d(retrain) near A; a broken model has a large distance elsewhere, a high "
        "held-out NLL and samples far from X \\ A.",
        f"retrain = the base recipe ({cfg['base_steps']} steps) trained from scratch on X \\ A; methods run "
        f"{cfg['unlearn_steps']} steps from the base model's EMA weights (lr {cfg['unlearn_lr']:g}, batch "
        f"{cfg['unlearn_batch']}). scaling_norm = {cfg['scaling_norm_fraction']:.0%} of ||G_x|| measured at the base "
        "model for each variant: " + ", ".join(
            f"{r['label']} {r['scaling_norm_calibration']['scaling_norm']:.3g} (||G_x|| "
            f"{r['scaling_norm_calibration']['grad_norm_x']:.3g})"
            for r in rows if "scaling_norm_calibration" in r) + ".",
        f"samples = target: fraction of {cfg['n_samples']} DDPM samples ({cfg['sample_steps']} steps) nearer to the "
        "target than to any image of X \\ A; NN dist: mean L2 distance (model space [-1, 1]) of the other "
        "samples to X \\ A.",
        f"Wall time {results['timings']['total']:.0f} s with {results['workers']} worker process(es), 1 thread each "
        f"(job CPU time suggests ~{results['timings']['idle_estimate']:.0f} s on idle cores, plus process "
        "start-up).",
    ]
    return "\n".join(lines + notes) + "\n"


def plot(results: dict, path: Path) -> None:
    """Three panels, one marker per model (legend on the right):

    1. progress toward the ideal X \\ A denoiser near A (x) against damage elsewhere (y: distance to the retrained
       model on noised X \\ A items): unlearning moves right, toward retrain; breaking the model moves up;
    2. the raw distances to the ideal X \\ A denoiser, near A (x) and elsewhere (y);
    3. progress per timestep: where along the noise levels each model has moved.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    grid = list(results["config"]["probe_timesteps"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    palette = ["tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan",
               "gold", "navy", "lime", "teal", "black"]
    markers = "ovD^<>pPXhd"
    x_max = 1.6
    floor = 1e-4
    k = 0
    for r in rows:
        m = r["metrics"]
        label = r["label"]
        if label == "pretrained":
            style = dict(color="tab:blue", marker="s", s=90)
        elif label == "retrain":
            style = dict(color="tab:green", marker="*", s=200)
        else:
            style = dict(color=palette[k % len(palette)], marker=markers[k % len(markers)], s=55)
            k += 1
        px, py = m["near_A"]["progress"], m["elsewhere"]["retrain"]
        shown = f"{label} (progress {px:.2f})" if px > x_max else label
        axes[0].scatter([min(px, x_max)], [max(py, floor)], zorder=3, label=shown, edgecolor="black", linewidth=0.5,
                        **style)
        axes[1].scatter([m["near_A"]["ideal_kept"]], [m["elsewhere"]["ideal_kept"]], zorder=3, edgecolor="black",
                        linewidth=0.5, **style)
        per_t = [(t, v) for t, v in zip(grid, m["near_A"]["progress_per_t"]) if v is not None]
        if per_t:
            axes[2].plot([t for t, _ in per_t], [min(v, x_max) for _, v in per_t], color=style["color"],
                         marker=style["marker"], lw=2.5 if label in ("retrain", "pretrained") else 1.2, ms=5)
    gap = results["reference"]["near_A"]["ideal_all_vs_ideal_kept"]
    ax = axes[0]
    for v in (0.0, 1.0):
        ax.axvline(v, color="grey", lw=0.8, ls="--")
    ax.set_xlim(-0.1, x_max + 0.05)
    ax.set_yscale("log")
    ax.set_xlabel("near A: progress, ideal X denoiser (0) -> ideal X\\A denoiser (1)")
    ax.set_ylabel(f"elsewhere: distance to the retrained model (floor {floor:g})")
    ax.set_title("Unlearning moves right; breaking the model moves up")
    ax = axes[1]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("near A: distance to ideal X\\A denoiser")
    ax.set_ylabel("elsewhere: distance to ideal X\\A denoiser")
    ax.set_title(f"Raw distances (the two ideals differ by {gap:.3f} near A)")
    ax = axes[2]
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("timestep t")
    ax.set_ylabel(f"near A: progress at t (clipped at {x_max})")
    ax.set_title("Progress per noise level (thick: pretrained, retrain)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8, frameon=False)
    fig.suptitle("diffunlearn bench toy: who moves toward retraining, and who breaks the model")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
