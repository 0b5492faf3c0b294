"""Membership inference by denoising loss (metric (iii) of EraseDiff, Wu et al. 2024, section 5.1).

A model that was trained on an image denoises it better than an image it never saw. Each image's score is its DDPM
loss ``||eps - eps_theta(gamma_t x + sigma_t eps, t)||^2`` (summed over dimensions) averaged over ``n_draws`` pairs
``(t_j, eps_j)``; draw ``j`` comes from a generator seeded by ``(seed, j)`` and is the same for every image, so an
image's loss is a function of the image alone (not of its set, position or batch) and member and non-member
losses differ only through the images. The AUC of ``-loss`` for separating members from non-members is 1 when
members are denoised strictly better, and near 0.5 once the model no longer treats them as training data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..model import DiffusionModel
from ..model.schedule import gamma_sigma, predict_noise, sum_sq


@dataclass
class MembershipResult:
    """``auc`` of score ``-loss`` with members as positives, and each set's per-image mean losses."""

    auc: float
    member_losses: torch.Tensor
    nonmember_losses: torch.Tensor


def membership_draws(n_draws: int, seed: int, shape: tuple[int, ...], t_min: int, t_max: int
                     ) -> list[tuple[int, torch.Tensor]]:
    """The ``(t_j, eps_j)`` pairs every image is scored with: ``t_j`` uniform on ``[t_min, t_max]``, ``eps_j`` standard
    normal of one image's ``shape``, both from a generator seeded by ``(seed, j)``."""
    from ..model.sampling import image_generators

    draws = []
    for g in image_generators(seed, range(int(n_draws))):
        t = int(torch.randint(int(t_min), int(t_max) + 1, (1,), generator=g))
        draws.append((t, torch.randn(shape, generator=g)))
    return draws


def denoising_losses(model: DiffusionModel, images: torch.Tensor, n_draws: int = 8, seed: int = 0, t_min: int = 0,
                     t_max: int | None = None, batch_size: int = 256,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image DDPM loss averaged over the shared draws of :func:`membership_draws`; (N,) float32. ``labels``:
    each image's class, for a class-conditional model."""
    if images.ndim != 4 or len(images) == 0:
        raise UserError(f"membership images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    model.check_data(tuple(images.shape[1:]), "membership")
    T = model.num_train_timesteps
    t_max = T - 1 if t_max is None else int(t_max)
    if not 0 <= int(t_min) <= t_max < T:
        raise UserError(f"timesteps must satisfy 0 <= t_min <= t_max <= {T - 1} (got {t_min}, {t_max})")
    if int(n_draws) < 1:
        raise UserError("n_draws must be at least 1")
    return mean_over_draws(model, images, lambda e_hat, e: sum_sq(e_hat - e), n_draws, seed, t_min, t_max,
                           batch_size, labels)


def mean_over_draws(model: DiffusionModel, images: torch.Tensor, stat, n_draws: int = 8, seed: int = 0,
                    t_min: int = 0, t_max: int | None = None, batch_size: int = 256,
                    labels: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per image, ``stat(eps_theta(x_t, t[, y]), eps)`` (one value per row) averaged over the shared ``(t, eps)``
    draws of :func:`membership_draws`, ``x_t = gamma_t x0 + sigma_t eps``; (N,) of ``dtype``. The loop behind the
    denoising loss and :func:`diffunlearn.metrics.classes.noise_kl` (inputs unchecked: callers check them)."""
    t_max = model.num_train_timesteps - 1 if t_max is None else int(t_max)
    unet = model.unet
    device = next(unet.parameters(), torch.empty(0)).device
    abar = model.alphas_cumprod(device)
    was_training = unet.training
    unet.eval()
    total = torch.zeros(len(images), dtype=dtype)
    try:
        with torch.inference_mode():
            for t, eps in membership_draws(n_draws, seed, tuple(images.shape[1:]), t_min, t_max):
                eps = eps.to(device)
                for b0 in range(0, len(images), batch_size):
                    x0 = images[b0:b0 + batch_size].to(device).float()
                    tt = torch.full((len(x0),), t, device=device, dtype=torch.long)
                    g, s = gamma_sigma(abar, tt, x0.ndim)
                    e = eps.expand_as(x0)
                    y = None if labels is None else labels[b0:b0 + len(x0)].to(device)
                    total[b0:b0 + len(x0)] += stat(predict_noise(unet, g * x0 + s * e, tt, y), e).cpu()
    finally:
        unet.train(was_training)
    return total / int(n_draws)


def membership_auc(model: DiffusionModel, members: torch.Tensor, nonmembers: torch.Tensor, n_draws: int = 8,
                   seed: int = 0, t_min: int = 0, t_max: int | None = None, batch_size: int = 256,
                   member_labels: torch.Tensor | None = None, nonmember_labels: torch.Tensor | None = None
                   ) -> MembershipResult:
    """ROC AUC of ``-loss`` (lower loss = more likely a training member) for members vs held-out non-members (with
    their class labels for a class-conditional model)."""
    lm = denoising_losses(model, members, n_draws, seed, t_min, t_max, batch_size, member_labels)
    ln = denoising_losses(model, nonmembers, n_draws, seed, t_min, t_max, batch_size, nonmember_labels)
    return MembershipResult(loss_auc(lm, ln), lm, ln)


def loss_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """ROC AUC of ``-loss`` with members as positives, from per-image losses of :func:`denoising_losses`."""
    return roc_auc(-member_losses, -nonmember_losses)


def roc_auc(positive, negative) -> float:
    """ROC AUC of scores, higher meaning positive: P(a positive scores above a negative), ties counting one half."""
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([torch.as_tensor(positive).flatten(), torch.as_tensor(negative).flatten()]).double()
    return float(roc_auc_score([1] * (len(scores) - len(negative)) + [0] * len(negative), scores.numpy()))
