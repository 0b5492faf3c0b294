"""The deletion fine-tuning loop: any registered method, through Accelerate.

Each optimiser step draws all its rows at once from one seeded generator (pairs from X \\ A and A, noise, timesteps
and the method's own randomness), then splits them over processes and micro-batches. So the update does not depend
on how a global batch is split: batch 1 x accumulation 8 equals batch 8 x accumulation 1, and two processes equal
one. Gradients are accumulated per loss term when the method combines them (SISS norm-fixing), otherwise the
weighted sum is back-propagated once; processes average gradients explicitly, then the final gradient is clipped
and AdamW steps. The input model is never modified: the loop trains a copy.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import torch

from .diffusion import sample_timesteps
from .errors import UserError
from .methods import METHODS, Context, Method, StepBatch, make_method
from .metrics.similarity import SIMILARITY_T
from .models import DiffusionModel


@dataclass
class UnlearnConfig:
    model: str = field(default="", metadata={"help": "diffusers model directory (or a run directory holding model/)"})
    data: str = field(default="", metadata={"help": "data SPEC for X: image folder, .npy/.npz, or a built-in name"})
    forget: str = field(default="default", metadata={"help": "forget SPEC for A: indices, names, @file, or 'default'"})
    method: str = field(default="siss", metadata={"help": "unlearning method: " + ", ".join(METHODS)})
    out: str = field(default="", metadata={"help": "run directory to create"})
    steps: int = field(default=300, metadata={"help": "optimiser steps"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate (constant)"})
    batch_size: int = field(default=64, metadata={"help": "rows per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    beta1: float = field(default=0.95, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    weight_decay: float = field(default=1e-6, metadata={"help": "AdamW weight decay"})
    clip_norm: float = field(default=1.0, metadata={"help": "clip the final gradient to this L2 norm"})
    t_min: int = field(default=0, metadata={"help": "smallest training timestep"})
    t_max: int = field(default=-1, metadata={"help": "largest training timestep (-1: T-1)"})
    seed: int = field(default=0, metadata={"help": "random seed: same seed, same weights"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (GPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (large UNets)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    log_every: int = field(default=1, metadata={"help": "print a progress line every N steps (the JSONL log has every step)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output directory"})
    allow_pickle: bool = field(default=False, metadata={"help": "allow loading pickle weights (.bin/.ckpt): only for files you trust"})
    checkpoint_every: int = field(default=0, metadata={"help": "write a resumable checkpoint every N steps (0: never)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    # sequential deletion requests (diffunlearn.sequential)
    requests: str = field(default="", metadata={"help": "file of deletion requests applied in turn, each for --steps "
                                                        "steps (one forget SPEC per line, or a YAML list); writes "
                                                        "ledger.jsonl"})
    held_out: str = field(default="", metadata={"help": "with --requests: data SPEC of images never trained on "
                                                        "(membership AUC, quality loss); default: the data set's own"})
    sscd: str = field(default="", metadata={"help": "with --requests: local SSCD TorchScript file for the "
                                                    "noise-and-denoise similarity (default: weight-free pixel cosine)"})
    similarity_t: int = field(default=SIMILARITY_T, metadata={"help": "with --requests: noise-and-denoise "
                                                                      "similarity noises to this step, denoises back"})
    # method hyperparameters: None means the method's own default; a flag the method does not take is an error
    lam: float | None = field(default=None, metadata={"help": "SISS mixture weight lambda in [0, 1] (default 0.5)", "flag": "--lambda"})
    scaling_norm: float | None = field(default=None, metadata={"help": "SISS: norm the NegGrad gradient is fixed to (default 5)"})
    superfactor: float | None = field(default=None, metadata={"help": "SISS: fixed NegGrad multiplier instead of norm-fixing"})
    norm_refresh: int | None = field(default=None, metadata={"help": "SISS: take both gradients every k-th step only, reusing ||G_a|| in between (approximation; default 1 = exact)"})
    inner_steps: int | None = field(default=None, metadata={"help": "EraseDiff: inner passes over A per step (default 2)"})
    lambda_e: float | None = field(default=None, metadata={"help": "EraseDiff: weight of the forget loss (default 0.1)"})
    adaptive: bool | None = field(default=None, metadata={"help": "EraseDiff: adaptive lambda_e = max(eta - cos, 0)"})
    eta: float | None = field(default=None, metadata={"help": "EraseDiff: eta of the adaptive weight"})
    lambda_r: float | None = field(default=None, metadata={"help": "ReTrack: weight of the redirect loss (default 0.005)"})
    knn: int | None = field(default=None, metadata={"help": "ReTrack: neighbours per forget item (default 10)"})
    # after saving: verification.json + report.html (diffunlearn.verification)
    verify: str = field(default="fast", metadata={"help": "verify the deletion after saving the model: fast, full "
                                                          "or off (writes verification.json and report.html)"})
    audit: str = field(default="", metadata={"help": "with --verify: relearning audit relearn[:K] (fine-tune K "
                                                     "steps on X \\ A and on A's neighbours, measure A again)"})

    def method_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in ("lam", "scaling_norm", "superfactor", "inner_steps", "lambda_e",
                                              "adaptive", "eta", "lambda_r", "knn", "norm_refresh")
                if getattr(self, k) is not None}

    def build_method(self) -> Method:
        return make_method(self.method, **self.method_kwargs())

    def validate(self, num_timesteps: int | None = None) -> None:
        from .verification.command import check_options

        check_options(self.verify, self.audit)
        if not self.requests and (self.held_out or self.sscd or self.similarity_t != SIMILARITY_T):
            raise UserError("--held-out, --sscd and --similarity-t apply only with --requests")
        if self.checkpoint_every < 0:
            raise UserError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.steps < 0:
            raise UserError(f"--steps must be >= 0, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise UserError("--batch-size and --grad-accum must be at least 1")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not self.clip_norm > 0:
            raise UserError(f"--clip-norm must be positive, got {self.clip_norm}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.weight_decay < 0:
            raise UserError("AdamW needs 0 <= beta1, beta2 < 1 and weight decay >= 0")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if num_timesteps is not None:
            t_max = num_timesteps - 1 if self.t_max < 0 else self.t_max
            if not 0 <= self.t_min <= t_max < num_timesteps:
                raise UserError(f"timestep range [{self.t_min}, {self.t_max}] must lie within [0, {num_timesteps - 1}]")


def _accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = not torch.cuda.is_available()  # on CPU-only machines, WORLD_SIZE > 1 means gloo processes (MULTI_CPU)
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:  # a previous Accelerator in this process fixed other settings
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


class RowSampler:
    """Draws the rows of optimiser steps from one generator, independent of batch splitting."""

    def __init__(self, kept: torch.Tensor, forget: torch.Tensor, method: Method, t_min: int, t_max: int, seed: int):
        self.kept, self.forget, self.method = kept, forget, method
        self.t_min, self.t_max = t_min, t_max
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> StepBatch:
        g = self.generator
        shape = tuple(self.kept.shape[1:])
        x_idx = torch.randint(0, len(self.kept), (n,), generator=g)
        a_idx = torch.randint(0, len(self.forget), (n,), generator=g)
        eps = torch.randn((n, *shape), generator=g)
        t = sample_timesteps(n, self.t_min, self.t_max, g)
        extra = self.method.draw(n, shape, g)
        return StepBatch(x_idx, a_idx, self.kept[x_idx], self.forget[a_idx], eps, t, extra)


def unlearn(model: DiffusionModel, kept: torch.Tensor, forget: torch.Tensor, method: Method,
            cfg: UnlearnConfig | None = None, log: Callable[[dict], None] | None = None,
            callback: Callable[[int, torch.nn.Module], None] | None = None,
            checkpoint: "Checkpointer | None" = None) -> DiffusionModel:
    """Unlearn ``forget`` (A) from ``model`` keeping ``kept`` (X \\ A); returns a new model, ``model`` is unchanged.

    ``log`` receives one dict per optimiser step; ``callback(step, unet)`` runs after each step (evaluation curves);
    ``checkpoint`` saves (every ``cfg.checkpoint_every`` steps) and restores the complete training state.
    """
    cfg = cfg or UnlearnConfig()
    cfg.validate(model.num_train_timesteps)
    if len(forget) == 0:
        raise UserError("the forget set is empty")
    if len(kept) == 0:
        raise UserError("nothing is left to keep: A equals X")
    model.check_data(tuple(kept.shape[1:]), "kept")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = _accelerator(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    if method.from_scratch:
        unet = type(model.unet).from_config(model.unet.config)
    else:
        unet = copy.deepcopy(model.unet)
    unet.to(acc.device).train()
    if cfg.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    t_max = model.num_train_timesteps - 1 if cfg.t_max < 0 else cfg.t_max
    sampler = RowSampler(kept, forget, method, cfg.t_min, t_max, cfg.seed)
    world, rank = acc.num_processes, acc.process_index
    per_proc = cfg.batch_size * cfg.grad_accum
    ctx = Context(model.alphas_cumprod(acc.device), kept.to(acc.device), forget.to(acc.device), cfg.t_min, t_max,
                  acc.device, sampler.generator, unet=unet, optimizer=opt, batch_size=cfg.batch_size,
                  draw=sampler.draw, autocast=acc.autocast)
    method.setup(ctx)
    first = 1
    if checkpoint is not None and checkpoint.exists():
        first = checkpoint.restore(unet, opt, sampler.generator, method) + 1
    for step in range(first, cfg.steps + 1):
        t0 = time.time()
        record: dict = {"step": step}
        record.update(method.before_step(ctx))
        separate = method.separate_grads  # asked every step: a method may combine separately only on some steps
        # One micro-batch in one process: a subtracting method gets its update with G_a as the only extra buffer
        lean = separate and cfg.grad_accum == 1 and world == 1 and hasattr(method, "stats_in_graph")
        coefs = None if separate else method.loss_coefficients()
        rows = sampler.draw(per_proc * world).slice(slice(rank * per_proc, (rank + 1) * per_proc)).to(acc.device)
        opt.zero_grad(set_to_none=True)
        bufs: dict[str, list[torch.Tensor]] = {}
        sums: dict[str, float] = {}
        for mb in range(cfg.grad_accum):
            micro = rows.slice(slice(mb * cfg.batch_size, (mb + 1) * cfg.batch_size))
            with acc.autocast():
                terms = method.terms(unet, micro, ctx)
            for k, v in terms.losses.items():
                sums["loss_" + k] = sums.get("loss_" + k, 0.0) + float(v.detach().mean()) / cfg.grad_accum
            for k, v in terms.stats.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
            if lean:
                update_stats = _subtract_in_graph(method, terms.losses, params)
            elif separate:
                names = list(terms.losses)
                for i, k in enumerate(names):
                    grads = torch.autograd.grad(terms.losses[k].mean() / cfg.grad_accum, params,
                                                retain_graph=i + 1 < len(names), allow_unused=True)
                    acc_k = bufs.setdefault(k, [torch.zeros_like(p) for p in params])
                    for b, g in zip(acc_k, grads):
                        if g is not None:
                            b.add_(g)
            else:
                loss = sum(coefs[k] * v.mean() for k, v in terms.losses.items()) / cfg.grad_accum
                loss.backward()
        if not all(torch.isfinite(torch.tensor(v)) for k, v in sums.items() if k.startswith("loss_")):
            raise UserError(f"the loss became NaN or Inf at step {step}; {_kept_note(checkpoint)}lower --lr or check the data")
        if lean:
            record.update(update_stats)
        elif separate:
            if world > 1:
                bufs = {k: [acc.reduce(b, reduction="mean") for b in v] for k, v in bufs.items()}
            update, stats = method.combine(bufs)
            record.update(stats)
            for p, g in zip(params, update):
                p.grad = g
        else:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif world > 1:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        if world > 1:
            sums = {k: float(acc.reduce(torch.tensor(v, device=acc.device), reduction="mean")) for k, v in sums.items()}
        total = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
        if not torch.isfinite(torch.tensor(total)):
            raise UserError(f"the gradient became NaN or Inf at step {step}; {_kept_note(checkpoint)}lower --lr or check the data")
        opt.step()
        record.update(sums)
        record.update({"grad_norm": total, "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 4)})
        if log is not None and acc.is_main_process:
            log(record)
        if callback is not None:
            unet.eval()
            callback(step, unet)
            unet.train()
        if checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            if acc.is_main_process:
                checkpoint.save(step, unet, opt, sampler.generator, method)
            acc.wait_for_everyone()
    opt.zero_grad(set_to_none=True)
    unet.eval().to("cpu")
    if hasattr(unet, "disable_gradient_checkpointing") and cfg.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    return DiffusionModel(unet, copy.deepcopy(model.scheduler), source=f"{model.source} unlearned by {method.name}",
                          codec=model.codec)


def _subtract_in_graph(method, losses: dict[str, torch.Tensor], params: list) -> dict[str, float]:
    """``g = G_x - c G_a`` into the parameters' gradients with ``G_a`` the only buffer held beside them: ``G_a`` from
    its own backward pass (the graph kept), ``c`` from it, then one backward pass of ``mean L_x - c mean L_a``. Two
    backward passes, as when both gradients are accumulated separately, but one gradient buffer instead of three."""
    ga = torch.autograd.grad(losses["a"].mean(), params, retain_graph=True, allow_unused=True)
    ga = [torch.zeros_like(p) if g is None else g for p, g in zip(params, ga)]
    c = method.factor_for(ga)
    (losses["x"].mean() - c * losses["a"].mean()).backward()
    for p in params:
        if p.grad is None:  # a parameter neither loss reaches
            p.grad = torch.zeros_like(p)
    return method.stats_in_graph([p.grad for p in params], ga, c)


def _kept_note(checkpoint) -> str:
    step = checkpoint.last_step() if checkpoint is not None else None
    return f"the checkpoint of step {step} is kept (--resume continues from it); " if step else ""


class Checkpointer:
    """One file holding everything a run needs to continue bit-for-bit: weights, AdamW state, the row sampler's
    generator state and the step. Written to a temporary file, fsynced, then renamed over the old one, so a kill at
    any moment leaves either the previous checkpoint or the new one, never a torn file. Loaded with
    ``weights_only=True`` (tensors and numbers only; it is our own file, but no code can run from it either way)."""

    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def last_step(self) -> int | None:
        return int(torch.load(self.path, weights_only=True)["step"]) if self.exists() else None

    def save(self, step: int, unet, opt, generator: torch.Generator, method: Method) -> None:
        import os

        state = {"step": step, "model": {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()},
                 "optimizer": opt.state_dict(), "generator": generator.get_state(), "method": method.state_dict()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def restore(self, unet, opt, generator: torch.Generator, method: Method) -> int:
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read checkpoint {self.path}: {e}") from None
        unet.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        method.load_state_dict(state.get("method", {}))
        return int(state["step"])


RESUME_IGNORES = ("resume", "overwrite", "threads", "log_every", "verify", "audit")


def run_unlearn(cfg: UnlearnConfig) -> dict:
    """The ``diffunlearn unlearn`` command: validate everything, then unlearn and write the run directory.

    Under ``accelerate launch`` every process runs this; only the main process writes. With ``--resume`` the run in
    ``--out`` continues from its last checkpoint (its settings must match) and ends with the same weights as an
    uninterrupted run.
    """
    from pathlib import Path

    from .data import load_data, resolve_forget, split_kept
    from .models import load_model, model_summary, save_model, state_hash
    from .runs import RunDir, prepare_out_dir

    if cfg.requests:
        from .sequential import run_sequential

        return run_sequential(cfg)
    method = cfg.build_method()
    cfg.validate()
    if not cfg.out:
        raise UserError("pass --out: the run directory to create")
    if not cfg.model:
        raise UserError("pass --model: a diffusers model directory")
    out = Path(cfg.out)
    if cfg.resume:
        _check_resumable(out, cfg)
    else:
        prepare_out_dir(out, cfg.overwrite)
    model = load_model(resolve_model_dir(cfg.model), allow_pickle=cfg.allow_pickle)
    cfg.validate(model.num_train_timesteps)
    data = load_data(cfg.data)
    model.check_images(data.shape, "data")
    forget_idx = resolve_forget(cfg.forget, data)
    kept, forget = split_kept(data, forget_idx)
    # a latent model's images are encoded here, once (the codec caches them); the trainer sees only latents
    kept, forget = model.encode(kept, "data"), model.encode(forget, "data")
    src = Path(model.source).resolve()
    if out.resolve() == src or src in out.resolve().parents or out.resolve() in src.parents:
        raise UserError("--out must not contain or be inside the input model's directory: the input is never modified")
    hash_before = state_hash(model.unet)
    acc = _accelerator(cfg.mixed_precision)
    acc.wait_for_everyone()  # every process has validated before anything is written
    run = None
    checkpoint = Checkpointer(out / "checkpoint.pt")
    if acc.is_main_process:
        config = {"command": "unlearn", **asdict(cfg), "method_hyperparameters": method.hyperparameters()}
        run = RunDir(out, config, cfg.overwrite, resume_from=checkpoint.last_step() or 0 if cfg.resume else None)
    acc.wait_for_everyone()
    every = max(1, cfg.log_every)
    last: dict = {}

    def log(rec):
        last.clear()
        last.update(rec)
        run.log(rec)
        if rec["step"] % every == 0 or rec["step"] == cfg.steps:
            keys = [k for k in rec if k.startswith("loss_")] + ["grad_norm", "seconds"]
            print(f"step {rec['step']}/{cfg.steps} " + " ".join(f"{k}={rec[k]:.4g}" for k in keys if k in rec), flush=True)

    new = unlearn(model, kept, forget, method, cfg, log=log, checkpoint=checkpoint)
    summary = {"command": "unlearn", "method": method.name, "hyperparameters": method.hyperparameters(),
               "steps": cfg.steps, "kept": len(kept), "forget": len(forget_idx),
               "forget_names": [data.names[i] for i in forget_idx][:50],
               "model_in": {"dir": model.source, "sha256": hash_before},
               "model_out": {"dir": str(out / "model"), "sha256": state_hash(new.unet)},
               "processes": acc.num_processes, "last_step": last, "model": model_summary(new)}
    if acc.is_main_process:
        save_model(new, run.model_dir)  # atomic: the model directory appears only when complete
        run.finish(summary)
        print(f"saved {run.model_dir}")
        checkpoint.path.unlink(missing_ok=True)
    acc.wait_for_everyone()
    if acc.is_main_process:  # the model is saved: a failed verification is recorded, the model stays
        from .verification.command import audit_settings, verify_run

        summary["verification"] = verify_run(out, model, new, data, forget_idx, cfg.verify, seed=cfg.seed, audit=
                                             audit_settings(cfg.audit, cfg.lr, cfg.batch_size, cfg.seed))
    return summary


def _check_resumable(out, cfg: UnlearnConfig) -> None:
    import yaml

    if not (out / "config.yaml").is_file():
        raise UserError(f"nothing to resume in {out}: no config.yaml (start the run without --resume)")
    if (out / "summary.json").is_file():
        raise UserError(f"the run in {out} has already finished")
    old = yaml.safe_load((out / "config.yaml").read_text()) or {}
    defaults = {f.name: f.default for f in fields(cfg)}  # a run started before an option existed used its default
    diff = [k for k, v in asdict(cfg).items() if k not in RESUME_IGNORES and old.get(k, defaults[k]) != v]
    if diff:
        raise UserError(f"--resume needs the same settings as the run in {out}; these differ: {', '.join(diff)}")


def resolve_model_dir(path: str) -> str:
    """A run directory (holding ``model/``) or a model directory."""
    from pathlib import Path

    from .pretrained import available, pretrained_dir

    p = Path(path)
    if not p.exists() and path in available():
        p = pretrained_dir(path)
    if (p / "model" / "model_index.json").is_file() or (p / "model" / "unet").is_dir():
        return str(p / "model")
    return str(p)

