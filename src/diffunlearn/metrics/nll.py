"""Exact likelihood of datapoints under a DDPM, by the probability-flow ODE (Song et al. 2021, ICLR, "Score-Based
Generative Modeling through Stochastic Differential Equations", eq. 13 and appendix D.2).

The discrete linear schedule ``beta_i = linspace(beta_start, beta_end, T)`` is the VP-SDE (their eq. 11)
``dx = -beta(t)/2 x dt + sqrt(beta(t)) dw`` with ``beta(t) = beta_min + t (beta_max - beta_min)``,
``beta_min = T beta_start`` and ``beta_max = T beta_end`` (0.1 and 20 for the usual 1e-4 -> 0.02 at T = 1000), step
``i`` sitting at ``t = i / (T - 1)``. Its probability-flow ODE is

    dx/dt = f(x, t) = -beta(t)/2 (x + score(x, t)),   score(x, t) = -eps_theta(x, k) / sigma_k,   k = round(t (T - 1)),

and the instantaneous change of variables gives ``log p_0(x) = log p_1(z) + int_0^1 div f(x(t), t) dt`` with
``z = x(1)`` and ``p_1 = N(0, I)``. ``sigma_k = sqrt(1 - abar_k)`` is the discrete schedule's noise level at the queried
step: it is the scale the network was trained at, so ``-eps_theta / sigma_k`` is the network's own score estimate (this
is what Song et al.'s released code does for discrete-time DDPM models). The divergence is estimated by Hutchinson's
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

from ..errors import UserError
from ..model import DiffusionModel
from ..model.schedule import predict_noise

#: the 8-bit discretisation of pixels in [-1, 1] (log2 of 2/256 per dimension, as Song et al.); latents have none
BITS_OFFSET = 7.0
# Names how the solve is laid out (one state per image, probes sharing its forward): results moved at the solver
# tolerance when the layout changed, so stored evaluations record it and are not reused across layouts.
NLL_SOLVER = "pf-ode-rk45/shared-forward"


@dataclass
class NLLResult:
    """Per-image negative log-likelihood in bits per dimension.

    ``bpd``: mean over probes, shape (N,); ``stderr``: standard error of that mean over probes (NaN when
    ``n_probes == 1``); ``per_probe``: (N, n_probes); ``nfe``: network evaluations summed over all solves (each one
    forward of the solve's images and one vector-Jacobian product per probe); ``seconds``: wall time.
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


class _Traced(torch.nn.Module):
    """``eps_theta(x, t)`` as a plain tensor function, the form ``torch.jit.trace`` records (labels ``y`` fixed for
    a class-conditional model)."""

    def __init__(self, unet: torch.nn.Module, y: torch.Tensor | None = None):
        super().__init__()
        self.unet, self.y = unet, y

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return predict_noise(self.unet, x, t, self.y)


def _network(unet, x: torch.Tensor, t: torch.Tensor, jit: bool, num_timesteps: int, y: torch.Tensor | None = None):
    """The function the solve evaluates: for a diffusers ``UNet2DModel`` and ``jit``, the network traced by
    ``torch.jit.trace`` at this batch shape (diffusers' Python bookkeeping around each layer then runs once instead
    of at every evaluation: about 15% of a small UNet's forward and vector-Jacobian product on CPU), kept only if it
    reproduces the eager output exactly at two inputs and two timesteps; otherwise the eager network. Parameters are
    shared with ``unet``; nothing is copied or changed."""
    eager = lambda x_, t_: predict_noise(unet, x_, t_, y)  # noqa: E731
    from diffusers import UNet2DModel
    if not jit or not isinstance(unet, UNet2DModel):
        return eager
    import warnings
    other_t = (t + num_timesteps // 2) % num_timesteps
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_Traced(unet, y), (x, t), check_trace=False)
            same = all(torch.equal(traced(a, b), eager(a, b)) for a, b in ((x, t), (-0.5 * x, other_t)))
    except Exception:  # a network the tracer cannot record: evaluate it eagerly
        return eager
    return traced if same else eager


def _solve(unet, sched: VPSchedule, x0: np.ndarray, probes: torch.Tensor, t_eps: float, rtol: float, atol: float,
           jit: bool = True, y: torch.Tensor | None = None):
    """Integrate the ODE from ``t_eps`` to 1 for U images and their divergences for K probes each.

    ``x0``: (U, D); ``probes``: (K, U, *shape), probe j of image u at ``[j, u]``. The state holds each image once
    (its trajectory does not depend on the probe) and one log-density integral per (probe, image), so one network
    forward per evaluation serves all K probes, each taking its own vector-Jacobian product through the same graph.
    Returns (z (U, D), delta_logp (K, U), nfe)."""
    from scipy.integrate import solve_ivp

    K, U, shape = probes.shape[0], probes.shape[1], probes.shape[2:]
    D = int(np.prod(shape))
    device = next(unet.parameters(), torch.empty(0)).device
    v = probes.to(device)

    def state_at(t: float, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(y[: U * D]).view(U, *shape).to(device, torch.float32)
        return x, torch.full((U,), sched.timestep(t), device=device, dtype=torch.long)

    with torch.inference_mode(False):
        net = _network(unet, *state_at(t_eps, x0.ravel()), jit, sched.num_timesteps,
                       None if y is None else y.to(device))

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        k = sched.timestep(t)
        beta, sigma = sched.beta(t), float(sched.sigmas[k])
        # The vjp needs a graph through the network even when the caller is in inference mode.
        with torch.inference_mode(False), torch.enable_grad():
            x, steps = state_at(t, y)
            x.requires_grad_(True)
            eps = net(x, steps)
            vjps = [torch.autograd.grad(eps, x, v[j], retain_graph=j < K - 1)[0] for j in range(K)]
        with torch.no_grad():
            drift = -0.5 * beta * (x - eps / sigma)
            # v^T (df/dx) v = -beta/2 (v^T v - v^T (d eps/dx) v / sigma), and v^T v = D for a Rademacher v
            div = torch.stack([-0.5 * beta * (D - (g * v[j]).flatten(1).sum(1) / sigma) for j, g in enumerate(vjps)])
        return np.concatenate([drift.double().cpu().numpy().ravel(), div.double().cpu().numpy().ravel()])

    y0 = np.concatenate([x0.astype(np.float64).ravel(), np.zeros(K * U)])
    sol = solve_ivp(rhs, (t_eps, 1.0), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise UserError(f"the probability-flow ODE solve failed ({sol.message}); try looser rtol/atol")
    y1 = sol.y[:, -1]
    return y1[: U * D].reshape(U, D), y1[U * D:].reshape(K, U), int(sol.nfev)


def nll_bits_per_dim(model: DiffusionModel, images: torch.Tensor, n_probes: int = 1, rtol: float = 1e-5,
                     atol: float = 1e-5, seed: int = 0, t_eps: float = 1e-5, batch_size: int = 32,
                     jit: bool = True, progress: bool = False, labels: torch.Tensor | None = None) -> NLLResult:
    """Exact NLL (bits/dim) of each image by the probability-flow ODE of the VP-SDE
    (Song et al. 2021, eq. 13, app. D.2).

    ``images``: (N, C, H, W) in [-1, 1]. An image's trajectory does not depend on the probe, so the ODE state holds
    each image once and one log-density integral per (image, probe): one network forward per evaluation serves all
    of an image's probes, each taking its own vector-Jacobian product through the same graph. About
    ``batch_size // n_probes`` images are solved together by one RK45 run (scipy ``solve_ivp``, ``rtol``/``atol`` on
    the whole state, so an image's result can move by about the tolerance with the batch it is solved in; the same
    inputs, seed and batch size give the same numbers). ``jit``: trace a diffusers UNet for the solve (see
    ``_network``; the numbers are the same, checked at the start of every solve). ``progress``: a bar over the
    images, with the network evaluations so far. ``labels``: each image's class, for a class-conditional model.
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
    per_probe = np.empty((n, n_probes))
    nfe = 0
    unet = model.unet
    offset = BITS_OFFSET if model.codec is None else 0.0  # a latent model's density is of latents
    was_training = unet.training
    unet.eval()
    per_solve = max(1, int(batch_size) // n_probes)  # images per solve, so that about batch_size integrals share it
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"NLL of {n} image(s), {n_probes} probe(s)", unit="image")
    try:
        for i0 in range(0, n, per_solve):
            idx = list(range(i0, min(n, i0 + per_solve)))
            probes = torch.stack([torch.stack([rademacher_probe(seed, i, j, shape) for i in idx])
                                  for j in range(n_probes)])
            y = None if labels is None else labels[idx]
            z, delta_logp, evals = _solve(unet, sched, x[idx].reshape(len(idx), D), probes, t_eps, rtol, atol, jit, y)
            nfe += evals
            prior_logp = -0.5 * D * math.log(2 * math.pi) - 0.5 * (z ** 2).sum(1)
            per_probe[idx] = (-(prior_logp[None] + delta_logp) / (D * math.log(2)) + offset).T
            if bar is not None:
                bar.update(len(idx))
                bar.set_postfix(evaluations=nfe)
    finally:
        unet.train(was_training)
        if bar is not None:
            bar.close()
    mean = per_probe.mean(1)
    stderr = per_probe.std(1, ddof=1) / math.sqrt(n_probes) if n_probes > 1 else np.full(n, np.nan)
    return NLLResult(torch.from_numpy(mean), torch.from_numpy(stderr), torch.from_numpy(per_probe), nfe,
                     time.perf_counter() - start)
