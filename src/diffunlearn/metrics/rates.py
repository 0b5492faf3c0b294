"""How often generated samples reproduce the forgotten target, with an exact binomial interval.

MNIST T-Shirt protocol of the SISS paper (Alberti et al. 2025, section 5.2): a sample counts as the target when its L2
distance to the target image, pixels in [0, 1] and flattened, is at most 10. A rate is reported with its 95%
Clopper-Pearson interval (Clopper & Pearson 1934), since "0 T-shirts" means something only beside the sample count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


def binomial_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval for a binomial proportion after ``k`` successes in ``n`` trials.

    Lower bound ``Beta(alpha/2; k, n-k+1)`` quantile, upper bound ``Beta(1-alpha/2; k+1, n-k)`` quantile, with the
    bound fixed at 0 (k = 0) or 1 (k = n) where that Beta is undefined; at ``k = 0`` the upper bound is
    ``1 - (alpha/2)^(1/n)``.
    """
    from scipy.stats import beta

    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise UserError(f"a binomial interval needs 0 <= k <= n and n >= 1 (got k={k}, n={n})")
    if not 0.0 < level < 1.0:
        raise UserError(f"confidence level must lie in (0, 1), got {level}")
    alpha = 1.0 - level
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def rate_summary(k: int, n: int) -> dict:
    """``k`` of ``n`` as ``{count, n, rate, ci95}``, the interval exact (:func:`binomial_ci`)."""
    return {"count": int(k), "n": int(n), "rate": k / n, "ci95": list(binomial_ci(k, n))}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value on paired binary outcomes (the same sample seeds judged under two models):
    under the null hypothesis that both models produce the target equally often, each discordant pair (the target
    under one model only) is a fair coin, so with ``only_a`` and ``only_b`` discordant pairs the p-value is
    ``min(1, 2 P(Binomial(only_a + only_b, 1/2) <= min(only_a, only_b)))``; 1.0 with no discordant pair."""
    from scipy.stats import binom

    a, b = int(only_a), int(only_b)
    if a < 0 or b < 0:
        raise UserError(f"discordant counts must be >= 0, got {a} and {b}")
    n = a + b
    return 1.0 if n == 0 else float(min(1.0, 2.0 * binom.cdf(min(a, b), n, 0.5)))


def paired_hits(hits_a, hits_b) -> dict:
    """The paired comparison of two models' target samples on the same seeds: sample indices counted under ``a``
    only, under ``b`` only, under both, and the exact McNemar p-value."""
    a, b = set(int(i) for i in hits_a), set(int(i) for i in hits_b)
    return {"only_a": len(a - b), "only_b": len(b - a), "both": len(a & b),
            "p_value": mcnemar_exact(len(a - b), len(b - a))}


def pixel_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L2 distances (len(a), len(b)) between model-space images, measured on pixels mapped to [0, 1] (half the
    model-space distance): the scale of the paper's target threshold."""
    a, b = a.detach().float().flatten(1).cpu(), b.detach().float().flatten(1).cpu()
    if len(b) == 0:
        return torch.empty((len(a), 0))
    return torch.stack([((a - y) / 2.0).norm(dim=1) for y in b], dim=1)


@dataclass
class TargetRate:
    """``count`` of ``n`` samples within ``threshold`` of the target; ``rate = count / n`` and its interval."""

    count: int
    n: int
    rate: float
    ci_low: float
    ci_high: float
    threshold: float
    distances: torch.Tensor

    @property
    def hits(self) -> list[int]:
        """Positions of the samples within the threshold, in order."""
        return torch.nonzero(self.distances <= self.threshold).flatten().tolist()

    def summary(self) -> dict:
        return {"count": self.count, "n": self.n, "rate": self.rate, "ci95": [self.ci_low, self.ci_high],
                "threshold": self.threshold, "min_distance": float(self.distances.min())}


def target_rate(samples: torch.Tensor, target: torch.Tensor, threshold: float = 10.0,
                level: float = 0.95) -> TargetRate:
    """Fraction of ``samples`` (N, C, H, W) within L2 ``threshold`` of ``target`` ((C, H, W) or (1, C, H, W)).

    Both are given in model space [-1, 1]; distances are measured on pixels mapped to [0, 1], where the paper's
    threshold of 10 was set (half the model-space distance).
    """
    if target.ndim == samples.ndim and target.shape[0] == 1:
        target = target[0]
    if samples.ndim != 4 or tuple(target.shape) != tuple(samples.shape[1:]):
        raise UserError(f"samples {tuple(samples.shape)} and target {tuple(target.shape)} do not match: "
                        "expected (N, C, H, W) samples and one (C, H, W) target")
    if len(samples) == 0:
        raise UserError("no samples to count the target in")
    distances = pixel_distances(samples, target[None])[:, 0]
    count, n = int((distances <= threshold).sum()), len(samples)
    lo, hi = binomial_ci(count, n, level)
    return TargetRate(count, n, count / n, lo, hi, float(threshold), distances)
