"""``diffunlearn demo``: unlearn the T-shirt from the shipped MNIST T-Shirt model and show that it is gone.

Runs ``diffunlearn unlearn``'s default command on the shipped base model (SISS lambda 0.5, the NegGrad norm measured
at the model, AdamW 5e-5, batch 64) with the closed loop: a check every 50 steps, at most 1,000, stopping at the
first step whose deletion the fast verification confirms (on this model at seed 0: step 600). Then it evaluates both
models, prints the before/after table (T-shirt rate, T-shirt NLL, classifier IS/FID) beside the verdict, and saves
``before_after.png``: the same seeded samples from both models, one above the other. The run directory is an
``unlearn`` run directory (model, verification.json, report.html with the loop's checks) plus the demo's files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import run_field
from ..errors import UserError
from ..runs.summary import UnlearnSummary
from ..verification.results import Verification


@dataclass
class DemoConfig:
    out: str = run_field("out", "runs/demo")
    until: str = field(default="removed", metadata={"help": "'removed': unlearn until the verification confirms the "
                                                            "deletion (at most --max-steps); '' runs --steps steps"})
    max_steps: int = field(default=1000, metadata={"help": "with --until removed: the most steps"})
    check_every: int = field(default=50, metadata={"help": "with --until removed: steps between checks"})
    steps: int = field(default=300, metadata={"help": "without --until: SISS steps (the paper: 300)"})
    verify: str = field(default="fast", metadata={"help": "verification budget: fast, full or off (not with "
                                                          "--until removed)"})
    n_samples: int = field(default=256, metadata={"help": "samples per model for the T-shirt rate, IS and FID"})
    sample_steps: int = field(default=50, metadata={"help": "DDPM sampling steps"})
    nll_probes: int = field(default=2, metadata={"help": "Hutchinson probes for the T-shirt NLL"})
    nll_tol: float = field(default=1e-5, metadata={"help": "RK45 rtol = atol of the NLL solve "
                                                           "(the specification: 1e-5)"})
    seed: int = field(default=0, metadata={"help": "unlearning seed"})
    threads: int = run_field("threads")
    show_forgotten: bool = field(default=False, metadata={"help": "show the T-shirt samples in the picture"})
    recompute_before: bool = field(default=False, metadata={"help": "evaluate the shipped base model again instead "
                                                                    "of reusing its stored evaluation"})
    overwrite: bool = run_field("overwrite")


def run_demo(cfg: DemoConfig) -> dict:
    from ..model import load_model
    from ..model.sampling import save_grid
    from ..pretrained import pretrained_dir
    from ..protocols.mnist_tshirt import MnistTshirtProtocol, masked
    from ..runs import write_json
    from ..trainer import TrainerConfig
    from .evaluate import EvalConfig, evaluate
    from .unlearn import UnlearnConfig, run_unlearn

    if cfg.steps < 1 or cfg.n_samples < 10:
        raise UserError("--steps must be >= 1 and --n-samples >= 10")
    ucfg = UnlearnConfig(model="mnist-tshirt-base", data="mnist-tshirt", forget="default", out=cfg.out,
                         overwrite=cfg.overwrite, verify=cfg.verify, until=cfg.until, max_steps=cfg.max_steps,
                         check_every=cfg.check_every, log_every=25,
                         trainer=TrainerConfig(steps=cfg.max_steps if cfg.until else cfg.steps, seed=cfg.seed,
                                               threads=cfg.threads))
    ucfg.validate()  # every setting is checked before anything runs
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_all = time.time()
    base = load_model(pretrained_dir("mnist-tshirt-base") / "model")
    protocol = MnistTshirtProtocol.load()
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
    print("[2/3] unlearning with unlearn's defaults (SISS, the NegGrad norm measured at the model)"
          + (f", until the {cfg.verify} verification confirms the deletion (a check every {cfg.check_every} steps, "
             f"at most {cfg.max_steps}) ..." if cfg.until else f", {cfg.steps} steps ..."), flush=True)
    t0 = time.time()
    summary = run_unlearn(ucfg)
    unlearn_s = time.time() - t0
    out = Path(cfg.out)
    save_before(out, key, before, s_before)
    print("[3/3] evaluating the unlearned model ...", flush=True)
    after_model = load_model(out / "model")
    after, s_after = evaluate(after_model, protocol, ecfg)
    before_target = before.pop("_is_target")
    idx = shown_indices(before_target)  # s_before holds exactly these samples (see save_before)
    before_tiles = masked(s_before, [before_target[i] for i in idx], cfg.show_forgotten)
    after_target = after.pop("_is_target")
    after_tiles = masked(s_after[idx], [after_target[i] for i in idx], cfg.show_forgotten)
    before["reused_stored_evaluation"] = stored is not None
    save_grid(torch.cat([before_tiles, after_tiles]), out / "before_after.png", ncol=16,
              title="top two rows: before; bottom two rows: after SISS (the same seeds)")
    steps = (summary.until or {}).get("model_is_step")
    steps = summary.steps if steps is None else steps
    verdict = _verdict(summary)
    table = demo_table(before, after, unlearn_s, steps) + f"\n{verdict}\n"
    (out / "results.md").write_text(table)
    write_json(out / "metrics.json", {"before": before, "after": after, "unlearn_seconds": unlearn_s,
                                      "steps": steps, "verdict": verdict})
    print("\n" + table)
    print(f"picture: {out / 'before_after.png'} (top two rows before, bottom two after; grey tiles are "
          f"samples that reproduced the T-shirt"
          f"{'' if cfg.show_forgotten else ', hidden: --show-forgotten shows them'}); report: {out / 'report.html'}")
    print(f"total {time.time() - t_all:.0f} s")
    return {"before": before, "after": after, "steps": steps, "verdict": verdict,
            **({"exit_status": summary.exit_status} if summary.exit_status is not None else {})}


def _verdict(summary: UnlearnSummary) -> str:
    """The verification's headline as one sentence (or why there is none)."""
    import json

    v = summary.verification
    if not v:
        return "Not verified (--verify off)."
    if v.get("status") != "ok":
        return f"Verification {v.get('status')}: {v.get('error')}."
    text = Verification.from_dict(json.loads(Path(v["file"]).read_text())).overall.text
    until = summary.until
    return (f"Verification: **{v['overall']}**" + (f" (unlearned until removed: {until['outcome']})" if until else "")
            + f". {text}")


BEFORE_FILE = "demo-before.json"


def before_key(model, ecfg) -> dict:
    """What the base model's evaluation depends on: its weights and the evaluation settings (sampling is seeded per
    image and the NLL by its own seed, so the same key gives the same numbers)."""
    from ..metrics.nll import NLL_SOLVER
    from ..model import state_hash

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

    from ..data import to_uint8

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


def demo_table(before: dict, after: dict, unlearn_s: float, steps: int) -> str:
    def row(name, m):
        r, nll = m["tshirt_rate"], m["tshirt_nll"]
        return (f"| {name} | {r['count']}/{r['n']} = {100 * r['rate']:.2f}% ({100 * r['ci95'][0]:.2f}–"
                f"{100 * r['ci95'][1]:.2f}%) | {nll['bpd']:.2f} ± {nll['stderr']:.2f} | "
                f"{m['classifier_is']['mean']:.2f} | {m['classifier_fid']['value']:.2f} |")

    return "\n".join([
        "| model | T-shirt rate (95% CI) ↓ | T-shirt NLL, bits/dim ↑ | classifier IS ↑ | classifier FID ↓ |",
        "|---|---|---|---|---|",
        row("before (shipped base)", before),
        row(f"after SISS, {steps} steps ({unlearn_s:.0f} s with its checks and verification)", after),
    ]) + "\n"
