"""``diffunlearn eval``: the MNIST T-Shirt metrics of METHODS.md for one model, written to ``metrics.json``.

- T-shirt rate: fraction of N seeded 50-step DDPM samples within L2 10 of the T-shirt, with its 95% interval;
- NLL of the T-shirt in bits/dim by the probability-flow ODE, with its Monte Carlo (probe) standard error;
- classifier IS and classifier FID: Inception Score and Frechet distance computed with the shipped MNIST+T-shirt
  domain classifier (not Inception), IS after removing detected T-shirts, FID against the kept training digits.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .sampling import SAMPLE_BATCH


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "model directory, run directory, or a shipped model name"})
    preset: str = field(default="mnist-tshirt", metadata={"help": "evaluation protocol (mnist-tshirt)"})
    out: str = field(default="", metadata={"help": "directory for metrics.json and samples.png"})
    n_samples: int = field(default=512, metadata={"help": "samples for the T-shirt rate, IS and FID"})
    sample_steps: int = field(default=50, metadata={"help": "DDPM sampling steps (the paper: 50)"})
    nll_probes: int = field(default=4, metadata={"help": "Hutchinson probes for the NLL (standard error reported)"})
    nll_tol: float = field(default=1e-5, metadata={"help": "RK45 rtol = atol of the NLL solve (METHODS.md: 1e-5)"})
    seed: int = field(default=0, metadata={"help": "sample i uses generator (seed, i): grids line up across models"})
    batch_size: int = field(default=SAMPLE_BATCH, metadata={"help": "images per sampling forward pass (larger on a GPU)"})
    bf16: bool = field(default=False, metadata={"help": "sample under bfloat16 autocast: ~1.8x faster on CPUs with "
                                                        "bf16 units, slightly different metrics"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    show_forgotten: bool = field(default=False, metadata={"help": "show samples that reproduce the forgotten image"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output directory"})


@dataclass
class MnistTshirtProtocol:
    """Everything the MNIST T-Shirt metrics need besides the model, loaded once."""

    target: torch.Tensor
    reference: torch.Tensor
    classifier: torch.nn.Module

    @classmethod
    def load(cls) -> "MnistTshirtProtocol":
        from .data import load_data, resolve_forget, split_kept
        from .metrics.classifier import load_classifier
        from .pretrained import pretrained_dir

        data = load_data("mnist-tshirt")
        kept, forget = split_kept(data, resolve_forget("default", data))
        return cls(forget[0], kept, load_classifier(pretrained_dir("mnist-classifier")))

    def sample_metrics(self, samples: torch.Tensor) -> dict:
        from .metrics.classifier import classifier_fid, classifier_inception_score
        from .metrics.rates import target_rate

        rate = target_rate(samples, self.target)
        keep = rate.distances > rate.threshold
        is_mean, is_std = classifier_inception_score(self.classifier, samples[keep], splits=10)
        fid = classifier_fid(self.classifier, samples[keep], self.reference)
        return {"tshirt_rate": rate.summary(), "classifier_is": {"mean": is_mean, "std": is_std, "splits": 10},
                "classifier_fid": {"value": fid, "reference": f"{len(self.reference)} kept training digits"},
                "_is_target": (~keep).tolist()}

    def nll(self, model, probes: int, tol: float, seed: int = 0) -> dict:
        from .metrics.nll import NLL_SOLVER, nll_bits_per_dim

        r = nll_bits_per_dim(model, self.target[None], n_probes=probes, rtol=tol, atol=tol, seed=seed)
        return {"bpd": float(r.bpd[0]), "stderr": float(r.stderr[0]), "probes": probes, "rtol": tol,
                "nfe": r.nfe, "seconds": round(r.seconds, 1), "solver": NLL_SOLVER}


def masked(samples: torch.Tensor, is_target, show: bool) -> torch.Tensor:
    """Replace samples that reproduce the forgotten image by a flat grey tile unless ``show``: a report must not
    reproduce what was asked to be forgotten."""
    if show:
        return samples
    out = samples.clone()
    out[torch.as_tensor(is_target, dtype=torch.bool)] = 0.0
    return out


def evaluate(model, protocol: MnistTshirtProtocol, cfg: EvalConfig) -> tuple[dict, torch.Tensor]:
    from .sampling import ddpm_sample

    t0 = time.time()
    samples = ddpm_sample(model, cfg.n_samples, cfg.sample_steps, cfg.seed, cfg.batch_size, bf16=cfg.bf16)
    t_sample = time.time() - t0
    metrics = protocol.sample_metrics(samples)
    metrics["tshirt_nll"] = protocol.nll(model, cfg.nll_probes, cfg.nll_tol)
    metrics["seconds"] = {"sampling": round(t_sample, 1), "total": round(time.time() - t0, 1)}
    metrics["sampling"] = {"n": cfg.n_samples, "steps": cfg.sample_steps, "seed": cfg.seed, "bf16": cfg.bf16}
    return metrics, samples


def run_eval(cfg: EvalConfig) -> dict:
    from .models import load_model
    from .runs import RunDir, prepare_out_dir, write_json
    from .sampling import save_grid
    from .unlearn import resolve_model_dir

    if cfg.preset != "mnist-tshirt":
        raise UserError(f"unknown evaluation preset {cfg.preset!r}: known is mnist-tshirt")
    if cfg.n_samples < 10 or cfg.sample_steps < 1 or cfg.nll_probes < 1:
        raise UserError("--n-samples must be at least 10 (IS uses 10 splits); --sample-steps, --nll-probes >= 1")
    if not cfg.out:
        raise UserError("pass --out: the directory for metrics.json")
    prepare_out_dir(cfg.out, cfg.overwrite)
    model = load_model(resolve_model_dir(cfg.model))
    model.check_data((1, 28, 28), "mnist-tshirt")
    protocol = MnistTshirtProtocol.load()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out, {"command": "eval", **asdict(cfg)}, cfg.overwrite)
    metrics, samples = evaluate(model, protocol, cfg)
    is_target = metrics.pop("_is_target")
    save_grid(masked(samples[:256], is_target[:256], cfg.show_forgotten), Path(cfg.out) / "samples.png")
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

