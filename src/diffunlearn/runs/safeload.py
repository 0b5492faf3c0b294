"""Weight files that are safe to load: safetensors by default, pickle (``.bin``/``.ckpt``/...) only when the user
says they trust the file; every safetensors file is read through once so a truncated file fails before loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def weights_in(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES)]


def check_weights(folder: Path, allow_pickle: bool) -> None:
    files = weights_in(folder)
    safe = [p for p in files if p.suffix == ".safetensors"]
    if not files:
        raise UserError(f"no weights in {folder}: expected diffusion_pytorch_model.safetensors")
    if not safe:
        if not allow_pickle:
            raise UserError(f"{folder} holds only pickle weights ({files[0].name}), which can run code when loaded; "
                            "convert them to safetensors or pass --allow-pickle if you trust the file")
        return
    from safetensors import safe_open

    for p in safe:
        try:
            with safe_open(str(p), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:
            raise UserError(f"corrupt or truncated weights {p}: {e}") from None


def check_finite(module: torch.nn.Module, where: str) -> None:
    """Weights holding NaN or Inf are refused at load, naming the first such tensor: training from them fails at its
    first step with a loss that points away from the cause."""
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"the weights in {where} hold NaN or Inf: tensor {name} has {bad} of {t.numel()} values "
                            "non-finite; the file is broken: re-export or re-copy the model")


def state_hash(unet: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers, in name order: the model's identity in the ledger."""
    h = hashlib.sha256()
    for name, t in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()
