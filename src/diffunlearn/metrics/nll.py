"""Exact likelihood of datapoints under a DDPM, by the probability-flow ODE (Song et al. 2021, ICLR, "Score-Based
Generative Modeling through Stochastic Differential Equations", eq. 13 and appendix D.2).

The discrete linear schedule ``beta_i = linspace(beta_start, beta_end, T)`` is the VP-SDE (their eq. 11)
``dx = -beta(t)/2 x dt + sqrt(beta(t)) dw`` with ``beta(t) = beta_min + t (beta_max - beta_min)``,
``beta_min = T beta_start`` and ``beta_max = T beta_end`` (0.1 and 20 for the usual 1e-4 -> 0.02 at T = 1000), step
``i`` sitting at ``t = i / (T - 1)``. Its probability-flow ODE is

    dx/dt = f(x, t) = -beta(t)/2 (x + score(x, t)),   score(x, t) = -eps_theta(x, k) / sigma_k,   k = round(t (T - 1)),

and the instantaneous change of variables gives ``log p_0(x) = log p_1(z) + int_0^1 div f(x(t), t) dt`` with ``z = x(1)``
and ``p_1 = N(0, I)``. ``sigma_k = sqrt(1 - abar_k)`` is the discrete schedule's noise level at the queried step: it
is the scale the network was trained at, so ``-eps_theta / sigma_k`` is the network's own score estimate (this is
what Song et al.'s released code does for discrete-time DDPM models). The divergence is estimated by Hutchinson's
trick, ``div f ~ v^T (df/dx) v``, with one Rademacher probe ``v`` per solve held fixed over the whole trajectory
(their appendix D.2); several probes are averaged. Bits per dimension follow their code:
``bpd = -(log N(z; 0, I) + delta_logp) / (D ln 2) + 7``, the 7 bits converting a density on [-1, 1] to the
probability of 8-bit pixels (bin width 2/256 = 2^-7).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..diffusion import predict_noise
from ..errors import UserError
from ..models import DiffusionModel

BITS_OFFSET = 7.0


@dataclass
class NLLResult:
    """Per-image negative log-likelihood in bits per dimension.

    ``bpd``: mean over probes, shape (N,); ``stderr``: standard error of that mean over probes (NaN when
    ``n_probes == 1``); ``per_probe``: (N, n_probes); ``nfe``: network evaluations summed over all solves (each one
    forward and one vector-Jacobian product on a whole batch); ``seconds``: wall time.
    """

    bpd: torch.Tensor
    stderr: torch.Tensor
    per_probe: torch.Tensor
    nfe: int
    seconds: float


@dataclass(frozen=True)
class VPSchedule:
    """The VP-SDE matching a linear discrete DDPM schedule (Song et al. 2021, eq. 11 and its footnote)."""

    beta_min: float
    beta_max: float
    sigmas: np.ndarray  # sigma_k = sqrt(1 - abar_k) of the discrete schedule, k = 0..T-1

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def timestep(self, t: float) -> int:
        """``round(t (T - 1))``, halves rounded up, kept inside the schedule."""
        return int(min(max(math.floor(t * (self.num_timesteps - 1) + 0.5), 0), self.num_timesteps - 1))


def vp_schedule(model: DiffusionModel) -> VPSchedule:
    cfg = model.scheduler.config
    if cfg.get("beta_schedule", "linear") != "linear" or cfg.get("trained_betas") is not None:
        raise UserError(f"exact NLL needs a linear beta schedule (the VP-SDE); this model's is "
                        f"{cfg.get('beta_schedule')!r}")
    T = model.num_train_timesteps
    abar = model.alphas_cumprod().double().cpu().numpy()
    return VPSchedule(float(cfg.beta_start) * T, float(cfg.beta_end) * T, np.sqrt(1.0 - abar))


def rademacher_probe(seed: int, image_index: int, probe_index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The Hutchinson probe used for probe ``probe_index`` of image ``image_index``: entries +-1, seeded by
    ``(seed, image_index, probe_index)`` so an image's probes do not depend on batching."""
    rng = np.random.default_rng([int(seed), int(image_index), int(probe_index)])
    return torch.from_numpy(rng.integers(0, 2, size=shape).astype(np.float32) * 2.0 - 1.0)


def _solve(unet, sched: VPSchedule, x0: np.ndarray, probes: torch.Tensor, t_eps: float, rtol: float, atol: float):
    """Integrate the ODE and its divergence from ``t_eps`` to 1 for a batch of M copies; returns (z, delta_logp, nfe)."""
    from scipy.integrate import solve_ivp

    M, shape = x0.shape[0], x0.shape[1:]
    D = int(np.prod(shape))
    device = next(unet.parameters(), torch.empty(0)).device
    v = probes.to(device)

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        k = sched.timestep(t)
        beta, sigma = sched.beta(t), float(sched.sigmas[k])
        # The vjp needs a graph through the network even when the caller is in inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.from_numpy(y[: M * D]).view(M, *shape).to(device, torch.float32).requires_grad_(True)
            eps = predict_noise(unet, x, torch.full((M,), k, device=device, dtype=torch.long))
            (vjp,) = torch.autograd.grad((eps * v).sum(), x)
        with torch.no_grad():
            drift = -0.5 * beta * (x - eps / sigma)
            # v^T (df/dx) v = -beta/2 (v^T v - v^T (d eps/dx) v / sigma), and v^T v = D for a Rademacher v
            div = -0.5 * beta * (D - (vjp * v).flatten(1).sum(1) / sigma)
        return np.concatenate([drift.double().cpu().numpy().ravel(), div.double().cpu().numpy()])

    y0 = np.concatenate([x0.astype(np.float64).ravel(), np.zeros(M)])
    sol = solve_ivp(rhs, (t_eps, 1.0), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise UserError(f"the probability-flow ODE solve failed ({sol.message}); try looser rtol/atol")
    y1 = sol.y[:, -1]
    return y1[: M * D].reshape(M, D), y1[M * D:], int(sol.nfev)


def nll_bits_per_dim(model: DiffusionModel, images: torch.Tensor, n_probes: int = 1, rtol: float = 1e-5,
                     atol: float = 1e-5, seed: int = 0, t_eps: float = 1e-5, batch_size: int = 32) -> NLLResult:
    """Exact NLL (bits/dim) of each image by the probability-flow ODE of the VP-SDE (Song et al. 2021, eq. 13, app. D.2).

    ``images``: (N, C, H, W) in [-1, 1]. Every (image, probe) pair is one copy in a shared ODE state, with its own
    log-density integral; up to ``batch_size`` copies are solved together by one RK45 run (scipy ``solve_ivp``,
    ``rtol``/``atol`` on the whole state, so a copy's result can move by about the tolerance with the batch it is
    solved in; the same inputs, seed and batch size give the same numbers).
    """
    if images.ndim != 4:
        raise UserError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    model.check_data(tuple(images.shape[1:]), "NLL")
    if not torch.isfinite(images).all():
        raise UserError("NLL images contain NaN or Inf values")
    if int(n_probes) < 1 or int(batch_size) < 1:
        raise UserError("n_probes and batch_size must be at least 1")
    if not (rtol > 0 and atol > 0):
        raise UserError("rtol and atol must be positive")
    if not 0.0 < t_eps < 1.0:
        raise UserError(f"t_eps must lie in (0, 1), got {t_eps}")
    if int(seed) < 0:
        raise UserError("seed must be non-negative")
    sched = vp_schedule(model)
    start = time.perf_counter()
    n, n_probes = len(images), int(n_probes)
    shape = tuple(images.shape[1:])
    D = int(np.prod(shape))
    x = images.detach().cpu().double().numpy()
    copies = [(i, j) for i in range(n) for j in range(n_probes)]
    per_probe = np.empty((n, n_probes))
    nfe = 0
    unet = model.unet
    was_training = unet.training
    unet.eval()
    try:
        for c0 in range(0, len(copies), int(batch_size)):
            chunk = copies[c0: c0 + int(batch_size)]
            probes = torch.stack([rademacher_probe(seed, i, j, shape) for i, j in chunk])
            z, delta_logp, evals = _solve(unet, sched, x[[i for i, _ in chunk]], probes, t_eps, rtol, atol)
            nfe += evals
            prior_logp = -0.5 * D * math.log(2 * math.pi) - 0.5 * (z ** 2).sum(1)
            bpd = -(prior_logp + delta_logp) / (D * math.log(2)) + BITS_OFFSET
            for (i, j), b in zip(chunk, bpd):
                per_probe[i, j] = b
    finally:
        unet.train(was_training)
    mean = per_probe.mean(1)
    stderr = per_probe.std(1, ddof=1) / math.sqrt(n_probes) if n_probes > 1 else np.full(n, np.nan)
    return NLLResult(torch.from_numpy(mean), torch.from_numpy(stderr), torch.from_numpy(per_probe), nfe,
                     time.perf_counter() - start)
