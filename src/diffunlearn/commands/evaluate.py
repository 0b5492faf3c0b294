"""``diffunlearn eval``: the MNIST T-Shirt metrics of docs/methods.md for one model, written to ``metrics.json`` (the
protocol itself: :mod:`diffunlearn.protocols.mnist_tshirt`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import run_field
from ..errors import UserError
from ..model.sampling import SAMPLE_BATCH
from ..protocols.mnist_tshirt import MnistTshirtProtocol, masked


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "model directory, run directory, or a shipped model name"})
    preset: str = field(default="mnist-tshirt", metadata={"help": "evaluation protocol (mnist-tshirt)"})
    out: str = field(default="", metadata={"help": "directory for metrics.json and samples.png"})
    n_samples: int = field(default=512, metadata={"help": "samples for the T-shirt rate, IS and FID"})
    sample_steps: int = field(default=50, metadata={"help": "sampling steps (the paper: 50 DDPM steps)"})
    sampler: str = field(default="ddpm", metadata={"help": "ddpm (the protocol), dpm++sde (with --sample-steps 20: "
                                                           "the same T-shirt rate 4.4x faster) or dpm++ (its ODE form, "
                                                           "which drew more T-shirts)"})
    nll_probes: int = field(default=4, metadata={"help": "Hutchinson probes for the NLL (standard error reported)"})
    nll_tol: float = field(default=1e-5, metadata={"help": "RK45 rtol = atol of the NLL solve "
                                                           "(the specification: 1e-5)"})
    seed: int = field(default=0, metadata={"help": "sample i uses generator (seed, i): grids line up across models"})
    batch_size: int = field(default=SAMPLE_BATCH, metadata={"help": "images per sampling forward pass "
                                                                    "(larger on a GPU)"})
    bf16: bool = field(default=False, metadata={"help": "sample under bfloat16 autocast: ~1.8x faster on CPUs with "
                                                        "bf16 units, slightly different metrics"})
    threads: int = run_field("threads")
    show_forgotten: bool = field(default=False, metadata={"help": "show samples that reproduce the forgotten image"})
    overwrite: bool = run_field("overwrite")


def evaluate(model, protocol: MnistTshirtProtocol, cfg: EvalConfig, progress: bool = False
             ) -> tuple[dict, torch.Tensor]:
    """The protocol's metrics of ``model`` with ``cfg``'s sampling and NLL settings."""
    return protocol.evaluate(model, cfg.n_samples, cfg.sample_steps, cfg.nll_probes, cfg.nll_tol, cfg.seed,
                             cfg.batch_size, bf16=cfg.bf16, progress=progress, sampler=cfg.sampler)


def run_eval(cfg: EvalConfig) -> dict:
    from ..model import load_model
    from ..model.sampling import check_sampler, save_grid
    from ..runs import RunDir, prepare_out_dir, write_json

    if cfg.preset != "mnist-tshirt":
        raise UserError(f"unknown evaluation preset {cfg.preset!r}: known is mnist-tshirt")
    if cfg.n_samples < 10 or cfg.sample_steps < 1 or cfg.nll_probes < 1:
        raise UserError("--n-samples must be at least 10 (IS uses 10 splits); --sample-steps, --nll-probes >= 1")
    if not cfg.out:
        raise UserError("pass --out: the directory for metrics.json")
    check_sampler(cfg.sampler)
    model = load_model(cfg.model)
    model.check_data((1, 28, 28), "mnist-tshirt")
    if model.conditional:
        raise UserError("eval measures unconditional MNIST T-Shirt models; a class-conditional model is measured by "
                        "`diffunlearn verify` or `diffunlearn bench class`")
    prepare_out_dir(cfg.out, cfg.overwrite)
    protocol = MnistTshirtProtocol.load()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out, {"command": "eval", **asdict(cfg)}, cfg.overwrite)
    metrics, samples = evaluate(model, protocol, cfg, progress=True)
    is_target = metrics.pop("_is_target")
    save_grid(masked(samples[:256], is_target[:256], cfg.show_forgotten), Path(cfg.out) / "samples.png",
              title=f"{min(len(samples), 256)} samples" + ("" if cfg.show_forgotten else "; grey: a T-shirt, hidden"))
    metrics["model"] = model.source
    write_json(Path(cfg.out) / "metrics.json", metrics)
    run.finish({"command": "eval", "metrics": "metrics.json"})
    print(format_metrics(metrics))
    return metrics


def format_metrics(m: dict) -> str:
    r = m["tshirt_rate"]
    return (f"T-shirt rate {r['count']}/{r['n']} = {100 * r['rate']:.2f}% "
            f"(95% CI {100 * r['ci95'][0]:.2f}-{100 * r['ci95'][1]:.2f}%) | "
            f"T-shirt NLL {m['tshirt_nll']['bpd']:.2f} +- {m['tshirt_nll']['stderr']:.2f} bits/dim | "
            f"classifier IS {m['classifier_is']['mean']:.2f} | classifier FID {m['classifier_fid']['value']:.2f}")

