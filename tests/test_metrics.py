"""Tests of the metrics: each derives its expected value in its docstring from a closed-form stand-in model."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffunlearn.errors import UserError
from diffunlearn.metrics.classifier import (
    DomainClassifier,
    classifier_fid,
    classifier_inception_score,
    frechet_distance,
    load_classifier,
    save_classifier,
    train_classifier,
)
from diffunlearn.metrics.membership import denoising_losses, membership_auc, membership_draws
from diffunlearn.metrics.nll import nll_bits_per_dim, rademacher_probe
from diffunlearn.metrics.rates import binomial_ci, target_rate
from diffunlearn.model import DiffusionModel, build_scheduler

LN2 = math.log(2.0)
SHAPE = (1, 4, 4)
D = 16
# Dormand-Prince (RK45) weights b_i of the solution scipy advances: sum |b_i| = 1 + 2 * 2187/6784
DOPRI_ABS_WEIGHTS = 1.0 + 2 * 2187 / 6784


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class StandIn(torch.nn.Module):
    """Closed-form replacement for a diffusers UNet: ``unet(x, t).sample`` and the ``config`` fields models read."""

    def __init__(self, shape):
        super().__init__()
        self.config = types.SimpleNamespace(sample_size=shape[1], in_channels=shape[0])


class GaussianScoreNet(StandIn):
    """The exact noise prediction for data ``N(0, cov)`` under the discrete schedule: at step ``k`` the marginal is
    ``N(0, abar_k cov + (1 - abar_k) I)``, whose score is ``-P_k x`` with ``P_k = (abar_k cov + (1 - abar_k) I)^-1``,
    so ``eps(x, k) = sigma_k P_k x`` (then ``-eps / sigma_k`` is the exact score at step k)."""

    def __init__(self, alphas_cumprod, cov, shape=SHAPE):
        super().__init__(shape)
        lam, q = np.linalg.eigh(np.asarray(cov, np.float64))
        self.register_buffer("lam", torch.tensor(lam))
        self.register_buffer("q", torch.tensor(q))
        self.register_buffer("abar", alphas_cumprod.double())

    def forward(self, x, t):
        abar = self.abar[t.long()].view(-1, 1)
        y = (x.flatten(1).double() @ self.q) / (abar * self.lam + 1 - abar)
        eps = (1 - abar).sqrt() * (y @ self.q.T)
        return types.SimpleNamespace(sample=eps.to(x.dtype).view_as(x))


def vp_scheduler(T: int) -> DDPMScheduler:
    """The discrete linear schedule of the VP-SDE with beta_min = 0.1, beta_max = 20 on T steps (T = 1000: the usual
    1e-4 -> 0.02)."""
    return DDPMScheduler(num_train_timesteps=T, beta_start=0.1 / T, beta_end=20.0 / T, beta_schedule="linear")


def staircase_flow(lams: np.ndarray, abar: np.ndarray, t_eps: float = 1e-5):
    """For ``GaussianScoreNet`` the ODE is linear and diagonal in cov's eigenbasis: along eigenvalue ``lam_j``,
    ``dx_j/dt = g_j(t) x_j`` with ``g_j(t) = -beta(t)/2 (1 - 1/v_{j,k(t)})``, ``v_{j,k} = abar_k lam_j + 1 - abar_k``,
    ``k(t) = round(t (T-1))``: a staircase in ``t`` (step k holds on ``[(k-1/2)/(T-1), (k+1/2)/(T-1))``).

    Returns ``Lam_j = int_{t_eps}^1 g_j dt`` (exactly: ``int beta = beta_min (b-a) + (beta_max - beta_min)(b^2-a^2)/2``
    on each stair), so ``z = Q diag(e^Lam) Q^T x`` and the exact divergence integral is ``sum_j Lam_j``; and the largest
    jump ``J_j`` of ``g_j`` between stairs, which bounds how far RK45 can stray (see ``staircase_bound``).
    """
    T = len(abar)
    k = np.arange(T)
    a, b = np.maximum(t_eps, (k - 0.5) / (T - 1)), np.minimum(1.0, (k + 0.5) / (T - 1))
    int_beta = np.where(b > a, 0.1 * (b - a) + 19.9 * (b * b - a * a) / 2, 0.0)
    inv_v = 1.0 / (abar[:, None] * lams[None] + 1.0 - abar[:, None])
    lam_int = (-0.5 * int_beta[:, None] * (1.0 - inv_v)).sum(0)
    t_jump = (k[:-1] + 0.5) / (T - 1)
    jumps = (0.5 * (0.1 + 19.9 * t_jump)[:, None] * np.abs(np.diff(inv_v, axis=0))).max(0)
    return lam_int, jumps


def staircase_bound(jump: float, mean_z2: float) -> float:
    """Bits/dim the RK45 solution can miss the exact staircase flow by, beyond its tolerance.

    RK45's step error control sees a smooth right-hand side; on a step of length h the staircase differs from the
    piecewise-linear curve through its stairs' midpoints by at most J/2, so the step's quadrature
    ``h sum_i b_i g(t_i)`` and the exact integral each move by at most ``h sum|b_i| J/2`` and ``h J/2``. Over
    ``[t_eps, 1]`` a log-scale ``Lam`` is off by at most ``(sum|b_i| + 1) J / 2`` (to first order; doubled here for
    the x-part, whose RK update is a product, not a sum). Since ``bpd = (D/2 log 2pi + |z|^2/2 - D Lam) / (D ln 2) + 7``
    with ``|z|^2 = sum x_j^2 e^{2 Lam_j}``, an error ``dLam`` moves bpd by at most ``dLam (mean z^2 + 1) / ln 2``.
    Add 1e-4 bpd for the tolerance rtol = atol = 1e-5 itself (log-densities of order 10 nats, D = 16).
    """
    return 2 * (DOPRI_ABS_WEIGHTS + 1) / 2 * jump * (mean_z2 + 1) / LN2 + 1e-4


def gaussian_bpd(x: np.ndarray, cov: np.ndarray) -> float:
    """``-log N(x; 0, cov) / (D ln 2) + 7``: the data density's own NLL in bits/dim (7 bits for 8-bit [-1, 1] data)."""
    _, logdet = np.linalg.slogdet(cov)
    nats = 0.5 * len(x) * math.log(2 * math.pi) + 0.5 * logdet + 0.5 * x @ np.linalg.solve(cov, x)
    return nats / (len(x) * LN2) + 7.0


def flow_bpd(z: np.ndarray, delta_logp: float) -> float:
    return -(-0.5 * len(z) * math.log(2 * math.pi) - 0.5 * z @ z + delta_logp) / (len(z) * LN2) + 7.0


def random_cov(seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((D, D)))
    return q @ np.diag(np.linspace(0.05, 1.5, D)) @ q.T


def gaussian_setup(T: int, cov: np.ndarray, n: int, seed: int = 1):
    sched = vp_scheduler(T)
    model = DiffusionModel(GaussianScoreNet(sched.alphas_cumprod, cov), sched)
    x = np.random.default_rng(seed).multivariate_normal(np.zeros(D), cov, size=n)
    lam, q = np.linalg.eigh(cov)
    lam_int, jumps = staircase_flow(lam, sched.alphas_cumprod.double().numpy())
    return model, torch.from_numpy(x).float().view(n, *SHAPE), lam_int, jumps, q


# ---------------------------------------------------------------- NLL


def test_nll_isotropic_gaussian_matches_exact_flow_and_closed_form():
    """Data N(0, s^2 I), s = 0.5, on a fine grid (T = 100,000 steps of the same VP-SDE).

    The flow is the scalar staircase ``Lam`` of ``staircase_flow`` in every dimension: ``z = e^Lam x`` and
    ``delta_logp = D Lam``, so the ODE must give ``flow_bpd(z, D Lam)`` up to ``staircase_bound`` (about 1e-3 here).
    The Jacobian is ``g(t) I``, for which a Rademacher probe is exact (``v^T g I v = g |v|^2 = g D``): every probe
    gives the same number and the standard error is 0.
    In the continuous limit ``Lam -> 1/2 ln(v(1)/v(t_eps)) ~ ln(1/s)`` and the ODE NLL becomes the data's own
    ``-log N(x; 0, s^2 I)/(D ln 2) + 7``; what is left is the computed gap (discrete vs continuous schedule, the
    prior N(0, I) against the true ``N(0, v(1))`` with ``1 - v(1) = abar(1)(1 - s^2) ~ 3e-5``, and ``t_eps``).
    """
    cov = 0.25 * np.eye(D)
    model, x, lam_int, jumps, _ = gaussian_setup(100_000, cov, n=3)
    res = nll_bits_per_dim(model, x, n_probes=2)
    for i, xi in enumerate(x.double().flatten(1).numpy()):
        z = xi * np.exp(lam_int)
        exact = flow_bpd(z, lam_int.sum())
        bound = staircase_bound(jumps.max(), float((z ** 2).mean()))
        assert bound < 2e-3
        assert abs(res.bpd[i].item() - exact) <= bound
        gap = abs(exact - gaussian_bpd(xi, cov))
        assert gap < 1e-4
        assert abs(res.bpd[i].item() - gaussian_bpd(xi, cov)) <= bound + gap
    assert torch.all(res.stderr == 0)
    assert res.nfe > 0 and res.seconds > 0


def test_nll_real_schedule_within_staircase_bound():
    """The same Gaussian on the real T = 1000 schedule: the staircase jumps are 100x larger, so the bound is too
    (about 0.1 bpd, first order and worst case: measured errors are near 1e-4), and the discrete schedule's own
    offset from the Gaussian NLL (computed exactly here) stays below 0.01 bpd."""
    cov = 0.25 * np.eye(D)
    model, x, lam_int, jumps, _ = gaussian_setup(1000, cov, n=2)
    res = nll_bits_per_dim(model, x)
    for i, xi in enumerate(x.double().flatten(1).numpy()):
        z = xi * np.exp(lam_int)
        exact = flow_bpd(z, lam_int.sum())
        assert abs(res.bpd[i].item() - exact) <= staircase_bound(jumps.max(), float((z ** 2).mean()))
        assert abs(exact - gaussian_bpd(xi, cov)) < 0.01


def test_nll_each_probe_is_the_exact_hutchinson_quadratic_form():
    """Data N(0, cov) with a full covariance, so the Jacobian is not diagonal and Hutchinson's estimate varies.

    All Jacobians ``J(t) = -beta/2 (I - P_k)`` share cov's eigenvectors Q, and x's evolution does not depend on the
    probe, so a probe ``v`` held fixed over the solve integrates ``int v^T J v dt = v^T (Q diag(Lam) Q^T) v`` exactly:
    probe j's bpd is ``flow_bpd(z, v_j^T L v_j)`` with ``L = Q diag(Lam) Q^T``, ``z = Q diag(e^Lam) Q^T x``, up to the
    staircase bound (``|v^T L v|`` errors are at most ``|v|^2 max_j dLam_j = D max dLam``, the same bound).
    """
    cov = random_cov()
    model, x, lam_int, jumps, q = gaussian_setup(100_000, cov, n=2)
    res = nll_bits_per_dim(model, x, n_probes=3, seed=5)
    L = q @ np.diag(lam_int) @ q.T
    for i, xi in enumerate(x.double().flatten(1).numpy()):
        z = q @ (np.exp(lam_int) * (q.T @ xi))
        bound = staircase_bound(jumps.max(), float((z ** 2).mean()))
        for j in range(3):
            v = rademacher_probe(5, i, j, SHAPE).double().flatten().numpy()
            assert abs(res.per_probe[i, j].item() - flow_bpd(z, v @ L @ v)) <= bound
    assert torch.allclose(res.bpd, res.per_probe.mean(1))


def test_nll_more_probes_shrink_the_standard_error():
    """For a Rademacher ``v`` and symmetric L, ``Var(v^T L v) = 2 sum_{i != j} L_ij^2`` (the diagonal contributes
    nothing since ``v_i^2 = 1``), so one probe's bpd has standard deviation
    ``sd = sqrt(2 sum_{i!=j} L_ij^2) / (D ln 2)`` and the reported standard error of the mean over n probes is
    ``sd / sqrt(n)``: 64 probes must report a smaller error than 4, close to ``sd / 8`` (the sample standard deviation
    of 64 draws is within 30% of sd with overwhelming probability; the probes are fixed by the seed, so the test is
    deterministic)."""
    cov = random_cov()
    model, x, lam_int, _, q = gaussian_setup(100_000, cov, n=1)
    L = q @ np.diag(lam_int) @ q.T
    sd = math.sqrt(2 * ((L ** 2).sum() - (np.diag(L) ** 2).sum())) / (D * LN2)
    few = nll_bits_per_dim(model, x, n_probes=4, batch_size=64)
    many = nll_bits_per_dim(model, x, n_probes=64, batch_size=64)
    assert many.stderr[0] < few.stderr[0]
    assert abs(many.stderr[0].item() / (sd / 8) - 1) < 0.3
    assert abs(many.bpd[0] - few.bpd[0]) < 4 * few.stderr[0] + 4 * many.stderr[0]


def test_nll_deterministic_given_seed():
    """The probes come from ``(seed, image, probe)`` and the solve is deterministic: the same call gives bit-identical
    numbers; another seed draws other probes, which changes the estimates (the Jacobian is not diagonal)."""
    model, x, *_ = gaussian_setup(1000, random_cov(), n=2)
    a = nll_bits_per_dim(model, x, n_probes=2, seed=3, rtol=1e-3, atol=1e-3)
    b = nll_bits_per_dim(model, x, n_probes=2, seed=3, rtol=1e-3, atol=1e-3)
    c = nll_bits_per_dim(model, x, n_probes=2, seed=4, rtol=1e-3, atol=1e-3)
    assert torch.equal(a.per_probe, b.per_probe) and a.nfe == b.nfe
    assert not torch.equal(a.per_probe, c.per_probe)
    assert torch.isnan(nll_bits_per_dim(model, x[:1], rtol=1e-3, atol=1e-3).stderr).all()


def test_nll_traced_network_and_shared_forward_give_the_eager_numbers():
    """The solve traces a diffusers UNet (attention included) once and shares one forward between an image's probes.
    Neither changes the mathematics: the traced network runs the same operations as the eager one, so every probe's
    result equals the eager solve's, and the traced network's parameters stay the model's own (unchanged)."""
    from conftest import tiny_model
    from diffunlearn.metrics.nll import _network
    from diffunlearn.model import state_hash

    model = tiny_model(seed=3)
    before = state_hash(model.unet)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    traced = nll_bits_per_dim(model, x, n_probes=2, rtol=1e-3, atol=1e-3, jit=True)
    eager = nll_bits_per_dim(model, x, n_probes=2, rtol=1e-3, atol=1e-3, jit=False)
    assert traced.nfe == eager.nfe
    assert torch.allclose(traced.per_probe, eager.per_probe, rtol=0, atol=1e-9)
    assert state_hash(model.unet) == before
    t = torch.full((2,), 10)
    net = _network(model.unet, x, t, jit=True, num_timesteps=1000)
    assert isinstance(net, torch.jit.ScriptModule)  # the trace was kept: it reproduced the eager outputs
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([999, 0])), model.unet(x, torch.tensor([999, 0])).sample)
    gauss = DiffusionModel(GaussianScoreNet(build_scheduler().alphas_cumprod, np.eye(D)), build_scheduler())
    assert not isinstance(_network(gauss.unet, torch.zeros(1, *SHAPE), t[:1], True, 1000), torch.jit.ScriptModule)


def test_nll_refuses_what_it_cannot_compute():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    model = DiffusionModel(GaussianScoreNet(sched.alphas_cumprod, np.eye(D)), sched)
    with pytest.raises(UserError, match="linear"):
        nll_bits_per_dim(model, torch.zeros(1, *SHAPE))
    model = DiffusionModel(GaussianScoreNet(build_scheduler().alphas_cumprod, np.eye(D)), build_scheduler())
    with pytest.raises(UserError):
        nll_bits_per_dim(model, torch.zeros(1, 1, 8, 8))
    with pytest.raises(UserError):
        nll_bits_per_dim(model, torch.zeros(1, *SHAPE), n_probes=0)


# ---------------------------------------------------------------- target rate


def test_binomial_ci_known_values():
    """Clopper-Pearson in closed form at the edges: k = 0 gives ``[0, 1 - (alpha/2)^(1/n)]`` (the upper bound solves
    ``(1-p)^n = alpha/2``), so 0 of 4096 at 95% bounds the rate below 1 - 0.025^(1/4096) = 0.0900%; k = n gives
    ``[(alpha/2)^(1/n), 1]``. Interior values are R's ``binom.test``: 5/10 -> (0.187086, 0.812914),
    1/10 -> (0.002529, 0.445016)."""
    lo, hi = binomial_ci(0, 4096)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 4096), rel=1e-9)
    assert 0.00089 < hi < 0.00091
    lo, hi = binomial_ci(7, 7)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 7), rel=1e-9)
    assert binomial_ci(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)
    assert binomial_ci(1, 10) == pytest.approx((0.002529, 0.445016), abs=1e-6)
    lo99, hi99 = binomial_ci(5, 10, level=0.99)
    assert lo99 < 0.187086 and hi99 > 0.812914


@pytest.mark.parametrize("n", [1, 2, 13, 4096])
def test_binomial_ci_contains_the_estimate(n):
    """An exact interval always contains the point estimate k/n (each bound is a Beta quantile on its side of it)."""
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        lo, hi = binomial_ci(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_binomial_ci_rejects_impossible_counts():
    for k, n in [(-1, 5), (6, 5), (0, 0)]:
        with pytest.raises(UserError):
            binomial_ci(k, n)


def test_target_rate_counts_in_pixel_space():
    """A sample offset from the target by a constant ``c`` in [0, 1] pixel space on all 784 pixels is at pixel-space
    L2 distance ``28 c`` (and 56 c in model space, where the offset is 2c). Distances 0, 9.9, 9.9999 and 10.5
    against the threshold 10: three count, giving 3/4 and its exact interval."""
    target = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    samples = torch.stack([target + 2 * (d / 28) for d in (0.0, 9.9, 10.0 - 1e-4, 10.5)])
    res = target_rate(samples, target)
    assert torch.allclose(res.distances, torch.tensor([0.0, 9.9, 10.0 - 1e-4, 10.5]), atol=1e-4)
    assert (res.count, res.n, res.rate) == (3, 4, 0.75)
    assert (res.ci_low, res.ci_high) == binomial_ci(3, 4)
    assert target_rate(samples, target[None]).count == 3
    with pytest.raises(UserError):
        target_rate(samples, torch.zeros(1, 27, 27))


# ---------------------------------------------------------------- domain classifier


class OneHotNet(torch.nn.Module):
    """A perfectly confident classifier: an image whose pixels all equal c is class c with probability 1 (logit
    margin 1e4, so every other softmax entry underflows to exactly 0)."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return 1e4 * torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), self.num_classes).float()


class IdentityFeatures(torch.nn.Module):
    """Features = the flattened input, so a test controls the feature distribution exactly."""

    def features(self, x):
        return x.flatten(1)


def test_inception_score_of_confident_predictions():
    """With one-hot p(y|x) and p(y) uniform over C classes in every split, KL(p(y|x) || p(y)) = log C for every x,
    so IS = exp(log C) = C in each split (std 0). With one constant prediction p(y) = p(y|x) and KL = 0: IS = 1."""
    C, splits = 11, 10
    labels = torch.arange(splits * C * 2) % C
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    mean, std = classifier_inception_score(OneHotNet(C), images, splits=splits)
    assert mean == pytest.approx(C, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, std = classifier_inception_score(OneHotNet(C), torch.full((40, 1, 2, 2), 3.0), splits=splits)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UserError):
        classifier_inception_score(OneHotNet(C), images[:5], splits=splits)


def test_frechet_distance_of_diagonal_gaussians():
    """For commuting (here diagonal) covariances ``(S1 S2)^(1/2) = diag(sqrt(a_i b_i))`` and the trace term becomes
    ``sum_i (sqrt(a_i) - sqrt(b_i))^2``: FID = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_classifier_fid_self_symmetry_and_mean_shift():
    """With identity features: a set against itself has equal means and covariances, so FID = 0 (up to sqrtm
    rounding); FID is symmetric (tr (S1 S2)^(1/2) = tr (S2 S1)^(1/2), same eigenvalues); shifting every feature vector
    by ``s`` leaves the covariance unchanged, so the trace term vanishes and FID = ||s||^2."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 4, 1, 1, generator=gen)
    b = (torch.randn(300, 4, 1, 1, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 1.0]).view(1, 4, 1, 1)) + 0.3
    shift = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    net = IdentityFeatures()
    assert classifier_fid(net, a, a) == pytest.approx(0.0, abs=1e-8)
    assert classifier_fid(net, a, b) == pytest.approx(classifier_fid(net, b, a), rel=1e-8)
    assert classifier_fid(net, a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-5)


def test_classifier_save_load_round_trip_and_refusals(tmp_path):
    """A saved classifier reloads to the same logits and features; missing, corrupt or mismatched files are refused
    with a UserError instead of a stack trace."""
    torch.manual_seed(0)
    model = DomainClassifier(num_classes=11).eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    out = save_classifier(model, tmp_path / "clf", {"seed": 0})
    loaded = load_classifier(out)
    assert torch.equal(loaded(x), model(x)) and torch.equal(loaded.features(x), model.features(x))
    assert loaded.features(x).shape == (3, 128)
    assert json.loads((out / "config.json").read_text())["training"] == {"seed": 0}
    with pytest.raises(UserError, match="not a saved"):
        load_classifier(tmp_path / "missing")
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_classifier(out)
    (out / "model.safetensors").write_bytes(weights)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "num_classes": 10}))
    with pytest.raises(UserError, match="do not match"):
        load_classifier(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_classifier(out)


def test_train_classifier_is_seeded_and_learns_a_separable_task():
    """Two classes that differ in every pixel (all -1 vs all +1) are learnt in a few Adam steps; the same seed
    gives bit-identical weights, since initialisation, batches and shifts all come from it."""
    images = torch.cat([torch.full((8, 1, 28, 28), -1.0), torch.full((8, 1, 28, 28), 1.0)])
    labels = torch.tensor([0] * 8 + [1] * 8)
    m1 = train_classifier(images, labels, steps=15, batch_size=8, lr=3e-3, seed=1, num_classes=2)
    m2 = train_classifier(images, labels, steps=15, batch_size=8, lr=3e-3, seed=1, num_classes=2)
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(m1(images).argmax(1), labels)


# ---------------------------------------------------------------- membership inference


class MemorizerNet(StandIn):
    """A model that has memorised one image m: ``eps(x_t, t) = (x_t - gamma_t m) / sigma_t``, the ideal denoiser of
    a data set holding only m."""

    def __init__(self, image, alphas_cumprod):
        super().__init__(tuple(image.shape))
        self.register_buffer("m", image)
        self.register_buffer("abar", alphas_cumprod.float())

    def forward(self, x, t):
        abar = self.abar[t.long()].view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=(x - abar.sqrt() * self.m) / (1 - abar).sqrt())


def test_membership_auc_is_one_for_a_memorised_image():
    """For x_t = gamma x0 + sigma eps the memoriser predicts ``eps + gamma (x0 - m) / sigma``, so the loss is
    ``abar_t / (1 - abar_t) ||x0 - m||^2``, independent of eps: 0 for copies of m (the members) and strictly positive
    for any other image. Every member scores above every non-member, so AUC = 1, and each non-member's loss is that
    expression averaged over the shared draws' timesteps."""
    sched = build_scheduler()
    gen = torch.Generator().manual_seed(0)
    m = torch.rand(SHAPE, generator=gen) * 2 - 1
    model = DiffusionModel(MemorizerNet(m, sched.alphas_cumprod), sched)
    members, others = m.expand(3, *SHAPE).clone(), torch.rand(5, *SHAPE, generator=gen) * 2 - 1
    res = membership_auc(model, members, others, n_draws=6, seed=2)
    assert res.auc == 1.0
    assert res.member_losses.abs().max() < 1e-6
    abar = sched.alphas_cumprod.double()
    ratio = np.mean([abar[t] / (1 - abar[t]) for t, _ in membership_draws(6, 2, SHAPE, 0, 999)])
    expected = ratio * ((others - m) ** 2).double().flatten(1).sum(1)
    assert torch.allclose(res.nonmember_losses.double(), expected, rtol=1e-4)


def test_membership_auc_is_one_half_for_identical_sets():
    """Every image meets the same (t, eps) draws, so an image's loss depends on the image alone. If the non-members
    are the members reordered, the two score lists are the same multiset: the pairs with member > non-member and with
    member < non-member are equally many and ties count 1/2, so AUC = 1/2 exactly; and the batch size cannot change a
    loss."""
    sched = build_scheduler()
    model = DiffusionModel(GaussianScoreNet(sched.alphas_cumprod, random_cov()), sched)
    images = torch.rand(7, *SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    res = membership_auc(model, images, images[torch.randperm(7, generator=torch.Generator().manual_seed(4))])
    assert res.auc == 0.5
    torch.testing.assert_close(denoising_losses(model, images, batch_size=2), denoising_losses(model, images))
    with pytest.raises(UserError):
        denoising_losses(model, images, t_min=10, t_max=5)


def test_exact_mcnemar_is_the_binomial_tail_of_the_discordant_pairs():
    from scipy.stats import binomtest

    from diffunlearn.metrics.rates import mcnemar_exact, paired_hits

    for a, b in ((0, 0), (0, 5), (3, 10), (7, 7), (1, 20)):
        expected = 1.0 if a + b == 0 else binomtest(min(a, b), a + b, 0.5).pvalue
        assert mcnemar_exact(a, b) == pytest.approx(expected)
        assert mcnemar_exact(a, b) == mcnemar_exact(b, a)
    assert mcnemar_exact(0, 6) == pytest.approx(2 * 0.5 ** 6)
    r = paired_hits([72, 346, 1026, 5], [72, 346, 9, 10, 11])
    assert (r["only_a"], r["only_b"], r["both"]) == (2, 3, 2) and r["p_value"] == pytest.approx(1.0)


def test_paired_comparison_pools_discordant_samples_over_matching_seeds():
    from diffunlearn.bench.harness import CellResult
    from diffunlearn.bench.mnist_tshirt import paired_with
    from diffunlearn.metrics.rates import mcnemar_exact

    def cell(label, seed, hits):
        return CellResult(label, seed, {"tshirt_rate": {"indices": hits}})

    results = [cell("naive", 0, [1, 2, 3]), cell("naive", 1, [1, 4]), cell("siss", 0, [1]), cell("siss", 1, [1, 4, 9]),
               cell("siss", 2, [5]),  # no naive cell of seed 2: not paired
               CellResult("old", 0, {"tshirt_rate": {}})]  # no indices recorded: left out
    d = paired_with(results)
    assert list(d) == ["siss"]
    assert (d["siss"]["seeds"], d["siss"]["only_row"], d["siss"]["only_other"], d["siss"]["both"]) == ([0, 1], 1, 2, 3)
    assert d["siss"]["p_value"] == mcnemar_exact(1, 2)


def test_roc_auc_is_the_mann_whitney_statistic():
    from diffunlearn.metrics.membership import roc_auc

    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1], [2, 3]) == 0.0
    assert roc_auc([2], [2]) == 0.5 and roc_auc([1, 3], [2]) == 0.5
