"""ReTrack (importance sampling redirected to the k nearest neighbours of the data to forget).

Once: the ``knn`` nearest neighbours of every a in A among X \\ A (Euclidean, flattened model-space inputs), cached.
Per step: ``x_t = gamma_t a + sigma_t eps``; for each neighbour ``x_n``, ``v_n = (x_t - gamma_t x_n) / sigma_t`` and
``p_n = softmax_n(-||x_t - gamma_t x_n||^2 / (2 sigma_t^2))``; ``L_unlearn = sum_n p_n ||eps_theta(x_t) - v_n||^2``
(denoising a is redirected toward its neighbours); ``L = lambda_r L_unlearn + (1 - lambda_r) L_remain``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..model.schedule import predict_noise, sum_sq
from .base import Method, Terms, check_range
from .weights import drop_negligible

#: distances computed per chunk of kept images: at most this many float64 elements of kept images at once
NN_CHUNK_ELEMENTS = 2 ** 22


def nearest_kept(forget, kept, k: int) -> torch.Tensor:
    """Indices (into ``kept``) of the ``k`` nearest neighbours of each forget item, shape (|A|, k).

    Exact Euclidean distances in float64 between flattened model-space images, computed one chunk of ``kept`` at a
    time (a lazy image array is decoded chunk by chunk, never whole), keeping the best ``k`` so far; ties go to the
    lower index. ``forget`` and ``kept`` are tensors or image arrays."""
    a = forget[:].flatten(1).double().cpu()
    k = min(int(k), len(kept))
    best_d = torch.empty((len(a), 0), dtype=torch.float64)
    best_i = torch.empty((len(a), 0), dtype=torch.long)
    step = max(1, NN_CHUNK_ELEMENTS // max(1, a.shape[1]))
    for s in range(0, len(kept), step):
        x = kept[s:s + step].flatten(1).double().cpu()
        d = torch.cdist(a, x, compute_mode="donot_use_mm_for_euclid_dist")
        cand_d = torch.cat([best_d, d], 1)
        cand_i = torch.cat([best_i, torch.arange(s, s + len(x)).expand(len(a), -1)], 1)
        order = torch.sort(cand_d, dim=1, stable=True).indices[:, :k]  # stable: equal distances keep index order
        best_d, best_i = cand_d.gather(1, order), cand_i.gather(1, order)
    return best_i


def nearest_kept_by_class(forget, kept, kept_labels: torch.Tensor, forget_labels: torch.Tensor, k: int) -> torch.Tensor:
    """For a class-conditional model: the ``k`` nearest kept neighbours of each forget item among kept images of its
    own class (denoising ``a`` under its label is redirected to images that label may produce), or among all kept
    images when its class has fewer than ``k`` kept images (forgetting a whole class). Indices into ``kept``."""
    k = min(int(k), len(kept))
    out = torch.empty((len(forget), k), dtype=torch.long)
    kept_labels, forget_labels = kept_labels.cpu(), forget_labels.cpu()
    for c in torch.unique(forget_labels):
        rows = torch.nonzero(forget_labels == c).flatten()
        pool = torch.nonzero(kept_labels == c).flatten()
        items = forget[rows] if torch.is_tensor(forget) else forget.subset(rows.numpy())
        if len(pool) < k:
            out[rows] = nearest_kept(items, kept, k)
        else:
            cands = kept[pool.to(kept.device)] if torch.is_tensor(kept) else kept.subset(pool.numpy())
            out[rows] = pool[nearest_kept(items, cands, k)]
    return out


@dataclass
class ReTrack(Method):
    lambda_r: float = field(default=0.005, metadata={"help": "weight of the redirect loss"})
    knn: int = field(default=10, metadata={"help": "neighbours per forget item"})

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
        if ctx.labels is None:
            self.neighbours = nearest_kept(ctx.forget, ctx.kept, self.knn)
        else:
            self.neighbours = nearest_kept_by_class(ctx.forget, ctx.kept, *ctx.labels, self.knn)

    def terms(self, unet, batch, ctx):
        g, s = ctx.gs(batch.t, batch.a.ndim)
        x_t = g * batch.a + s * batch.eps
        nb = self.neighbours[batch.a_idx.cpu()]  # (B, k)
        uniq, inv = torch.unique(nb, return_inverse=True)  # rows share neighbours: fetch each image once
        nbrs = ctx.kept[uniq.to(ctx.kept.device)].to(x_t.device)[inv.to(x_t.device)]  # (B, k, C, H, W)
        diff = x_t.unsqueeze(1) - g.unsqueeze(1) * nbrs
        v = diff / s.unsqueeze(1)
        p = torch.softmax(-diff.double().pow(2).flatten(2).sum(2) / (2 * s.flatten().double()[:, None] ** 2), dim=1)
        y = None if batch.a_y is None else torch.cat([batch.a_y, batch.x_y])  # a keeps its own label
        e_hat = predict_noise(unet, torch.cat([x_t, g * batch.x + s * batch.eps]), torch.cat([batch.t, batch.t]), y)
        e_a, e_x = e_hat.chunk(2)
        err = (e_a.unsqueeze(1) - v).float().pow(2).flatten(2).sum(2)
        unlearn = (drop_negligible(p.float(), err) * err).sum(1)  # far neighbours' subnormal p_n become 0
        return Terms({"unlearn": unlearn, "remain": sum_sq(e_x - batch.eps)})
