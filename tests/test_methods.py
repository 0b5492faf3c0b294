"""The unlearning methods' mathematics, on a tiny random-weight UNet with a fixed noise model."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from conftest import random_sets, tiny_model
from diffunlearn.methods import METHODS, Context, make_method
from diffunlearn.methods.base import GradStep, global_norm
from diffunlearn.methods.retrack import nearest_kept
from diffunlearn.methods.siss import SubtractedGradients
from diffunlearn.model.schedule import ddpm_loss
from diffunlearn.trainer import RowSampler, TrainerConfig, unlearn


def _ctx(model, kept, forget, seed=0):
    T = model.num_train_timesteps
    return Context(model.alphas_cumprod(), kept, forget, 0, T - 1, torch.device("cpu"),
                   torch.Generator().manual_seed(seed))


def _mean_and_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.75])
def test_siss_terms_are_unbiased_for_naive_deletion_and_neggrad(lam):
    """Importance sampling (SISS paper eq. 4-7): with ``m ~ q_lambda(.|x, a) = (1-l) q(.|x) + l q(.|a)``,

        E_m[w_x ||eps_theta(m) - (m - g x)/s||^2] = int q(m|x) ||eps_theta(m) - (m - g x)/s||^2 dm
                                                  = E_eps ||eps_theta(g x + s eps) - eps||^2,

    the naive-deletion loss of x; likewise ``w_a`` gives A's DDPM loss (the NegGrad term), for every lambda in (0, 1).
    Both sides are estimated by Monte Carlo with independent draws for a fixed model; they must agree within
    4.5 standard errors of the difference (a false failure has probability below 1e-5 per comparison).
    """
    model, (kept, forget) = tiny_model(), random_sets()
    method = make_method("siss", lam=lam)
    n = 6000
    with torch.no_grad():
        rows = RowSampler(kept, forget, method, 0, 999, seed=1).draw(n)
        terms = method.terms(model.unet, rows, _ctx(model, kept, forget)).losses
        direct = RowSampler(kept, forget, method, 0, 999, seed=2).draw(n)
        abar = model.alphas_cumprod()
        naive = ddpm_loss(model.unet, direct.x, direct.eps, direct.t, abar)
        neggrad = ddpm_loss(model.unet, direct.a, direct.eps, direct.t, abar)
    for is_term, target in ((terms["x"], naive), (terms["a"], neggrad)):
        (m1, s1), (m2, s2) = _mean_and_se(is_term), _mean_and_se(target)
        assert abs(m1 - m2) < 4.5 * math.hypot(s1, s2), (lam, m1, m2, s1, s2)


def test_siss_at_lambda_zero_is_naive_deletion_exactly():
    """At ``lambda = 0`` every row is ``m = g x + s eps`` and ``w_x = 1`` exactly, so ``L_x`` equals the naive-deletion
    loss row by row (same x, eps, t): the lambda = 0 ablation is naive deletion plus a weighted A term."""
    model, (kept, forget) = tiny_model(), random_sets()
    method = make_method("siss", lam=0.0)
    with torch.no_grad():
        rows = RowSampler(kept, forget, method, 0, 999, seed=0).draw(64)
        lx = method.terms(model.unet, rows, _ctx(model, kept, forget)).losses["x"]
        ref = ddpm_loss(model.unet, rows.x, rows.eps, rows.t, model.alphas_cumprod())
    torch.testing.assert_close(lx, ref, rtol=1e-5, atol=1e-5)


def test_siss_at_lambda_one_is_neggrad_exactly():
    """At ``lambda = 1`` every row is ``m = g a + s eps`` and ``w_a = 1``: ``L_a`` is A's DDPM loss row by row."""
    model, (kept, forget) = tiny_model(), random_sets()
    method = make_method("siss", lam=1.0)
    with torch.no_grad():
        rows = RowSampler(kept, forget, method, 0, 999, seed=0).draw(64)
        terms = method.terms(model.unet, rows, _ctx(model, kept, forget)).losses
        ref = ddpm_loss(model.unet, rows.a, rows.eps, rows.t, model.alphas_cumprod())
    torch.testing.assert_close(terms["a"], ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(terms["x"]).all()


@pytest.mark.parametrize("scaling_norm", [0.0, 0.3, 5.0, 500.0])
def test_norm_fixing_gives_a_neggrad_component_of_exactly_the_scaling_norm(scaling_norm):
    """``g = G_x - (s / ||G_a||) G_a``: the subtracted part has norm ``s / ||G_a|| * ||G_a|| = s`` whatever ||G_a||."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (7,), (2, 2, 2)]
    gx = [torch.randn(s, generator=g, dtype=torch.float64) * 30 for s in shapes]  # float64: no cancellation error
    ga = [torch.randn(s, generator=g, dtype=torch.float64) * 200 for s in shapes]
    out, stats = SubtractedGradients(scaling_norm=scaling_norm).combine({"x": gx, "a": ga})
    neg = [x - o for x, o in zip(gx, out)]
    assert float(global_norm(neg)) == pytest.approx(scaling_norm, rel=1e-6, abs=1e-9)
    assert stats["superfactor"] * stats["grad_norm_a"] == pytest.approx(scaling_norm, rel=1e-9)
    fixed, _ = SubtractedGradients(superfactor=0.5).combine({"x": gx, "a": ga})
    for f, x, a in zip(fixed, gx, ga):
        torch.testing.assert_close(f, x - 0.5 * a)


@pytest.mark.parametrize("name", ["siss", "siss-nois"])
def test_in_graph_subtraction_is_the_separate_buffers_update(name):
    """SISS's backward for one micro-batch in one process (G_a alone, then one backward of ``mean L_x - c mean L_a``
    into the parameters' gradients) gives ``G_x - c G_a`` with ``c = scaling_norm / ||G_a||``: the update ``combine``
    builds from both gradients taken separately, by linearity of the gradient, up to float rounding; so do the logged
    norms."""
    model, (kept, forget) = tiny_model(), random_sets()
    params = [p for p in model.unet.parameters() if p.requires_grad]
    ref_method, lean_method = make_method(name, scaling_norm=3.0), make_method(name, scaling_norm=3.0)
    rows = RowSampler(kept, forget, ref_method, 0, 999, seed=4).draw(8)
    ctx = _ctx(model, kept, forget)
    losses = ref_method.terms(model.unet, rows, ctx).losses
    gx = torch.autograd.grad(losses["x"].mean(), params, retain_graph=True)
    ga = torch.autograd.grad(losses["a"].mean(), params)
    want, want_stats = ref_method.combine({"x": list(gx), "a": list(ga)})
    step = GradStep(1, single=True, separate=True)
    lean_method.backward(lean_method.terms(model.unet, rows, ctx).losses, params, step)
    stats = lean_method.finish(params, step)
    diff = global_norm([p.grad - w for p, w in zip(params, want)])
    assert float(diff) <= 1e-5 * float(global_norm(want))  # float32 rounding, relative to the update's size
    for k in ("grad_norm_x", "grad_norm_a", "superfactor"):
        assert stats[k] == pytest.approx(want_stats[k], rel=1e-5), k
    assert stats["superfactor"] * stats["grad_norm_a"] == pytest.approx(3.0, rel=1e-9)


def test_norm_fixing_holds_in_a_training_run():
    """Every logged step satisfies ``superfactor * ||G_a|| = scaling_norm`` (the update really used norm-fixing)."""
    model, (kept, forget) = tiny_model(), random_sets()
    logs = []
    unlearn(model, kept, forget, make_method("siss", scaling_norm=2.5), TrainerConfig(steps=3, batch_size=4),
            log=logs.append)
    assert len(logs) == 3
    for rec in logs:
        assert rec["superfactor"] * rec["grad_norm_a"] == pytest.approx(2.5, rel=1e-6)


@pytest.mark.parametrize("name,calls_per_micro", [("siss", 1), ("siss-nois", 2), ("naive", 1), ("neggrad", 1),
                                                  ("retrack", 1), ("erasediff-light", 2)])
def test_forward_passes_per_micro_batch(name, calls_per_micro):
    """SISS evaluates the model once per micro-batch on the mixture sample; SISS (No IS) twice (x_t and a_t)."""
    model, (kept, forget) = tiny_model(), random_sets()
    calls = []
    model.unet.register_forward_hook(lambda *_: calls.append(1))
    steps, accum = 2, 3
    unlearn(model, kept, forget, make_method(name), TrainerConfig(steps=steps, batch_size=2, grad_accum=accum))
    assert len(calls) == steps * accum * calls_per_micro


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_trainable_parameter_changes_and_the_input_is_untouched(name):
    """After a few AdamW steps every parameter has moved (no dead or detached parameter), and the input model's
    weights are bit-for-bit what they were (the loop trains a copy)."""
    model, (kept, forget) = tiny_model(), random_sets()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    new = unlearn(model, kept, forget, make_method(name), TrainerConfig(steps=3, batch_size=4, lr=1e-3))
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, before[k]), f"input model changed: {k}"
    unchanged = [k for k, p in new.unet.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[k])]
    assert not unchanged, f"{name}: parameters did not change: {unchanged[:5]}"


@pytest.mark.parametrize("name", ["siss", "erasediff", "retrack"])
def test_same_seed_same_weights(name):
    """Every random choice comes from the seeded generator: two runs give identical weights; another seed does not."""
    (kept, forget) = random_sets()
    cfg = TrainerConfig(steps=3, batch_size=4, seed=7)
    a = unlearn(tiny_model(), kept, forget, make_method(name), cfg)
    b = unlearn(tiny_model(), kept, forget, make_method(name), cfg)
    c = unlearn(tiny_model(), kept, forget, make_method(name), TrainerConfig(steps=3, batch_size=4, seed=8))
    sa, sb, sc = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", ["siss", "naive", "erasediff-light"])
def test_batch_times_accumulation_does_not_change_the_update(name):
    """The rows of a step are drawn at once, so batch 1 x accumulation 8 and batch 8 x accumulation 1 see the same
    rows; the per-term means are then equal and so is the update, up to float summation order (which AdamW's
    normalisation amplifies to ~1e-6 on parameters whose true gradient is zero, such as attention key biases)."""
    (kept, forget) = random_sets()
    la, lb = [], []
    a = unlearn(tiny_model(), kept, forget, make_method(name), TrainerConfig(steps=2, batch_size=8, grad_accum=1),
                log=la.append)
    b = unlearn(tiny_model(), kept, forget, make_method(name), TrainerConfig(steps=2, batch_size=1, grad_accum=8),
                log=lb.append)
    for ra, rb in zip(la, lb):
        for k in ra:
            if k.startswith(("loss_", "grad_norm")):
                assert ra[k] == pytest.approx(rb[k], rel=1e-5), k
    for (k, va), vb in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=5e-6, msg=k)


def test_erasediff_restores_the_weights_after_its_inner_passes():
    """EraseDiff's inner problem moves theta (the optimiser really steps), then ``theta <- theta_i`` restores it:
    the parameters after ``before_step`` equal those before, while the optimiser state has advanced."""
    model, (kept, forget) = tiny_model(), random_sets()
    unet = model.unet.train()
    method = make_method("erasediff", inner_steps=2)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    sampler = RowSampler(kept, forget, method, 0, 999, seed=0)
    ctx = _ctx(model, kept, forget)
    ctx.unet, ctx.optimizer, ctx.batch_size, ctx.draw = unet, opt, 4, sampler.draw
    ctx.autocast = contextlib.nullcontext
    before = [p.detach().clone() for p in unet.parameters()]
    moved = []
    opt.register_step_post_hook(
        lambda *_: moved.append(any(not torch.equal(p, b) for p, b in zip(unet.parameters(), before))))
    stats = method.before_step(ctx)
    assert moved == [True, True]  # |A| = 3 fits one batch of 4: a pass over A is one step
    assert all(torch.equal(p, b) for p, b in zip(unet.parameters(), before))
    assert math.isfinite(stats["phi"])
    assert all(int(opt.state[p]["step"]) == 2 for p in unet.parameters())


@pytest.mark.parametrize("n_forget,adaptive", [(3, False), (5, False), (5, True)])
def test_erasediff_step_equals_the_released_algorithm_written_out(n_forget, adaptive):
    """The released EraseDiff, written out with plain torch on the same stream of draws: per pass of outer steps,
    save theta, K = 2 passes over A (P = ceil(|A| / B) batches each, one unclipped AdamW step per batch), restore
    theta, then P outer steps on L_r + lambda_e (L_f - phi), each clipped at --clip-norm; lambda_e fixed, or
    max(eta - cos(grad L_r, grad L_f), 0) with cos = <g_r, g_f> / (|g_r| |g_f| + 1e-8). |A| = 5 with B = 2 gives
    P = 3 (two outer passes in 6 steps); |A| = 3 with B = 4 gives P = 1. The trainer must end on the same weights.
    Attention key biases are left out: a bias added to every key shifts each query's logits by a constant, which the
    softmax ignores, so their exact gradient is zero and AdamW turns the float rounding left there into steps of its
    own size (they differ by up to 1e-3 while every other weight agrees to 1e-7)."""
    B, steps, K, lam, eta, clip = (4 if n_forget == 3 else 2), 6, 2, 0.1, 0.1, 0.05
    model, (kept, forget) = tiny_model(), random_sets(n_forget=n_forget)
    cfg = TrainerConfig(steps=steps, batch_size=B, lr=1e-3, clip_norm=clip, seed=3, data_workers=0,
                        checkpoint_every=0)
    got = unlearn(model, kept, forget, make_method("erasediff", inner_steps=K, lambda_e=lam, adaptive=adaptive,
                                                   eta=eta), cfg)

    class Uniform:  # the draws EraseDiff adds to each row: u ~ U[0, 1)
        def draw(self, n, shape, g):
            return {"u": torch.rand((n, *shape), generator=g)}

    unet = __import__("copy").deepcopy(model.unet).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    sampler = RowSampler(kept, forget, Uniform(), 0, 999, seed=cfg.seed)
    abar = model.alphas_cumprod()

    def loss(x0, noise, t):  # the released loss: sum over pixels, mean over the batch
        a = abar[t].view(-1, 1, 1, 1)
        return (noise - unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample).square().sum((1, 2, 3)).mean()

    P = -(-n_forget // B)
    for _ in range(steps // P):
        theta_i = [p.detach().clone() for p in params]
        for _ in range(K):
            for _ in range(P):
                r = sampler.draw(B, parts=("a",))
                opt.zero_grad()
                loss(r.a, r.extra["u"], r.t).backward()
                opt.step()
        with torch.no_grad():
            for p, s in zip(params, theta_i):
                p.copy_(s)
        for _ in range(P):
            r = sampler.draw(B)
            l_r, l_q = loss(r.x, r.eps, r.t), loss(r.a, r.extra["u"], r.t)  # phi is a constant: no gradient
            if adaptive:
                g_q = torch.autograd.grad(l_q, params, retain_graph=True)
                g_r = torch.autograd.grad(l_r, params, retain_graph=True)
                flat_q, flat_r = torch.cat([g.flatten() for g in g_q]), torch.cat([g.flatten() for g in g_r])
                cos = float(flat_r @ flat_q / (flat_r.norm() * flat_q.norm() + 1e-8))
                weight = max(eta - cos, 0.0)
            else:
                weight = lam
            opt.zero_grad()
            (l_r + weight * l_q).backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
    compared = 0
    for (k, want), have in zip(unet.state_dict().items(), got.unet.state_dict().values()):
        if not k.endswith("to_k.bias"):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6, msg=k)
            compared += 1
    assert compared > 100


def test_retrack_neighbours_come_from_the_kept_set_only():
    """A is placed inside X's bounding box with exact copies of A also *outside* the kept set: the neighbours must
    be the true k nearest (by brute force) among X \\ A, so never a member of A."""
    kept, forget = random_sets(n_kept=40, n_forget=4)
    idx = nearest_kept(forget, kept, 5)
    assert idx.shape == (4, 5)
    d = torch.cdist(forget.flatten(1).double(), kept.flatten(1).double())
    brute = d.topk(5, largest=False).indices
    assert torch.equal(idx.sort(1).values, brute.sort(1).values)
    method = make_method("retrack", knn=5)
    method.setup(_ctx(tiny_model(), kept, forget))
    assert torch.equal(method.neighbours, idx)
    assert int(method.neighbours.max()) < len(kept)


def test_retrack_redirect_target_is_the_posterior_over_neighbours():
    """With one neighbour, ``p = 1`` and ``L_unlearn = ||eps_theta(x_t) - (x_t - g x_n)/s||^2``: the ideal denoiser of
    the one-point set {x_n}."""
    model, (kept, forget) = tiny_model(), random_sets(n_kept=10, n_forget=2)
    method = make_method("retrack", knn=1)
    ctx = _ctx(model, kept, forget)
    method.setup(ctx)
    with torch.no_grad():
        rows = RowSampler(kept, forget, method, 0, 999, seed=3).draw(8)
        got = method.terms(model.unet, rows, ctx).losses["unlearn"]
        g, s = ctx.gs(rows.t)
        x_t = g * rows.a + s * rows.eps
        xn = kept[method.neighbours[rows.a_idx, 0]]
        e = model.unet(x_t, rows.t).sample
        want = (e - (x_t - g * xn) / s).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


class _AlwaysSeparate:
    """Mixin forcing the two-gradient path, as the reference for the one-backward paths."""

    @property
    def separate_grads(self):
        return True


def test_fixed_superfactor_in_one_backward_equals_the_two_gradient_combination():
    """``g = G_x - s G_a = grad(mean L_x - s mean L_a)`` by linearity of the gradient: one backward pass of the
    combined loss gives the same update as taking G_x and G_a separately."""
    from dataclasses import dataclass

    from diffunlearn.methods.siss import SISS

    @dataclass
    class Separate(_AlwaysSeparate, SISS):
        pass

    (kept, forget) = random_sets()
    cfg = TrainerConfig(steps=3, batch_size=4)
    one = unlearn(tiny_model(), kept, forget, make_method("siss", superfactor=0.3), cfg)
    two = unlearn(tiny_model(), kept, forget, Separate(superfactor=0.3), cfg)
    for (k, a), b in zip(one.unet.state_dict().items(), two.unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-6, msg=k)


def test_norm_refresh_takes_both_gradients_only_every_kth_step():
    """With ``norm_refresh = 3`` steps 1, 4, 7 measure ||G_a|| (and fix the NegGrad norm exactly); the steps between
    reuse the last measured norm: their superfactor is ``scaling_norm / ||G_a||`` of the last refresh step."""
    (kept, forget) = random_sets()
    logs = []
    unlearn(tiny_model(), kept, forget, make_method("siss", scaling_norm=2.0, norm_refresh=3),
            TrainerConfig(steps=7, batch_size=4), log=logs.append)
    measured = [r["step"] for r in logs if "grad_norm_a" in r]
    assert measured == [1, 4, 7]
    for r in logs:
        last = [x for x in logs if "grad_norm_a" in x and x["step"] <= r["step"]][-1]
        assert r["superfactor"] == pytest.approx(2.0 / last["grad_norm_a"], rel=1e-9)


def test_stale_norm_cosine_diagnostic_matches_a_direct_computation():
    """The logged ``cos_norm_k_steps_old`` is the cosine between this step's exact update ``G_x - (s/||G_a||) G_a``
    and ``G_x - (s/||G_a^(t-k)||) G_a``, computed from three dot products; check it against the vectors themselves."""
    g = torch.Generator().manual_seed(1)
    comb = SubtractedGradients(scaling_norm=3.0)
    history = []
    for _ in range(3):
        gx = [torch.randn(5, generator=g, dtype=torch.float64) * 10]
        ga = [torch.randn(5, generator=g, dtype=torch.float64) * (50 + 100 * torch.rand(1, generator=g).item())]
        history.append(float(global_norm(ga)))
        _, stats = comb.combine({"x": gx, "a": ga})
    exact = gx[0] - 3.0 / history[-1] * ga[0]
    stale = gx[0] - 3.0 / history[-2] * ga[0]
    want = float(torch.dot(exact, stale) / (exact.norm() * stale.norm()))
    assert stats["cos_norm_1_steps_old"] == pytest.approx(want, rel=1e-12)
    assert "cos_norm_5_steps_old" not in stats


def test_the_measured_scaling_norm_is_the_whole_steps_gradient_however_it_is_split():
    """``--scaling-norm auto`` measures ||G_x|| of the optimiser step's whole batch: differentiated a micro-batch
    at a time (gradient accumulation, several processes) it is the same norm as in one pass."""
    from diffunlearn.methods import MethodSpec
    from diffunlearn.protocols.calibration import calibrate_scaling_norm

    kept, forget = random_sets(n_kept=12, n_forget=3, seed=5)
    spec = MethodSpec("siss", {"scaling_norm": "auto"})
    whole = calibrate_scaling_norm(tiny_model(), kept, forget, spec, 8, 0.1, seed=0)
    split = calibrate_scaling_norm(tiny_model(), kept, forget, spec, 8, 0.1, seed=0, micro=3)
    assert split["grad_norm_x"] == pytest.approx(whole["grad_norm_x"], rel=1e-5)
    assert whole["scaling_norm"] == pytest.approx(0.1 * whole["grad_norm_x"])
