"""The deletion fine-tuning loop: any registered method, through Accelerate.

Each optimiser step draws all its rows at once from one seeded generator (pairs from X \\ A and A, noise, timesteps
and the method's own randomness), then splits them over processes and micro-batches. So the update does not depend
on how a global batch is split: batch 1 x accumulation 8 equals batch 8 x accumulation 1, and two processes equal
one. Only then are images fetched: each process fetches its own rows' images alone, from memory or from disk through
a DataLoader with ``data_workers`` processes (:mod:`diffunlearn.data.loader`), so nothing else is decoded. How the
gradients of a method's loss terms become one update is the method's own (``Method.backward`` per micro-batch,
``Method.finish`` per step); the loop never names a term or a method. The final gradient is clipped and AdamW steps.
The input model is never modified: the loop trains a copy.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import run_field
from .data.arrays import as_tensor_or_lazy
from .data.loader import RowFetcher
from .errors import RunFailed, UserError
from .methods import Context, Method, StepBatch
from .methods.base import GradStep
from .model import DiffusionModel
from .model.schedule import sample_timesteps
from .optim import check_optimizer, make_optimizer


@dataclass
class TrainerConfig:
    """How the deletion fine-tuning runs: optimiser, steps, batching, timesteps, precision, checkpoints."""

    steps: int = field(default=300, metadata={"help": "optimiser steps"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate (constant)"})
    batch_size: int = field(default=64, metadata={"help": "rows per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    beta1: float = field(default=0.95, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    weight_decay: float = field(default=1e-6, metadata={"help": "AdamW weight decay"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw, or adamw8bit: 8-bit AdamW states (bitsandbytes), "
                                                             "2 instead of 8 bytes per parameter"})
    clip_norm: float = field(default=1.0, metadata={"help": "clip the final gradient to this L2 norm"})
    t_min: int = field(default=0, metadata={"help": "smallest training timestep"})
    t_max: int = field(default=-1, metadata={"help": "largest training timestep (-1: T-1)"})
    seed: int = field(default=0, metadata={"help": "random seed: same seed, same weights"})
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16 (GPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (large UNets)"})
    threads: int = run_field("threads")
    checkpoint_every: int = field(default=-1, metadata={"help": "write a resumable checkpoint every N steps (0: never; "
                                                                "-1: every 10 minutes of wall time)"})
    data_workers: int = field(default=2, metadata={"help": "processes that decode a step's images from disk (0: this "
                                                           "process decodes them; in-memory data never uses them)"})

    def validate(self, num_timesteps: int | None = None) -> None:
        if self.checkpoint_every < -1:
            raise UserError(f"--checkpoint-every must be >= -1 (-1: every 10 minutes), got {self.checkpoint_every}")
        if self.data_workers < 0:
            raise UserError(f"--data-workers must be >= 0, got {self.data_workers}")
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
        check_optimizer(self.optimizer)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if num_timesteps is not None:
            t_max = num_timesteps - 1 if self.t_max < 0 else self.t_max
            if not 0 <= self.t_min <= t_max < num_timesteps:
                raise UserError(f"timestep range [{self.t_min}, {self.t_max}] must lie within [0, {num_timesteps - 1}]")


def accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = not torch.cuda.is_available()  # on CPU-only machines, WORLD_SIZE > 1 means gloo processes (MULTI_CPU)
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:  # a previous Accelerator in this process fixed other settings
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


class RowSampler:
    """Draws the rows of optimiser steps from one generator, independent of batch splitting; fetches their images.

    ``rows(n)`` draws a step's indices and randomness (the generator's only use); ``fetch`` then gets the images of
    the rows a process keeps, so under several processes each decodes only its own share. ``kept`` and ``forget``
    are tensors or lazy :class:`~diffunlearn.data.arrays.ImageArray` (read through a DataLoader with ``workers``)."""

    def __init__(self, kept, forget, method: Method, t_min: int, t_max: int, seed: int, workers: int = 0,
                 labels: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.kept, self.forget = as_tensor_or_lazy(kept), as_tensor_or_lazy(forget)
        self.labels = labels  # (labels of X \ A, labels of A) for a class-conditional model
        self.method = method
        self.t_min, self.t_max = t_min, t_max
        self.generator = torch.Generator().manual_seed(seed)
        self.fetcher = RowFetcher([self.kept, self.forget], workers)

    def rows(self, n: int) -> StepBatch:
        g = self.generator
        shape = tuple(self.kept.shape[1:])
        x_idx = torch.randint(0, len(self.kept), (n,), generator=g)
        a_idx = torch.randint(0, len(self.forget), (n,), generator=g)
        eps = torch.randn((n, *shape), generator=g)
        t = sample_timesteps(n, self.t_min, self.t_max, g)
        extra = self.method.draw(n, shape, g)
        x_y, a_y = (None, None) if self.labels is None else (self.labels[0][x_idx], self.labels[1][a_idx])
        return StepBatch(x_idx, a_idx, None, None, eps, t, extra, x_y, a_y)

    def fetch(self, batch: StepBatch, parts: tuple[str, ...] = ("x", "a")) -> StepBatch:
        """``batch`` with the images of its rows (``parts``: ``x`` from X \\ A, ``a`` from A)."""
        x, a = self.fetcher.fetch([batch.x_idx if "x" in parts else None, batch.a_idx if "a" in parts else None])
        return dataclasses.replace(batch, x=x, a=a)

    def draw(self, n: int, parts: tuple[str, ...] = ("x", "a")) -> StepBatch:
        return self.fetch(self.rows(n), parts)

    def close(self) -> None:
        self.fetcher.close()


def unlearn(model: DiffusionModel, kept, forget, method: Method,
            cfg: TrainerConfig | None = None, log: Callable[[dict], None] | None = None,
            callback: Callable[[int, torch.nn.Module], None] | None = None,
            checkpoint: "Checkpointer | None" = None,
            labels: tuple[torch.Tensor, torch.Tensor] | None = None) -> DiffusionModel:
    """Unlearn ``forget`` (A) from ``model`` keeping ``kept`` (X \\ A); returns a new model, ``model`` is unchanged.

    ``kept`` and ``forget`` are tensors (N, C, H, W) in model space or lazy image arrays (``split_kept``), whose
    images are then decoded per step, only for the rows drawn. A class-conditional model needs ``labels``: the class
    indices of ``kept`` and of ``forget`` (every method then conditions each row on its own label). ``log`` receives one
    dict per optimiser step; ``callback(step, unet)`` runs after each step (evaluation curves) and ends the run there by
    returning True (``unlearn --until removed``); ``checkpoint`` saves (every ``cfg.checkpoint_every`` steps) and
    restores the complete training state.
    """
    cfg = cfg or TrainerConfig()
    cfg.validate(model.num_train_timesteps)
    if len(forget) == 0:
        raise UserError("the forget set is empty")
    if len(kept) == 0:
        raise UserError("nothing is left to keep: A equals X")
    model.check_data(tuple(kept.shape[1:]), "kept")
    labels = check_labels(model, labels, len(kept), len(forget))
    if labels is not None:
        method.check_labels(*labels)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = accelerator(cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    if method.from_scratch:
        unet = type(model.unet).from_config(model.unet.config)
    else:
        unet = copy.deepcopy(model.unet)
    unet.to(acc.device).train()
    if cfg.gradient_checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.optimizer, params, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    t_max = model.num_train_timesteps - 1 if cfg.t_max < 0 else cfg.t_max
    kept, forget = (x.to(acc.device) if torch.is_tensor(x) else x for x in map(as_tensor_or_lazy, (kept, forget)))
    sampler = RowSampler(kept, forget, method, cfg.t_min, t_max, cfg.seed, cfg.data_workers, labels)
    try:
        return _loop(model, unet, opt, params, method, cfg, acc, sampler, t_max, log, callback, checkpoint)
    finally:
        sampler.close()


def space_needed(model: DiffusionModel, cfg: TrainerConfig) -> dict[str, int]:
    """Bytes a run writes beside its logs: the model directory (UNet and, for a latent model, its autoencoder) and,
    when checkpoints are written, two checkpoints (the new one is written beside the old before replacing it), each
    holding the weights and the optimiser's two moments."""
    weights = sum(t.numel() * t.element_size() for t in model.unet.state_dict().values())
    codec = (sum(t.numel() * t.element_size() for t in model.codec.module.state_dict().values())
             if model.codec is not None else 0)
    needs = {"model": weights + codec}
    if cfg.checkpoint_every != 0 and cfg.steps > 0:
        trained = sum(p.numel() for p in model.unet.parameters() if p.requires_grad)
        moments = trained * (2 if cfg.optimizer == "adamw8bit" else 8)
        needs["checkpoints"] = 2 * (weights + moments)
    return needs


def check_labels(model: DiffusionModel, labels, n_kept: int, n_forget: int):
    """Class labels go with a class-conditional model and only with one: one int64 label per kept and forget item,
    each a class the model knows."""
    if not model.conditional:
        if labels is not None:
            raise UserError("class labels were given but the model is not class-conditional: drop the labels")
        return None
    if labels is None:
        raise UserError("the model is class-conditional but the data has no class labels: give labelled data (class "
                        "subfolders, or a 'labels' array in the .npz)")
    from .data.labels import check_model_labels

    return tuple(check_model_labels(y, model.classes, n, what)
                 for y, n, what in zip(labels, (n_kept, n_forget), ("kept", "forget")))


def _loop(model, unet, opt, params, method, cfg, acc, sampler, t_max, log, callback, checkpoint) -> DiffusionModel:
    world, rank = acc.num_processes, acc.process_index
    per_proc = cfg.batch_size * cfg.grad_accum
    ctx = Context(model.alphas_cumprod(acc.device), sampler.kept, sampler.forget, cfg.t_min, t_max, acc.device,
                  sampler.generator, unet=unet, optimizer=opt, batch_size=cfg.batch_size, draw=sampler.draw,
                  autocast=acc.autocast, labels=sampler.labels)
    method.setup(ctx)
    first = 1
    if checkpoint is not None and checkpoint.exists():
        first = checkpoint.restore(unet, opt, sampler.generator, method) + 1
        if checkpoint.final:  # the run had finished training; only its model was not written
            first = cfg.steps + 1
    reduce = (lambda t: acc.reduce(t, reduction="mean")) if world > 1 else (lambda t: t)
    last_save = time.time()
    touched = [False]  # set when an optimiser step begins: from then on the weights are no longer the last step's
    hook = opt.register_step_pre_hook(lambda *_: touched.__setitem__(0, True))
    for step in range(first, cfg.steps + 1):
        t0 = time.time()
        start = (sampler.generator.get_state(), copy.deepcopy(method.state_dict()))
        touched[0] = False
        try:
            record = _step(step, unet, opt, params, method, cfg, acc, sampler, ctx, reduce, world, rank, per_proc)
            record.update({"seconds": round(time.time() - t0, 4)})
            if log is not None and acc.is_main_process:
                log(record)  # the run's log file: a full disk here is a failure of the run
        except BaseException as e:
            hook.remove()
            _failed(e, step, first, start, touched[0] or world > 1, unet, opt, sampler, method, checkpoint)
            raise
        if callback is not None:  # the caller's own code: its exceptions reach the caller as they are
            unet.eval()
            stop = callback(step, unet) is True  # a callback that returns True ends the run at this step
            unet.train()
            if stop:
                break
        if checkpoint is not None and step < cfg.steps and _checkpoint_due(cfg, step, last_save, acc):
            try:
                if acc.is_main_process:
                    checkpoint.save(step, unet, opt, sampler.generator, method)
                acc.wait_for_everyone()
            except BaseException as e:
                hook.remove()
                _failed(e, step, first, start, True, unet, opt, sampler, method, checkpoint)
                raise
            last_save = time.time()
    hook.remove()
    opt.zero_grad(set_to_none=True)
    unet.eval().to("cpu")
    if hasattr(unet, "disable_gradient_checkpointing") and cfg.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    return DiffusionModel(unet, copy.deepcopy(model.scheduler), source=f"{model.source} unlearned by {method.name}",
                          codec=model.codec, classes=model.classes)


def _step(step, unet, opt, params, method, cfg, acc, sampler, ctx, reduce, world, rank, per_proc) -> dict:
    """One optimiser step; returns its log record."""
    record: dict = {"step": step}
    record.update(method.before_step(ctx))
    # asked every step: a method may combine its terms' gradients separately only on some steps
    grad_step = GradStep(cfg.grad_accum, single=cfg.grad_accum == 1 and world == 1,
                         separate=method.separate_grads, reduce=reduce)
    mine = sampler.rows(per_proc * world).slice(slice(rank * per_proc, (rank + 1) * per_proc))
    rows = sampler.fetch(mine).to(acc.device)  # this process decodes its own rows' images and no others
    opt.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    for mb in range(cfg.grad_accum):
        micro = rows.slice(slice(mb * cfg.batch_size, (mb + 1) * cfg.batch_size))
        with acc.autocast():
            terms = method.terms(unet, micro, ctx)
        for k, v in terms.losses.items():
            sums["loss_" + k] = sums.get("loss_" + k, 0.0) + float(v.detach().mean()) / cfg.grad_accum
        for k, v in terms.stats.items():
            sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        method.backward(terms.losses, params, grad_step)
    if not all(torch.isfinite(torch.tensor(v)) for k, v in sums.items() if k.startswith("loss_")):
        raise Diverged(f"the loss became NaN or Inf at step {step}: lower --lr")
    record.update(method.finish(params, grad_step))
    if world > 1:
        sums = {k: float(acc.reduce(torch.tensor(v, device=acc.device), reduction="mean")) for k, v in sums.items()}
    total = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
    if not torch.isfinite(torch.tensor(total)):
        raise Diverged(f"the gradient became NaN or Inf at step {step}: lower --lr")
    opt.step()
    record.update(sums)
    record.update({"grad_norm": total, "lr": opt.param_groups[0]["lr"]})
    return record


class Diverged(UserError):
    """The loss or gradient turned NaN or Inf: the input was checked finite, so the learning rate is the cause."""


def _failed(e, step, first, start, dirty, unet, opt, sampler, method, checkpoint) -> None:
    """A step failed: keep the last good step's state when it is still intact, then raise one line naming the cause.

    Before the optimiser has touched the weights they are still those of step ``step - 1``; with the generator and the
    method's state put back as they were when this step began, that is exactly the checkpoint an uninterrupted run
    would have written there, so ``--resume`` continues bit for bit. Ctrl-C keeps its own exception."""
    if checkpoint is None:
        return
    saved = None
    if not dirty and step > first:
        sampler.generator.set_state(start[0])
        method.load_state_dict(start[1])
        try:
            checkpoint.save(step - 1, unet, opt, sampler.generator, method)
            saved = step - 1
        except OSError:
            pass
    kept = saved if saved is not None else checkpoint.last_step()
    if isinstance(e, KeyboardInterrupt):
        return
    if kept:
        note = (f"the checkpoint of step {kept} is kept, but --resume would repeat the same steps: start again "
                "with --overwrite" if isinstance(e, Diverged) else
                f"the checkpoint of step {kept} is kept: fix the cause and rerun the same command with --resume to "
                "continue from it")
    elif step > 1:
        note = (f"{step - 1} step(s) were trained but none could be kept (no checkpoint yet; --checkpoint-every N "
                "writes one every N steps)")
    else:
        note = "nothing was trained yet"
    if isinstance(e, UserError):
        cause = str(e) if f"step {step}" in str(e) else f"{e} (at step {step})"
        raise RunFailed(f"{cause}; {note}", e, kept, step) from e
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise RunFailed(f"disk full at step {step} while writing {e.filename or 'the run'}; {note}"
                        + (" once space is free" if kept else ""), e, kept, step) from e
    trace = checkpoint.path.with_name("error.txt")
    try:
        trace.write_text("".join(traceback.format_exception(e)))
        where = f"; the traceback is in {trace}"
    except OSError:
        where = ""
    first_line = _first_line(e)
    raise RunFailed(f"step {step} failed: {type(e).__name__}: {first_line}; {note}{where}", e, kept, step) from e


#: with ``checkpoint_every = -1``, a checkpoint is written when this many seconds have passed since the last one
CHECKPOINT_SECONDS = 600.0


def _checkpoint_due(cfg: TrainerConfig, step: int, last_save: float, acc) -> bool:
    if cfg.checkpoint_every >= 0:
        return cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
    due = time.time() - last_save >= CHECKPOINT_SECONDS
    if acc.num_processes > 1:  # every process must decide alike, or the barrier after saving would never be met
        due = bool(acc.reduce(torch.tensor(float(due), device=acc.device), reduction="sum") > 0)
    return due


def _first_line(e: BaseException) -> str:
    """An exception's first sentence: enough to name the cause on the one line an error gets."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]


#: the layout of ``checkpoint.pt`` (1: weights, optimiser, generator, method state and step; or final weights)
CHECKPOINT_FORMAT = 1


class Checkpointer:
    """One file holding everything a run needs to continue bit-for-bit: weights, AdamW state, the row sampler's
    generator state and the step. Written to a temporary file, fsynced, then renamed over the old one, so a kill at
    any moment leaves either the previous checkpoint or the new one, never a torn file. Loaded with
    ``weights_only=True`` (tensors and numbers only; it is our own file, but no code can run from it either way)."""

    def __init__(self, path, extra=None):
        self.path = Path(path)
        self.final = False  # the restored checkpoint holds the finished weights only (save_final)
        #: an object whose ``state_dict()`` is saved with every checkpoint and given back to its
        #: ``load_state_dict`` on restore (the closed loop of ``--until removed``: its checks and decisions)
        self.extra = extra

    def exists(self) -> bool:
        return self.path.is_file()

    def _peek(self, read):
        """``read(state)`` of the checkpoint's contents through a memory map: the weights and optimiser state it also
        holds (gigabytes for a large UNet) are not read. An unreadable checkpoint is a one-line error."""
        try:
            return read(torch.load(self.path, weights_only=True, mmap=True))
        except Exception as e:
            raise UserError(f"cannot read checkpoint {self.path} ({_first_line(e)}): start the "
                            "run again with --overwrite") from None

    def last_step(self) -> int | None:
        """The step the checkpoint holds (None without a checkpoint)."""
        return self._peek(lambda state: int(state["step"])) if self.exists() else None

    def saved_extra(self) -> dict | None:
        """The ``extra`` state the checkpoint holds, or None without a checkpoint."""
        return self._peek(lambda state: state.get("extra")) if self.exists() else None

    def holds_final(self) -> bool:
        """The checkpoint holds finished weights (:meth:`save_final`): resuming only writes the model."""
        if not self.exists():
            return False
        try:
            return self._peek(lambda state: bool(state.get("final")))
        except UserError:  # an unreadable checkpoint is reported where it is restored
            return False

    def save(self, step: int, unet, opt, generator: torch.Generator, method: Method) -> None:
        state = {"format": CHECKPOINT_FORMAT, "step": step,
                 "model": {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()},
                 "optimizer": opt.state_dict(), "generator": generator.get_state(), "method": method.state_dict(),
                 **self._extra()}
        self._write(state)

    def _extra(self) -> dict:
        return {"extra": self.extra.state_dict()} if self.extra is not None else {}

    def save_final(self, step: int, unet) -> None:
        """The trained weights alone, when the model directory could not be written: ``--resume`` then writes the
        model without training again."""
        self._write({"format": CHECKPOINT_FORMAT, "step": step, "final": True,
                     "model": {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}, **self._extra()})

    def _write(self, state: dict) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a half-written file would only hold the space a full disk lacks
            raise
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
            raise UserError(f"cannot read checkpoint {self.path} ({_first_line(e)}): start the run again with "
                            "--overwrite") from None
        fmt = state.get("format", 1) if isinstance(state, dict) else None
        if fmt != CHECKPOINT_FORMAT or "model" not in state or "step" not in state:
            raise UserError(f"checkpoint {self.path} is of another format ({fmt!r}, this version writes "
                            f"{CHECKPOINT_FORMAT}): start the run again with --overwrite, or resume it with the "
                            "version that wrote it")
        try:
            unet.load_state_dict(state["model"])
            if not state.get("final"):
                opt.load_state_dict(state["optimizer"])
                generator.set_state(state["generator"])
                method.load_state_dict(state.get("method", {}))
            if self.extra is not None and "extra" in state:
                self.extra.load_state_dict(state["extra"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"checkpoint {self.path} does not fit this run ({_first_line(e)}): it was "
                            "written for another model or method; start the run again with --overwrite") from None
        self.final = bool(state.get("final"))
        return int(state["step"])
