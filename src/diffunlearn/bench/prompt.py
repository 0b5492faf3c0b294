"""``diffunlearn bench prompt``: the SISS paper's Stable Diffusion protocol (section 5.3) on the shipped CPU replica
``prompt-digits``, a tiny pixel-space text-conditional model in which one prompt mostly reproduces a training digit
and a variant prompt only sometimes (see :mod:`diffunlearn.sd.replica` and the model's README.md).

It runs the ``diffunlearn prompt`` code paths unchanged:

1. ``prompt build``: ``n`` samples of the prompt, labelled memorised (A) or not (X \\ A) by k-means (2 clusters on
   pixels; the tighter cluster is A) or, with ``--label reference``, by distance to the known training image;
2. ``prompt unlearn`` for every method x seed from the shipped weights, the prompt held fixed (the conditional model
   treated as unconditional, ``FixedPromptUNet``), counting memorised samples among ``eval_samples`` (16) on the
   prompt and on the variant every ``eval_every`` steps, with the quality measure (the weight-free sharpness proxy
   unless ``--clip`` names local CLIP weights);
3. success as the paper defines it, per prompt and run: 0 of 16 memorised at the end while quality holds at every
   count; the success rate is the share of seeds that succeed.

SISS's ``scaling_norm`` is the paper's rule applied to this model ("auto": ``scaling_norm_fraction`` of ||G_x||, the
gradient norm of the variant's own X \\ A term at the shipped weights, as ``bench instance`` does); the paper's 750
is Stable Diffusion's value, for a UNet about 3,500 times larger.

Cells (method x seed) are cached under ``cells/``: a re-run with the same settings loads them. Writes
``results.md``, ``results.json`` and ``memorised.png`` (memorised count over steps, per method, on both prompts).
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

#: label -> (method, hyperparameters); "auto": scaling_norm_fraction of ||G_x|| at the shipped weights
ROWS: dict[str, tuple[str, dict]] = {
    "siss-lambda0.5": ("siss", {"lam": 0.5, "scaling_norm": "auto"}),
    "siss-nois": ("siss-nois", {"scaling_norm": "auto"}),
    "naive": ("naive", {}),
    "erasediff": ("erasediff", {"inner_steps": 2, "lambda_e": 0.1}),
    "retrack": ("retrack", {"lambda_r": 0.5, "knn": 10}),
    "erasediff-light": ("erasediff-light", {"eta": 1e-2}),
    "neggrad": ("neggrad", {}),
}
DEFAULT_ROWS = ["siss-lambda0.5", "siss-nois", "naive", "erasediff", "retrack"]
FREE_SETTINGS = ("out", "rows", "seeds")


@dataclass
class PromptBenchConfig:
    out: str = field(default="runs/bench-prompt", metadata={"help": "benchmark directory (re-runs resume)"})
    model: str = field(default="prompt-digits", metadata={"help": "shipped model name or SD-layout directory"})
    prompt: str = field(default="", metadata={"help": "the memorised prompt (default: the replica's replica.json)"})
    variant: str = field(default="", metadata={"help": "the variant prompt, also scored (default: the replica's)"})
    rows: str = field(default=",".join(DEFAULT_ROWS), metadata={"help": "comma-separated methods: " + ", ".join(ROWS)})
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


def _rows(cfg: PromptBenchConfig) -> list[str]:
    labels = list(dict.fromkeys(x.strip() for x in cfg.rows.split(",") if x.strip()))
    unknown = [x for x in labels if x not in ROWS]
    if unknown:
        raise UserError(f"unknown benchmark row {unknown[0]!r}: rows are {', '.join(ROWS)}")
    if not labels:
        raise UserError("--rows names no row")
    return labels


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
    _rows(cfg)


def resolve_replica(cfg: PromptBenchConfig) -> dict:
    """The model directory, the replica's description (``replica.json`` beside or above it; {} if none) and the
    settings that follow from it."""
    from ..pretrained import available, pretrained_dir
    from ..sd.pipeline import resolve_sd_dir
    from ..sd.replica import REPLICA_FILE

    p = Path(cfg.model)
    if not p.exists() and cfg.model in available():
        p = pretrained_dir(cfg.model)
    model_dir = resolve_sd_dir(p)
    info = {}
    for folder in (model_dir, model_dir.parent):
        if (folder / REPLICA_FILE).is_file():
            info = json.loads((folder / REPLICA_FILE).read_text())
            info["folder"] = str(folder)
            break
    prompt, variant = cfg.prompt or info.get("prompt", ""), cfg.variant or info.get("variant", "")
    if not prompt or not variant:
        raise UserError(f"{model_dir} has no {REPLICA_FILE} naming its prompts: pass --prompt and --variant")
    reference = None
    if cfg.label == "reference":
        if not info.get("memorised_image"):
            raise UserError(f"--label reference needs the known training image: no {REPLICA_FILE} beside {model_dir}")
        reference = str(Path(info["folder"]) / info["memorised_image"])
    return {"model_dir": str(model_dir), "prompt": prompt, "variant": variant, "reference": reference,
            "sample_steps": cfg.sample_steps or int(info.get("sample_steps", 50)),
            "guidance": cfg.guidance or float(info.get("guidance", 7.5)), "replica": info}


def _cell_dir(root: Path, label: str, seed: int) -> Path:
    return root / "cells" / f"{label}-seed{seed}"


def _unlearn_config(cfg: PromptBenchConfig, rep: dict, root: Path, label: str, seed: int, params: dict):
    from ..sd.prompt import PromptUnlearnConfig

    method, _ = ROWS[label]
    from ..methods import MethodSpec
    from ..trainer import TrainerConfig

    return PromptUnlearnConfig(model=rep["model_dir"], data=str(root / "data"), out=str(_cell_dir(root, label, seed)),
                               original_prompt=rep["variant"], eval_every=cfg.eval_every,
                               eval_samples=cfg.eval_samples, eval_seed=1, sample_steps=rep["sample_steps"],
                               guidance=rep["guidance"], clip=cfg.clip, proxy_band=cfg.proxy_band,
                               sample_batch_size=64, device="cpu", log_every=max(1, cfg.steps), overwrite=True,
                               method=MethodSpec(method, dict(params)),
                               trainer=TrainerConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                                                     grad_accum=1, seed=seed, gradient_checkpointing=False,
                                                     beta1=0.9, weight_decay=1e-2, threads=1))


def _scaling_norm(cfg: PromptBenchConfig, rep: dict, root: Path, label: str) -> dict:
    """The paper's rule at the shipped weights with the prompt held fixed, through ``bench instance``'s
    calibration."""
    from ..sd.memorisation import read_prompt_data
    from ..sd.pipeline import load_sd
    from .instance import calibrate_scaling_norm

    method, params = ROWS[label]
    sd = load_sd(rep["model_dir"])
    data = read_prompt_data(root / "data")
    latents = sd.encode_images(data.images)
    mask = torch.from_numpy(data.memorised)
    model = sd.as_unconditional(sd.encode_prompt(rep["prompt"]))
    return calibrate_scaling_norm(model, latents[~mask], latents[mask], method, params, cfg.batch_size,
                                  cfg.scaling_norm_fraction, seed=0)


def run_cell(cfg: PromptBenchConfig, rep: dict, root: Path, label: str, seed: int, calib: dict | None) -> dict:
    from ..sd.prompt import run_prompt_unlearn

    _, params = ROWS[label]
    params = {k: (calib["scaling_norm"] if v == "auto" else v) for k, v in params.items()}
    t0 = time.time()
    summary = run_prompt_unlearn(_unlearn_config(cfg, rep, root, label, seed, params))
    res = {"label": label, "seed": seed, "method": summary["method"], "hyperparameters": summary["hyperparameters"],
           "scaling_norm_calibration": calib, "success": summary["success"], "curve": summary["curve"],
           "quality_measure": summary["quality_measure"], "quality_rule": summary["quality_rule"],
           "seconds": round(time.time() - t0, 1)}
    path = _cell_dir(root, label, seed) / "cell.json"
    write_json(path, res, indent=1)  # the cell counts as done only when complete
    return res


def run_prompt_bench(cfg: PromptBenchConfig) -> dict:
    from ..sd.pipeline import load_sd, require_transformers
    from ..sd.prompt import PromptBuildConfig, run_build

    _validate(cfg)
    require_transformers()
    labels = _rows(cfg)
    root = Path(cfg.out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} exists and is not a directory")
    check_bench_dir(root, cfg, FREE_SETTINGS)
    rep = resolve_replica(cfg)
    load_sd(rep["model_dir"])  # every input is checked before anything is written
    for label in labels:
        _unlearn_config(cfg, rep, root, label, 0, {k: (1.0 if v == "auto" else v)
                                                   for k, v in ROWS[label][1].items()}).build_method()
    torch.set_num_threads(1)
    t_start = time.time()
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "config.json", asdict(cfg))
    data = root / "data"
    if not (data / "labels.csv").is_file():
        run_build(PromptBuildConfig(model=rep["model_dir"], prompt=rep["prompt"], out=str(data), n=cfg.n, seed=0,
                                    sample_steps=rep["sample_steps"], guidance=rep["guidance"],
                                    reference=rep["reference"] or "",
                                    threshold=cfg.threshold if rep["reference"] else None, batch_size=64,
                                    device="cpu", threads=1, overwrite=True))
    build = json.loads((data / "memorisation.json").read_text())
    calib_path = root / "scaling_norm.json"
    calib = json.loads(calib_path.read_text()) if calib_path.is_file() else {}
    results, ran = [], 0
    for label in labels:
        if "auto" in ROWS[label][1].values() and label not in calib:
            calib[label] = _scaling_norm(cfg, rep, root, label)
            write_json(calib_path, calib)
        for seed in range(cfg.seeds):
            path = _cell_dir(root, label, seed) / "cell.json"
            if path.is_file():
                results.append(read_json(path))
                continue
            print(f"--- {label}, seed {seed}", flush=True)
            results.append(run_cell(cfg, rep, root, label, seed, calib.get(label)))
            ran += 1
    summary = {"benchmark": "prompt", "config": asdict(cfg), "model_dir": rep["model_dir"],
               "prompt": rep["prompt"], "variant": rep["variant"], "sample_steps": rep["sample_steps"],
               "guidance": rep["guidance"], "replica": rep["replica"],
               "data": {"n": build["n"], "memorised": build["memorised"], "labelled_by": build["how"],
                        "threshold": build["threshold"],
                        "reference_distance": _reference_distance(rep, data),
                        "quality": _data_quality(cfg, data)},
               "rows": aggregate(results, labels),
               "timings": {"wall_seconds": round(time.time() - t_start, 1), "cells_run": ran,
                           "cells_cached": len(results) - ran, "build_seconds": build.get("seconds"),
                           "cell_seconds": round(sum(c["seconds"] for c in results), 1)},
               "cells": results}
    (root / "results.md").write_text(markdown(summary))
    write_json(root / "results.json", summary)
    plot(summary, root / "memorised.png")
    print(markdown(summary))
    return summary


def _data_quality(cfg: PromptBenchConfig, data: Path) -> dict:
    """Mean quality of the build's memorised (A) and not memorised (X \\ A) samples, by the benchmark's measure: the
    scale against which to read a change of quality (a model that makes X \\ A-like samples instead of copies of A
    scores about kept / memorised of its value before unlearning, with nothing broken)."""
    from ..sd.memorisation import read_prompt_data
    from ..sd.quality import quality_measure

    pd = read_prompt_data(data)
    q = quality_measure(cfg.clip, band=cfg.proxy_band)
    return {"measure": q.name, "memorised": float(np.mean(q(pd.forget))), "kept": float(np.mean(q(pd.kept)))}


def _reference_distance(rep: dict, data: Path) -> float | None:
    """RMS pixel distance between the build's reference (the medoid of A) and the replica's real training image: how
    well the labelling found the memorised image (0 = it is the training image)."""
    from ..sd.memorisation import load_image, pixel_features, rms_distance

    info = rep["replica"]
    if not info.get("memorised_image"):
        return None
    ref = load_image(data / "reference.png")
    true = load_image(Path(info["folder"]) / info["memorised_image"], tuple(ref.shape[-2:]))
    return float(rms_distance(pixel_features(ref[None]), pixel_features(true[None])[0])[0])


def success_rate(cells: list[dict], which: str) -> dict:
    """The share of runs that succeed on prompt ``which`` (``prompt`` or ``original_prompt``, the variant)."""
    ok = [bool(c["success"][which]["success"]) for c in cells]
    return {"successes": sum(ok), "runs": len(ok), "rate": sum(ok) / len(ok) if ok else float("nan")}


def aggregate(results: list[dict], labels: list[str]) -> dict:
    rows = {}
    for label in labels:
        cells = sorted((c for c in results if c["label"] == label), key=lambda c: c["seed"])
        if not cells:
            continue
        row = {"method": cells[0]["method"], "hyperparameters": cells[0]["hyperparameters"],
               "seeds": [c["seed"] for c in cells]}
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
        rows[label] = row
    return rows


def command_line(cfg: dict) -> str:
    defaults = asdict(PromptBenchConfig())
    parts = ["diffunlearn bench prompt", "--out", str(cfg["out"])]
    for k, v in cfg.items():
        if k != "out" and v != defaults.get(k):
            parts += ["--" + k.replace("_", "-"), f"'{v}'" if isinstance(v, str) and " " in v else str(v)]
    return " ".join(parts)


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
        f"Command: `{command_line(cfg)}`",
    ]
    return "\n".join(lines + notes) + "\n"


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


__all__ = ["PromptBenchConfig", "ROWS", "aggregate", "markdown", "plot", "run_prompt_bench", "success_rate"]
