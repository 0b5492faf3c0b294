"""``diffunlearn sample``: a PNG grid and an .npy of samples from a model directory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import run_field
from ..errors import UserError
from ..model.sampling import SAMPLE_BATCH


@dataclass
class SampleConfig:
    model: str = field(default="", metadata={"help": "diffusers model directory (or a run directory holding model/)"})
    out: str = field(default="", metadata={"help": "output directory (samples.png, samples.npy, summary.json)"})
    n: int = field(default=64, metadata={"help": "number of images"})
    steps: int = field(default=50, metadata={"help": "sampling steps"})
    sampler: str = field(default="ddpm", metadata={"help": "ddpm (ancestral), dpm++sde (DPM-Solver++ SDE: with 20 "
                                                           "steps the rate of memorised copies of 50-step DDPM, 4.4x "
                                                           "faster) or dpm++ (its ODE form: more memorised copies)"})
    seed: int = field(default=0, metadata={"help": "image i uses the generator (seed, i)"})
    batch_size: int = field(default=SAMPLE_BATCH, metadata={"help": "images per forward pass (larger on a GPU)"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast: ~1.8x faster on CPUs with bf16 units, "
                                                        "slightly different images"})
    classes: str = field(default="", metadata={"flag": "--class", "help": "class-conditional model: the class to "
                                                 "sample (name or index), or a comma list taken in turn (default: "
                                                 "every class in turn)"})
    guidance: float = field(default=1.0, metadata={"help": "class-conditional model: classifier-free guidance scale "
                                                   "(1: the conditional model alone, 0: unconditional)"})
    threads: int = run_field("threads")
    overwrite: bool = run_field("overwrite")
    allow_pickle: bool = run_field("allow_pickle")


def run_sample(cfg: SampleConfig) -> dict:
    import torch

    from ..data import to_uint8
    from ..model import load_model
    from ..model.sampling import check_guidance, check_sampler, ddpm_sample, save_grid
    from ..runs import RunDir, prepare_out_dir

    if cfg.n < 1 or cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("--n, --steps and --batch-size must be at least 1")
    if not cfg.out:
        raise UserError("pass --out: the directory to write samples to")
    model = load_model(cfg.model, allow_pickle=cfg.allow_pickle)
    labels = class_labels(model, cfg.classes, cfg.n)
    check_guidance(model, cfg.guidance)
    check_sampler(cfg.sampler)
    prepare_out_dir(cfg.out, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out, {"command": "sample", **asdict(cfg)}, cfg.overwrite)
    import time

    t0 = time.time()
    x = ddpm_sample(model, cfg.n, cfg.steps, cfg.seed, cfg.batch_size, progress=True, bf16=cfg.bf16, labels=labels,
                    guidance=cfg.guidance, sampler=cfg.sampler)
    run.log({"images": cfg.n, "steps": cfg.steps, "seconds": round(time.time() - t0, 3)})
    np.save(Path(cfg.out) / "samples.npy", to_uint8(x))
    files = ["samples.png", "samples.npy"]
    tiles, cond = None, ""
    if labels is not None:
        np.save(Path(cfg.out) / "labels.npy", labels.numpy())
        files.append("labels.npy")
        tiles = [model.classes[int(c)] for c in labels[:256]]
        cond = f", class under each image, guidance {cfg.guidance:g}"
    save_grid(x[:256], Path(cfg.out) / "samples.png", labels=tiles, title=f"{min(cfg.n, 256)} samples of {cfg.model}"
              f" ({cfg.steps} {cfg.sampler} steps, image i seeded by ({cfg.seed}, i){cond})")
    summary = {"command": "sample", "n": cfg.n, "steps": cfg.steps, "sampler": cfg.sampler, "seed": cfg.seed,
               "model": model.source,
               "files": files}
    if labels is not None:
        summary.update(guidance=cfg.guidance, classes=sorted({model.classes[int(c)] for c in labels}))
    run.finish(summary)
    print(f"wrote {Path(cfg.out) / 'samples.png'} and samples.npy ({cfg.n} images, uint8 N,H,W,C)")
    return summary


def class_labels(model, spec: str, n: int):
    """``--class``: None for an unconditional model (which refuses a class), else one label per sample: the named
    classes taken in turn, or every class in turn when none is named."""
    import torch

    from ..model.sampling import sample_labels

    if not spec:
        return sample_labels(model, n)  # None for an unconditional model; else every class in turn
    if not model.conditional:
        raise UserError(f"--class {spec} needs a class-conditional model, and {model.source} is unconditional")
    wanted = [model.class_index(c.strip()) for c in spec.split(",") if c.strip()]
    if not wanted:
        raise UserError(f"--class {spec!r} names no class: give a class name or index, or a comma list of them")
    return torch.tensor(wanted)[torch.arange(n) % len(wanted)]
