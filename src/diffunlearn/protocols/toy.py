"""The toy protocol: a model's noise predictions against the exact ideal denoisers of X and X \\ A on 8x8 digits.

The data are ``toy-digits``: 240 real 8x8 digits plus 16 copies of one more '7' (the forget set A). X \\ A is a small
finite set, so the ideal denoiser of X \\ A (the Bayes-optimal noise prediction a perfect retrain would converge to,
:mod:`diffunlearn.model.ideal`) is known in closed form, and so is the ideal denoiser of X (a perfect base model). Every
model is evaluated on fixed probes:

- *near A*: ``gamma_t a + sigma_t eps`` for a in A; *elsewhere*: ``gamma_t x + sigma_t eps`` for x in X \\ A, on a grid
  of timesteps, the same noise for every model. Reported: the mean over the grid of the per-dimension squared
  distance of ``eps_theta`` to the ideal X \\ A denoiser, to the ideal X denoiser and to a reference model (the
  retrained one), and (near A) the *progress*: the position of ``eps_theta`` on the segment from the ideal X denoiser
  (0) to the ideal X \\ A one (1). Elsewhere the two ideals coincide (A's posterior weight vanishes there), so the
  distances there measure damage to what should be kept.
- the likelihood of A: exact NLL in bits/dim by the probability-flow ODE (:mod:`diffunlearn.metrics.nll`), and the NLL
  of held-out digits (a quality measure); also A's DDPM loss per dimension at fixed (t, eps) draws (a cheap proxy,
  named ``loss_A``).
- samples: DDPM samples (per-image seeds) assigned to their nearest training image; the fraction whose nearest image
  is the target (with a 95% Clopper-Pearson interval), and the mean distance of the other samples to their nearest
  image of X \\ A (broken models produce samples far from every digit).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch

#: a timestep enters the progress score when the two ideal denoisers differ there by at least this much per dim
PROGRESS_MIN_GAP = 5e-3


class ToySettings(Protocol):
    """The evaluation settings the protocol reads (``bench toy``'s config has them all)."""

    seed: int
    probe_timesteps: tuple[int, ...]
    probes_per_t: int
    loss_draws: int
    n_samples: int
    sample_steps: int
    nll: bool
    nll_probes: int
    nll_heldout: int
    nll_rtol: float
    nll_atol: float


def load_sets():
    """The toy data, X \\ A and A."""
    from ..data import load_data, split_kept

    data = load_data("toy-digits")
    kept, forget = split_kept(data, data.default_forget)
    return data, kept.load(), forget.load()


@dataclass
class ProbeSet:
    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    ideal_kept: torch.Tensor  # eps* of X \ A at x_t (float64)
    ideal_all: torch.Tensor   # eps* of X at x_t (float64)


def make_probes(clean: torch.Tensor, all_x: torch.Tensor, kept: torch.Tensor, alphas_cumprod: torch.Tensor,
                timesteps, per_t: int, generator: torch.Generator) -> ProbeSet:
    """``per_t`` probes ``gamma_t c + sigma_t eps`` per timestep, cycling through the clean images ``clean``."""
    from ..model.ideal import ideal_eps
    from ..model.schedule import gamma_sigma

    xs, ts, es = [], [], []
    for t in timesteps:
        idx = torch.arange(per_t) % len(clean)
        eps = torch.randn((per_t, *clean.shape[1:]), generator=generator)
        tt = torch.full((per_t,), int(t), dtype=torch.long)
        g, s = gamma_sigma(alphas_cumprod, tt)
        xs.append(g * clean[idx] + s * eps)
        ts.append(tt)
        es.append(eps)
    x_t, t, eps = torch.cat(xs), torch.cat(ts), torch.cat(es)
    return ProbeSet(x_t, t, eps, ideal_eps(x_t, t, kept, alphas_cumprod), ideal_eps(x_t, t, all_x, alphas_cumprod))


@torch.no_grad()
def predict(unet, x_t: torch.Tensor, t: torch.Tensor, batch: int = 512) -> torch.Tensor:
    from ..model.schedule import predict_noise

    unet.eval()
    return torch.cat([predict_noise(unet, x_t[i:i + batch], t[i:i + batch]).double()
                      for i in range(0, len(x_t), batch)])


def _per_t(sq: torch.Tensor, t: torch.Tensor, grid) -> list[float]:
    return [float(sq[t == int(k)].mean()) for k in grid]


def progress(pred: torch.Tensor, probes: ProbeSet, grid) -> tuple[float, list]:
    """How far ``pred`` has moved from the ideal X denoiser toward the ideal X \\ A one, per timestep:
    ``sum_i <pred_i - eps*_X, eps*_X\\A - eps*_X> / sum_i ||eps*_X\\A - eps*_X||^2`` over the probes at t (the
    least-squares coefficient of ``pred`` on the segment from eps*_X (0) to eps*_X\\A (1)). Unlike the raw distances
    it ignores the error components orthogonal to the unlearning direction, which any generalising network has near
    the ideals (they memorise the finite set at small t). Averaged over the grid timesteps whose gap is at least
    ``PROGRESS_MIN_GAP`` per dim (elsewhere the direction is undefined); ``None`` at the others."""
    u = (probes.ideal_kept - probes.ideal_all).flatten(1)
    v = (pred - probes.ideal_all).flatten(1)
    per_t = []
    for k in grid:
        sel = probes.t == int(k)
        den = float(u[sel].pow(2).sum())
        ok = den / (int(sel.sum()) * u.shape[1]) >= PROGRESS_MIN_GAP
        per_t.append(float((u[sel] * v[sel]).sum()) / den if ok else None)
    used = [x for x in per_t if x is not None]
    return (sum(used) / len(used) if used else float("nan")), per_t


def distances(pred: torch.Tensor, probes: ProbeSet, grid, reference: torch.Tensor | None = None,
              with_progress: bool = False) -> dict:
    """Mean over the timestep grid of the per-dimension squared distance of ``pred`` to each target."""
    D = pred[0].numel()
    targets = {"ideal_kept": probes.ideal_kept, "ideal_all": probes.ideal_all, "noise": probes.eps.double()}
    if reference is not None:
        targets["retrain"] = reference
    out = {}
    for name, target in targets.items():
        per_t = _per_t((pred - target).pow(2).flatten(1).sum(1) / D, probes.t, grid)
        out[name] = sum(per_t) / len(per_t)
        out[name + "_per_t"] = per_t
    if with_progress:
        out["progress"], out["progress_per_t"] = progress(pred, probes, grid)
    return out


class ToyEvaluator:
    """Everything fixed across models: the data, the probes and their ideal denoisers, the reference model's outputs.
    The probes and loss draws come from generator ``10_000 + seed``; samples and NLL probes are seeded by ``seed``."""

    def __init__(self, cfg: ToySettings, alphas_cumprod: torch.Tensor, reference_dir: str | None):
        data, kept, forget = load_sets()
        self.cfg, self.data, self.kept, self.forget = cfg, data, kept, forget
        self.abar = alphas_cumprod
        g = torch.Generator().manual_seed(10_000 + cfg.seed)
        grid = cfg.probe_timesteps
        self.near = make_probes(forget, data.images.load(), kept, alphas_cumprod, grid, cfg.probes_per_t, g)
        self.elsewhere = make_probes(kept[torch.randperm(len(kept), generator=g)], data.images.load(), kept,
                                     alphas_cumprod, grid, cfg.probes_per_t, g)
        # A's DDPM loss at uniform timesteps (a cheap likelihood proxy: the unweighted variational bound's terms)
        self.loss_t = torch.randint(0, len(alphas_cumprod), (cfg.loss_draws,), generator=g)
        self.loss_eps = torch.randn((cfg.loss_draws, *kept.shape[1:]), generator=g)
        self.ref_near = self.ref_else = None
        if reference_dir:
            from ..model import load_model

            ref = load_model(reference_dir)
            self.ref_near = predict(ref.unet, self.near.x_t, self.near.t)
            self.ref_else = predict(ref.unet, self.elsewhere.x_t, self.elsewhere.t)

    def reference_gaps(self) -> dict:
        """Distances between the two ideal denoisers themselves: the scale of every distance in the table."""
        grid, D = self.cfg.probe_timesteps, self.kept[0].numel()
        out = {}
        for name, p in (("near_A", self.near), ("elsewhere", self.elsewhere)):
            per_t = _per_t((p.ideal_all - p.ideal_kept).pow(2).flatten(1).sum(1) / D, p.t, grid)
            out[name] = {"ideal_all_vs_ideal_kept": sum(per_t) / len(per_t), "per_t": per_t}
        return out

    def evaluate(self, model) -> dict:
        from ..model.sampling import ddpm_sample
        from ..model.schedule import gamma_sigma, predict_noise

        cfg, t0 = self.cfg, time.time()
        unet = model.unet.eval()
        res: dict = {}
        res["near_A"] = distances(predict(unet, self.near.x_t, self.near.t), self.near, cfg.probe_timesteps,
                                  self.ref_near, with_progress=True)
        res["elsewhere"] = distances(predict(unet, self.elsewhere.x_t, self.elsewhere.t), self.elsewhere,
                                     cfg.probe_timesteps, self.ref_else)
        with torch.no_grad():
            a = self.forget[0].expand(len(self.loss_t), *self.forget.shape[1:])
            g, s = gamma_sigma(self.abar, self.loss_t)
            err = predict_noise(unet, g * a + s * self.loss_eps, self.loss_t) - self.loss_eps
            res["loss_A"] = float(err.double().pow(2).flatten(1).sum(1).mean() / a[0].numel())
        if cfg.nll:
            res.update(self._nll(model))
        res.update(self._samples(ddpm_sample(model, cfg.n_samples, steps=cfg.sample_steps, seed=cfg.seed,
                                             batch_size=max(1, cfg.n_samples))))
        res["eval_seconds"] = round(time.time() - t0, 2)
        return res

    def _nll(self, model) -> dict:
        from ..metrics.nll import nll_bits_per_dim

        cfg = self.cfg
        held = self.data.held_out[: cfg.nll_heldout] if self.data.held_out is not None else self.kept[:0]
        k = max(1, cfg.nll_probes)
        # A is copies of one image: k copies of it (so k different Hutchinson probes, which are seeded by the image's
        # position) and the held-out digits (one probe each) in one ODE solve
        images = torch.cat([self.forget[:1].expand(k, *self.forget.shape[1:]), held])
        r = nll_bits_per_dim(model, images, n_probes=1, rtol=cfg.nll_rtol, atol=cfg.nll_atol, seed=cfg.seed,
                             batch_size=len(images))
        bpd_a = r.bpd[:k].double()
        out = {"nll_A_bpd": float(bpd_a.mean()),
               "nll_A_stderr": float(bpd_a.std() / math.sqrt(k)) if k > 1 else float("nan"), "nll_nfe": r.nfe,
               "nll_seconds": round(r.seconds, 2)}
        if len(held):
            out["nll_heldout_bpd"] = float(r.bpd[k:].mean())
        return out

    def _samples(self, samples: torch.Tensor) -> dict:
        from ..metrics.rates import binomial_ci

        kept = self.kept.flatten(1).double()
        target = self.forget[0].flatten().double()
        s = samples.flatten(1).double()
        d_kept = torch.cdist(s, kept).min(1).values
        d_target = (s - target).norm(dim=1)
        is_target = d_target < d_kept
        k, n = int(is_target.sum()), len(s)
        others = d_kept[~is_target]
        return {"target_count": k, "n_samples": n, "target_frac": k / n, "target_frac_ci95": list(binomial_ci(k, n)),
                "nn_dist_kept": float(others.mean()) if len(others) else float("nan"),
                "nn_dist_kept_all": float(d_kept.mean())}


__all__ = ["PROGRESS_MIN_GAP", "ProbeSet", "ToyEvaluator", "ToySettings", "distances", "load_sets", "make_probes",
           "predict", "progress"]
