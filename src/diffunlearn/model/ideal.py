"""The ideal (Bayes-optimal) noise predictor of a finite data set: the exact gold standard of the toy benchmark.

For training data ``S = {s_1, ..., s_n}`` (each drawn with equal probability) and the forward process
``x_t = gamma_t x0 + sigma_t eps``, the marginal of ``x_t`` is the Gaussian mixture
``p_t(x) = (1/n) sum_i N(x; gamma_t s_i, sigma_t^2 I)``. The minimiser of the DDPM loss
``E ||eps - eps_theta(x_t, t)||^2`` over all functions is the conditional mean ``E[eps | x_t]``:

    E[x0 | x_t] = sum_i softmax_i(-||x_t - gamma_t s_i||^2 / (2 sigma_t^2)) s_i,
    eps*(x_t, t) = (x_t - gamma_t E[x0 | x_t]) / sigma_t = -sigma_t grad_x log p_t(x_t)   (Tweedie).

A model trained to convergence on S (with unlimited capacity) predicts exactly ``eps*``; so ``eps*`` of ``X \\ A`` is
what perfect retraining would give, and ``eps*`` of ``X`` what the perfectly fitted base model gives. Everything is
computed in float64, with ``logsumexp``-stable softmax weights, for a batch with one timestep per row.
"""

from __future__ import annotations

import torch

from .schedule import gamma_sigma


def _as_timesteps(t, n: int) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"expected one timestep per row ({n}), got shape {tuple(t.shape)}")
    return t


def posterior_weights(x_t: torch.Tensor, data: torch.Tensor, gamma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``p(x0 = s_i | x_t)``, shape (B, n), float64; ``gamma``/``sigma`` broadcast per row (shape (B,) or (B,1,..))."""
    x = x_t.double().flatten(1)                      # (B, D)
    s = data.double().flatten(1)                     # (n, D)
    g = gamma.double().reshape(-1, 1)                # (B, 1)
    sig = sigma.double().reshape(-1, 1)              # (B, 1)
    # ||x - g s||^2 = ||x||^2 - 2 g <x, s> + g^2 ||s||^2, without materialising (B, n, D)
    d2 = (x.pow(2).sum(1, keepdim=True) - 2.0 * g * (x @ s.T) + g.pow(2) * s.pow(2).sum(1)[None, :]).clamp_min(0.0)
    logits = -d2 / (2.0 * sig.pow(2))
    return torch.softmax(logits, dim=1)             # softmax subtracts the row max: the logsumexp trick


def posterior_mean(x_t: torch.Tensor, t, data: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``E[x0 | x_t]`` under the empirical distribution of ``data``, shape of ``x_t``, float64."""
    t = _as_timesteps(t, len(x_t))
    gamma, sigma = gamma_sigma(alphas_cumprod.double(), t, 2)
    w = posterior_weights(x_t, data, gamma.double(), sigma.double())
    return (w @ data.double().flatten(1)).view(x_t.shape)


def ideal_eps(x_t: torch.Tensor, t, data: torch.Tensor, alphas_cumprod: torch.Tensor,
              batch_size: int = 4096) -> torch.Tensor:
    """``eps*(x_t, t)`` of the finite set ``data`` (N, C, H, W), float64, for ``x_t`` (B, C, H, W), ``t`` (B,) or int.

    ``alphas_cumprod`` is the model's schedule (``DiffusionModel.alphas_cumprod()`` or ``scheduler.alphas_cumprod``).
    """
    if len(data) == 0:
        raise ValueError("the ideal denoiser needs a non-empty data set")
    t = _as_timesteps(t, len(x_t))
    abar = alphas_cumprod.double()
    out = []
    for i in range(0, len(x_t), batch_size):
        xb, tb = x_t[i:i + batch_size].double(), t[i:i + batch_size]
        gamma, sigma = gamma_sigma(abar, tb, xb.ndim)
        w = posterior_weights(xb, data, gamma, sigma)
        mean = (w @ data.double().flatten(1)).view(xb.shape)
        out.append((xb - gamma * mean) / sigma)
    return torch.cat(out) if out else torch.empty_like(x_t, dtype=torch.float64)


class IdealDenoiser(torch.nn.Module):
    """``eps*`` of a finite set as a module with the UNet's call signature: ``ideal(x_t, t).sample``."""

    def __init__(self, data: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("data", data.detach().double().clone())
        self.register_buffer("abar", alphas_cumprod.detach().double().clone())

    def forward(self, x_t: torch.Tensor, t):
        from types import SimpleNamespace

        t = _as_timesteps(torch.as_tensor(t).cpu(), len(x_t))
        return SimpleNamespace(sample=ideal_eps(x_t, t, self.data, self.abar).to(x_t.dtype))
