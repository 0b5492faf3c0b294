"""The trainer's optimiser: AdamW in fp32 (torch), or AdamW with 8-bit states (bitsandbytes' blockwise-quantised
``AdamW8bit``, Dettmers et al. 2022), which keeps both moments in one byte per parameter instead of four each: 2 bytes
of optimiser state per parameter instead of 8. That is what lets a Stable Diffusion UNet (860 M parameters) train
within 24 GB on a CPU machine; bitsandbytes runs its optimisers on CPU too (``pip install 'diffunlearn[lowmem]'``).
Tensors below bitsandbytes' ``min_8bit_size`` (4096 elements: biases, norms) keep fp32 states."""

from __future__ import annotations

import logging

import torch

from .errors import UserError

#: --optimizer name -> optimiser state bytes per parameter (for memory estimates)
OPTIMIZERS = {"adamw": 8, "adamw8bit": 2}


def check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def make_optimizer(name: str, params, lr: float, betas: tuple[float, float], weight_decay: float
                   ) -> torch.optim.Optimizer:
    """``adamw`` (torch.optim.AdamW) or ``adamw8bit`` (bitsandbytes.optim.AdamW8bit); same hyperparameters."""
    check_optimizer(name)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    # bitsandbytes logs a warning about an optional 4-bit CPU kernel at import; the optimiser does not use it
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("--optimizer adamw8bit needs bitsandbytes: pip install 'diffunlearn[lowmem]'") from None
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
