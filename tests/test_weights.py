"""SISS importance weights (SISS paper eq. 6-7; docs/methods.md)."""

import math

import pytest
import torch

from diffunlearn.methods.weights import (
    LOG_WEIGHT_MAX,
    NEGLIGIBLE,
    WEIGHT_FLOOR,
    drop_negligible,
    importance_weights,
    log_density_gap,
    log_weights,
)

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
    """At ``l = 0`` the mixture is ``q(.|x)``: ``w_x = 1``, ``w_a = e^{-D}``. At ``l = 1``: ``w_a = 1``,
    ``w_x = e^{D}``."""
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


def test_drop_negligible_zeroes_exactly_what_cannot_move_the_gradient():
    """An entry's output gradient has norm ``2 w sqrt(loss)``: entries below ``2^-48`` of the largest, and weights below
    ``2^-102``, become exact zeros; every other weight is returned bit for bit. The same weight is kept beside a large
    loss and dropped beside a small one (the rule weighs contributions, not weights)."""
    assert NEGLIGIBLE == 2.0 ** -48 and WEIGHT_FLOOR == 2.0 ** -102
    w = torch.tensor([2.0, 1e-3, 1e-13, 1e-13, 1e-17, 1e-17, 1e-31, 1e-40, 0.0])
    loss = torch.tensor([1.0, 1.0, 1e6, 1.0, 1.0, 1e6, 1e40, 1e40, 1.0], dtype=torch.float64)  # beyond fp32 on purpose
    # w sqrt(loss): 2, 1e-3, 1e-10, 1e-13 (kept: above 2^-48 * 2 ~ 7.1e-15), 1e-17 (dropped), 1e-14 (kept);
    # 1e-31 has a large contribution (1e-11) but lies below the floor 2^-102 ~ 2.0e-31; 1e-40 is subnormal
    want = torch.tensor([2.0, 1e-3, 1e-13, 1e-13, 0.0, 1e-17, 0.0, 0.0, 0.0])
    assert torch.equal(drop_negligible(w, loss), want)


def test_drop_negligible_leaves_no_subnormal_weight_and_keeps_non_finite_losses():
    """Weights from 1e-45 to 1: none subnormal afterwards, those within 2^-48 of the largest unchanged. A row whose
    loss is NaN keeps its weight (so the loss the trainer checks is still NaN); a tensor whose weights all lie below
    the floor becomes all zeros."""
    tiny = torch.finfo(torch.float32).tiny
    w = torch.logspace(-45, 0, 200).float()
    got = drop_negligible(w, torch.ones_like(w))
    assert not ((got > 0) & (got < tiny)).any()
    assert torch.equal(got[w >= 2.0 ** -48], w[w >= 2.0 ** -48])
    assert (got[w < 2.0 ** -48] == 0).all()
    assert drop_negligible(torch.tensor([1.0, 1e-20]), torch.tensor([float("nan"), 1.0]))[0] == 1.0
    assert torch.equal(drop_negligible(torch.tensor([1e-32, 1e-35]), torch.ones(2)), torch.zeros(2))
