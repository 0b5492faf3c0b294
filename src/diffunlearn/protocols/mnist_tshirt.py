"""The MNIST T-Shirt protocol (docs/methods.md; the SISS paper's Table 2): how much of the T-shirt a model still makes,
and at what quality.

- T-shirt rate: fraction of N seeded DDPM samples within L2 10 of the T-shirt, with its 95% interval;
- NLL of the T-shirt in bits/dim by the probability-flow ODE, with its Monte Carlo (probe) standard error;
- classifier IS and classifier FID: Inception Score and Frechet distance computed with the shipped MNIST+T-shirt
  domain classifier (not Inception), IS after removing detected T-shirts, FID against the kept training digits;
- the decay curve while unlearning: the T-shirt count among a few samples and a cheap NLL, every few steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..model.sampling import SAMPLE_BATCH


@dataclass
class MnistTshirtProtocol:
    """Everything the MNIST T-Shirt metrics need besides the model, loaded once."""

    target: torch.Tensor
    reference: torch.Tensor
    classifier: torch.nn.Module

    @classmethod
    def load(cls) -> "MnistTshirtProtocol":
        from ..data import load_data, resolve_forget, split_kept
        from ..metrics.classifier import load_classifier
        from ..pretrained import pretrained_dir

        data = load_data("mnist-tshirt")
        kept, forget = split_kept(data, resolve_forget("default", data))
        return cls(forget[0], kept.load(), load_classifier(pretrained_dir("mnist-classifier")))

    def sample_metrics(self, samples: torch.Tensor) -> dict:
        from ..metrics.classifier import classifier_fid, classifier_inception_score
        from ..metrics.rates import target_rate

        rate = target_rate(samples, self.target)
        keep = rate.distances > rate.threshold
        is_mean, is_std = classifier_inception_score(self.classifier, samples[keep], splits=10)
        fid = classifier_fid(self.classifier, samples[keep], self.reference)
        # which samples (sample i is seeded by i) were T-shirts, with their distances: paired comparisons between
        # models on the same sample seeds and a look at each counted sample need them
        hits = rate.hits
        summary = {**rate.summary(), "indices": hits, "distances": [round(float(rate.distances[i]), 4) for i in hits],
                   "nearest": sorted(round(float(d), 4) for d in rate.distances)[:16]}
        return {"tshirt_rate": summary, "classifier_is": {"mean": is_mean, "std": is_std, "splits": 10},
                "classifier_fid": {"value": fid, "reference": f"{len(self.reference)} kept training digits"},
                "_is_target": (~keep).tolist()}

    def nll(self, model, probes: int, tol: float, seed: int = 0, progress: bool = False) -> dict:
        from ..metrics.nll import NLL_SOLVER, nll_bits_per_dim

        r = nll_bits_per_dim(model, self.target[None], n_probes=probes, rtol=tol, atol=tol, seed=seed,
                             progress=progress)
        return {"bpd": float(r.bpd[0]), "stderr": float(r.stderr[0]), "probes": probes, "rtol": tol,
                "nfe": r.nfe, "seconds": round(r.seconds, 1), "solver": NLL_SOLVER}

    def evaluate(self, model, n_samples: int, sample_steps: int, nll_probes: int, nll_tol: float, seed: int = 0,
                 batch_size: int = SAMPLE_BATCH, bf16: bool = False, progress: bool = False, sampler: str = "ddpm"
                 ) -> tuple[dict, torch.Tensor]:
        """Every metric of one model (sample ``i`` seeded by ``(seed, i)``), and the samples; ``_is_target`` marks
        the samples that reproduce the T-shirt."""
        from ..model.sampling import ddpm_sample

        t0 = time.time()
        samples = ddpm_sample(model, n_samples, sample_steps, seed, batch_size, bf16=bf16, progress=progress,
                              sampler=sampler)
        t_sample = time.time() - t0
        metrics = self.sample_metrics(samples)
        metrics["tshirt_nll"] = self.nll(model, nll_probes, nll_tol, progress=progress)
        metrics["seconds"] = {"sampling": round(t_sample, 1), "total": round(time.time() - t0, 1)}
        metrics["sampling"] = {"n": n_samples, "steps": sample_steps, "seed": seed, "bf16": bf16, "sampler": sampler}
        return metrics, samples

    def curve_point(self, model, step: int, n_samples: int, sample_steps: int, nll_tol: float,
                    sampler: str = "ddpm", tracked: list[int] | None = None) -> dict:
        """One point of the decay curve: the T-shirt count among ``n_samples`` samples (their own seeds, never the
        training generator's; drawn with ``sampler`` as the final evaluation is), or with ``tracked`` among exactly
        those samples of the evaluation's seeds (which of them are still T-shirts is listed), and the T-shirt's NLL
        with one probe."""
        from ..metrics.nll import nll_bits_per_dim
        from ..metrics.rates import target_rate
        from ..model.sampling import ddpm_sample

        if tracked is None:
            samples = ddpm_sample(model, n_samples, sample_steps, seed=10_000, sampler=sampler)
        else:
            samples = ddpm_sample(model, 0, sample_steps, seed=0, sampler=sampler, indices=tracked)
        r = target_rate(samples, self.target)
        nll = nll_bits_per_dim(model, self.target[None], 1, nll_tol, nll_tol)
        point = {"step": step, "tshirt_count": r.count, "n": r.n, "rate": r.rate, "ci95": [r.ci_low, r.ci_high],
                 "nll_bpd": float(nll.bpd[0])}
        if tracked is not None:
            point["tracked_still_tshirts"] = [int(tracked[j]) for j in r.hits]
            point["tracked_distances"] = [round(float(r.distances[j]), 4) for j in r.hits]
        return point


def masked(samples: torch.Tensor, is_target, show: bool) -> torch.Tensor:
    """Replace samples that reproduce the forgotten image by a flat grey tile unless ``show``: a report must not
    reproduce what was asked to be forgotten."""
    if show:
        return samples
    out = samples.clone()
    out[torch.as_tensor(is_target, dtype=torch.bool)] = 0.0
    return out


__all__ = ["MnistTshirtProtocol", "masked"]
