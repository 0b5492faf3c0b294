"""``diffunlearn bench prompt``: the SISS paper's Stable Diffusion protocol (section 5.3;
:mod:`diffunlearn.sd.protocol`) on the shipped CPU replica ``prompt-digits``, a tiny pixel-space
text-conditional model in which one prompt mostly reproduces a training digit and a variant prompt only sometimes
(see :mod:`diffunlearn.sd.replica` and the model's README.md).

It runs the ``diffunlearn prompt`` library code on one loaded model:

1. ``prompt build``: ``n`` samples of the prompt, labelled memorised (A) or not (X \\ A) by k-means (2 clusters on
   pixels; the tighter cluster is A) or, with ``--label reference``, by distance to the known training image;
2. ``prompt unlearn`` for every row of the preset ``presets/bench/prompt.yaml`` x seed from the shipped weights, the
   prompt held fixed (the conditional model treated as unconditional, ``FixedPromptUNet``), counting memorised
   samples among ``eval_samples`` (16) on the prompt and on the variant every ``eval_every`` steps, with the quality
   measure (the weight-free sharpness proxy unless ``--clip`` names local CLIP weights);
3. success as the paper defines it, per prompt and run: 0 of 16 memorised at the end while quality holds at every
   count; the success rate is the share of seeds that succeed.

SISS's ``scaling_norm`` is the paper's rule applied to this model ("auto": ``scaling_norm_fraction`` of ||G_x||, the
gradient norm of the variant's own X \\ A term at the shipped weights, as ``bench instance`` does; stored in
``scaling_norm.json``); the paper's 750 is Stable Diffusion's value, for a UNet about 3,500 times larger.

Cells (row x seed) are cached under ``cells/``: a re-run with the same settings loads them. Writes ``results.md``,
``results.json`` and ``memorised.png`` (memorised count over steps, per method, on both prompts).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import run_field
from ..errors import UserError
from ..runs import write_json
from ..trainer import TrainerConfig
from .harness import (
    Cell,
    CellResult,
    aggregate,
    check_bench_dir,
    command_line,
    load_rows,
    open_bench_dir,
    run_cells,
    select,
    write_results,
)

PRESET = "bench/prompt"
FREE_SETTINGS = ("out", "rows", "preset", "seeds")


@dataclass
class PromptBenchConfig:
    out: str = run_field("bench_out", "runs/bench-prompt")
    model: str = field(default="prompt-digits", metadata={"help": "shipped model name or SD-layout directory"})
    prompt: str = field(default="", metadata={"help": "the memorised prompt (default: the replica's replica.json)"})
    variant: str = field(default="", metadata={"help": "the variant prompt, also scored (default: the replica's)"})
    rows: str = field(default="", metadata={"help": "comma-separated rows of the preset (default: those not marked "
                                                    "default: false)"})
    preset: str = field(default=PRESET, metadata={"help": "the rows: a YAML preset (built-in name or file)"})
    seeds: int = field(default=3, metadata={"help": "unlearning seeds per method (success rate = share of seeds)"})
    n: int = field(default=128, metadata={"help": "samples of the prompt labelled into A and X \\ A"})
    label: str = field(default="kmeans", metadata={"help": "kmeans (the paper's) or reference (distance to the "
                                                           "replica's known training image)"})
    threshold: float = field(default=0.15, metadata={"help": "with --label reference: RMS pixel distance threshold"})
    steps: int = field(default=35, metadata={"help": "unlearning steps (the paper's Stable Diffusion budget)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant)"})
    batch_size: int = field(default=16, metadata={"help": "rows per step"})
    scaling_norm_fraction: float = field(default=0.1, metadata={"help": "SISS 'auto' scaling_norm: this fraction "
                                                                        "of ||G_x|| at the shipped weights"})
    eval_every: int = field(default=5, metadata={"help": "count memorised samples every N steps"})
    eval_samples: int = field(default=16, metadata={"help": "samples per count (the paper: 16)"})
    sample_steps: int = field(default=0, metadata={"help": "DDIM steps (0: the replica's, else 50)"})
    guidance: float = field(default=0.0, metadata={"help": "classifier-free guidance (0: the replica's, else 7.5)"})
    clip: str = field(default="", metadata={"help": "local CLIP directory: quality by CLIP-IQA (default: the "
                                                    "weight-free sharpness proxy)"})
    proxy_band: float = field(default=2.0, metadata={"help": "without CLIP: sharpness must stay within this factor"})
    verify: str = field(default="fast", metadata={"help": "verify every run's deletion (fast, full or off): the "
                                                          "memorised rate with its interval, the targeted seeds, the "
                                                          "variant and token edits, higher guidance"})


def _validate(cfg: PromptBenchConfig) -> None:
    if cfg.seeds < 1 or cfg.steps < 1 or cfg.batch_size < 1 or cfg.eval_every < 1 or cfg.eval_samples < 1:
        raise UserError("--seeds, --steps, --batch-size, --eval-every and --eval-samples must be at least 1")
    if cfg.n < 4:
        raise UserError(f"--n must be at least 4, got {cfg.n}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.label not in ("kmeans", "reference"):
        raise UserError(f"--label must be kmeans or reference, got {cfg.label!r}")
    if not 0 < cfg.threshold <= 1:
        raise UserError(f"--threshold is an RMS pixel distance in (0, 1], got {cfg.threshold}")
    if cfg.sample_steps < 0 or not (math.isfinite(cfg.guidance) and cfg.guidance >= 0):
        raise UserError("--sample-steps must be >= 0 and --guidance a finite number >= 0")
    if not cfg.scaling_norm_fraction > 0 or not cfg.proxy_band > 1:
        raise UserError("--scaling-norm-fraction must be positive and --proxy-band > 1")
    if cfg.verify != "off":
        from ..sd.proof import check_prompt_budget

        check_prompt_budget(cfg.verify)


def _trainer(cfg: PromptBenchConfig, seed: int) -> TrainerConfig:
    """The benchmark's budget; the preset's trainer block (and a row's) goes over it."""
    return TrainerConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed, threads=1)


class _Session:
    """Everything loaded once for all cells: the model, the data set's latents, the counter of memorised samples."""

    def __init__(self, cfg: PromptBenchConfig, rep: dict, sd, root: Path):
        from ..sd.memorisation import read_prompt_data
        from ..sd.protocol import MemorisedCounter
        from ..sd.quality import quality_measure
        from ..sd.workflows import prompt_latents

        self.cfg, self.rep, self.sd = cfg, rep, sd
        self.data = read_prompt_data(root / "data")
        self.quality = quality_measure(cfg.clip, band=cfg.proxy_band)
        self.kept, self.forget = prompt_latents(sd, self.data, "cpu")
        self.counter = MemorisedCounter(sd, self.data.rule, self.quality,
                                        {"prompt": rep["prompt"], "original_prompt": rep["variant"]},
                                        cfg.eval_samples, 1, rep["sample_steps"], rep["guidance"], 64, cfg.eval_every)

    def calibrate(self, row) -> dict:
        """The paper's scaling_norm rule at the shipped weights with the prompt held fixed."""
        from ..protocols.calibration import calibrate_scaling_norm

        model = self.sd.as_unconditional(self.counter.embeds["prompt"])
        return calibrate_scaling_norm(model, self.kept, self.forget, row.method, self.cfg.batch_size,
                                      self.cfg.scaling_norm_fraction, seed=0)

    def run(self, cell: Cell, calib: dict | None) -> CellResult:
        from ..config import to_dict
        from ..protocols.calibration import with_scaling_norm
        from ..runs import RunDir
        from ..sd.workflows import prompt_method, unlearn_prompt

        row, seed = cell.row, cell.key
        spec = with_scaling_norm(row.method, calib["scaling_norm"]) if row.auto else row.method
        method, trainer = prompt_method(spec), row.trainer_config(_trainer(self.cfg, seed))
        t0 = time.time()
        run = RunDir(cell.dir, {"command": "bench prompt", "row": row.settings(), "seed": seed,
                                "method": {"name": method.name, **method.hyperparameters()},
                                "trainer": to_dict(trainer), "prompts": self.counter.prompts}, overwrite=True)
        proof = None if self.cfg.verify == "off" else {"budget": self.cfg.verify, "paraphrases": [self.rep["variant"]]}
        s = unlearn_prompt(self.sd, self.kept, self.forget, method, trainer, self.counter, run, "cpu",
                           log_every=max(1, trainer.steps), proof=proof)
        return cell.result(method=s["method"], hyperparameters=s["hyperparameters"], steps=trainer.steps,
                           details={"scaling_norm_calibration": calib, "success": s["success"], "curve": s["curve"],
                                    "quality_measure": s["quality_measure"], "quality_rule": s["quality_rule"],
                                    "verification": _verification_of(cell.dir) if proof else None,
                                    "seconds": round(time.time() - t0, 1)})


def _verification_of(cell_dir: Path) -> dict | None:
    """A cell's verification in brief: the overall verdict, the fresh rate, the targeted seeds, every reworded
    prompt and guidance scale before and after, the detection score, the cost."""
    path = Path(cell_dir) / "verification.json"
    if not path.is_file():
        return None
    v = json.loads(path.read_text())
    if v.get("status") != "ok":
        return {"status": v.get("status"), "error": v.get("error")}
    targeted, fresh, *variants = v["verdicts"]
    return {"status": "ok", "overall": v["overall"]["status"], "fresh": {k: fresh[k] for k in ("count", "n", "ci95")},
            "targeted": {k: targeted[k] for k in ("searched", "hits_before", "still_after")},
            "variants": [{"measure": x["measure"], "prompt": x["prompt"], "guidance": x["guidance"],
                          "before": x["before"]["count"], "after": x["after"]["count"], "n": x["after"]["n"],
                          "status": x["status"]} for x in variants],
            "detect": {"before": v["detect"]["before"][0], "after": v["detect"]["after"][0],
                       "reworded_before": v["detect"]["before"][1:], "reworded_after": v["detect"]["after"][1:]},
            "budget": v["budget"]["name"], "seconds": v["seconds_total"]}


def _progress(r: CellResult) -> None:
    p, v = r.details["success"]["prompt"], r.details["success"]["original_prompt"]
    print(f"[{r.label} seed {r.key}] {r.details['seconds']:.0f}s  memorised {p['memorised_before']} -> "
          f"{p['memorised_after']} (prompt), {v['memorised_before']} -> {v['memorised_after']} (variant)", flush=True)


def run_prompt_bench(cfg: PromptBenchConfig) -> dict:
    from ..protocols.calibration import with_scaling_norm
    from ..runs import check_outside_model
    from ..sd.memorisation import RULE_FILE, load_image
    from ..sd.pipeline import load_sd, require_transformers
    from ..sd.protocol import data_quality, reference_distance, resolve_replica
    from ..sd.workflows import build_data, prompt_method

    _validate(cfg)
    require_transformers()
    rows = select(load_rows(cfg.preset)[0], cfg.rows)
    root = Path(cfg.out)
    check_bench_dir(root, cfg, FREE_SETTINGS)
    rep = resolve_replica(cfg.model, cfg.prompt, cfg.variant, cfg.label, cfg.sample_steps, cfg.guidance)
    sd = load_sd(rep["model_dir"])
    check_outside_model(root, sd.source)
    for row in rows:  # every input is checked before anything is written
        prompt_method(with_scaling_norm(row.method, 1.0))
        row.trainer_config(_trainer(cfg, 0)).validate(int(sd.scheduler.config.num_train_timesteps))
    torch.set_num_threads(1)
    t_start = time.time()
    open_bench_dir(root, cfg)
    data = root / "data"
    if not (data / "labels.csv").is_file():
        reference = load_image(Path(rep["reference"]), sd.image_shape[1:]) if rep["reference"] else None
        build_data(sd, rep["prompt"], data, cfg.n, 0, rep["sample_steps"], rep["guidance"], reference,
                   cfg.threshold if reference is not None else None, 64,
                   {"command": "bench prompt: build", "model": rep["model_dir"], "prompt": rep["prompt"], "n": cfg.n,
                    "seed": 0, "sample_steps": rep["sample_steps"], "guidance": rep["guidance"],
                    "reference": rep["reference"] or "", "threshold": cfg.threshold if reference is not None else None})
    build = json.loads((data / RULE_FILE).read_text())
    session = _Session(cfg, rep, sd, root)
    calib_path = root / "scaling_norm.json"
    calib = json.loads(calib_path.read_text()) if calib_path.is_file() else {}
    for row in rows:
        if row.auto and row.label not in calib:
            calib[row.label] = session.calibrate(row)
            write_json(calib_path, calib)
    cells = [Cell.of(root, row, seed) for row in rows for seed in range(cfg.seeds)]
    results, ran, _ = run_cells(cells, lambda c: session.run(c, calib.get(c.row.label)), progress=_progress)
    labels = [r.label for r in rows]
    summary = {"benchmark": "prompt", "config": asdict(cfg), "model_dir": rep["model_dir"],
               "prompt": rep["prompt"], "variant": rep["variant"], "sample_steps": rep["sample_steps"],
               "guidance": rep["guidance"], "replica": rep["replica"],
               "data": {"n": build["n"], "memorised": build["memorised"], "labelled_by": build["how"],
                        "threshold": build["threshold"], "reference_distance": reference_distance(rep["replica"], data),
                        "quality": data_quality(session.quality, session.data)},
               "rows": aggregate(results, labels, _summarise),
               "timings": {"wall_seconds": round(time.time() - t_start, 1), "cells_run": ran,
                           "cells_cached": len(results) - ran, "build_seconds": build.get("seconds"),
                           "cell_seconds": round(sum(c.details["seconds"] for c in results), 1)},
               "cells": [r.to_dict() for r in results]}
    write_results(root, summary, markdown(summary))
    plot(summary, root / "memorised.png")
    return summary


def _summarise(results: list[CellResult]) -> dict:
    """One row: the success rate over seeds on each prompt, the memorised counts, quality and the mean curves."""
    from ..sd.protocol import success_rate

    results = sorted(results, key=lambda c: c.key)
    row = {"method": results[0].method, "hyperparameters": results[0].hyperparameters,
           "seeds": [c.key for c in results]}
    cells = [c.details for c in results]  # each run's success, curves, seconds and verification
    for key, name in (("prompt", "prompt"), ("original_prompt", "variant")):
        s = [c["success"][key] for c in cells]
        row[name] = {"success": success_rate(cells, key),
                     "memorised_before": s[0]["memorised_before"], "of": s[0]["of"],
                     "memorised_after": [r["memorised_after"] for r in s],
                     "quality_before": s[0]["quality_before"],
                     "quality_after": float(np.mean([r["quality_after"] for r in s])),
                     "quality_min": float(min(r["quality_min"] for r in s)),
                     "quality_holds": [r["quality_holds"] for r in s]}
        steps = [r["step"] for r in cells[0]["curve"][key]]
        ratio = [[c["curve"][key][i]["quality"] / c["curve"][key][0]["quality"] for c in cells]
                 for i in range(len(steps))]
        row[name]["curve"] = {"step": steps,
                              "memorised_mean": [float(np.mean([c["curve"][key][i]["memorised"] for c in cells]))
                                                 for i in range(len(steps))],
                              "quality_ratio_mean": [float(np.mean(r)) for r in ratio],
                              "quality_ratio_min": [float(np.min(r)) for r in ratio]}
    row["seconds"] = float(np.mean([c["seconds"] for c in cells]))
    row["verification"] = [c.get("verification") for c in cells]
    return row


def markdown(summary: dict) -> str:
    cfg, rows, d = summary["config"], summary["rows"], summary["data"]
    head = ["method", "success: prompt", "success: variant", "memorised (prompt) before → after",
            "memorised (variant) before → after", "quality before → after (min)", "s per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        p, v = r["prompt"], r["variant"]

        def rate(x):
            s = x["success"]
            return f"{s['successes']}/{s['runs']} ({s['rate']:.0%})"

        lines.append(f"| {label} | {rate(p)} | {rate(v)} | {p['memorised_before']}/{p['of']} → "
                     f"{', '.join(map(str, p['memorised_after']))} | {v['memorised_before']}/{v['of']} → "
                     f"{', '.join(map(str, v['memorised_after']))} | {p['quality_before']:.3g} → "
                     f"{p['quality_after']:.3g} ({min(p['quality_min'], v['quality_min']):.3g}) | "
                     f"{r['seconds']:.0f} |")
    lines += _verification_table(rows)
    any_cell = summary["cells"][0] if summary["cells"] else {}
    ref = d.get("reference_distance")
    which = "medoid of A" if d["labelled_by"] == "kmeans" else "given"
    ref_note = f"; the reference ({which}) is at {ref:.3f} from the real training image" if ref is not None else ""
    notes = [
        "",
        f"Model `{cfg['model']}` ({summary['model_dir']}). Prompt {summary['prompt']!r} (unlearned, held fixed); "
        f"variant {summary['variant']!r} (only scored: does the fix generalise?).",
        f"Data set: {d['n']} samples of the prompt (seed 0), {d['memorised']} labelled memorised (A) by "
        f"{d['labelled_by']}, {d['n'] - d['memorised']} kept (X \\ A); memorised iff RMS pixel distance to the "
        f"reference <= {d['threshold']:.3f}{ref_note}.",
        f"Each method x seed runs {cfg['steps']} steps from the shipped weights: AdamW lr {cfg['lr']:g} (constant; "
        f"betas 0.9/0.999, wd 1e-2), batch {cfg['batch_size']}, gradient clipped to 1.0, uniform timesteps; SISS "
        f"scaling_norm = {cfg['scaling_norm_fraction']:.0%} of ||G_x|| at the shipped weights. Memorised counts among "
        f"{cfg['eval_samples']} samples (seed 1, the same starting noises at every count) every {cfg['eval_every']} "
        f"steps, DDIM {summary['sample_steps']} steps, guidance {summary['guidance']:g}.",
        "Success (the paper's): 0 of " + f"{cfg['eval_samples']} memorised at the end while quality holds at every "
        f"count ({any_cell.get('quality_rule', 'quality rule')}). Success rate = share of the {cfg['seeds']} "
        "seed(s); the memorised columns list the count after unlearning per seed (a success where the count was "
        "already 0 before unlearning would be trivial).",
        (f"For scale, the same quality measure on the data set's samples before unlearning: memorised (A) "
         f"{d['quality']['memorised']:.3g}, not memorised (X \\ A) {d['quality']['kept']:.3g} (ratio "
         f"{d['quality']['kept'] / d['quality']['memorised']:.2f}): a model that makes X \\ A-like samples instead "
         "of copies loses that much by this measure with nothing broken." if d.get("quality") else ""),
        f"Time: building the data set {summary['timings'].get('build_seconds') or 0:.0f} s, the "
        f"{len(summary['cells'])} runs {summary['timings']['cell_seconds']:.0f} s in all (each including its counts), "
        f"one torch thread; this invocation {summary['timings']['wall_seconds']:.0f} s wall "
        f"({summary['timings']['cells_run']} run(s), {summary['timings']['cells_cached']} cached).",
        "",
        f"Command: `{command_line('prompt', cfg, PromptBenchConfig)}`",
    ]
    return "\n".join(lines + notes) + "\n"


def _verification_table(rows: dict) -> list[str]:
    """Per method, the verification of every seed's model: the verdicts, the fresh memorised rate pooled over seeds
    with its exact interval, the targeted seeds still drawing the image, each reworded prompt and guidance scale."""
    from ..metrics.rates import binomial_ci

    have = {label: [v for v in r.get("verification") or [] if v and v.get("status") == "ok"]
            for label, r in rows.items()}
    if not any(have.values()):
        return []
    out = ["", "Verification of each run's model (the memorised image, per seed; before → after in samples):", "",
           "| method | verdicts | fresh memorised after, pooled (95% CI) | targeted seeds still drawing it | "
           "reworded prompts after | higher guidance after | detection score before → after | verify s |",
           "|---|---|---|---|---|---|---|---|"]
    for label, vs in have.items():
        if not vs:
            continue
        k, n = sum(v["fresh"]["count"] for v in vs), sum(v["fresh"]["n"] for v in vs)
        lo, hi = binomial_ci(k, n)
        verdicts = ", ".join(f"{sum(v['overall'] == s for v in vs)} {s}" for s in
                             dict.fromkeys(v["overall"] for v in vs))
        targeted = "; ".join(f"{v['targeted']['still_after']}/{v['targeted']['hits_before']}" for v in vs)

        def variants(kind):
            per = {}
            for v in vs:
                for x in v["variants"]:
                    if x["measure"] == kind:
                        key = x["prompt"] if kind == "reworded" else f"x{x['guidance']:g}"
                        per.setdefault(key, [x["before"], []])[1].append(x["after"])
            n_each = vs[0]["variants"][0]["n"] if vs[0]["variants"] else 0
            return "; ".join(f"{key!r}: {b} → {', '.join(map(str, a))} of {n_each}" if kind == "reworded" else
                             f"guidance {key[1:]}: {b} → {', '.join(map(str, a))} of {n_each}"
                             for key, (b, a) in per.items()) or "—"
        det = (f"{vs[0]['detect']['before']:.3g} → "
               f"{', '.join(format(v['detect']['after'], '.3g') for v in vs)}")
        out.append(f"| {label} | {verdicts} | {k}/{n} = {k / n:.2%} ({lo:.2%}–{hi:.2%}) | {targeted} | "
                   f"{variants('reworded')} | {variants('guidance')} | {det} | "
                   f"{np.mean([v['seconds'] for v in vs]):.0f} |")
    return out


def plot(summary: dict, path: Path) -> None:
    """Top: memorised count (mean over seeds) against unlearning step, one line per method, prompt and variant.
    Bottom: quality relative to its value before unlearning (mean over seeds, and the lowest seed dotted), with the
    proxy's band when quality is the relative proxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.6), sharex=True, sharey="row")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (key, title) in enumerate(zip(("prompt", "variant"), (summary["prompt"], summary["variant"]))):
        for n, (label, r) in enumerate(summary["rows"].items()):
            c, col = r[key]["curve"], colours[n % len(colours)]
            axes[0, j].plot(c["step"], c["memorised_mean"], marker="o", ms=3, label=label, color=col)
            axes[1, j].plot(c["step"], c["quality_ratio_mean"], marker="o", ms=3, color=col)
            axes[1, j].plot(c["step"], c["quality_ratio_min"], ls=":", color=col)
        axes[0, j].set_title(f"{key}: {title!r}", fontsize=9)
        axes[1, j].set_xlabel("unlearning step")
        if not summary["config"].get("clip"):
            band = summary["config"]["proxy_band"]
            axes[1, j].axhline(1 / band, color="k", ls="--", lw=0.8)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    of = next(iter(summary["rows"].values()))["prompt"]["of"] if summary["rows"] else 16
    axes[0, 0].set_ylabel(f"memorised samples of {of}\n(mean over seeds)")
    axes[0, 0].set_ylim(-0.5, of + 0.5)
    axes[1, 0].set_ylabel("quality / before\n(mean; dotted: lowest seed)")
    axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["PromptBenchConfig", "markdown", "plot", "run_prompt_bench"]
