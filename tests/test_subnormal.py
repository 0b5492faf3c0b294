"""Negligible importance weights become exact zeros (methods/weights.py, ``drop_negligible``): the gradient is the
float64 gradient to float32 rounding, and no subnormal float32 number enters the backward pass (on CPUs every
product with one takes a microcode assist, which made a third of the SISS steps on MNIST several times slower)."""

from __future__ import annotations

import copy
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import tiny_model
from diffunlearn.methods import Context, StepBatch, make_method
from diffunlearn.methods import siss as siss_module
from diffunlearn.methods.weights import log_density_gap, log_weights

TINY = torch.finfo(torch.float32).tiny  # float32's smallest normal number, 2^-126
LAM, T = 0.5, 100
# rows drawn from x (w_a chosen) and from a (w_x chosen); the other weight of each row lies between 1 and 2
W_A_OF_X_ROWS = [1e-40, 1e-33, 1e-20, 1e-3, 1.0]  # subnormal, below the floor, relatively negligible, kept, plain
W_X_OF_A_ROWS = [1e-40, 1e-25, 1.0]
KEPT = 3  # index of the small weight the rule must keep (the test shows that dropping it would fail)


class SubnormalWatch(TorchDispatchMode):
    """Records every operator that receives or returns a float32 tensor holding a subnormal number."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel():
                a = t.detach().abs()
                if bool(((a > 0) & (a < TINY)).any()):
                    self.ops.append(str(func))
                    break
        return out


def _batch(model) -> StepBatch:
    """Rows whose log-density gap D is set exactly: with ``m = g x + s eps`` and ``x - a = delta v``, ``v`` a unit
    vector orthogonal to ``eps``, ``D = g^2 delta^2 / (2 s^2)`` (and ``-D`` for rows drawn from a), so each row gets
    the weight asked for: ``w_a = 1 / ((1 - l) e^D + l)``, ``w_x = 1 / ((1 - l) + l e^-D)``."""
    gen = torch.Generator().manual_seed(0)
    n = len(W_A_OF_X_ROWS) + len(W_X_OF_A_ROWS)
    ab = model.alphas_cumprod()[T].double()
    g, s = float(ab.sqrt()), float((1 - ab).sqrt())
    x = torch.rand((n, 1, 8, 8), generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn((n, 1, 8, 8), generator=gen, dtype=torch.float64)
    v = torch.randn((n, 1, 8, 8), generator=gen, dtype=torch.float64)
    v = v - (v * eps).sum((1, 2, 3), keepdim=True) / eps.pow(2).sum((1, 2, 3), keepdim=True) * eps
    v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    gaps = [math.log(1 / (w * (1 - LAM)) - LAM / (1 - LAM)) for w in W_A_OF_X_ROWS]  # D of x-rows
    gaps += [math.log(1 / (w * LAM) - (1 - LAM) / LAM) for w in W_X_OF_A_ROWS]  # -D of a-rows
    delta = torch.tensor([s * math.sqrt(2 * d) / g for d in gaps], dtype=torch.float64).view(-1, 1, 1, 1)
    from_a = torch.arange(n) >= len(W_A_OF_X_ROWS)
    a = torch.where(from_a.view(-1, 1, 1, 1), x + delta * v, x - delta * v)
    zeros = torch.zeros(n, dtype=torch.long)
    return StepBatch(zeros, zeros, x.float(), a.float(), eps.float(), torch.full((n,), T), {"from_a": from_a})


def _grads(loss, unet, watch: SubnormalWatch | None = None):
    params = list(unet.parameters())
    if watch is None:
        return [g.double() for g in torch.autograd.grad(loss, params, retain_graph=True)]
    with watch:
        return [g.double() for g in torch.autograd.grad(loss, params, retain_graph=True)]


def _siss_grads(unet, batch, ctx, watch=None):
    terms = make_method("siss", lam=LAM).terms(unet, batch, ctx).losses
    return {k: _grads(v.mean(), unet, watch) for k, v in terms.items()}


def _float64_grads(unet, batch, ctx, drop_row: int | None = None):
    """The unflushed terms in float64: every weight exact, none set to 0 (row ``drop_row`` of L_a excepted)."""
    u = copy.deepcopy(unet).double()
    x, a, eps = batch.x.double(), batch.a.double(), batch.eps.double()
    ab = ctx.alphas_cumprod.double()[batch.t]
    g, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    m = g * torch.where(batch.extra["from_a"].view(-1, 1, 1, 1), a, x) + s * eps
    e_hat = u(m, batch.t).sample
    log_wx, log_wa = log_weights(log_density_gap(m, x, a, g, s), LAM)
    w_a = log_wa.exp()
    if drop_row is not None:
        w_a = w_a.clone()
        w_a[drop_row] = 0
    lx = log_wx.exp() * (e_hat - (m - g * x) / s).pow(2).flatten(1).sum(1)
    la = w_a * (e_hat - (m - g * a) / s).pow(2).flatten(1).sum(1)
    return {"x": _grads(lx.mean(), u), "a": _grads(la.mean(), u)}, (log_wx.exp(), w_a)


def _rel(g1, g2) -> float:
    num = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(g1, g2)))
    return num / math.sqrt(sum(float(b.pow(2).sum()) for b in g2))


def test_dropping_negligible_weights_keeps_the_float64_gradient_and_keeps_subnormals_out(monkeypatch):
    """The batch's weights are subnormal, tiny and negligible on purpose (checked below). With them zeroed, G_x and
    G_a equal the unflushed float64 gradients to float32 rounding, and no operator of either backward pass sees a
    subnormal number. Without the rule the same backward passes do see them (the watch can fail), and dropping the
    smallest weight the rule keeps (1e-3) would move G_a far beyond the tolerance (the rule is not too eager)."""
    torch.manual_seed(0)
    model = tiny_model()
    unet = model.unet.train()
    ctx = Context(model.alphas_cumprod(), torch.zeros(1), torch.zeros(1), 0, 999, torch.device("cpu"),
                  torch.Generator())
    batch = _batch(model)
    ref, (w_x64, w_a64) = _float64_grads(unet, batch, ctx)
    n_x = len(W_A_OF_X_ROWS)
    torch.testing.assert_close(w_a64[:n_x], torch.tensor(W_A_OF_X_ROWS, dtype=torch.float64), rtol=1e-4, atol=0)
    torch.testing.assert_close(w_x64[n_x:], torch.tensor(W_X_OF_A_ROWS, dtype=torch.float64), rtol=1e-4, atol=0)
    assert 0 < float(w_a64[0].float()) < TINY  # a subnormal float32 weight really is in the batch

    watch = SubnormalWatch()
    got = _siss_grads(unet, batch, ctx, watch)
    assert watch.ops == []
    tol = 1e-5  # float32 against float64 on this model: about 1e-6
    for k in ("x", "a"):
        assert _rel(got[k], ref[k]) < tol, k

    unflushed_watch = SubnormalWatch()
    monkeypatch.setattr(siss_module, "drop_negligible", lambda w, loss: w)
    unflushed = _siss_grads(unet, batch, ctx, unflushed_watch)
    assert len(unflushed_watch.ops) > 0
    for k in ("x", "a"):
        assert _rel(unflushed[k], ref[k]) < tol and _rel(got[k], unflushed[k]) < tol, k

    without_kept_row, _ = _float64_grads(unet, batch, ctx, drop_row=KEPT)
    assert _rel(without_kept_row["a"], ref["a"]) > 10 * tol


def test_retrack_far_neighbours_reach_the_backward_pass_as_exact_zeros(monkeypatch):
    """ReTrack's posterior over neighbours, ``p_n = softmax(-||x_t - g x_n||^2 / (2 s^2))``, is subnormal for far
    neighbours at small t; zeroed, no subnormal reaches the backward pass (without the rule, some do), and the
    gradient is unchanged to float32 rounding."""
    from diffunlearn.methods import retrack as retrack_module
    from diffunlearn.methods.retrack import nearest_kept

    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    forget = torch.rand((2, 1, 8, 8), generator=gen) * 2 - 1
    # neighbours at distances that put p_n across the float32 range at t = 10 (s ~ 0.047)
    scales = torch.tensor([0.0, 0.3, 0.62, 0.65, 2.0]).view(-1, 1, 1, 1, 1)
    direction = torch.randn((1, 2, 1, 8, 8), generator=gen)
    kept = (forget.unsqueeze(0)
            + scales * direction / direction.flatten(2).norm(dim=2).view(1, 2, 1, 1, 1)).flatten(0, 1)
    method = make_method("retrack", knn=5)
    ctx = Context(model.alphas_cumprod(), kept, forget, 0, 999, torch.device("cpu"), torch.Generator())
    method.neighbours = nearest_kept(forget, kept, 5)
    n = 2
    batch = StepBatch(torch.zeros(n, dtype=torch.long), torch.arange(n), kept[:n], forget,
                      torch.randn((n, 1, 8, 8), generator=gen), torch.full((n,), 10))
    g, s = ctx.gs(batch.t)
    nbrs = kept[method.neighbours]
    diff = (g * forget + s * batch.eps).unsqueeze(1) - g.unsqueeze(1) * nbrs
    p = torch.softmax(-diff.double().pow(2).flatten(2).sum(2) / (2 * s.flatten().double()[:, None] ** 2), dim=1)
    assert bool(((p.float() > 0) & (p.float() < TINY)).any())  # the batch does hold subnormal neighbour weights
    watches = [SubnormalWatch(), SubnormalWatch()]
    grads = [_grads(method.terms(model.unet, batch, ctx).losses["unlearn"].mean(), model.unet, watches[0])]
    monkeypatch.setattr(retrack_module, "drop_negligible", lambda w, loss: w)
    grads.append(_grads(method.terms(model.unet, batch, ctx).losses["unlearn"].mean(), model.unet, watches[1]))
    assert watches[0].ops == [] and len(watches[1].ops) > 0
    assert _rel(grads[0], grads[1]) < 1e-5
