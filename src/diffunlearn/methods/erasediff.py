"""EraseDiff (Wu et al. 2024, "EraseDiff: Erasing Data Influence in Diffusion Models"), solved first-order.

Bilevel form, in the loop order of the authors' released code. A pass over A is ``P = ceil(|A| / batch)`` batches.
Every ``P`` outer steps: save ``theta``, take ``inner_steps`` (K) passes over A, one unclipped optimiser step per
batch, on ``L_f = E||u - eps_theta(gamma_t a + sigma_t u, t)||^2`` with ``u ~ U[0, 1)^d`` (the same ``u`` corrupts
the input and is the target); ``phi`` is the mean loss of the last pass; restore ``theta`` (the optimiser state is
kept). Then ``P`` outer steps (one pass over A) on ``L_r + lambda_e (L_f - phi)`` with ``L_r`` the DDPM loss on
X \\ A, each clipped by the trainer's ``--clip-norm``. ``lambda_e`` is fixed, or adaptive
``max(eta - cos(grad L_r, grad L_f), 0)``. When A fits one batch (P = 1) this is K inner steps per outer step.

Batches are drawn with replacement, as every method's rows here (the released code walks a shuffled loader).

``EraseDiffLight`` is the variant the SISS paper compared against: no inner loop, ``L_f' = ||u - eps_theta(a_t)||^2``
with Gaussian-noised ``a_t`` and an independent uniform target ``u``, combined as
``g = G_x + max(eta - <G_x, G_a> / ||G_a||^2, 0) G_a``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..model.schedule import predict_noise, sum_sq
from .base import Method, Terms, ddpm_terms, global_norm


def _uniform_forget_loss(unet, batch, ctx, u: torch.Tensor) -> torch.Tensor:
    g, s = ctx.gs(batch.t, batch.a.ndim)
    return sum_sq(predict_noise(unet, g * batch.a + s * u, batch.t, batch.a_y) - u)


@dataclass
class EraseDiff(Method):
    inner_steps: int = field(default=2, metadata={"help": "inner passes over A (K) before each pass of outer steps; "
                                                          "a pass is ceil(|A| / batch) optimiser steps"})
    lambda_e: float = field(default=0.1, metadata={"help": "weight of the forget loss"})
    adaptive: bool = field(default=False, metadata={"help": "adaptive lambda_e = max(eta - cos, 0)"})
    eta: float = field(default=0.1, metadata={"help": "eta of the adaptive weight"})

    name = "erasediff"
    summary = "bilevel: inner passes fit A to uniform noise, outer steps keep X \\ A (Wu et al. 2024)"

    def __post_init__(self):
        self._phi, self._left = 0.0, 0  # the inner problem's value, outer steps left in the current pass
        if self.inner_steps < 0:
            raise UserError(f"inner_steps must be >= 0, got {self.inner_steps}")
        if self.lambda_e < 0:
            raise UserError(f"lambda_e must be >= 0, got {self.lambda_e}")

    @property
    def separate_grads(self) -> bool:  # adaptive lambda_e needs both gradients
        return self.adaptive

    def loss_coefficients(self):
        return {"r": 1.0, "f": self.lambda_e}

    def draw(self, n, shape, generator):
        return {"u": torch.rand((n, *shape), generator=generator)}

    def terms(self, unet, batch, ctx):
        return Terms({"r": ddpm_terms(unet, batch.x, batch.eps, batch.t, ctx, batch.x_y),
                      "f": _uniform_forget_loss(unet, batch, ctx, batch.extra["u"])})

    def combine(self, grads):
        gr, gf = grads["r"], grads["f"]
        dot = sum((a.double() * b.double()).sum() for a, b in zip(gr, gf))
        cos = float(dot / (global_norm(gr) * global_norm(gf) + 1e-8))  # the released code's guard
        lam = max(self.eta - cos, 0.0)
        return [a + lam * b for a, b in zip(gr, gf)], {"lambda_e": lam, "cos_rf": cos}

    def state_dict(self) -> dict:
        return {"phi": self._phi, "left": self._left}

    def load_state_dict(self, state: dict) -> None:
        self._phi, self._left = float(state.get("phi", 0.0)), int(state.get("left", 0))

    def before_step(self, ctx):
        """At the start of each pass of outer steps, the inner problem: ``inner_steps`` passes over A, one unclipped
        optimiser step per batch, then the weights are restored; ``phi`` is the last pass's mean loss."""
        if self.inner_steps == 0:
            return {}
        if self._left > 0:
            self._left -= 1
            return {"phi": self._phi}
        per_pass = -(-len(ctx.forget) // ctx.batch_size)
        params = [p for p in ctx.unet.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        for _ in range(self.inner_steps):
            phi = 0.0
            for _ in range(per_pass):
                batch = ctx.draw(ctx.batch_size, parts=("a",)).to(ctx.device)  # only A's images are used
                with ctx.autocast():
                    loss = _uniform_forget_loss(ctx.unet, batch, ctx, batch.extra["u"]).mean()
                ctx.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                ctx.optimizer.step()
                phi += float(loss.detach()) / per_pass
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        ctx.optimizer.zero_grad(set_to_none=True)
        self._phi, self._left = phi, per_pass - 1
        return {"phi": phi}


@dataclass
class EraseDiffLight(Method):
    eta: float = field(default=1e-3, metadata={"help": "eta of the adaptive weight"})

    name = "erasediff-light"
    summary = "EraseDiff without the inner loop, as compared in the SISS paper"
    separate_grads = True

    def draw(self, n, shape, generator):
        return {"u": torch.rand((n, *shape), generator=generator)}

    def terms(self, unet, batch, ctx):
        g, s = ctx.gs(batch.t, batch.a.ndim)
        e_hat = predict_noise(unet, g * batch.a + s * batch.eps, batch.t, batch.a_y)
        return Terms({"x": ddpm_terms(unet, batch.x, batch.eps, batch.t, ctx, batch.x_y),
                      "a": sum_sq(e_hat - batch.extra["u"])})

    def combine(self, grads):
        gx, ga = grads["x"], grads["a"]
        dot = sum((a.double() * b.double()).sum() for a, b in zip(gx, ga))
        na2 = float(global_norm(ga) ** 2)
        c = max(self.eta - float(dot) / na2, 0.0) if na2 > 0 else 0.0
        return [a + c * b for a, b in zip(gx, ga)], {"coef_a": c, "grad_norm_x": float(global_norm(gx)),
                                                    "grad_norm_a": na2 ** 0.5}
