"""Training a DDPM from scratch: the base model on X, or the retrain gold standard on X \\ A.

The recipe follows the paper's MNIST model (AdamW, cosine schedule with warm-up, EMA with inv_gamma 1, power 0.75,
max 0.9999); the EMA weights are what gets saved, since unlearning starts from them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .config import run_field
from .console import logger
from .data import load_data, resolve_forget, split_kept
from .data.arrays import as_tensor_or_lazy
from .data.labels import require_labels, split_labels
from .data.loader import RowFetcher
from .errors import UserError
from .model import DiffusionModel, build_scheduler, build_unet, model_summary, save_model
from .model.schedule import ddpm_loss, sample_timesteps
from .runs import RunDir
from .tracking import Progress

say = logger(__name__).info


@dataclass
class TrainConfig:
    data: str = field(default="", metadata={"help": "data SPEC: image folder, .npy/.npz, or a built-in name"})
    forget: str = field(default="", metadata={"help": "forget SPEC: when given, train on X \\ A "
                                                      "(the retrain gold standard)"})
    out: str = run_field("out")
    arch: str = field(default="mnist-small", metadata={"help": "UNet size: mnist-small, mnist-paper, toy, tiny"})
    class_conditional: bool = field(default=False, metadata={"help": "train a class-conditional UNet on the data's "
                                                                     "labels (class subfolders, "
                                                                     "an .npz 'labels' array)"})
    label_dropout: float = field(default=0.1, metadata={"help": "class-conditional: fraction of rows trained with the "
                                                                "null class (classifier-free guidance)"})
    steps: int = field(default=4000, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    warmup: int = field(default=500, metadata={"help": "linear warm-up steps before the cosine decay"})
    weight_decay: float = field(default=1e-6, metadata={"help": "AdamW weight decay"})
    ema_max_decay: float = field(default=0.9999, metadata={"help": "EMA decay ceiling (inv_gamma 1, power 0.75)"})
    timesteps: int = field(default=1000, metadata={"help": "diffusion steps T (linear betas 1e-4..0.02)"})
    seed: int = field(default=0, metadata={"help": "random seed: same seed, same weights"})
    threads: int = run_field("threads")
    data_workers: int = field(default=2, metadata={"help": "processes that decode a step's images from disk (0: this "
                                                           "process decodes them; in-memory data never uses them)"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (GPU)"})
    log_every: int = field(default=50, metadata={"help": "log a line every N steps"})
    overwrite: bool = run_field("overwrite")


def ema_decay(step: int, max_decay: float, inv_gamma: float = 1.0, power: float = 0.75) -> float:
    """EMA warm-up of Song et al. / diffusers ``EMAModel``: ``1 - (1 + step / inv_gamma) ** -power``, capped."""
    return min(max_decay, max(0.0, 1.0 - (1.0 + step / inv_gamma) ** -power))


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_loop(unet: torch.nn.Module, draw: Callable, batch_loss: Callable, run: RunDir, *, steps: int, lr: float,
               warmup: int, weight_decay: float, ema_max_decay: float, seed: int, log_every: int,
               mixed_precision: str = "no") -> tuple[torch.nn.Module, dict]:
    """The one from-scratch training loop (the base model, the retrain gold standard, the prompt replica): AdamW
    (betas 0.95/0.999) at ``lr`` after ``warmup`` linear warm-up steps with cosine decay, the gradient clipped to 1.0,
    and an EMA copy of the weights (inv_gamma 1, power 0.75, at most ``ema_max_decay``), through Accelerate.

    Each step draws its batch, a tuple of tensors, with ``draw(generator)`` from one generator seeded by ``seed``,
    moves it to the device and back-propagates the scalar ``batch_loss(unet, batch)``. Every ``log_every`` steps and
    at the last, the mean loss since the previous record, the gradient norm, lr, EMA decay and seconds go to
    ``run``'s log and are printed. Trains ``unet`` in place; returns the EMA weights (on the CPU, not trainable) and
    the last record."""
    from .trainer import accelerator

    acc = accelerator(mixed_precision)
    unet.train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    unet, opt = acc.prepare(unet, opt)
    ema.to(acc.device)
    gen = torch.Generator().manual_seed(seed)
    t0, running, rec = time.time(), 0.0, {}
    progress = Progress(steps, log_every, start=0)  # lines only at logged steps: the first step is 1
    for step in range(steps):
        batch = tuple(v.to(acc.device) for v in draw(gen))
        with acc.autocast():
            loss = batch_loss(unet, batch)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        gnorm = acc.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        d = ema_decay(step, ema_max_decay)
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), acc.unwrap_model(unet).parameters()):
                pe.lerp_(p.detach(), 1.0 - d)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rec = {"step": step + 1, "loss": running / ((step % log_every) + 1), "grad_norm": float(gnorm),
                   "lr": sched.get_last_lr()[0], "ema_decay": d, "seconds": round(time.time() - t0, 2)}
            running = 0.0
            run.log(rec)
            line = progress.line(step + 1, rec, ["loss", "grad_norm", "lr"])
            if line:
                say(line)
    return ema.to("cpu"), rec


def train(cfg: TrainConfig) -> dict:
    """Train a DDPM on the configured data and save the EMA weights to ``<out>/model``."""
    if cfg.steps <= 0 or cfg.batch_size <= 0:
        raise UserError("--steps and --batch-size must be positive")
    if not cfg.lr > 0:
        raise UserError("--lr must be positive")
    if cfg.data_workers < 0:
        raise UserError(f"--data-workers must be >= 0, got {cfg.data_workers}")
    if not cfg.out:
        raise UserError("pass --out: the run directory to create")
    if not 0 <= cfg.label_dropout < 1:
        raise UserError(f"--label-dropout must lie in [0, 1), got {cfg.label_dropout}")
    data = load_data(cfg.data)
    if cfg.class_conditional:
        require_labels(data, "--class-conditional needs labelled data")
    images, labels = data.images, data.labels
    kept_what = "X"
    if cfg.forget:
        forget = resolve_forget(cfg.forget, data)
        images, _ = split_kept(data, forget)
        labels = None if labels is None else split_labels(labels, forget)[0]
        kept_what = "X \\ A"
    c, h, w = data.shape
    if h != w:
        raise UserError(f"images must be square, got {h}x{w}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    classes = data.classes if cfg.class_conditional else None
    # a null class only when some rows learn it (label dropout): otherwise guidance would use an untrained embedding
    unet = build_unet(cfg.arch, h, c, num_classes=None if classes is None else len(classes),
                      null_class=cfg.label_dropout > 0)
    model = DiffusionModel(unet, build_scheduler(cfg.timesteps), classes=classes)
    run = RunDir(cfg.out, {"command": "train", **asdict(cfg)}, cfg.overwrite)

    abar = model.alphas_cumprod()

    def draw(gen: torch.Generator) -> tuple:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        eps = torch.randn((cfg.batch_size, c, h, w), generator=gen)
        t = sample_timesteps(cfg.batch_size, 0, cfg.timesteps - 1, gen)
        batch = (fetcher.fetch([idx])[0], eps, t)  # only this step's rows are decoded
        if classes is None:
            return batch
        if cfg.label_dropout == 0:
            return batch + (labels[idx],)
        # classifier-free guidance: a fraction of rows learn the null class (index len(classes)) instead of their own
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
        return batch + (torch.where(drop, len(classes), labels[idx]),)

    def batch_loss(net, batch) -> torch.Tensor:
        # mean over pixels (the standard diffusers recipe); unlearning uses sums, as docs/methods.md says
        return ddpm_loss(net, *batch[:3], abar, *batch[3:]).mean() / (c * h * w)

    images = as_tensor_or_lazy(images)
    fetcher = RowFetcher([images], cfg.data_workers)
    t0 = time.time()
    try:
        ema, _ = train_loop(unet, draw, batch_loss, run, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                            weight_decay=cfg.weight_decay, ema_max_decay=cfg.ema_max_decay, seed=cfg.seed,
                            log_every=cfg.log_every, mixed_precision=cfg.mixed_precision)
    finally:
        fetcher.close()
    out_model = DiffusionModel(ema, model.scheduler, classes=classes)
    from .runs.cards import training_card

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "threads", "log_every")}
    save_model(out_model, run.model_dir, extra_files={"README.md": training_card(kept_what, len(images), settings)})
    summary = {"command": "train", "trained_on": kept_what, "images": len(images), "steps": cfg.steps,
               "train_seconds": round(time.time() - t0, 1), "model": model_summary(out_model),
               "model_dir": str(run.model_dir)}
    run.finish(summary)
    say(f"saved {run.model_dir} (trained on {kept_what}: {len(images)} images, {cfg.steps} steps, "
        f"{summary['train_seconds']:.0f} s)")
    return summary
