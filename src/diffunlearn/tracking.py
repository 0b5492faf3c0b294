"""Experiment tracking through Accelerate's trackers (TensorBoard, or Weights & Biases in offline mode), and the
progress line with an ETA that every training command prints."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .errors import UserError

REPORT_TO = ("none", "tensorboard", "wandb")


def check_report_to(name: str) -> None:
    if name not in REPORT_TO:
        raise UserError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {name!r}")
    if name == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--report-to tensorboard needs TensorBoard: pip install 'diffunlearn[tracking]'") from None
    if name == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--report-to wandb needs wandb: pip install wandb (it runs offline here)") from None


class Tracker:
    """One tracker for a run directory: scalars every step, sample images when given, hyperparameters once.
    TensorBoard writes to ``<run>/tensorboard``; W&B runs offline (``WANDB_MODE=offline`` unless set) into ``<run>``."""

    def __init__(self, name: str, run_dir: Path, config: dict):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        check_report_to(name)
        self.name = name
        if name == "tensorboard":
            self.impl = TensorBoardTracker("tensorboard", str(run_dir))
        else:
            os.environ.setdefault("WANDB_MODE", "offline")
            self.impl = WandBTracker("diffunlearn", dir=str(run_dir))
        if hasattr(self.impl, "start"):
            self.impl.start()
        from .config import flatten

        self.impl.store_init_configuration({k: v for k, v in flatten(config, sep="/").items()
                                            if isinstance(v, (int, float, str, bool))})

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool) and math.isfinite(v)}
        self.impl.log(values, step=record["step"])

    def log_images(self, tag: str, images, step: int) -> None:
        """``images``: (N, C, H, W) in [-1, 1]."""
        arr = ((images.clamp(-1, 1) + 1) / 2).cpu().numpy()
        if self.name == "tensorboard":
            self.impl.log_images({tag: arr}, step=step, dataformats="NCHW")
        else:
            self.impl.log_images({tag: list(arr.transpose(0, 2, 3, 1))}, step=step)

    def finish(self) -> None:
        self.impl.finish()


class Progress:
    """``step 12/300 loss_x=... eta 3m05s``: the ETA from the mean time of the steps run so far in this process.
    ``start``: the step this process starts after (0 for a new run); by default, the one before the first step
    ``line`` is called with (right when ``line`` sees every step, as a resumed run's logger does)."""

    def __init__(self, total: int, every: int = 1, start: int | None = None):
        self.total, self.every = total, max(1, every)
        self.started, self.first = time.time(), start

    def line(self, step: int, record: dict, keys: list[str]) -> str | None:
        if self.first is None:
            self.first = step - 1  # a resumed run starts past 0
        if step % self.every and step != self.total:
            return None
        done = step - self.first
        left = (time.time() - self.started) / max(1, done) * (self.total - step)
        vals = " ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)
        return f"step {step}/{self.total} {vals} eta {format_seconds(left)}"


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
