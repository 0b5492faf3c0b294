"""The samplers: ancestral DDPM and DPM-Solver++ (ODE and SDE) from diffusers, on the exact denoiser of a finite set."""

from __future__ import annotations

import pytest
import torch

from diffunlearn.model import DiffusionModel, build_scheduler
from diffunlearn.model.sampling import ddpm_sample


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("dpm++", 20), ("dpm++sde", 30)])
def test_every_sampler_lands_on_the_data_of_an_ideal_denoiser(sampler, steps):
    """With the exact denoiser of two images (the optimum the DDPM loss trains toward), every sampler must end on one
    of the two images: the ODE and SDE solvers of DPM-Solver++ and ancestral DDPM alike."""
    from types import SimpleNamespace

    from diffunlearn.model.ideal import IdealDenoiser

    g = torch.Generator().manual_seed(0)
    data = torch.rand((2, 1, 4, 4), generator=g) * 1.6 - 0.8
    sched = build_scheduler()
    ideal = IdealDenoiser(data, sched.alphas_cumprod)
    ideal.config = SimpleNamespace(sample_size=4, in_channels=1, get=lambda k, d=None: None)
    out = ddpm_sample(DiffusionModel(ideal, sched), 8, steps, seed=3, sampler=sampler)
    nearest = torch.cdist(out.flatten(1).double(), data.flatten(1).double()).min(1).values
    assert nearest.max() < 0.05, nearest


def test_dpm_solver_images_do_not_depend_on_the_batch():
    from diffunlearn.model import build_unet

    torch.manual_seed(0)
    m = DiffusionModel(build_unet("tiny", 8, 1), build_scheduler())
    for sampler in ("dpm++", "dpm++sde"):
        batch = ddpm_sample(m, 3, 6, seed=2, sampler=sampler, batch_size=2)  # two batches: solver state reset
        alone = torch.cat([ddpm_sample(m, 1, 6, seed=2, start=i, sampler=sampler) for i in range(3)])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
