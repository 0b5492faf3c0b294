"""``diffunlearn bench toy``: every unlearning method against an exact gold standard, in about two minutes on 2 cores.

The data are ``toy-digits``: 240 real 8x8 digits plus 16 copies of one more '7' (the forget set A). X \\ A is a small
finite set, so the ideal denoiser of X \\ A (the Bayes-optimal noise prediction a perfect retrain would converge to,
:mod:`diffunlearn.ideal`) is known in closed form, and so is the ideal denoiser of X (a perfect base model).

Steps: train a small base DDPM (``toy-small``, 164 k parameters) on X and, with the same recipe, the retrain gold
standard on X \\ A (``train.train``: 800 steps, batch 64, AdamW lr 2e-3 with cosine decay after 100 warm-up steps,
EMA weights saved); run every method of :data:`diffunlearn.methods.METHODS` on the base model (the registry's
``retrain``, which re-initialises the weights and trains only for the unlearning budget, is replaced by that
full-recipe retrain); evaluate every model on fixed probes:

- *near A*: ``gamma_t a + sigma_t eps`` for a in A; *elsewhere*: ``gamma_t x + sigma_t eps`` for x in X \\ A, on a grid
  of timesteps, the same noise for every model. Reported: the mean over the grid of the per-dimension squared
  distance of ``eps_theta`` to the ideal X \\ A denoiser, to the ideal X denoiser and to the retrained model, and
  (near A) the *progress*: the position of ``eps_theta`` on the segment from the ideal X denoiser (0) to the ideal
  X \\ A one (1). Elsewhere the two ideals coincide (A's posterior weight vanishes there), so the distances there
  measure damage to what should be kept.
- the likelihood of A: exact NLL in bits/dim by the probability-flow ODE (:mod:`diffunlearn.metrics.nll`, tolerance
  1e-3 for speed, 4 Hutchinson probes), and the NLL of 8 held-out digits (a quality measure); also A's DDPM loss
  per dimension at 512 fixed (t, eps) draws (a cheap proxy, named ``loss_A``).
- samples: 128 DDPM samples (25 steps, per-image seeds) assigned to their nearest training image; the fraction whose
  nearest image is the target (with a 95% Clopper-Pearson interval), and the mean distance of the other samples to
  their nearest image of X \\ A (broken models produce samples far from every digit).

Unlearning hyperparameters (chosen for this data and budget, the same for every method where shared): 100 steps,
batch 64, AdamW lr 1e-4 (constant; betas 0.95/0.999, weight decay 1e-6), gradient clipped to 1.0, uniform timesteps.
The paper's MNIST run used lr 5e-5 for 300 steps; with a third of the steps the rate is doubled. Per method:
SISS lambda 0.5 with ``scaling_norm`` = 10% of ||G_x|| (the paper's rule), measured for each variant at the base
model (``calibrate_scaling_norm``: the importance-weighted x term of lambda = 0.5 has a larger gradient norm than
the plain DDPM term of SISS (No IS) or lambda = 0, so one shared value would be 10% for one and far more for
another); EraseDiff 2 inner steps, lambda_e 0.1; EraseDiff-light eta 1e-3 (the SISS paper's MNIST value); ReTrack
lambda_r 0.005 and 10 neighbours (the released MNIST settings); naive deletion and NegGrad take none.
``--ablations`` adds SISS lambda = 0 and lambda = 1.

Jobs run in ``workers`` spawned processes (one torch thread each): the base and retrain trainings in parallel, then
the methods, each unlearning and evaluating its own model. A script that calls :func:`run_toy_bench` with
``workers > 1`` must guard its entry point with ``if __name__ == "__main__":`` (spawned workers re-import it).
Writes ``results.json``, ``results.md`` and ``toy.png`` (and the models, under ``base/``, ``retrain/``, ``models/``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError

#: Hyperparameters of the methods on the toy data (a method missing here runs with its own defaults); the module
#: docstring gives the reasons. ``scaling_norm="auto"``: 10% of ||G_x|| measured for the variant at the base model.
TOY_HYPERPARAMS: dict[str, dict] = {
    "naive": {},
    "neggrad": {},
    "siss": {"lam": 0.5, "scaling_norm": "auto"},
    "siss-nois": {"scaling_norm": "auto"},
    "erasediff": {"inner_steps": 2, "lambda_e": 0.1},
    "erasediff-light": {"eta": 1e-3},
    "retrack": {"lambda_r": 0.005, "knn": 10},
}
#: The SISS paper's ablations, run as extra rows: (label, method, hyperparameters).
TOY_ABLATIONS: list[tuple[str, str, dict]] = [
    ("siss-lam0", "siss", {"lam": 0.0, "scaling_norm": "auto"}),
    ("siss-lam1", "siss", {"lam": 1.0, "scaling_norm": "auto"}),
]
#: Methods of the registry that are not fine-tuning runs on the base model (replaced by the honest retrain).
SKIPPED = {"retrain": "replaced by 'retrain': train.train on X \\ A with the base model's full recipe"}


@dataclass
class ToyBenchConfig:
    seed: int = 0
    quick: bool = False
    arch: str = "toy-small"
    # base model and retrain: the same recipe (train.train: AdamW, cosine with warm-up, EMA)
    base_steps: int = 800
    base_batch: int = 64
    base_lr: float = 2e-3
    warmup: int = 100
    # unlearning: the same budget and optimiser for every method (constant lr, clip 1.0, from the EMA weights)
    unlearn_steps: int = 100
    unlearn_lr: float = 1e-4
    unlearn_batch: int = 64
    ablations: bool = False  # also run SISS lambda = 0 and lambda = 1 (the paper's ablations; ~+15 s)
    scaling_norm_fraction: float = 0.10
    calibration_batches: int = 4
    # evaluation
    probe_timesteps: tuple[int, ...] = (50, 100, 150, 200, 300, 400, 600, 800)
    probes_per_t: int = 128
    n_samples: int = 128
    sample_steps: int = 25
    nll: bool = True
    nll_probes: int = 4
    nll_heldout: int = 8
    nll_rtol: float = 1e-3
    nll_atol: float = 1e-3
    loss_draws: int = 512
    workers: int = 2
    save_models: bool = True
    methods: tuple[str, ...] | None = None  # None: every registered method

    @classmethod
    def quick_config(cls, **overrides) -> "ToyBenchConfig":
        """Tiny settings for tests and smoke runs (tens of seconds on one core)."""
        base = dict(quick=True, base_steps=300, base_batch=32, base_lr=3e-3, warmup=30, unlearn_steps=5,
                    ablations=False, probes_per_t=32, probe_timesteps=(50, 100, 200, 300), n_samples=32,
                    sample_steps=10, nll=False, loss_draws=128, workers=1, save_models=False, calibration_batches=2)
        base.update(overrides)
        return cls(**base)


# ---------------------------------------------------------------- data and probes


def _load_sets():
    from ..data import load_data, split_kept

    data = load_data("toy-digits")
    kept, forget = split_kept(data, data.default_forget)
    return data, kept.load(), forget.load()


@dataclass
class ProbeSet:
    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    ideal_kept: torch.Tensor  # eps* of X \ A at x_t (float64)
    ideal_all: torch.Tensor   # eps* of X at x_t (float64)


def make_probes(clean: torch.Tensor, all_x: torch.Tensor, kept: torch.Tensor, alphas_cumprod: torch.Tensor,
                timesteps, per_t: int, generator: torch.Generator) -> ProbeSet:
    """``per_t`` probes ``gamma_t c + sigma_t eps`` per timestep, cycling through the clean images ``clean``."""
    from ..diffusion import gamma_sigma
    from ..ideal import ideal_eps

    xs, ts, es = [], [], []
    for t in timesteps:
        idx = torch.arange(per_t) % len(clean)
        eps = torch.randn((per_t, *clean.shape[1:]), generator=generator)
        tt = torch.full((per_t,), int(t), dtype=torch.long)
        g, s = gamma_sigma(alphas_cumprod, tt)
        xs.append(g * clean[idx] + s * eps)
        ts.append(tt)
        es.append(eps)
    x_t, t, eps = torch.cat(xs), torch.cat(ts), torch.cat(es)
    return ProbeSet(x_t, t, eps, ideal_eps(x_t, t, kept, alphas_cumprod), ideal_eps(x_t, t, all_x, alphas_cumprod))


@torch.no_grad()
def predict(unet, x_t: torch.Tensor, t: torch.Tensor, batch: int = 512) -> torch.Tensor:
    from ..diffusion import predict_noise

    unet.eval()
    return torch.cat([predict_noise(unet, x_t[i:i + batch], t[i:i + batch]).double()
                      for i in range(0, len(x_t), batch)])


def _per_t(sq: torch.Tensor, t: torch.Tensor, grid) -> list[float]:
    return [float(sq[t == int(k)].mean()) for k in grid]


#: a timestep enters the progress score when the two ideal denoisers differ there by at least this much per dim
PROGRESS_MIN_GAP = 5e-3


def progress(pred: torch.Tensor, probes: ProbeSet, grid) -> tuple[float, list]:
    """How far ``pred`` has moved from the ideal X denoiser toward the ideal X \\ A one, per timestep:
    ``sum_i <pred_i - eps*_X, eps*_X\\A - eps*_X> / sum_i ||eps*_X\\A - eps*_X||^2`` over the probes at t (the
    least-squares coefficient of ``pred`` on the segment from eps*_X (0) to eps*_X\\A (1)). Unlike the raw distances
    it ignores the error components orthogonal to the unlearning direction, which any generalising network has near
    the ideals (they memorise the finite set at small t). Averaged over the grid timesteps whose gap is at least
    ``PROGRESS_MIN_GAP`` per dim (elsewhere the direction is undefined); ``None`` at the others."""
    u = (probes.ideal_kept - probes.ideal_all).flatten(1)
    v = (pred - probes.ideal_all).flatten(1)
    per_t = []
    for k in grid:
        sel = probes.t == int(k)
        den = float(u[sel].pow(2).sum())
        ok = den / (int(sel.sum()) * u.shape[1]) >= PROGRESS_MIN_GAP
        per_t.append(float((u[sel] * v[sel]).sum()) / den if ok else None)
    used = [x for x in per_t if x is not None]
    return (sum(used) / len(used) if used else float("nan")), per_t


def distances(pred: torch.Tensor, probes: ProbeSet, grid, reference: torch.Tensor | None = None,
              with_progress: bool = False) -> dict:
    """Mean over the timestep grid of the per-dimension squared distance of ``pred`` to each target."""
    D = pred[0].numel()
    targets = {"ideal_kept": probes.ideal_kept, "ideal_all": probes.ideal_all, "noise": probes.eps.double()}
    if reference is not None:
        targets["retrain"] = reference
    out = {}
    for name, target in targets.items():
        per_t = _per_t((pred - target).pow(2).flatten(1).sum(1) / D, probes.t, grid)
        out[name] = sum(per_t) / len(per_t)
        out[name + "_per_t"] = per_t
    if with_progress:
        out["progress"], out["progress_per_t"] = progress(pred, probes, grid)
    return out


# ---------------------------------------------------------------- one worker's state


class _Evaluator:
    """Everything fixed across models: the data, the probes and their ideal denoisers, the retrain model's outputs."""

    def __init__(self, cfg: ToyBenchConfig, alphas_cumprod: torch.Tensor, retrain_dir: str | None):
        data, kept, forget = _load_sets()
        self.cfg, self.data, self.kept, self.forget = cfg, data, kept, forget
        self.abar = alphas_cumprod
        g = torch.Generator().manual_seed(10_000 + cfg.seed)
        grid = cfg.probe_timesteps
        self.near = make_probes(forget, data.images.load(), kept, alphas_cumprod, grid, cfg.probes_per_t, g)
        self.elsewhere = make_probes(kept[torch.randperm(len(kept), generator=g)], data.images.load(), kept,
                                     alphas_cumprod, grid, cfg.probes_per_t, g)
        # A's DDPM loss at uniform timesteps (a cheap likelihood proxy: the unweighted variational bound's terms)
        self.loss_t = torch.randint(0, len(alphas_cumprod), (cfg.loss_draws,), generator=g)
        self.loss_eps = torch.randn((cfg.loss_draws, *kept.shape[1:]), generator=g)
        self.ref_near = self.ref_else = None
        if retrain_dir:
            from ..models import load_model

            ref = load_model(retrain_dir)
            self.ref_near = predict(ref.unet, self.near.x_t, self.near.t)
            self.ref_else = predict(ref.unet, self.elsewhere.x_t, self.elsewhere.t)

    def reference_gaps(self) -> dict:
        """Distances between the two ideal denoisers themselves: the scale of every distance in the table."""
        grid, D = self.cfg.probe_timesteps, self.kept[0].numel()
        out = {}
        for name, p in (("near_A", self.near), ("elsewhere", self.elsewhere)):
            per_t = _per_t((p.ideal_all - p.ideal_kept).pow(2).flatten(1).sum(1) / D, p.t, grid)
            out[name] = {"ideal_all_vs_ideal_kept": sum(per_t) / len(per_t), "per_t": per_t}
        return out

    def evaluate(self, model) -> dict:
        from ..diffusion import gamma_sigma, predict_noise
        from ..sampling import ddpm_sample

        cfg, t0 = self.cfg, time.time()
        unet = model.unet.eval()
        res: dict = {}
        res["near_A"] = distances(predict(unet, self.near.x_t, self.near.t), self.near, cfg.probe_timesteps,
                                  self.ref_near, with_progress=True)
        res["elsewhere"] = distances(predict(unet, self.elsewhere.x_t, self.elsewhere.t), self.elsewhere,
                                     cfg.probe_timesteps, self.ref_else)
        with torch.no_grad():
            a = self.forget[0].expand(len(self.loss_t), *self.forget.shape[1:])
            g, s = gamma_sigma(self.abar, self.loss_t)
            err = predict_noise(unet, g * a + s * self.loss_eps, self.loss_t) - self.loss_eps
            res["loss_A"] = float(err.double().pow(2).flatten(1).sum(1).mean() / a[0].numel())
        if cfg.nll:
            res.update(self._nll(model))
        res.update(self._samples(ddpm_sample(model, cfg.n_samples, steps=cfg.sample_steps, seed=cfg.seed,
                                             batch_size=max(1, cfg.n_samples))))
        res["eval_seconds"] = round(time.time() - t0, 2)
        return res

    def _nll(self, model) -> dict:
        try:
            from ..metrics.nll import nll_bits_per_dim
        except ImportError:  # the metrics package is optional for this benchmark
            return {}
        cfg = self.cfg
        held = self.data.held_out[: cfg.nll_heldout] if self.data.held_out is not None else self.kept[:0]
        k = max(1, cfg.nll_probes)
        # A is copies of one image: k copies of it (so k different Hutchinson probes, which are seeded by the image's
        # position) and the held-out digits (one probe each) in one ODE solve
        images = torch.cat([self.forget[:1].expand(k, *self.forget.shape[1:]), held])
        r = nll_bits_per_dim(model, images, n_probes=1, rtol=cfg.nll_rtol, atol=cfg.nll_atol, seed=cfg.seed,
                             batch_size=len(images))
        bpd_a = r.bpd[:k].double()
        out = {"nll_A_bpd": float(bpd_a.mean()),
               "nll_A_stderr": float(bpd_a.std() / math.sqrt(k)) if k > 1 else float("nan"), "nll_nfe": r.nfe,
               "nll_seconds": round(r.seconds, 2)}
        if len(held):
            out["nll_heldout_bpd"] = float(r.bpd[k:].mean())
        return out

    def _samples(self, samples: torch.Tensor) -> dict:
        kept = self.kept.flatten(1).double()
        target = self.forget[0].flatten().double()
        s = samples.flatten(1).double()
        d_kept = torch.cdist(s, kept).min(1).values
        d_target = (s - target).norm(dim=1)
        is_target = d_target < d_kept
        k, n = int(is_target.sum()), len(s)
        try:
            from ..metrics.rates import binomial_ci

            ci = list(binomial_ci(k, n))
        except ImportError:
            ci = None
        others = d_kept[~is_target]
        return {"target_count": k, "n_samples": n, "target_frac": k / n, "target_frac_ci95": ci,
                "nn_dist_kept": float(others.mean()) if len(others) else float("nan"),
                "nn_dist_kept_all": float(d_kept.mean())}


_STATE: dict = {}


def _evaluator(cfg: ToyBenchConfig, abar: torch.Tensor, retrain_dir: str | None) -> _Evaluator:
    stamp = None
    if retrain_dir:  # the retrain model's outputs are cached: a model re-trained into the same folder invalidates them
        stamp = [(p.name, p.stat().st_mtime_ns) for p in sorted(Path(retrain_dir).rglob("*.safetensors"))]
    key = (json.dumps(asdict(cfg), sort_keys=True, default=str), retrain_dir, stamp)
    if _STATE.get("key") != key:
        _STATE.clear()
        _STATE.update(key=key, ev=_Evaluator(cfg, abar, retrain_dir))
    return _STATE["ev"]


# ---------------------------------------------------------------- jobs (run inline or in worker processes)


def _train_job(cfg: ToyBenchConfig, out: str, forget: str) -> dict:
    from ..train import TrainConfig, train

    torch.set_num_threads(1)
    tc = TrainConfig(data="toy-digits", forget=forget, out=out, arch=cfg.arch, steps=cfg.base_steps,
                     batch_size=cfg.base_batch, lr=cfg.base_lr, warmup=cfg.warmup, seed=cfg.seed, threads=1,
                     log_every=max(1, cfg.base_steps), overwrite=True)
    t0, c0 = time.time(), time.process_time()
    summary = train(tc)
    return {"seconds": round(time.time() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2),
            "model_dir": summary["model_dir"], "recipe": asdict(tc)}


def _method_job(cfg: ToyBenchConfig, label: str, method_name: str, params: dict, base_dir: str,
                retrain_dir: str, out_dir: str | None) -> dict:
    from ..methods import make_method
    from ..models import load_model, save_model
    from ..trainer import TrainerConfig, unlearn

    torch.set_num_threads(1)
    c0 = time.process_time()
    base = load_model(base_dir)
    ev = _evaluator(cfg, base.alphas_cumprod(), retrain_dir)
    res: dict = {"label": label, "method": method_name, "hyperparameters": dict(params)}
    if method_name == "pretrained":
        model, res["steps"] = base, cfg.base_steps
    elif method_name == "retrain":
        model, res["steps"] = load_model(retrain_dir), cfg.base_steps
        res["hyperparameters"] = {"from_scratch_on": "X \\ A", "steps": cfg.base_steps, "batch_size": cfg.base_batch,
                                  "lr": cfg.base_lr, "recipe": "train.train (as the base model)"}
    else:
        if any(v == "auto" for v in params.values()):
            res["scaling_norm_calibration"] = calibrate_scaling_norm(cfg, base, method_name, params)
            params = {k: (res["scaling_norm_calibration"]["scaling_norm"] if v == "auto" else v)
                      for k, v in params.items()}
        method = make_method(method_name, **params)
        res["hyperparameters"] = method.hyperparameters()
        ucfg = TrainerConfig(steps=cfg.unlearn_steps, lr=cfg.unlearn_lr,
                             batch_size=cfg.unlearn_batch, seed=cfg.seed, threads=1)
        logs: list[dict] = []
        t0 = time.time()
        model = unlearn(base, ev.kept, ev.forget, method, ucfg, log=logs.append)
        res["seconds"], res["steps"] = round(time.time() - t0, 2), cfg.unlearn_steps
        res["train_log"] = _summarise_log(logs)
        if out_dir:
            save_model(model, Path(out_dir) / label)
    res["metrics"] = ev.evaluate(model)
    res["cpu_seconds"] = round(time.process_time() - c0, 2)  # this job's CPU time (unlearning + evaluation)
    return res


def _summarise_log(logs: list[dict]) -> dict:
    """Means over the run of the logged statistics (||G_x||, ||G_a||, weights, losses), and the last step's values."""
    if not logs:
        return {}
    keys = [k for k in logs[0] if k not in ("step", "seconds", "lr") and isinstance(logs[0][k], (int, float))]
    return {"mean": {k: sum(float(r.get(k, 0.0)) for r in logs) / len(logs) for k in keys},
            "last": {k: logs[-1][k] for k in keys if k in logs[-1]}}


def calibrate_scaling_norm(cfg: ToyBenchConfig, base, method_name: str, params: dict) -> dict:
    """The paper's rule, ``scaling_norm ~ 10% of the logged ||G_x||``, for this variant: ||G_x|| (the gradient of the
    batch mean of the variant's own ``x`` term, sum-over-pixels loss, batch ``unlearn_batch``) averaged over a few
    batches at the base model. Per variant, because the importance-weighted ``x`` term of SISS (lambda = 0.5) has a
    far larger gradient norm than the plain DDPM loss of SISS (No IS) or lambda = 0 (about 8x on this data)."""
    from ..methods import Context, make_method
    from ..methods.base import global_norm
    from ..trainer import RowSampler

    _, kept, forget = _load_sets()
    unet = copy.deepcopy(base.unet).train()
    method = make_method(method_name, **{k: (1.0 if v == "auto" else v) for k, v in params.items()})
    T = base.num_train_timesteps
    sampler = RowSampler(kept, forget, method, 0, T - 1, cfg.seed + 777)
    ctx = Context(base.alphas_cumprod(), kept, forget, 0, T - 1, torch.device("cpu"), sampler.generator, unet=unet,
                  batch_size=cfg.unlearn_batch, draw=sampler.draw)
    method.setup(ctx)
    params_ = [p for p in unet.parameters() if p.requires_grad]
    norms = []
    for _ in range(max(1, cfg.calibration_batches)):
        rows = sampler.draw(cfg.unlearn_batch)
        grads = torch.autograd.grad(method.terms(unet, rows, ctx).losses["x"].mean(), params_, allow_unused=True)
        norms.append(float(global_norm([g for g in grads if g is not None])))
    gx = sum(norms) / len(norms)
    return {"grad_norm_x": gx, "fraction": cfg.scaling_norm_fraction, "scaling_norm": cfg.scaling_norm_fraction * gx}


class _Pool:
    """Runs jobs in ``workers`` spawned processes, or inline when ``workers == 1``."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.ex = None
        if self.workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.ex = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))

    def map(self, fn, arglists: list[tuple]) -> list:
        if self.ex is None:  # inline: the jobs set torch to one thread; give the caller its setting back
            threads = torch.get_num_threads()
            try:
                return [fn(*args) for args in arglists]
            finally:
                torch.set_num_threads(threads)
        from concurrent.futures.process import BrokenProcessPool

        futures = [self.ex.submit(fn, *args) for args in arglists]
        try:
            return [f.result() for f in futures]
        except BrokenProcessPool:
            raise UserError("a benchmark worker process died (out of memory, or a script without an "
                            "`if __name__ == '__main__':` guard re-ran itself in the spawned worker); "
                            "retry with --workers 1") from None

    def close(self):
        if self.ex is not None:
            self.ex.shutdown()


# ---------------------------------------------------------------- the benchmark


def method_list(cfg: ToyBenchConfig) -> list[tuple[str, str, dict]]:
    """(label, method, hyperparameters) for every registered method (and the SISS ablations), in registry order."""
    from ..methods import METHODS

    names = list(cfg.methods) if cfg.methods is not None else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    runs = [(n, n, dict(TOY_HYPERPARAMS.get(n, {}))) for n in names if n not in SKIPPED]
    if cfg.ablations and cfg.methods is None:
        runs += [(label, m, dict(p)) for label, m, p in TOY_ABLATIONS]
    return runs


def run_toy_bench(out_dir: str | Path, seed: int = 0, quick: bool = False, overwrite: bool = False,
                  config: ToyBenchConfig | None = None, **overrides) -> dict:
    """Run the toy benchmark into ``out_dir``; returns the results (also written as JSON, Markdown and a PNG).

    ``overrides`` set :class:`ToyBenchConfig` fields (e.g. ``workers=1``, ``unlearn_steps=50``).
    """
    from ..runs import prepare_out_dir, write_json

    if config is None:
        config = ToyBenchConfig.quick_config(seed=seed) if quick else ToyBenchConfig(seed=seed)
    bad = [k for k in overrides if k not in {f.name for f in dataclasses.fields(ToyBenchConfig)}]
    if bad:
        raise UserError(f"unknown toy-bench setting(s): {', '.join(bad)}")
    cfg = dataclasses.replace(config, **overrides)
    out = prepare_out_dir(out_dir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    runs = method_list(cfg)
    t_start = time.time()
    timings: dict = {}
    pool = _Pool(cfg.workers)
    try:
        # 1. the base model on X and the retrain gold standard on X \ A, same recipe, in parallel
        t0 = time.time()
        base_info, retrain_info = pool.map(_train_job, [(cfg, str(out / "base"), ""),
                                                       (cfg, str(out / "retrain"), "default")])
        timings["train_base_and_retrain"] = round(time.time() - t0, 2)
        base_dir, retrain_dir = base_info["model_dir"], retrain_info["model_dir"]
        jobs = []
        for label, name, params in runs:
            jobs.append((cfg, label, name, params, base_dir, retrain_dir,
                         str(out / "models") if cfg.save_models else None))
        jobs.append((cfg, "pretrained", "pretrained", {}, base_dir, retrain_dir, None))
        jobs.append((cfg, "retrain", "retrain", {}, base_dir, retrain_dir, None))
        # 2. every method (unlearn + evaluate), longest first so the two workers finish together
        order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i][2]))
        t0 = time.time()
        done = pool.map(_method_job, [jobs[i] for i in order])
        timings["methods_and_evaluation"] = round(time.time() - t0, 2)
    finally:
        pool.close()
    by_label = {r["label"]: r for r in done}
    retrain_row = by_label["retrain"]
    retrain_row["seconds"] = retrain_info["seconds"]
    by_label["pretrained"]["seconds"] = base_info["seconds"]
    labels = ["pretrained", "retrain"] + [label for label, _, _ in runs]
    rows = [by_label[label] for label in labels]
    timings["total"] = round(time.time() - t_start, 2)
    # CPU seconds of the jobs: on a loaded machine, what the wall time would be on idle cores (one thread per job)
    cpu_jobs = sum(r["cpu_seconds"] for r in done)
    cpu_train = (base_info["cpu_seconds"], retrain_info["cpu_seconds"])
    timings["cpu_seconds"] = {"train_base": cpu_train[0], "train_retrain": cpu_train[1],
                              "methods_and_evaluation": round(cpu_jobs, 2)}
    timings["idle_estimate"] = round((max(cpu_train) if cfg.workers > 1 else sum(cpu_train))
                                     + cpu_jobs / max(1, min(cfg.workers, len(done))), 1)
    ev = _evaluator(cfg, _abar(base_dir), None)
    results = {
        "benchmark": "toy",
        "config": asdict(cfg),
        "data": {"source": "toy-digits", "n_X": len(ev.data), "n_kept": len(ev.kept), "n_forget": len(ev.forget),
                 "forget_is_copies_of_one_image": True},
        "recipe": {"base_and_retrain": base_info["recipe"], "unlearn": {"steps": cfg.unlearn_steps,
                   "lr": cfg.unlearn_lr, "batch_size": cfg.unlearn_batch, "optimizer": "AdamW (0.95, 0.999) wd 1e-6",
                   "clip_norm": 1.0}},
        "skipped": SKIPPED,
        "reference": ev.reference_gaps(),
        "rows": rows,
        "timings": timings,
        "threads_per_worker": 1,
        "workers": cfg.workers,
    }
    write_json(out / "results.json", results)
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    plot(results, out / "toy.png")
    print(table)
    return results


def _abar(model_dir: str) -> torch.Tensor:
    from ..models import load_model

    return load_model(model_dir).alphas_cumprod()


def _cost(name: str) -> float:
    return {"erasediff": 5, "retrack": 3, "siss": 2.2, "siss-nois": 3, "erasediff-light": 3, "naive": 1,
            "neggrad": 1, "pretrained": 0.3, "retrain": 0.3}.get(name, 2)


# ---------------------------------------------------------------- reporting

COLUMNS = [
    ("steps", "steps", "{:d}"),
    ("seconds", "time s", "{:.1f}"),
    ("near_A.progress", "near A: progress", "{:.2f}"),
    ("near_A.ideal_kept", "near A: d(eps*_X\\A)", "{:.3f}"),
    ("near_A.ideal_all", "near A: d(eps*_X)", "{:.3f}"),
    ("near_A.retrain", "near A: d(retrain)", "{:.3f}"),
    ("elsewhere.ideal_kept", "elsewhere: d(eps*_X\\A)", "{:.4f}"),
    ("elsewhere.ideal_all", "elsewhere: d(eps*_X)", "{:.4f}"),
    ("elsewhere.retrain", "elsewhere: d(retrain)", "{:.4f}"),
    ("nll_A_bpd", "NLL(A) bpd", "{:.2f}"),
    ("loss_A", "loss(A)/dim", "{:.3f}"),
    ("nll_heldout_bpd", "NLL(held-out) bpd", "{:.2f}"),
    ("target_frac", "samples = target", "{:.3f}"),
    ("nn_dist_kept", "NN dist to X\\A", "{:.2f}"),
]


def _get(row: dict, key: str):
    if key in ("steps", "seconds"):
        return row.get(key)
    v = row["metrics"]
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    try:
        return spec.format(v)
    except (ValueError, TypeError):
        return str(v)


def markdown_table(results: dict) -> str:
    """One row per model; distances are per-dimension squared errors averaged over the probe timesteps."""
    rows = results["rows"]
    cols = [c for c in COLUMNS if any(_get(r, c[0]) is not None for r in rows)]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |",
             "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(_get(r, k), spec) for k, _, spec in cols) + " |")
    ref = results["reference"]
    cfg = results["config"]
    notes = [
        "",
        f"d(.) = mean over t in {list(cfg['probe_timesteps'])} of ||eps_theta(x_t, t) - target||^2 / D (D = 64) on "
        "fixed probes: near A = gamma_t a + sigma_t eps, elsewhere = noised X \\ A items "
        f"({cfg['probes_per_t']} per t). "
        f"eps*_S = ideal (Bayes-optimal) denoiser of the finite set S. Scale: d(eps*_X, eps*_X\\A) = "
        f"{ref['near_A']['ideal_all_vs_ideal_kept']:.3f} near A, {ref['elsewhere']['ideal_all_vs_ideal_kept']:.2g} "
        "elsewhere.",
        "progress = least-squares position of eps_theta on the segment eps*_X (0) -> eps*_X\\A (1) near A, averaged "
        f"over the timesteps where the two ideals differ (gap >= {PROGRESS_MIN_GAP:g} per dim). Unlearning moves a "
        "row toward retrain's progress and d(retrain) near A; a broken model has a large distance elsewhere, a high "
        "held-out NLL and samples far from X \\ A.",
        f"retrain = the base recipe ({cfg['base_steps']} steps) trained from scratch on X \\ A; methods run "
        f"{cfg['unlearn_steps']} steps from the base model's EMA weights (lr {cfg['unlearn_lr']:g}, batch "
        f"{cfg['unlearn_batch']}). scaling_norm = {cfg['scaling_norm_fraction']:.0%} of ||G_x|| measured at the base "
        "model for each variant: " + ", ".join(
            f"{r['label']} {r['scaling_norm_calibration']['scaling_norm']:.3g} (||G_x|| "
            f"{r['scaling_norm_calibration']['grad_norm_x']:.3g})"
            for r in rows if "scaling_norm_calibration" in r) + ".",
        f"samples = target: fraction of {cfg['n_samples']} DDPM samples ({cfg['sample_steps']} steps) nearer to the "
        "target than to any image of X \\ A; NN dist: mean L2 distance (model space [-1, 1]) of the other "
        "samples to X \\ A.",
        f"Wall time {results['timings']['total']:.0f} s with {results['workers']} worker process(es), 1 thread each "
        f"(job CPU time suggests ~{results['timings']['idle_estimate']:.0f} s on idle cores, plus process "
        "start-up).",
    ]
    return "\n".join(lines + notes) + "\n"


def plot(results: dict, path: Path) -> None:
    """Three panels, one marker per model (legend on the right):

    1. progress toward the ideal X \\ A denoiser near A (x) against damage elsewhere (y: distance to the retrained
       model on noised X \\ A items): unlearning moves right, toward retrain; breaking the model moves up;
    2. the raw distances to the ideal X \\ A denoiser, near A (x) and elsewhere (y);
    3. progress per timestep: where along the noise levels each model has moved.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    grid = list(results["config"]["probe_timesteps"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    palette = ["tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan",
               "gold", "navy", "lime", "teal", "black"]
    markers = "ovD^<>pPXhd"
    x_max = 1.6
    floor = 1e-4
    k = 0
    for r in rows:
        m = r["metrics"]
        label = r["label"]
        if label == "pretrained":
            style = dict(color="tab:blue", marker="s", s=90)
        elif label == "retrain":
            style = dict(color="tab:green", marker="*", s=200)
        else:
            style = dict(color=palette[k % len(palette)], marker=markers[k % len(markers)], s=55)
            k += 1
        px, py = m["near_A"]["progress"], m["elsewhere"]["retrain"]
        shown = f"{label} (progress {px:.2f})" if px > x_max else label
        axes[0].scatter([min(px, x_max)], [max(py, floor)], zorder=3, label=shown, edgecolor="black", linewidth=0.5,
                        **style)
        axes[1].scatter([m["near_A"]["ideal_kept"]], [m["elsewhere"]["ideal_kept"]], zorder=3, edgecolor="black",
                        linewidth=0.5, **style)
        per_t = [(t, v) for t, v in zip(grid, m["near_A"]["progress_per_t"]) if v is not None]
        if per_t:
            axes[2].plot([t for t, _ in per_t], [min(v, x_max) for _, v in per_t], color=style["color"],
                         marker=style["marker"], lw=2.5 if label in ("retrain", "pretrained") else 1.2, ms=5)
    gap = results["reference"]["near_A"]["ideal_all_vs_ideal_kept"]
    ax = axes[0]
    for v in (0.0, 1.0):
        ax.axvline(v, color="grey", lw=0.8, ls="--")
    ax.set_xlim(-0.1, x_max + 0.05)
    ax.set_yscale("log")
    ax.set_xlabel("near A: progress, ideal X denoiser (0) -> ideal X\\A denoiser (1)")
    ax.set_ylabel(f"elsewhere: distance to the retrained model (floor {floor:g})")
    ax.set_title("Unlearning moves right; breaking the model moves up")
    ax = axes[1]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("near A: distance to ideal X\\A denoiser")
    ax.set_ylabel("elsewhere: distance to ideal X\\A denoiser")
    ax.set_title(f"Raw distances (the two ideals differ by {gap:.3f} near A)")
    ax = axes[2]
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("timestep t")
    ax.set_ylabel(f"near A: progress at t (clipped at {x_max})")
    ax.set_title("Progress per noise level (thick: pretrained, retrain)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=8, frameon=False)
    fig.suptitle("diffunlearn bench toy: who moves toward retraining, and who breaks the model")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
