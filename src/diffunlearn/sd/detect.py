"""Detecting memorised prompts without training data (Wen et al. 2024, "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models", ICLR 2024).

A memorised prompt pulls every starting noise toward one image, so the text-conditional part of the noise prediction
is unusually large: ``d(p) = mean_seeds ||eps(x_T, t_1, p) - eps(x_T, t_1, "")||_2`` at the first DDIM step ``t_1``,
over all latent dimensions, averaged over a few seeds. Higher means more likely memorised; the scale depends on the
model, so compare prompts of one model (Wen et al. report memorised prompts well above non-memorised ones on SD v1.4).
``run_detect`` is what ``diffunlearn detect`` runs: every prompt of a file scored, printed in order, written as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import run_field
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


@dataclass
class DetectConfig:
    model: str = field(default="", metadata={"help": "local Stable Diffusion v1.x diffusers directory"})
    prompts: str = field(default="", metadata={"help": "text file, one prompt per line (blank lines skipped)"})
    out: str = field(default="detect.json", metadata={"help": "JSON file to write the scores to"})
    seeds: int = field(default=4, metadata={"help": "starting noises averaged per prompt"})
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps (the score is taken at the first one)"})
    seed: int = field(default=0, metadata={"help": "seed of the starting noises"})
    batch_size: int = field(default=8, metadata={"help": "noises per UNet batch"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = run_field("threads")
    allow_pickle: bool = run_field("allow_pickle")
    overwrite: bool = run_field("overwrite", help="replace an existing --out file")


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


def run_detect(cfg: DetectConfig) -> dict:
    """Score every prompt by Wen et al.'s text-conditional noise magnitude; print them sorted, write JSON."""
    from ..runs import check_outside_model, write_json
    from .pipeline import load_sd, pick_device

    if not cfg.model or not cfg.prompts:
        raise UserError("pass --model (a Stable Diffusion directory) and --prompts (a file, one prompt per line)")
    if cfg.seeds < 1 or cfg.sample_steps < 1 or cfg.batch_size < 1:
        raise UserError("--seeds, --sample-steps and --batch-size must be at least 1")
    out = Path(cfg.out)
    if out.is_dir() or (out.exists() and not cfg.overwrite):
        raise UserError(f"--out {out} exists: choose another file or pass --overwrite")
    prompts = read_prompts(cfg.prompts)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sd = load_sd(cfg.model, cfg.allow_pickle, pick_device(cfg.device))
    check_outside_model(out, sd.source)
    scores, t = noise_gap_scores(sd, prompts, cfg.seeds, cfg.sample_steps, cfg.seed, cfg.batch_size)
    ranked = sorted(zip(prompts, scores), key=lambda ps: -ps[1])
    result = {"model": sd.source, "measure": "mean over seeds of ||eps(x_T, t, prompt) - eps(x_T, t, '')||_2 at the "
                                             "first DDIM step (Wen et al. 2024); higher = more likely memorised",
              "timestep": t, "seeds": cfg.seeds, "seed": cfg.seed, "sample_steps": cfg.sample_steps,
              "scores": [{"prompt": p, "score": s} for p, s in ranked]}
    width = max(len(f"{s:.4g}") for s in scores)
    for p, s in ranked:
        print(f"{s:>{width}.4g}  {p}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return result
