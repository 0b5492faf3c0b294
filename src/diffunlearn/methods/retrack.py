"""ReTrack (importance sampling redirected to the k nearest neighbours of the data to forget).

Once: the ``knn`` nearest neighbours of every a in A among X \\ A (Euclidean, flattened model-space inputs), cached.
Per step: ``x_t = gamma_t a + sigma_t eps``; for each neighbour ``x_n``, ``v_n = (x_t - gamma_t x_n) / sigma_t`` and
``p_n = softmax_n(-||x_t - gamma_t x_n||^2 / (2 sigma_t^2))``; ``L_unlearn = sum_n p_n ||eps_theta(x_t) - v_n||^2``
(denoising a is redirected toward its neighbours); ``L = lambda_r L_unlearn + (1 - lambda_r) L_remain``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion import predict_noise, sum_sq
from ..errors import UserError
from .base import Method, Terms, check_range
from .weights import drop_negligible


def nearest_kept(forget: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (into ``kept``) of the ``k`` nearest neighbours of each forget item, shape (|A|, k)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(kept))
    nn = NearestNeighbors(n_neighbors=k).fit(kept.flatten(1).double().cpu().numpy())
    _, idx = nn.kneighbors(forget.flatten(1).double().cpu().numpy())
    return torch.from_numpy(idx).long()


@dataclass
class ReTrack(Method):
    lambda_r: float = 0.005
    knn: int = 10

    name = "retrack"
    summary = "redirect A's denoising to its k nearest kept neighbours, plus the DDPM loss on X \\ A"

    def __post_init__(self):
        check_range("lambda_r", self.lambda_r, 0.0, 1.0)
        if self.knn < 1:
            raise UserError(f"knn must be >= 1, got {self.knn}")
        self.neighbours: torch.Tensor | None = None

    def loss_coefficients(self):
        return {"unlearn": self.lambda_r, "remain": 1.0 - self.lambda_r}

    def setup(self, ctx):
        self.neighbours = nearest_kept(ctx.forget, ctx.kept, self.knn)

    def terms(self, unet, batch, ctx):
        g, s = ctx.gs(batch.t, batch.a.ndim)
        x_t = g * batch.a + s * batch.eps
        nbrs = ctx.kept[self.neighbours[batch.a_idx.cpu()].to(ctx.kept.device)].to(x_t.device)  # (B, k, C, H, W)
        diff = x_t.unsqueeze(1) - g.unsqueeze(1) * nbrs
        v = diff / s.unsqueeze(1)
        p = torch.softmax(-diff.double().pow(2).flatten(2).sum(2) / (2 * s.flatten().double()[:, None] ** 2), dim=1)
        e_hat = predict_noise(unet, torch.cat([x_t, g * batch.x + s * batch.eps]), torch.cat([batch.t, batch.t]))
        e_a, e_x = e_hat.chunk(2)
        err = (e_a.unsqueeze(1) - v).float().pow(2).flatten(2).sum(2)
        unlearn = (drop_negligible(p.float(), err) * err).sum(1)  # far neighbours' subnormal p_n become 0
        return Terms({"unlearn": unlearn, "remain": sum_sq(e_x - batch.eps)})
