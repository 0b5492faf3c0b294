"""One deletion request, trained: the path ``unlearn`` takes for its forget set and ``unlearn --requests`` takes for
every request in turn.

A request is trained the same way wherever it comes from: an ``auto`` strength is measured at the model the request
starts from (at the optimiser step's whole batch, a micro-batch at a time), class-conditional rows carry their own
labels, a :class:`~diffunlearn.trainer.Checkpointer` saves and restores the whole training state (and the closed
loop's checks, when there is one), an interrupt says how to continue, and a model directory that cannot be written
leaves the trained weights as a final checkpoint that ``--resume`` turns into the model.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..console import logger
from ..data import ImageSet, load_data
from ..data.arrays import check_decodes
from ..data.cache import cache_dir, check_outside
from ..errors import UserError
from ..methods import Method, MethodSpec
from ..model import DiffusionModel, load_model
from ..protocols.calibration import AUTO_FRACTION, calibrated
from ..runs import check_outside_model
from ..trainer import Checkpointer, TrainerConfig, space_needed, unlearn

say = logger(__name__).info


@dataclass
class Trained:
    """What training one request gave: the new model, the method as it ran (an ``auto`` strength measured) and the
    measurement behind it (None when nothing was ``auto``)."""
    model: DiffusionModel
    method: Method
    calibration: dict | None


def processes() -> int:
    """How many processes train together (``accelerate launch`` sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_inputs(cfg, out: Path) -> tuple[DiffusionModel, ImageSet]:
    """The model and the data of an ``unlearn`` run (``cfg``: its model, data, cache, pickle and variant settings,
    and its ``trainer`` block), checked against each other and against ``out`` before anything is written: the
    trainer's timesteps fit the model, the images fit its sample shape (with ``cfg.check_data``, every file
    decodes), the run directory lies outside the model, and a latent model's cache outside the image folder. Nothing
    is decoded otherwise: files are listed and their headers read, arrays mapped."""
    model = load_model(cfg.model, allow_pickle=cfg.allow_pickle, variant=cfg.variant or None)
    cfg.trainer.validate(model.num_train_timesteps)
    data = load_data(cfg.data, cfg.cache_dir or None)
    model.check_images(data.shape, "data")
    if cfg.check_data:
        say(f"decoded {check_decodes(data.images)} image files: all usable")
    check_outside_model(out, model.source)
    if model.codec is not None:
        check_outside(cache_dir(cfg.cache_dir or None), getattr(data.images, "root", None))
    return model, data


def space_for(model: DiffusionModel, trainer: TrainerConfig, until: bool, replaces_model: bool = False
              ) -> dict[str, int]:
    """Bytes a request writes (:func:`~diffunlearn.trainer.space_needed`), with a closed loop's checkpoints also
    holding its last weights whose quality held (``until``), and a model written beside the one it replaces
    (``replaces_model``: every request of ``--requests`` after the first)."""
    needs = space_needed(model, trainer)
    weights = needs["model"]
    if replaces_model:
        needs["model"] += weights
    if until and "checkpoints" in needs:
        needs["checkpoints"] += 2 * weights
    return needs


def train_request(model: DiffusionModel, kept, forget, spec: MethodSpec, trainer: TrainerConfig, *,
                  labels: tuple[torch.Tensor, torch.Tensor] | None = None, checkpoint: Checkpointer | None = None,
                  log: Callable[[dict], None] | None = None,
                  callback: Callable[[int, torch.nn.Module], bool | None] | None = None) -> Trained:
    """Unlearn ``forget`` from ``model`` keeping ``kept`` with the method ``spec`` names; ``model`` is unchanged.

    ``spec``'s ``auto`` settings are measured at ``model`` on these images first (the same seeds whether the run
    starts or resumes, so a resumed request measures the same value). ``checkpoint`` restores a request that was
    interrupted and saves it as the trainer's settings say; ``log`` gets every step's record, ``callback`` runs after
    every step and ends the request by returning True."""
    spec, calibration = calibrated(model, kept, forget, spec, trainer.batch_size * trainer.grad_accum * processes(),
                                   AUTO_FRACTION, trainer.seed, labels=labels, micro=trainer.batch_size)
    method = spec.build()
    if labels is not None:
        method.check_labels(*labels)
    if calibration:
        say(f"scaling_norm auto = {calibration['scaling_norm']:.4g}: {AUTO_FRACTION:.0%} of ||G_x|| = "
            f"{calibration['grad_norm_x']:.4g} measured at the model this request starts from")
    try:
        new = unlearn(model, kept, forget, method, trainer, log=log, checkpoint=checkpoint, callback=callback,
                      labels=labels)
    except KeyboardInterrupt:
        step = checkpoint.last_step() if checkpoint is not None else None
        say("interrupted: " + (f"rerun the same command with --resume to continue from the checkpoint of step {step}"
                               if step else "no checkpoint was written yet (--checkpoint-every N writes one every N "
                                            "steps)"))
        raise
    return Trained(new, method, calibration)


def keep_trained(e: OSError, checkpoint: Checkpointer, new: DiffusionModel, step: int, model_dir: Path) -> None:
    """The model directory could not be written (the partial one is gone): keep the trained weights as a final
    checkpoint, which ``--resume`` turns into the model without training again, and say so in one line."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = "disk full" if full else f"cannot write ({e.strerror or e})"
    fix = "free space" if full else "fix the cause"
    try:
        checkpoint.save_final(step, new.unet)
        raise UserError(f"{cause} while writing the model to {model_dir}: the trained weights are kept in "
                        f"{checkpoint.path} (step {step}); {fix} and rerun the same command with --resume") from None
    except OSError:
        kept = checkpoint.last_step()
    then = (f"--resume continues from the checkpoint of step {kept}" if kept else
            "nothing is kept, so the run must start again (--overwrite)")
    raise UserError(f"{cause} while writing the model to {model_dir}, and the trained weights could not be kept "
                    f"either: {fix}; {then}") from None
