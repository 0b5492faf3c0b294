"""The ideal denoiser of a finite set (the toy benchmark's gold standard) and the toy benchmark end to end."""

from __future__ import annotations

import json

import pytest
import torch

from diffunlearn.model import build_scheduler
from diffunlearn.model.ideal import IdealDenoiser, ideal_eps, posterior_mean
from diffunlearn.model.schedule import gamma_sigma

ABAR = build_scheduler(1000).alphas_cumprod


def _points(n: int, seed: int = 0, shape=(1, 4, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g, dtype=torch.float64) * 2 - 1


def _noised(clean: torch.Tensor, t: torch.Tensor, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(clean.shape, generator=g, dtype=torch.float64)
    gamma, sigma = gamma_sigma(ABAR, t)
    return gamma.double() * clean + sigma.double() * eps, eps


def test_ideal_denoiser_is_the_score_of_the_gaussian_mixture():
    """Under the forward process the marginal of x_t is the mixture p_t(x) = (1/n) sum_i N(x; gamma s_i, sigma^2 I), so

        grad log p_t(x) = sum_i w_i(x) (gamma s_i - x) / sigma^2,   w_i = softmax_i(-||x - gamma s_i||^2 / (2 sigma^2)),

    and -sigma grad log p_t(x) = (x - gamma sum_i w_i s_i) / sigma = eps*(x, t) (Tweedie's formula). The score is taken
    here by autograd of log sum_i exp(-||x - gamma s_i||^2 / (2 sigma^2)) (the normalising constants do not depend
    on x), in float64, for one timestep per row (small to large t, where the weights go from one-hot to spread out).
    """
    data = _points(7)
    t = torch.tensor([0, 3, 20, 80, 250, 500, 900, 999])
    x, _ = _noised(data[torch.arange(len(t)) % len(data)] + 0.3, t)
    x = x.clone().requires_grad_(True)
    gamma, sigma = (v.double() for v in gamma_sigma(ABAR, t))
    d2 = (x.flatten(1)[:, None, :] - gamma.view(-1, 1, 1) * data.flatten(1)[None]).pow(2).sum(-1)
    logp = torch.logsumexp(-d2 / (2 * sigma.view(-1, 1) ** 2), dim=1)
    (score,) = torch.autograd.grad(logp.sum(), x)
    expected = -sigma * score
    got = ideal_eps(x.detach(), t, data, ABAR)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_ideal_denoiser_of_one_point_is_the_exact_noise():
    """With S = {s} the posterior puts all its mass on s whatever x_t is, so E[x0|x_t] = s and
    eps*(x_t, t) = (x_t - gamma_t s) / sigma_t exactly; for x_t = gamma_t s + sigma_t eps that is eps itself."""
    s = _points(1, seed=3)
    t = torch.tensor([0, 1, 10, 100, 500, 999])
    x, eps = _noised(s.expand(len(t), -1, -1, -1), t)
    x = x + 5.0  # far from gamma s: the weights must still be exactly one (no 0/0 from underflow)
    gamma, sigma = (v.double() for v in gamma_sigma(ABAR, t))
    torch.testing.assert_close(ideal_eps(x, t, s, ABAR), (x - gamma * s) / sigma, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(posterior_mean(x, t, s, ABAR), s.expand_as(x), rtol=0, atol=1e-15)


def test_ideal_denoiser_recovers_the_noise_of_a_data_point_at_small_sigma():
    """At x_t = gamma_t a + sigma_t eps with a in X, the log-weight of another point b relative to a is
    -(||x_t - gamma b||^2 - ||sigma eps||^2) / (2 sigma^2) ~ -gamma^2 ||a - b||^2 / (2 sigma^2): with the toy digits
    (distinct images at L2 distance >= ~1 in model space) and sigma_0 ~ 0.01 that is below -1000, so the posterior
    is one-hot on a (its copies included) and eps* = eps up to rounding. At a large sigma it is not (a check that the
    test can fail)."""
    from diffunlearn.data import load_data

    data = load_data("toy-digits")
    X = data.images.load().double()
    rows = torch.tensor([0, 17, 101, 239, 240, 255])  # real digits and copies of the forget target
    for t, close in ((0, True), (2, True), (800, False)):
        tt = torch.full((len(rows),), t)
        x, eps = _noised(X[rows], tt)
        err = (ideal_eps(x, tt, X, ABAR) - eps).abs().max()
        assert (err < 1e-6) == close, (t, float(err))


def test_ideal_denoiser_batches_per_row_timesteps_and_stays_finite():
    """A batch with one timestep per row equals row-by-row calls (and chunking does not matter); points very far from
    every gamma s_i give finite outputs (softmax over logits of -1e8 subtracts the row maximum)."""
    data = _points(9, seed=5)
    t = torch.tensor([0, 7, 150, 600, 999, 42])
    x, _ = _noised(data[:6], t)
    batched = ideal_eps(x, t, data, ABAR, batch_size=4)
    rows = torch.cat([ideal_eps(x[i:i + 1], int(t[i]), data, ABAR) for i in range(len(t))])
    torch.testing.assert_close(batched, rows, rtol=1e-12, atol=1e-12)
    far = torch.full((2, 1, 4, 4), 1e4, dtype=torch.float64)
    assert torch.isfinite(ideal_eps(far, torch.tensor([0, 999]), data, ABAR)).all()
    module = IdealDenoiser(data, ABAR)
    torch.testing.assert_close(module(x.float(), t).sample.double(), batched, rtol=1e-5, atol=1e-5)


def test_bench_command_refuses_a_non_empty_out_dir(tmp_path, capsys):
    """``bench toy`` checks --out before training anything: a non-empty directory is refused without --overwrite."""
    from diffunlearn import cli
    from diffunlearn.commands.bench import register

    register(cli.COMMANDS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["bench", "toy", "--quick", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x" and len(list(out.iterdir())) == 1


def test_toy_bench_quick_end_to_end(tmp_path):
    """The quick benchmark (tiny trainings, 5 unlearning steps) writes its three outputs, has a row for the pretrained
    model, the retrain gold standard and every registered method, and ranks retrain ahead of the pretrained model in
    the direction that matters.

    Expectation: near A the ideal X denoiser points back to a (A is in X), the ideal X \\ A denoiser to the nearest
    other digits; the retrained model never saw a, so its noise predictions there lie further along the segment
    eps*_X -> eps*_X\\A than the pretrained model's: ``progress`` (the least-squares position on that segment,
    0 = eps*_X, 1 = eps*_X\\A) is larger for retrain. It held with a margin of 0.06-0.07 at seeds 0, 1, 2 after only
    300 steps (about 0.45 vs 0.38).

    The raw mean squared distance to eps*_X\\A is NOT asserted here: at small t it is dominated by the memorisation
    error of the finite-set ideal (eps*_X\\A near a is ~2 per dim at t = 50), which no generalising network closes,
    so with the quick trainings it ranks retrain first at some seeds and not at others (retrain 0.797 vs pretrained
    0.809 at seed 0, but 0.803 vs 0.786 at seed 1). The full benchmark (800 steps) ranks retrain first on it too.
    """
    from diffunlearn.bench.toy import method_list, run_toy_bench

    res = run_toy_bench(tmp_path / "bench", seed=0, quick=True)
    out = tmp_path / "bench"
    for name in ("results.json", "results.md", "toy.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = ["pretrained", "retrain"] + [label for label, _, _ in method_list(_cfg(res))]
    table = (out / "results.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in saved["rows"]] == labels
    for label in labels:
        assert f"| {label} |" in table, label
    from diffunlearn.methods import METHODS

    for name in METHODS:  # every registered method has a row (retrain: the full-recipe retrain replaces it)
        assert name in labels
    rows = {r["label"]: r["metrics"] for r in res["rows"]}
    assert rows["retrain"]["near_A"]["progress"] > rows["pretrained"]["near_A"]["progress"] + 0.02
    assert rows["retrain"]["near_A"]["retrain"] == pytest.approx(0.0, abs=1e-12)
    for r in res["rows"]:
        m = r["metrics"]
        assert all(torch.isfinite(torch.tensor(v)) for v in (m["near_A"]["ideal_kept"], m["elsewhere"]["ideal_kept"]))
    # golden numbers pinned before the benchmarks were reorganised: (progress near A, distance to the ideal X \ A
    # denoiser elsewhere) of every row at seed 0; a reorganisation must not move them beyond float32 rounding
    for r in res["rows"]:
        got = [r["metrics"]["near_A"]["progress"], r["metrics"]["elsewhere"]["ideal_kept"]]
        assert got == pytest.approx(TOY_GOLDEN[r["label"]], rel=1e-4), r["label"]


TOY_GOLDEN = {
    'pretrained': [0.37870383959763176, 0.27253847279079396],
    'retrain': [0.4463086076569987, 0.2639034486771048],
    'naive': [0.38307219503378875, 0.2721275361515956],
    'neggrad': [0.46723904983983733, 0.29007014231946926],
    'siss': [0.3832021919639114, 0.27276396294773475],
    'siss-nois': [0.38782588719632277, 0.27207221951317995],
    'erasediff': [0.32412284413748293, 0.28197950513780506],  # re-pinned: inner steps unclipped, as released
    'erasediff-light': [0.37757153659821263, 0.27277452592818624],
    'retrack': [0.3846887093407605, 0.27214788419815084],
}


def _cfg(res):
    from diffunlearn.bench.toy import ToyBenchConfig

    cfg = dict(res["config"])
    cfg["probe_timesteps"] = tuple(cfg["probe_timesteps"])
    return ToyBenchConfig(**cfg)
