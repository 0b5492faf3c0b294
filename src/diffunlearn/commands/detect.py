"""``diffunlearn detect``: rank the prompts of a file by how memorised they look (Wen et al. 2024's score,
:func:`diffunlearn.sd.detect.noise_gap_scores`), print them in order and write them as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import run_field
from ..errors import UserError
from ..runs import check_outside_model
from ..sd.detect import noise_gap_scores, read_prompts
from ..sd.pipeline import pick_device


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



def run_detect(cfg: DetectConfig) -> dict:
    """Score every prompt by Wen et al.'s text-conditional noise magnitude; print them sorted, write JSON."""
    from ..runs import write_json
    from ..sd.pipeline import load_sd

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
