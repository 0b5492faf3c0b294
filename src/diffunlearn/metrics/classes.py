"""EraseDiff's measures of forgetting a class (Wu et al. 2024, Tables 1 and 3), on a domain classifier.

- **class accuracy**: the fraction of samples conditioned on class c that the classifier assigns to c (EraseDiff's
  "Accuracy": 0.86 -> 0.002 on CIFAR-10's forgotten classes); per class and as the mean over a group of classes;
- **class rate** (the unconditional variant): the fraction of unconditional samples the classifier assigns to c,
  with its exact binomial interval;
- **noise KL**: for an image noised to ``x_t`` and the model's noise prediction ``e`` (conditioned on the image's
  class), the KL divergence ``KL(N(mu, s^2) || N(0, 1))`` of a Gaussian fitted to the D elements of ``e`` from the
  standard normal the true noise follows: ``(s^2 + mu^2 - 1 - log s^2) / 2``, averaged over fixed (t, eps) pairs.
  EraseDiff reports its histogram: after unlearning, the forgotten classes' predictions move away from N(0, I)
  while the remaining classes' stay;
- **weight distance** to the retrained model: the L2 norm of the parameter difference, and that norm relative to the
  retrained model's own L2 norm (EraseDiff's WD, after Tarun et al. 2023; its normalisation is not stated, so both
  are given).
"""

from __future__ import annotations

import math

import torch

from ..model import DiffusionModel
from .membership import mean_over_draws
from .rates import binomial_ci, rate_summary


@torch.no_grad()
def predicted_classes(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The classifier's class (argmax) of each model-space image."""
    classifier.eval()
    return torch.cat([classifier(images[i:i + batch_size].float()).argmax(1)
                      for i in range(0, len(images), batch_size)]) if len(images) else torch.empty(0, dtype=torch.long)


def class_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> dict[int, dict]:
    """Per class c among ``labels``: how many samples conditioned on c the classifier put in c, of how many."""
    out = {}
    for c in sorted(set(labels.tolist())):
        mask = labels == c
        k, n = int((predicted[mask] == c).sum()), int(mask.sum())
        out[int(c)] = {"correct": k, "n": n, "accuracy": k / n, "ci95": list(binomial_ci(k, n))}
    return out


def class_rate(predicted: torch.Tensor, c: int) -> dict:
    """The fraction of samples the classifier assigns to class ``c``, with its exact 95% interval."""
    return rate_summary(int((predicted == c).sum()), len(predicted))


def noise_kl(model: DiffusionModel, images: torch.Tensor, labels: torch.Tensor | None = None, n_draws: int = 8,
             seed: int = 0, batch_size: int = 128) -> torch.Tensor:
    """Per image: ``KL(N(mu, s^2) || N(0, 1))`` of the elements of the model's noise prediction at ``x_t`` (conditioned
    on ``labels`` for a class-conditional model), averaged over the ``n_draws`` shared (t, eps) pairs of
    :func:`diffunlearn.metrics.membership.membership_draws` (t uniform on all timesteps). (N,) float64."""

    def kl(e_hat: torch.Tensor, _eps: torch.Tensor) -> torch.Tensor:
        e = e_hat.double().flatten(1)
        mu, var = e.mean(1), e.var(1, unbiased=False).clamp_min(1e-12)
        return 0.5 * (var + mu ** 2 - 1.0 - var.log())

    return mean_over_draws(model, images, kl, n_draws, seed, batch_size=batch_size, labels=labels,
                           dtype=torch.float64)


def weight_distance(a: torch.nn.Module, b: torch.nn.Module) -> dict:
    """``||theta_a - theta_b||_2`` over all parameters, and relative to ``||theta_b||_2`` (b: the retrained model)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys() or any(pa[k].shape != pb[k].shape for k in pa):
        raise ValueError("the two models have different parameters: a weight distance needs one architecture")
    d2 = sum(float((pa[k].detach().double() - pb[k].detach().double()).pow(2).sum()) for k in pa)
    n2 = sum(float(pb[k].detach().double().pow(2).sum()) for k in pb)
    return {"l2": math.sqrt(d2), "relative": math.sqrt(d2 / n2) if n2 else float("nan")}


__all__ = ["class_accuracy", "class_rate", "noise_kl", "predicted_classes", "weight_distance"]
