"""SISS importance weights (SISS paper eq. 6-7; METHODS.md "SISS" step 4)."""

import math

import pytest
import torch

from diffunlearn.methods.weights import LOG_WEIGHT_MAX, importance_weights, log_density_gap, log_weights

LAMBDAS = [0.0, 1e-6, 0.1, 0.5, 0.9, 1 - 1e-6, 1.0]


@pytest.mark.parametrize("lam", LAMBDAS)
def test_weights_mix_to_one_and_respect_bounds(lam):
    """``q_lambda = (1-l) q(.|x) + l q(.|a)`` so ``(1-l) w_x + l w_a = (1-l) q_x/q_l + l q_a/q_l = q_l/q_l = 1``.

    Each weight is a density over a mixture that contains it with weight (1-l) or l, hence ``w_x <= 1/(1-l)`` and
    ``w_a <= 1/l``. Checked over log-density gaps D spanning +-50 (weights from e^-50 to e^50), in float64.
    """
    d = torch.linspace(-50, 50, 2001, dtype=torch.float64)
    log_wx, log_wa = log_weights(d, lam)
    assert torch.isfinite(log_wx).all() and torch.isfinite(log_wa).all()
    w_x, w_a = log_wx.exp(), log_wa.exp()
    torch.testing.assert_close((1 - lam) * w_x + lam * w_a, torch.ones_like(d), rtol=1e-12, atol=1e-12)
    if lam < 1:
        assert (w_x <= 1 / (1 - lam) * (1 + 1e-12)).all()
    if lam > 0:
        assert (w_a <= 1 / lam * (1 + 1e-12)).all()


def test_weights_match_the_linear_space_formulas():
    """``w_x = 1/((1-l) + l e^{-D})`` and ``w_a = 1/((1-l) e^{D} + l)`` where these do not overflow."""
    d = torch.linspace(-20, 20, 401, dtype=torch.float64)
    for lam in (0.2, 0.5, 0.7):
        log_wx, log_wa = log_weights(d, lam)
        torch.testing.assert_close(log_wx.exp(), 1 / ((1 - lam) + lam * torch.exp(-d)))
        torch.testing.assert_close(log_wa.exp(), 1 / ((1 - lam) * torch.exp(d) + lam))


def test_edge_lambdas_give_the_limits():
    """At ``l = 0`` the mixture is ``q(.|x)``: ``w_x = 1``, ``w_a = e^{-D}``. At ``l = 1``: ``w_a = 1``, ``w_x = e^{D}``."""
    d = torch.tensor([-30.0, -1.0, 0.0, 2.0, 30.0], dtype=torch.float64)
    wx0, wa0 = (v.exp() for v in log_weights(d, 0.0))
    torch.testing.assert_close(wx0, torch.ones_like(d))
    torch.testing.assert_close(wa0, torch.exp(-d))
    wx1, wa1 = (v.exp() for v in log_weights(d, 1.0))
    torch.testing.assert_close(wa1, torch.ones_like(d))
    torch.testing.assert_close(wx1, torch.exp(d))


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_unbounded_edge_weights_are_clamped_not_nan(lam):
    """At the edges one weight is ``e^{|D|}``: D of 1e4 would overflow to inf (and inf * 0 = NaN in the loss).
    The weights stay finite, are clamped at ``e^LOG_WEIGHT_MAX``, and the clamping is counted."""
    d = torch.tensor([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=torch.float64)
    w_x, w_a, clamped = importance_weights(d, lam)
    assert torch.isfinite(w_x).all() and torch.isfinite(w_a).all()
    assert not torch.isnan(w_x).any() and not torch.isnan(w_a).any()
    assert clamped == 2
    assert float(torch.maximum(w_x, w_a).max()) == pytest.approx(math.exp(LOG_WEIGHT_MAX), rel=1e-6)


def test_log_density_gap_is_the_gaussian_log_ratio():
    """``D = log N(m; g x, s^2 I) - log N(m; g a, s^2 I)``; the normalising constants cancel."""
    g = torch.Generator().manual_seed(0)
    x, a, m = (torch.randn((4, 1, 3, 3), generator=g, dtype=torch.float64) for _ in range(3))
    gamma = torch.full((4, 1, 1, 1), 0.8, dtype=torch.float64)
    sigma = torch.full((4, 1, 1, 1), 0.6, dtype=torch.float64)
    dist = torch.distributions.Normal
    lx = dist(gamma * x, sigma).log_prob(m).flatten(1).sum(1)
    la = dist(gamma * a, sigma).log_prob(m).flatten(1).sum(1)
    torch.testing.assert_close(log_density_gap(m, x, a, gamma, sigma), lx - la)
