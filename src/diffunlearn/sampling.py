"""Sampling with per-image random generators, so image i is the same whatever the batch size (before/after grids
line up one to one)."""

from __future__ import annotations

import copy

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


def seeded_batches(n: int, batch_size: int, seed: int, start: int = 0, progress: bool = False):
    """The generators of each batch of ``n`` images: image ``i`` gets generator ``(seed, start + i)``."""
    it = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="sampling", unit="batch")
    for b0 in it:
        yield image_generators(seed, range(start + b0, start + min(n, b0 + batch_size)))


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
    bar = None
    if progress:  # counts denoising steps over all batches, so its ETA is right from the first batch on
        from tqdm import tqdm

        bar = tqdm(total=-(-n // batch_size) * len(sched.timesteps), desc=f"sampling {n} images", unit="step")
    for gens in seeded_batches(n, batch_size, seed, start):
        x = initial_noise(model.sample_shape, gens).to(device)
        for t in sched.timesteps:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                eps = predict_noise(unet, x, t.expand(len(x)).to(device))
            x = sched.step(eps.float(), t, x, generator=gens).prev_sample
            if bar is not None:
                bar.update()
        out.append(model.decode(x).cpu())  # a latent model decodes with its autoencoder
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else torch.empty((0, *model.image_shape))


def save_grid(images: torch.Tensor, path, ncol: int | None = None, labels: list[str] | None = None,
              title: str | None = None) -> None:
    """Save model-space images as one PNG grid, tiles upscaled (nearest neighbour) so the grid is at least 256 px
    wide, with a label under each tile and a title above when given (:mod:`diffunlearn.images`)."""
    from .images import grid, save_png

    save_png(grid(images, ncol, labels, title), path)
