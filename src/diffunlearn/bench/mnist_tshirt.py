"""``diffunlearn bench mnist-tshirt``: every method on the shipped MNIST T-Shirt model, shaped like the SISS paper's
Table 2 (the measures of :mod:`diffunlearn.protocols.mnist_tshirt`), with the T-shirt decay curve of each run. The
rows are the preset ``presets/bench/mnist-tshirt.yaml``; cells (row x seed) are cached on disk, so a re-run
resumes."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import run_field
from ..errors import UserError
from .harness import (
    Cell,
    CellResult,
    aggregate,
    check_bench_dir,
    load_rows,
    open_bench_dir,
    pm,
    run_cells,
    select,
    stat,
    write_results,
)

PRESET = "bench/mnist-tshirt"
REFERENCES = ("pretrained", "retrain")
# settings that may differ between runs into one benchmark directory: they do not change a cell's final model or
# its metrics (the decay curve samples with its own seeds and never draws from the training generator; a cell
# records its row and is refused if the preset now defines that row otherwise)
PER_RUN = ("rows", "preset", "seeds", "threads", "out", "curve_every", "curve_samples", "curve_nll_tol", "look",
           "curve_track")


@dataclass
class MnistBenchConfig:
    out: str = run_field("bench_out", "runs/bench-mnist-tshirt")
    seeds: int = field(default=3, metadata={"help": "seeds per method"})
    rows: str = field(default="", metadata={"help": "comma-separated rows of the preset (default: those not marked "
                                                    "default: false)"})
    preset: str = field(default=PRESET, metadata={"help": "the rows: a YAML preset (built-in name or file)"})
    steps_scale: float = field(default=1.0, metadata={"help": "multiply every method's steps (quick runs)"})
    n_samples: int = field(default=512, metadata={"help": "samples per evaluation (T-shirt rate, IS, FID)"})
    sample_steps: int = field(default=50, metadata={"help": "sampling steps"})
    sampler: str = field(default="ddpm", metadata={"help": "ddpm (the paper's), or dpm++sde (20 steps: the same "
                                                           "T-shirt rate 4.4x faster, docs/results/bench-sampler.md)"})
    nll_probes: int = field(default=4, metadata={"help": "Hutchinson probes for the final NLL"})
    nll_tol: float = field(default=1e-5, metadata={"help": "RK45 tolerance of the final NLL"})
    curve_every: int = field(default=50, metadata={"help": "evaluate the decay curve every N steps (0: off)"})
    curve_samples: int = field(default=128, metadata={"help": "samples per decay-curve point"})
    curve_nll_tol: float = field(default=1e-3, metadata={"help": "RK45 tolerance of the decay-curve NLL (1 probe)"})
    curve_track: str = field(default="", metadata={"help": "a cell's result.json (e.g. the pretrained cell's): each "
                                                          "decay-curve point draws exactly the samples that cell "
                                                          "counted as the T-shirt, at the evaluation's seeds, instead "
                                                          "of --curve-samples other ones"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    show_forgotten: bool = field(default=False, metadata={"help": "show T-shirt samples in the grids"})
    look: str = field(default="", metadata={"help": "ROW:SEED,...: run no cell; rebuild these finished cells' models "
                                                    "and draw only the samples they counted as the T-shirt "
                                                    "(counted.png, look.json in each cell)"})


def cell_trainer(cell: Cell, cfg: MnistBenchConfig):
    """The trainer settings of a method cell (its row's, the cell's seed, the steps scaled); None for a reference."""
    from ..trainer import TrainerConfig

    if cell.row.reference:
        return None
    ucfg = cell.row.trainer_config(TrainerConfig(seed=cell.key))
    return dataclasses.replace(ucfg, steps=max(1, int(round(ucfg.steps * cfg.steps_scale))))


def cell_model(cell: Cell, cfg: MnistBenchConfig, base, retrain, kept, forget, log: list, callback=None):
    """The model a cell judges: the reference model itself, or the unlearning run of the cell's row with the cell's
    seed (its per-step records appended to ``log``; ``callback(step, model)`` after each step)."""
    from ..model import DiffusionModel
    from ..trainer import unlearn

    ucfg = cell_trainer(cell, cfg)
    if ucfg is None:
        return base if cell.row.reference == "pretrained" else retrain
    hook = None if callback is None else (lambda step, unet: callback(step, DiffusionModel(unet, base.scheduler)))
    return unlearn(base, kept, forget, cell.row.method.build(), ucfg, log=log.append, callback=hook)


def tracked_samples(cfg: MnistBenchConfig) -> list[int] | None:
    """The sample numbers ``--curve-track`` names (the T-shirt samples of a finished cell), or None."""
    if not cfg.curve_track:
        return None
    from ..runs import read_json

    path = Path(cfg.curve_track)
    if not cfg.curve_every:
        raise UserError("--curve-track needs a decay curve: add --curve-every N")
    try:
        metrics = read_json(path)["metrics"]
        numbers = [int(i) for i in metrics["tshirt_rate"]["indices"]]
        drawn = metrics["sampling"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--curve-track {path}: not a finished bench mnist-tshirt cell's result.json that records its "
                        "T-shirt samples (e.g. cells/pretrained-seed0/result.json)") from None
    if not numbers:
        raise UserError(f"--curve-track {path}: that cell counted no T-shirt, so there is nothing to track")
    if (drawn.get("sampler", "ddpm"), drawn.get("steps"), drawn.get("seed")) != (cfg.sampler, cfg.sample_steps, 0):
        raise UserError(f"--curve-track {path}: that cell drew its samples with {drawn.get('steps')}-step "
                        f"{drawn.get('sampler', 'ddpm')} (seed {drawn.get('seed')}), this benchmark with "
                        f"{cfg.sample_steps}-step {cfg.sampler} (seed 0): track a cell drawn like this benchmark")
    return numbers


def _tracked(r: CellResult) -> bool:
    """Whether a cell's decay curve followed ``--curve-track``'s samples."""
    return bool((r.details.get("curve_settings") or {}).get("tracked"))


def _run_cell(cell: Cell, cfg: MnistBenchConfig, protocol, base, retrain, kept, forget, tracked: list[int] | None
              ) -> CellResult:
    from ..model.sampling import save_grid
    from ..protocols.mnist_tshirt import masked

    row, seed = cell.row, cell.key
    curve, log = [], []
    ucfg = cell_trainer(cell, cfg)
    steps, batch = (ucfg.steps, ucfg.batch_size) if ucfg else (0, 0)

    def callback(step, model):
        if step % cfg.curve_every == 0 or step == steps:
            curve.append(protocol.curve_point(model, step, cfg.curve_samples, cfg.sample_steps, cfg.curve_nll_tol,
                                              cfg.sampler, tracked))

    t0 = time.time()
    model = cell_model(cell, cfg, base, retrain, kept, forget, log, callback if cfg.curve_every else None)
    train_seconds = time.time() - t0 if ucfg else 0.0
    metrics, samples = protocol.evaluate(model, cfg.n_samples, cfg.sample_steps, cfg.nll_probes, cfg.nll_tol, seed=0,
                                         sampler=cfg.sampler)
    is_target = metrics.pop("_is_target")
    cell.dir.mkdir(parents=True, exist_ok=True)
    save_grid(masked(samples[:64], is_target[:64], cfg.show_forgotten), cell.dir / "samples.png", ncol=8)
    hits = metrics["tshirt_rate"]["indices"]
    if hits:  # every sample counted as the T-shirt, to look at
        from .tshirt_look import save_counted

        save_counted(cell.dir, "counted", samples[hits], hits, metrics["tshirt_rate"]["distances"],
                     f"{row.label} seed {seed}: samples counted as the T-shirt (number, L2 distance)")
    step_seconds = [r["seconds"] for r in log]
    first_zero = next((p["step"] for p in curve if p["tshirt_count"] == 0), None)
    return cell.result(method=row.method.name if row.method else None,
                       hyperparameters=dict(row.method.params) if row.method else {}, steps=steps, metrics=metrics,
                       details={"batch_size": batch, "curve": curve, "first_zero_step": first_zero,
                                "curve_settings": {"every": cfg.curve_every, "samples": cfg.curve_samples,
                                                   "nll_tol": cfg.curve_nll_tol, "sampler": cfg.sampler,
                                                   "tracked": tracked},
                                "unlearn_seconds": round(train_seconds, 1),
                                "seconds_per_step": float(np.median(step_seconds)) if step_seconds else None,
                                "log": log})


def _progress(r: CellResult) -> None:
    m = r.metrics
    print(f"[{r.label} seed {r.key}] {r.details['unlearn_seconds']:.0f}s unlearning  rate {m['tshirt_rate']['count']}/"
          f"{m['tshirt_rate']['n']}  NLL {m['tshirt_nll']['bpd']:.2f}  IS {m['classifier_is']['mean']:.2f}  "
          f"FID {m['classifier_fid']['value']:.2f}", flush=True)


def _summariser(results: list[CellResult]):
    from ..metrics.rates import rate_summary

    plain = [r.details["seconds_per_step"] for r in results if r.method == "naive" and r.details["seconds_per_step"]]
    plain_step = float(np.median(plain)) if plain else None

    def summarise(rs: list[CellResult]) -> dict:
        k = sum(r.metrics["tshirt_rate"]["count"] for r in rs)
        n = sum(r.metrics["tshirt_rate"]["n"] for r in rs)
        sps = [r.details["seconds_per_step"] for r in rs if r.details["seconds_per_step"]]
        # per cell: the first curve step with no T-shirt, ">steps" when never reached, None without a curve
        zeros = [r.details["first_zero_step"] if r.details["first_zero_step"] is not None
                 else (f">{r.steps}" if r.details["curve"] else None) for r in rs]
        return {
            "steps": rs[0].steps, "seeds": len(rs),
            "classifier_is": stat(r.metrics["classifier_is"]["mean"] for r in rs),
            "classifier_fid": stat(r.metrics["classifier_fid"]["value"] for r in rs),
            "nll": stat(r.metrics["tshirt_nll"]["bpd"] for r in rs),
            # Monte Carlo standard error of the mean NLL over the cells' Hutchinson probes (NaN with 1 probe)
            "nll_mc_stderr": float(np.sqrt(np.mean([r.metrics["tshirt_nll"]["stderr"] ** 2 for r in rs]) / len(rs))),
            "tshirt": rate_summary(k, n),
            "unlearn_seconds": stat(r.details["unlearn_seconds"] for r in rs),
            "seconds_per_step": float(np.median(sps)) if sps else None,
            "relative_step_time": float(np.median(sps)) / plain_step if sps and plain_step else None,
            "first_zero_step": zeros,
            "curve_points": sum(len(r.details["curve"]) for r in rs),
            "curve_tracked": any(_tracked(r) for r in rs),
            # how close the counted samples are to the T-shirt (pooled over the cells that recorded it): copies lie
            # near 0, degraded T-shirt shapes near the threshold
            "counted_distance": counted_distance(rs),
        }

    return summarise


def counted_distance(rs: list[CellResult]) -> dict | None:
    """Min, median and max L2 distance to the T-shirt of the samples the cells counted (pooled; only cells that
    recorded their distances), with how many cells and samples; None when none recorded any."""
    cells = [r.metrics["tshirt_rate"]["distances"] for r in rs if "distances" in r.metrics["tshirt_rate"]]
    d = [x for c in cells for x in c]
    if not d:
        return None
    return {"min": min(d), "median": float(np.median(d)), "max": max(d), "samples": len(d), "cells": len(cells)}


def paired_with(results: list[CellResult], other: str = "naive") -> dict:
    """Each row against ``other`` on the same sample seeds: for every unlearning seed both rows ran (cells that record
    which samples were T-shirts), the samples counted under the row only, under ``other`` only and under both, pooled
    over seeds, with the exact McNemar p-value (each (unlearning seed, sample seed) is one paired observation)."""
    from ..metrics.rates import mcnemar_exact, paired_hits

    ref = {r.key: r.metrics["tshirt_rate"]["indices"] for r in results
           if r.label == other and "indices" in r.metrics["tshirt_rate"]}
    out: dict = {}
    for r in results:
        hits = r.metrics["tshirt_rate"].get("indices")
        if r.label == other or hits is None or r.key not in ref:
            continue
        d = out.setdefault(r.label, {"seeds": [], "only_row": 0, "only_other": 0, "both": 0, "other": other})
        p = paired_hits(hits, ref[r.key])
        d["seeds"].append(r.key)
        d["only_row"] += p["only_a"]
        d["only_other"] += p["only_b"]
        d["both"] += p["both"]
    for d in out.values():
        d["p_value"] = mcnemar_exact(d["only_row"], d["only_other"])
    return out


def _markdown(rows: dict[str, dict], cfg: MnistBenchConfig, paired: dict | None = None) -> str:
    head = ("| method | steps | classifier IS ↑ | classifier FID ↓ | T-shirt NLL (bits/dim) ↑ | T-shirt rate (95% CI) "
            "↓ | counted samples' L2 to the T-shirt, min / median / max | unlearning s | s/step vs plain step | "
            "first step with 0 T-shirts |\n|" + "---|" * 10)
    lines = [head]
    for label, r in rows.items():
        one = r["seeds"] == 1
        mc = r["nll_mc_stderr"]
        nll = pm(r["nll"], mean_alone=one) + (f" (MC ± {mc:.2f})" if mc == mc else "")
        t = r["tshirt"]
        rel = f"{r['relative_step_time']:.2f}x" if r["relative_step_time"] else "—"
        zero = ", ".join("—" if z is None else str(z) for z in r["first_zero_step"]) if r["curve_points"] else \
            ("not measured" if r["steps"] else "—")
        zero += " (tracked)" if r.get("curve_tracked") else ""
        cd = r.get("counted_distance")
        near = "—" if cd is None else f"{cd['min']:.2f} / {cd['median']:.2f} / {cd['max']:.2f}" + (
            f" ({cd['cells']} of {r['seeds']} cells)" if cd["cells"] < r["seeds"] else "")
        lines.append(f"| {label} | {r['steps'] or '—'} | {pm(r['classifier_is'], mean_alone=one)} | "
                     f"{pm(r['classifier_fid'], mean_alone=one)} | {nll} | {t['count']}/{t['n']} = "
                     f"{100 * t['rate']:.2f}% ({100 * t['ci95'][0]:.2f}–{100 * t['ci95'][1]:.2f}%) | {near} | "
                     f"{r['unlearn_seconds']['mean']:.0f} | {rel} | {zero} |")
    lines.append(f"\n{cfg.seeds} seed(s) per method; {cfg.n_samples} samples per evaluation ({cfg.sample_steps}-step "
                 f"{'DDPM' if cfg.sampler == 'ddpm' else cfg.sampler}, sample i seeded by i; a sample is counted as "
                 f"the T-shirt within L2 10 of it, pixels in [0, 1]); NLL by the probability-flow ODE "
                 f"(rtol=atol={cfg.nll_tol}, "
                 f"{cfg.nll_probes} probes; MC: its Monte Carlo standard error over probes); ± is the standard "
                 "deviation over seeds (none with one seed); IS/FID computed with the shipped domain classifier, not "
                 "Inception. Seconds are each cell's own wall time: cells that shared the machine with other jobs ran "
                 "slower, so `diffunlearn bench speed` (methods side by side in one process) is the measure of "
                 "relative cost." + (" *(tracked)*: the decay curve drew only the samples of `--curve-track`'s cell "
                                     "that were T-shirts (the base model's copies), so its first step with 0 T-shirts "
                                     "is the step at which none of them was one any more." if
                                     any(r.get("curve_tracked") for r in rows.values()) else ""))
    if paired:
        lines.append("\nPaired against naive deletion on the same sample seeds (cells that record their T-shirt "
                     "samples; exact McNemar test on the discordant samples):\n\n| method | unlearning seeds | T-shirt "
                     "under the method only | under naive only | under both | p |\n|---|---|---|---|---|---|")
        for label, d in paired.items():
            lines.append(f"| {label} | {', '.join(map(str, d['seeds']))} | {d['only_row']} | {d['only_other']} | "
                         f"{d['both']} | {d['p_value']:.3g} |")
    return "\n".join(lines) + "\n"


def _plots(rows: dict, results: list[CellResult], root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (label, r) in enumerate(rows.items()):
        ax.errorbar(r["nll"]["mean"], r["classifier_is"]["mean"], xerr=r["nll"]["std"], yerr=r["classifier_is"]["std"],
                    fmt=markers[i % len(markers)], capsize=3,
                    label=label)  # a legend, as labels of nearby points overlap
    if "retrain" in rows:
        ax.axvline(rows["retrain"]["nll"]["mean"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("NLL of the T-shirt (bits/dim) → more forgotten (dotted: retrained model)")
    ax.set_ylabel("classifier Inception Score → better quality")
    ax.set_title("MNIST T-Shirt: quality against forgetting")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(root / "pareto.png", dpi=120)
    plt.close(fig)
    curves = [r for r in results if r.details["curve"] and r.key == 0]
    if curves:
        base = next((x for x in results if x.label == "pretrained"), None)
        gold = next((x for x in results if x.label == "retrain"), None)
        r0 = base.metrics["tshirt_rate"]["rate"] if base else float("nan")
        n0 = base.metrics["tshirt_nll"]["bpd"] if base else float("nan")
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for i, r in enumerate(curves):
            steps = [0] + [p["step"] for p in r.details["curve"]]
            style = dict(marker=markers[i % len(markers)], linestyle=["-", "--", "-.", ":"][i % 4], label=r.label)
            start = 1.0 if _tracked(r) else r0  # a tracked curve starts from samples that were all T-shirts
            a1.plot(steps, [100 * start] + [100 * p["rate"] for p in r.details["curve"]], **style)
            a2.plot(steps, [n0] + [p["nll_bpd"] for p in r.details["curve"]], **style)
        if gold:
            a2.axhline(gold.metrics["tshirt_nll"]["bpd"], color="grey", linestyle=":", linewidth=1,
                       label="retrained model")
        a1.set_xlabel("unlearning step")
        a1.set_ylabel("T-shirt rate (%)" + ("; tracked: share of the base\nmodel's T-shirt samples still T-shirts" if
                                            any(_tracked(r) for r in curves) else ""))
        a2.set_xlabel("unlearning step"), a2.set_ylabel("T-shirt NLL (bits/dim)")
        a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(root / "curves.png", dpi=120)
        plt.close(fig)


def _directory_settings(cfg: MnistBenchConfig) -> MnistBenchConfig:
    """``cfg`` with the settings its benchmark directory was computed with (those a cell depends on)."""
    from ..runs import read_json

    stored = Path(cfg.out) / "config.json"
    if not stored.is_file():
        raise UserError(f"--look: {cfg.out} holds no benchmark (no config.json); --out must be the benchmark's "
                        "directory")
    known = {f.name for f in dataclasses.fields(cfg)} - set(PER_RUN)
    try:
        settings = {k: v for k, v in read_json(stored).items() if k in known}
    except (ValueError, AttributeError):
        raise UserError(f"--look: {stored} is not a benchmark's settings; --out must be the benchmark's directory") \
            from None
    return dataclasses.replace(cfg, **settings)


def run_mnist_bench(cfg: MnistBenchConfig) -> dict | list[dict]:
    """Run the missing cells and write the table (the rows' summaries are returned); with ``look``, look at the named
    cells instead, with the directory's own settings (their records are returned)."""
    from ..data import load_data, resolve_forget, split_kept
    from ..model import load_model
    from ..pretrained import pretrained_dir
    from ..protocols.mnist_tshirt import MnistTshirtProtocol

    if cfg.look:
        cfg = _directory_settings(cfg)
    preset = load_rows(cfg.preset, REFERENCES)[0]
    rows = select(preset, cfg.rows)
    from ..model.sampling import check_sampler

    check_sampler(cfg.sampler)
    if cfg.seeds < 1 or cfg.n_samples < 10 or cfg.steps_scale <= 0:
        raise UserError("--seeds >= 1, --n-samples >= 10 and --steps-scale > 0 are required")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = Path(cfg.out)
    check_bench_dir(root, cfg, PER_RUN)
    tracked = tracked_samples(cfg)  # a bad --curve-track fails before anything is written
    base = load_model(pretrained_dir("mnist-tshirt-base") / "model")
    retrain = load_model(pretrained_dir("mnist-tshirt-retrain") / "model")
    protocol = MnistTshirtProtocol.load()
    data = load_data("mnist-tshirt")
    kept, forget = split_kept(data, resolve_forget("default", data))
    if cfg.look:
        from .tshirt_look import look_cells

        return look_cells(cfg, preset, protocol, lambda cell, log: cell_model(cell, cfg, base, retrain, kept, forget,
                                                                               log))
    open_bench_dir(root, cfg)
    cells = [Cell.of(root, row, seed) for row in rows for seed in range(cfg.seeds if row.method else 1)]
    results, _, _ = run_cells(cells, lambda c: _run_cell(c, cfg, protocol, base, retrain, kept, forget, tracked),
                              progress=_progress)
    from .tshirt_look import counted_overview, with_looked_numbers

    results = with_looked_numbers(root, results)
    labels = [label for label in preset if label in {r.label for r in rows}]
    table = aggregate(results, labels, _summariser(results))
    paired = paired_with(results)
    write_results(root, {"config": asdict(cfg), "rows": table, "paired_with_naive": paired,
                         "cells": [r.to_dict() for r in results]},
                  _markdown(table, cfg, paired))
    _plots(table, results, root)
    counted_overview(root, results, root / "counted.png")
    return table
