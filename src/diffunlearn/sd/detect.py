"""Detecting memorised prompts without training data (Wen et al. 2024, "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models", ICLR 2024).

A memorised prompt pulls every starting noise toward one image, so the text-conditional part of the noise prediction
is unusually large: ``d(p) = mean_seeds ||eps(x_T, t_1, p) - eps(x_T, t_1, "")||_2`` at the first DDIM step ``t_1``,
over all latent dimensions, averaged over a few seeds. Higher means more likely memorised; the scale depends on the
model, so compare prompts of one model (Wen et al. report memorised prompts well above non-memorised ones on SD v1.4).
``diffunlearn detect`` (:mod:`diffunlearn.commands.prompt`) scores every prompt of a file (:func:`read_prompts`)
this way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..model.sampling import image_generators, initial_noise
from .pipeline import StableDiffusion


@torch.no_grad()
def noise_gap_scores(sd: StableDiffusion, prompts: list[str], seeds: int = 4, steps: int = 50, seed: int = 0,
                     batch_size: int = 8) -> tuple[list[float], int]:
    """``d(p)`` for each prompt, and the timestep it was measured at. The same starting noises serve every prompt,
    and the unconditional prediction on them is computed once."""
    sched = sd.ddim(steps)
    t = sched.timesteps[0]
    gens = image_generators(seed, range(seeds))
    unet = sd.unet.eval()
    dev = next(unet.parameters()).device  # the UNet may sit elsewhere than the text encoder
    x = sched.scale_model_input(initial_noise(sd.latent_shape, gens).to(dev) * sched.init_noise_sigma, t)

    def eps(emb):
        parts = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
        emb = emb.to(dev)
        return torch.cat([unet(p, t, encoder_hidden_states=emb.expand(len(p), -1, -1)).sample for p in parts])

    eps_u = eps(sd.encode_prompt(""))
    scores = [float((eps(sd.encode_prompt(p)) - eps_u).flatten(1).norm(dim=1).mean()) for p in prompts]
    return scores, int(t)


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {path}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: {e}") from None
    prompts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line)")
    return prompts
