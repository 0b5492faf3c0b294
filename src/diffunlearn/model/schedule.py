"""The forward process and the DDPM loss, read from a diffusers scheduler (never re-derived).

``x_t = gamma_t x0 + sigma_t eps`` with ``gamma_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` (Ho et al. 2020).
Per-sample losses are squared errors summed over all dimensions; callers average over the batch.
"""

from __future__ import annotations

import torch


def gamma_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma_t, sigma_t)`` for integer timesteps ``t``, shaped to broadcast over (B, C, H, W)."""
    abar = alphas_cumprod.to(t.device)[t].float()
    shape = (-1,) + (1,) * (ndim - 1)
    return abar.sqrt().view(shape), (1.0 - abar).sqrt().view(shape)


def sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 norm, summed over every dimension but the first."""
    return x.float().pow(2).flatten(1).sum(1)


def predict_noise(unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                  y: torch.Tensor | None = None) -> torch.Tensor:
    """``eps_theta(x_t, t)`` for a diffusers UNet, or ``eps_theta(x_t, t, y)`` with class labels ``y`` (shape (B,),
    int64) for a class-conditional one (``UNet2DModel`` with ``num_class_embeds``)."""
    out = unet(x_t, t) if y is None else unet(x_t, t, class_labels=y)
    return out.sample if hasattr(out, "sample") else out


def sample_timesteps(n: int, t_min: int, t_max: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in ``[t_min, t_max]`` (inclusive)."""
    return torch.randint(t_min, t_max + 1, (n,), generator=generator)


def ddpm_loss(unet, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
              y: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``||eps - eps_theta(gamma_t x0 + sigma_t eps, t[, y])||^2``."""
    g, s = gamma_sigma(alphas_cumprod, t, x0.ndim)
    return sum_sq(predict_noise(unet, g * x0 + s * eps, t, y) - eps)
