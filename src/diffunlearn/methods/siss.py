"""SISS: Subtracted Importance Sampled Scores (Alberti et al., "Data Unlearning in Diffusion Models", ICLR 2025).

One forward pass per micro-batch on the mixture sample ``m`` (eq. 8-10); both terms are importance-weighted so that
``E[w_x L_x]`` is the naive-deletion loss and ``E[w_a L_a]`` the NegGrad loss (eq. 4-7, Lemma 1); the NegGrad
gradient is rescaled to exactly ``scaling_norm`` each step (norm-fixing) or multiplied by a fixed ``superfactor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..model.schedule import predict_noise, sum_sq
from .base import Method, Terms, check_range, ddpm_terms
from .weights import drop_negligible, importance_weights, log_density_gap


@dataclass
class SubtractedGradients:
    """``g = G_x - c G_a`` with ``c = scaling_norm / ||G_a||`` (norm-fixing) or a fixed ``superfactor`` ``c``.

    A fixed superfactor is linear in the loss, so it costs one backward pass of ``mean L_x - c mean L_a`` and gives
    the same update exactly. Norm-fixing needs ``||G_a||``: by default both gradients are taken every step (exact);
    ``norm_refresh = k > 1`` takes them every k-th step only and in between reuses the last ``||G_a||`` with one
    backward pass (an approximation, measured in docs/performance.md).
    """

    scaling_norm: float | None = field(default=5.0, metadata={
        "help": "norm the NegGrad gradient is fixed to, or 'auto': 10%% of ||G_x|| measured at the input model on "
                "this run's data (the paper's rule, per model). The unlearn command's default is auto; "
                "the class's default is 5.0, the paper's MNIST value", "auto": True})
    superfactor: float | None = field(default=None, metadata={"help": "fixed NegGrad multiplier "
                                                                      "instead of norm-fixing"})
    norm_refresh: int = field(default=1, metadata={"help": "take both gradients every k-th step only, reusing ||G_a|| "
                                                           "in between (approximation; 1 = exact)"})

    def __post_init__(self):
        if self.superfactor is not None:
            if self.superfactor < 0:
                raise UserError(f"superfactor must be >= 0, got {self.superfactor}")
            self.scaling_norm = None
        elif self.scaling_norm is None or not self.scaling_norm >= 0:
            raise UserError(f"scaling_norm must be >= 0, got {self.scaling_norm}")
        if self.norm_refresh < 1:
            raise UserError(f"norm_refresh must be >= 1, got {self.norm_refresh}")
        self._step = 0
        self._last_norm_a: float | None = None
        self._norms: list[float] = []

    def before_step(self, ctx):
        self._step += 1
        return {} if self.separate_grads else {"superfactor": self._factor()}

    @property
    def separate_grads(self) -> bool:
        if self.superfactor is not None:
            return False
        return self._last_norm_a is None or (self._step - 1) % self.norm_refresh == 0

    def state_dict(self):
        return {"step": self._step, "last_norm_a": self._last_norm_a, "norms": list(self._norms[-11:])}

    def load_state_dict(self, state):
        self._step, self._last_norm_a = int(state["step"]), state["last_norm_a"]
        self._norms = list(state.get("norms", []))

    def _factor(self) -> float:
        if self.superfactor is not None:
            return float(self.superfactor)
        return float(self.scaling_norm / self._last_norm_a) if self._last_norm_a else 0.0

    def loss_coefficients(self):
        return {"x": 1.0, "a": -self._factor()}

    def backward(self, losses, params, step):
        """One micro-batch in one process: ``g = G_x - c G_a`` into the parameters' gradients with ``G_a`` the only
        buffer held beside them: ``G_a`` from its own backward pass (the graph kept), ``c`` from it, then one backward
        pass of ``mean L_x - c mean L_a``. Two backward passes, as when both gradients are accumulated separately,
        but one gradient buffer instead of three (the same update as ``combine`` up to float rounding)."""
        if not (step.separate and step.single):
            return super().backward(losses, params, step)
        ga = torch.autograd.grad(losses["a"].mean(), params, retain_graph=True, allow_unused=True)
        ga = [torch.zeros_like(p) if g is None else g for p, g in zip(params, ga)]
        c = self.factor_for(ga)
        (losses["x"].mean() - c * losses["a"].mean()).backward()
        for p in params:
            if p.grad is None:  # a parameter neither loss reaches
                p.grad = torch.zeros_like(p)
        step.stats.update(self.stats_in_graph([p.grad for p in params], ga, c))

    def finish(self, params, step):
        if step.separate and step.single:
            return step.stats
        return super().finish(params, step)

    def combine(self, grads):
        gx, ga = grads["x"], grads["a"]
        c = self.factor_for(ga)
        out = [x - c * a for x, a in zip(gx, ga)]
        xx = sum((x.double() ** 2).sum() for x in gx)
        xa = sum((x.double() * a.double()).sum() for x, a in zip(gx, ga))
        return out, self._stats(xx, xa, c)

    def factor_for(self, ga) -> float:
        """The subtraction factor for this step's ``G_a`` (records ``||G_a||`` for norm-fixing and refresh)."""
        self._last_norm_a = float(torch.sqrt(sum((a.double() ** 2).sum() for a in ga)))
        return self._factor()

    def stats_in_graph(self, g, ga, c: float) -> dict[str, float]:
        """The statistics ``combine`` logs, from the combined gradient ``g = G_x - c G_a`` and ``G_a``."""
        xa = sum((gi.double() * a.double()).sum() for gi, a in zip(g, ga)) + c * self._last_norm_a ** 2
        xx = sum(((gi.double() + c * a.double()) ** 2).sum() for gi, a in zip(g, ga))
        return self._stats(xx, xa, c)

    def _stats(self, xx, xa, c: float) -> dict[str, float]:
        stats = {"grad_norm_x": float(xx.sqrt()), "grad_norm_a": self._last_norm_a, "superfactor": c}
        if self.superfactor is None:
            stats.update(self._stale_norm_cosines(xx, xa, self._last_norm_a ** 2, c))
        return stats

    def _stale_norm_cosines(self, xx, xa, aa, c: float) -> dict[str, float]:
        """How far ``--norm-refresh k`` would move this step's update: the cosine between the exact update and the one
        built with ``||G_a||`` from k steps ago, for k = 1, 5, 10 (a free diagnostic of the approximation), from the
        dot products ``xx = <G_x, G_x>``, ``xa = <G_x, G_a>``, ``aa = <G_a, G_a>``."""
        self._norms.append(self._last_norm_a)

        def cos(c1, c2):  # <gx - c1 ga, gx - c2 ga> / (|gx - c1 ga| |gx - c2 ga|), from three dot products
            dot = xx - (c1 + c2) * xa + c1 * c2 * aa
            n1, n2 = (xx - 2 * c1 * xa + c1 * c1 * aa).sqrt(), (xx - 2 * c2 * xa + c2 * c2 * aa).sqrt()
            return float(dot / (n1 * n2))

        return {f"cos_norm_{k}_steps_old": cos(c, self.scaling_norm / self._norms[-1 - k])
                for k in (1, 5, 10) if len(self._norms) > k and self._norms[-1 - k] > 0}


@dataclass
class SISS(SubtractedGradients, Method):
    """SISS with mixture weight ``lam`` in [0, 1]; lam = 0 and lam = 1 are the paper's ablations."""

    lam: float = field(default=0.5, metadata={"flag": "--lambda", "help": "mixture weight lambda in [0, 1]"})

    name = "siss"
    summary = "importance-sampled naive deletion minus norm-fixed NegGrad, one forward pass (Alberti et al. 2025)"

    def __post_init__(self):
        check_range("lambda", self.lam, 0.0, 1.0)
        SubtractedGradients.__post_init__(self)

    def draw(self, n, shape, generator):
        return {"from_a": torch.rand(n, generator=generator) < self.lam}

    def check_labels(self, kept_labels, forget_labels):
        """At lambda = 0 (1) every row is drawn from x (a), and where the labels of x and a differ such a row says
        nothing about the other term (its density there is 0): that term would silently vanish."""
        same = len(torch.unique(torch.cat([kept_labels, forget_labels]))) == 1
        if self.lam in (0.0, 1.0) and not same:
            raise UserError(f"SISS with lambda {self.lam:g} cannot estimate its "
                            f"{'NegGrad' if self.lam == 0 else 'naive-deletion'} term when kept and forgotten images "
                            "have different class labels (no row is drawn from that side): choose 0 < lambda < 1")

    def terms(self, unet, batch, ctx):
        g, s = ctx.gs(batch.t, batch.x.ndim)
        from_a = batch.extra["from_a"].view(-1, *([1] * (batch.x.ndim - 1)))
        m = g * torch.where(from_a, batch.a, batch.x) + s * batch.eps
        y = None if batch.x_y is None else torch.where(from_a.flatten(), batch.a_y, batch.x_y)
        e_hat = predict_noise(unet, m, batch.t, y)  # the one forward pass
        e_x = (m - g * batch.x) / s
        e_a = (m - g * batch.a) / s
        w_x, w_a, clamped = importance_weights(log_density_gap(m, batch.x, batch.a, g, s), self.lam)
        if y is not None:
            w_x, w_a = labelled_weights(w_x, w_a, from_a.flatten(), batch.x_y != batch.a_y, self.lam)
        l_x, l_a = sum_sq(e_hat - e_x), sum_sq(e_hat - e_a)
        # weights too small to move the gradient become exact zeros (subnormal ones would slow the backward pass)
        w_x, w_a = drop_negligible(w_x.to(e_hat.device), l_x), drop_negligible(w_a.to(e_hat.device), l_a)
        stats = {"w_x_mean": float(w_x.mean()), "w_a_mean": float(w_a.mean()),
                 # rows that G_a's backward sweep cannot skip (bench speed reports what this implies)
                 "rows_w_a_positive": float((w_a > 0).float().mean())}
        if clamped:
            stats["weights_clamped"] = clamped
        return Terms({"x": w_x * l_x, "a": w_a * l_a}, stats)


def labelled_weights(w_x: torch.Tensor, w_a: torch.Tensor, from_a: torch.Tensor, differ: torch.Tensor,
                     lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance weights of a class-conditional model, where a row's sample is the pair (m, y) and the label is
    not noised: ``q((m, y) | x) = q(m | x) [y = y_x]``. Where ``y_x = y_a`` the label factors cancel and the weights are
    the unconditional ones; where they differ, a row drawn from ``a`` has density 0 under ``x`` and the reverse, so
    ``w_x = [from x] / (1 - lambda)`` and ``w_a = [from a] / lambda`` (each row then feeds exactly one term, and both
    estimates stay unbiased for 0 < lambda < 1; at lambda = 0 or 1 one term has no rows: ``SISS.check_labels``)."""
    cx = 1.0 / (1.0 - lam) if lam < 1 else 0.0
    ca = 1.0 / lam if lam > 0 else 0.0
    only_x = torch.where(from_a, 0.0, cx).to(w_x)
    only_a = torch.where(from_a, ca, 0.0).to(w_a)
    return torch.where(differ, only_x, w_x), torch.where(differ, only_a, w_a)


@dataclass
class SISSNoIS(SubtractedGradients, Method):
    """SISS (No IS): the same norm-fixed combination on plain DDPM losses of x and a, two forward passes."""

    name = "siss-nois"
    summary = "naive deletion minus norm-fixed NegGrad without importance sampling, two forward passes"

    def terms(self, unet, batch, ctx):
        return Terms({"x": ddpm_terms(unet, batch.x, batch.eps, batch.t, ctx, batch.x_y),
                      "a": ddpm_terms(unet, batch.a, batch.eps, batch.t, ctx, batch.a_y)})
