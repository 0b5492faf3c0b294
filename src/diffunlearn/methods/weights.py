"""SISS importance weights in log space (SISS paper, eq. 6-7; METHODS.md, "SISS" step 4).

With ``D = log q(m|x) - log q(m|a) = ||m - gamma a||^2 / (2 sigma^2) - ||m - gamma x||^2 / (2 sigma^2)`` and the
mixture ``q_lambda(m) = (1 - lambda) q(m|x) + lambda q(m|a)``:

    w_x = q(m|x) / q_lambda(m) = 1 / ((1 - lambda) + lambda exp(-D))
    w_a = q(m|a) / q_lambda(m) = 1 / ((1 - lambda) exp(D) + lambda)

so ``log w_x = -logaddexp(log(1 - lambda), log(lambda) - D)`` and ``log w_a = -logaddexp(log(1 - lambda) + D,
log(lambda))``. ``log(0) = -inf`` is handled exactly by ``logaddexp``, so lambda = 0 and 1 give finite weights.
At those edges one weight has no bound (``w_a = exp(-D)`` at lambda = 0); log-weights above ``LOG_WEIGHT_MAX`` are
clamped, and the number clamped is reported, rather than overflowing to inf and NaN.
"""

from __future__ import annotations

import math

import torch

LOG_WEIGHT_MAX = 60.0  # exp(60) ~ 1e26: far beyond any weight a finite-variance estimate uses, still finite in fp32


def log_density_gap(m: torch.Tensor, x: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor,
                    sigma: torch.Tensor) -> torch.Tensor:
    """``D = log q(m|x) - log q(m|a)`` per row, in float64."""
    m, x, a, gamma, sigma = (v.double() for v in (m, x, a, gamma, sigma))
    var2 = 2.0 * sigma.flatten() ** 2
    return ((m - gamma * a).pow(2).flatten(1).sum(1) - (m - gamma * x).pow(2).flatten(1).sum(1)) / var2


def log_weights(d: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log w_x, log w_a)`` for the log-density gap ``d``, finite for every lambda in [0, 1]."""
    d = d.double()
    log_lam = torch.tensor(math.log(lam) if lam > 0 else -math.inf, dtype=torch.float64)
    log_1m = torch.tensor(math.log1p(-lam) if lam < 1 else -math.inf, dtype=torch.float64)
    log_wx = -torch.logaddexp(log_1m.expand_as(d), log_lam - d)
    log_wa = -torch.logaddexp(log_1m + d, log_lam.expand_as(d))
    return log_wx, log_wa


def importance_weights(d: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(w_x, w_a, n_clamped)`` as float32; weights are never NaN or inf."""
    log_wx, log_wa = log_weights(d, lam)
    clamped = int((log_wx > LOG_WEIGHT_MAX).sum() + (log_wa > LOG_WEIGHT_MAX).sum())
    w_x = log_wx.clamp(max=LOG_WEIGHT_MAX).exp().float()
    w_a = log_wa.clamp(max=LOG_WEIGHT_MAX).exp().float()
    return w_x, w_a, clamped
