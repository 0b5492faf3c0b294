"""Sampling with per-image random generators, so image i is the same whatever the batch size (before/after grids
line up one to one)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from .diffusion import predict_noise
from .models import DiffusionModel

#: images per forward pass: on CPU 64 took about 20% less CPU time than 256 (and than 1024) for bitwise the same images
#: (docs/results/bench-speed.md); on a GPU pass a larger batch.
SAMPLE_BATCH = 64


def image_generators(seed: int, indices) -> list[torch.Generator]:
    """One generator per image, seeded by ``(seed, i)``."""
    return [torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i)) for i in indices]


def initial_noise(shape: tuple[int, ...], gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


@torch.inference_mode()
def ddpm_sample(model: DiffusionModel, n: int, steps: int = 50, seed: int = 0, batch_size: int = SAMPLE_BATCH,
                start: int = 0, progress: bool = False, device: str | torch.device = "cpu",
                bf16: bool = False) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020) on ``steps`` evenly spaced timesteps; returns (n, C, H, W) in [-1, 1]
    (a latent model's samples decoded to images).

    Image ``i`` uses generator ``(seed, start + i)`` for its initial noise and every step's noise. ``bf16`` runs the
    network under bfloat16 autocast (the scheduler's arithmetic stays float32): faster on hardware with bfloat16
    matrix units, and other numbers (a few percent of the images take visibly different trajectories).
    """
    sched = copy.deepcopy(model.scheduler)
    sched.set_timesteps(steps)
    unet = model.unet.to(device).eval()
    out = []
    it = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="sampling", unit="batch")
    for b0 in it:
        gens = image_generators(seed, range(start + b0, start + min(n, b0 + batch_size)))
        x = initial_noise(model.sample_shape, gens).to(device)
        for t in sched.timesteps:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                eps = predict_noise(unet, x, t.expand(len(x)).to(device))
            x = sched.step(eps.float(), t, x, generator=gens).prev_sample
        out.append(model.decode(x).cpu())  # a latent model decodes with its autoencoder
    return torch.cat(out) if out else torch.empty((0, *model.image_shape))


def save_grid(images: torch.Tensor, path, ncol: int | None = None, labels: list[str] | None = None) -> None:
    """Save model-space images as one PNG grid."""
    from PIL import Image

    from .data import to_uint8

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img.save(path)
