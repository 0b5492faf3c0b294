"""SISS importance weights in log space (SISS paper, eq. 6-7; docs/methods.md).

With ``D = log q(m|x) - log q(m|a) = ||m - gamma a||^2 / (2 sigma^2) - ||m - gamma x||^2 / (2 sigma^2)`` and the
mixture ``q_lambda(m) = (1 - lambda) q(m|x) + lambda q(m|a)``:

    w_x = q(m|x) / q_lambda(m) = 1 / ((1 - lambda) + lambda exp(-D))
    w_a = q(m|a) / q_lambda(m) = 1 / ((1 - lambda) exp(D) + lambda)

so ``log w_x = -logaddexp(log(1 - lambda), log(lambda) - D)`` and ``log w_a = -logaddexp(log(1 - lambda) + D,
log(lambda))``. ``log(0) = -inf`` is handled exactly by ``logaddexp``, so lambda = 0 and 1 give finite weights.
At those edges one weight has no bound (``w_a = exp(-D)`` at lambda = 0); log-weights above ``LOG_WEIGHT_MAX`` are
clamped, and the number clamped is reported, rather than overflowing to inf and NaN.

At the other end, most weights of a batch are far below 1 (``exp(-D)`` with ``|D|`` in the thousands at small t).
Those that land in or near float32's subnormal range (below ``2^-126``) make the backward pass several times slower
on CPUs (every product with a subnormal operand or result takes a microcode assist) while adding nothing to the
gradient, so ``drop_negligible`` sets them to exactly 0 by the rule written there.
"""

from __future__ import annotations

import math

import torch

LOG_WEIGHT_MAX = 60.0  # exp(60) ~ 1e26: far beyond any weight a finite-variance estimate uses, still finite in fp32
EPS32 = 2.0 ** -24  # float32's unit roundoff
NEGLIGIBLE = EPS32 ** 2  # a row's share of the output gradient below this (relative to the largest) is dropped
WEIGHT_FLOOR = torch.finfo(torch.float32).tiny / EPS32  # 2^-102 ~ 2e-31: 24 bits above the subnormal range


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


def drop_negligible(w: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``w`` with exact zeros where ``w * loss`` cannot change the gradient of ``sum(w * loss)`` in float32.

    ``loss`` holds squared errors ``||r||^2`` of the network output (same shape as ``w``; one per row, or per row and
    neighbour). The gradient that the weighted entry sends into the network is ``2 w r``, of norm ``2 w sqrt(loss)``;
    the parameters' gradient is the sum over entries of the network's Jacobian times it. An entry is zeroed when

    - its ``w sqrt(loss)`` is below ``NEGLIGIBLE = 2^-48`` times the largest in the tensor: even summed over a batch
      of B entries and amplified by a Jacobian up to ``2^24 / B`` times larger than the largest entry's, its share of
      the gradient stays below one float32 rounding unit (``2^-24``) of the largest entry's, an error that float32
      summation makes anyway; or
    - ``w < WEIGHT_FLOOR = 2^-102``: one more factor below ``2^-24`` in the backward pass (the ``1/B`` of the mean,
      a small residual, a small weight) would make it subnormal. This can also zero the largest entry, when every
      weight of the tensor is this small; the term then contributes an exact 0 instead of a gradient made of
      subnormal numbers (float32 keeps fewer than 24 significant bits there), and a norm-fixed SISS step takes no
      NegGrad component for that micro-batch (``SubtractedGradients._factor`` of a zero norm).

    Non-finite losses are kept as they are (the trainer stops on a NaN or infinite loss).
    """
    size = w.detach().double() * loss.detach().double().clamp_min(0).sqrt()
    big = size.max() if size.numel() else size.new_zeros(())
    keep = ((size >= NEGLIGIBLE * big) & (w >= WEIGHT_FLOOR)) | ~torch.isfinite(size)
    return torch.where(keep, w, torch.zeros_like(w))
