"""``diffunlearn demo``: unlearn the T-shirt from the shipped MNIST T-Shirt model with SISS and show the effect.

Runs the paper's MNIST settings (SISS lambda 0.5, norm-fixed scaling_norm 5, AdamW 5e-5, batch 64) on the shipped
base model for 200 steps instead of the paper's 300: on this model the T-shirt's NLL reaches the retrained model's by
step 200 (the decay curve of ``bench mnist-tshirt``), and 200 steps keep the demo under 15 minutes on 2 CPU cores
(300 steps took 15 min 49 s; ``--steps 300``). Then it prints the before/after table (T-shirt rate, T-shirt NLL,
classifier IS/FID) and saves ``before_after.png``: the same seeded samples from both models, one above the other.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import UserError


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "run directory to create"})
    steps: int = field(default=200, metadata={"help": "SISS steps (the paper: 300)"})
    n_samples: int = field(default=256, metadata={"help": "samples per model for the T-shirt rate, IS and FID"})
    sample_steps: int = field(default=50, metadata={"help": "DDPM sampling steps"})
    nll_probes: int = field(default=2, metadata={"help": "Hutchinson probes for the T-shirt NLL"})
    nll_tol: float = field(default=1e-5, metadata={"help": "RK45 rtol = atol of the NLL solve "
                                                           "(the specification: 1e-5)"})
    seed: int = field(default=0, metadata={"help": "unlearning seed"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    show_forgotten: bool = field(default=False, metadata={"help": "show the T-shirt samples in the picture"})
    recompute_before: bool = field(default=False, metadata={"help": "evaluate the shipped base model again instead "
                                                                    "of reusing its stored evaluation"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output directory"})


def run_demo(cfg: DemoConfig) -> dict:
    from .data import load_data, resolve_forget, split_kept
    from .evaluate import EvalConfig, evaluate
    from .protocols.mnist_tshirt import MnistTshirtProtocol, masked
    from .models import load_model, save_model
    from .pretrained import pretrained_dir
    from .runs import RunDir, prepare_out_dir, write_json
    from .sampling import save_grid
    from .config import build_config, load_yaml, to_dict
    from .methods import MethodSpec
    from .trainer import TrainerConfig, unlearn

    if cfg.steps < 1 or cfg.n_samples < 10:
        raise UserError("--steps must be >= 1 and --n-samples >= 10")
    prepare_out_dir(cfg.out, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_all = time.time()
    base = load_model(pretrained_dir("mnist-tshirt-base") / "model")
    protocol = MnistTshirtProtocol.load()
    data = load_data("mnist-tshirt")
    kept, forget = split_kept(data, resolve_forget("default", data))
    preset = load_yaml("mnist-tshirt")  # the paper's settings: the demo runs the shipped preset, fewer steps
    spec = MethodSpec.resolve(preset["method"], None, MethodSpec(), "mnist-tshirt")
    ucfg = build_config(TrainerConfig, raw={**preset["trainer"], "steps": cfg.steps, "seed": cfg.seed},
                        where="mnist-tshirt")
    run = RunDir(cfg.out, {"command": "demo", **asdict(cfg), "method": spec.to_dict(), "trainer": to_dict(ucfg)},
                 cfg.overwrite)
    ecfg = EvalConfig(n_samples=cfg.n_samples, sample_steps=cfg.sample_steps, nll_probes=cfg.nll_probes,
                      nll_tol=cfg.nll_tol, seed=0)
    key = before_key(base, ecfg)
    stored = None if cfg.recompute_before else load_before(pretrained_dir("mnist-tshirt-base"), key)
    if stored is not None:
        before, s_before = stored
        print(f"[1/3] the shipped base model's evaluation with these settings is stored beside it ({BEFORE_FILE}, "
              f"same weights hash); reusing it (--recompute-before evaluates again)", flush=True)
    else:
        print(f"[1/3] evaluating the shipped base model ({cfg.n_samples} samples, NLL of the T-shirt) ...", flush=True)
        before, s_before = evaluate(base, protocol, ecfg)
        s_before = s_before[shown_indices(before["_is_target"])]
    save_before(Path(cfg.out), key, before, s_before)
    print(f"[2/3] SISS (lambda {spec.to_dict()['lam']}, scaling_norm {spec.to_dict()['scaling_norm']}), "
          f"{cfg.steps} steps of batch {ucfg.batch_size} ...", flush=True)
    t0 = time.time()

    def log(rec):
        run.log(rec)
        if rec["step"] % 25 == 0 or rec["step"] == cfg.steps:
            print(f"  step {rec['step']}/{cfg.steps}  loss_x {rec['loss_x']:.1f}  loss_a {rec['loss_a']:.1f}  "
                  f"||G_x|| {rec['grad_norm_x']:.1f}  ||G_a|| {rec['grad_norm_a']:.1f}", flush=True)

    after_model = unlearn(base, kept, forget, spec.build(), ucfg, log=log)
    unlearn_s = time.time() - t0
    save_model(after_model, run.model_dir)
    print("[3/3] evaluating the unlearned model ...", flush=True)
    after, s_after = evaluate(after_model, protocol, ecfg)
    before_target = before.pop("_is_target")
    idx = shown_indices(before_target)  # s_before holds exactly these samples (see save_before)
    before_tiles = masked(s_before, [before_target[i] for i in idx], cfg.show_forgotten)
    after_target = after.pop("_is_target")
    after_tiles = masked(s_after[idx], [after_target[i] for i in idx], cfg.show_forgotten)
    before["reused_stored_evaluation"] = stored is not None
    save_grid(torch.cat([before_tiles, after_tiles]), Path(cfg.out) / "before_after.png", ncol=16,
              title="top two rows: before; bottom two rows: after SISS (the same seeds)")
    table = demo_table(before, after, unlearn_s, cfg)
    (Path(cfg.out) / "results.md").write_text(table)
    write_json(Path(cfg.out) / "metrics.json", {"before": before, "after": after, "unlearn_seconds": unlearn_s})
    run.finish({"command": "demo", "before": before, "after": after, "unlearn_seconds": round(unlearn_s, 1)})
    print("\n" + table)
    print(f"picture: {Path(cfg.out) / 'before_after.png'} (top two rows before, bottom two after; grey tiles are "
          f"samples that reproduced the T-shirt"
          f"{'' if cfg.show_forgotten else ', hidden: --show-forgotten shows them'})")
    print(f"total {time.time() - t_all:.0f} s")
    return {"before": before, "after": after}


BEFORE_FILE = "demo-before.json"


def before_key(model, ecfg) -> dict:
    """What the base model's evaluation depends on: its weights and the evaluation settings (sampling is seeded per
    image and the NLL by its own seed, so the same key gives the same numbers)."""
    from .metrics.nll import NLL_SOLVER
    from .models import state_hash

    return {"weights_sha256": state_hash(model.unet), "n_samples": ecfg.n_samples, "sample_steps": ecfg.sample_steps,
            "nll_probes": ecfg.nll_probes, "nll_tol": ecfg.nll_tol, "seed": ecfg.seed, "nll_solver": NLL_SOLVER}


def shown_indices(is_target, n: int = 32) -> list[int]:
    """The sample indices the picture shows: every sample in which the base model reproduced the T-shirt (up to half
    the tiles), the first others after them, in index order. Samples are seeded per index, so the same indices
    before and after unlearning line up, and the picture shows what became of the T-shirt's seeds."""
    hits = [i for i, t in enumerate(is_target) if t][: n // 2]
    rest = [i for i, t in enumerate(is_target) if not t][: n - len(hits)]
    return sorted(hits + rest)


def save_before(folder: Path, key: dict, metrics: dict, samples: torch.Tensor) -> None:
    """Write the base model's evaluation as ``demo-before.json``: the metrics and the samples the picture shows
    (``samples`` holds the samples at ``shown_indices(metrics["_is_target"])``, in that order)."""
    import json

    from .data import to_uint8

    record = {"key": key, "metrics": metrics, "shown_indices": shown_indices(metrics["_is_target"]),
              "shown_samples_uint8": to_uint8(samples).tolist()}
    (folder / BEFORE_FILE).write_text(json.dumps(record))


def load_before(folder: Path, key: dict):
    """The stored evaluation and the shown samples when its key equals ``key``, else None."""
    import json

    path = folder / BEFORE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != key or record.get("shown_indices") != shown_indices(record["metrics"]["_is_target"]):
        return None  # other weights or settings, or samples stored for another choice of tiles
    pixels = torch.tensor(record["shown_samples_uint8"], dtype=torch.float32).permute(0, 3, 1, 2)  # (N, H, W, C)
    return record["metrics"], pixels / 127.5 - 1.0


def demo_table(before: dict, after: dict, unlearn_s: float, cfg: DemoConfig) -> str:
    def row(name, m):
        r, nll = m["tshirt_rate"], m["tshirt_nll"]
        return (f"| {name} | {r['count']}/{r['n']} = {100 * r['rate']:.2f}% ({100 * r['ci95'][0]:.2f}–"
                f"{100 * r['ci95'][1]:.2f}%) | {nll['bpd']:.2f} ± {nll['stderr']:.2f} | "
                f"{m['classifier_is']['mean']:.2f} | {m['classifier_fid']['value']:.2f} |")

    return "\n".join([
        "| model | T-shirt rate (95% CI) ↓ | T-shirt NLL, bits/dim ↑ | classifier IS ↑ | classifier FID ↓ |",
        "|---|---|---|---|---|",
        row("before (shipped base)", before),
        row(f"after SISS, {cfg.steps} steps ({unlearn_s:.0f} s)", after),
    ]) + "\n"
