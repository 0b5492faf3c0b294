"""``diffunlearn prompt train-replica``: train the CPU replica of a memorised prompt (:mod:`diffunlearn.sd.replica`)
and measure how often each prompt reproduces the memorised image."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import run_field
from ..console import logger
from ..errors import UserError
from ..sd.replica import (
    MEMORISED_FILE,
    PROMPT,
    REPLICA_FILE,
    VARIANT,
    build_scheduler,
    build_text,
    build_unet,
    caption_embeddings,
    memorisation_rates,
    replica_data,
    write_sd_dir,
)

say = logger(__name__).info


@dataclass
class ReplicaTrainConfig:
    out: str = run_field("out")
    layout: str = field(default="prompt", metadata={"help": "prompt: one memorised prompt and a variant (bench "
                                                            "prompt's replica); laion: distinct captions, a few pairs "
                                                            "duplicated (for detect; see diffunlearn.sd.laion)"})
    n_captions: int = field(default=600, metadata={"help": "laion: distinct caption-image pairs"})
    memorised: int = field(default=4, metadata={"help": "laion: pairs duplicated"})
    duplicates: int = field(default=40, metadata={"help": "laion: extra copies of each duplicated pair"})
    steps: int = field(default=3000, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=64, metadata={"help": "pairs per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    warmup: int = field(default=200, metadata={"help": "linear warm-up steps before the cosine decay"})
    weight_decay: float = field(default=1e-6, metadata={"help": "AdamW weight decay"})
    ema_max_decay: float = field(default=0.999, metadata={"help": "EMA decay ceiling (inv_gamma 1, power 0.75)"})
    caption_dropout: float = field(default=0.1, metadata={"help": "probability of training on the empty caption"})
    per_class: int = field(default=30, metadata={"help": "distinct digits per class (and per sevens' caption)"})
    copies: int = field(default=150, metadata={"help": "copies of the memorised image under the memorised prompt"})
    variant_copies: int = field(default=10, metadata={"help": "copies of it under the variant prompt"})
    seed: int = field(default=0, metadata={"help": "seed of the text encoder, initialisation, batches and noise"})
    samples: int = field(default=128, metadata={"help": "samples per prompt for the memorisation rates"})
    sample_steps: int = field(default=50, metadata={"help": "DDIM steps of those samples"})
    guidance: float = field(default=1.0, metadata={"help": "classifier-free guidance of those samples (1: the "
                                                          "conditional model alone); laion: counted at 1, 1.5, 2 and "
                                                          "this scale, each costing --samples per duplicated caption"})
    threshold: float = field(default=0.15, metadata={"help": "memorised iff RMS pixel distance to the training "
                                                             "image <= this"})
    threads: int = run_field("threads")
    log_every: int = field(default=250, metadata={"help": "log a line every N steps"})
    overwrite: bool = run_field("overwrite", help="replace a previous run directory")


def _validate(cfg: ReplicaTrainConfig) -> None:
    if cfg.layout not in ("prompt", "laion"):
        raise UserError(f"--layout must be prompt or laion, got {cfg.layout!r}")
    if not cfg.out:
        raise UserError("pass --out: the run directory to create")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.samples < 1 or cfg.sample_steps < 1 or cfg.log_every < 1:
        raise UserError("--steps, --batch-size, --samples, --sample-steps and --log-every must be at least 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)) or cfg.warmup < 0:
        raise UserError("--lr must be a positive number and --warmup >= 0")
    if not 0 <= cfg.caption_dropout < 1:
        raise UserError(f"--caption-dropout must lie in [0, 1), got {cfg.caption_dropout}")
    if not 0 < cfg.threshold <= 1:
        raise UserError(f"--threshold is an RMS pixel distance in (0, 1], got {cfg.threshold}")
    if not (math.isfinite(cfg.guidance) and cfg.guidance >= 0):
        raise UserError(f"--guidance must be a finite number >= 0, got {cfg.guidance}")


def train_replica(cfg: ReplicaTrainConfig) -> dict:
    """``diffunlearn prompt train-replica``: train the replica (:mod:`diffunlearn.sd.replica`) and measure how often
    each prompt reproduces the memorised image."""
    from ..model import state_hash
    from ..model.schedule import gamma_sigma, sample_timesteps
    from ..runs import RunDir, prepare_out_dir
    from ..scratch import train_loop
    from ..sd.memorisation import save_image
    from ..sd.pipeline import load_sd, require_transformers

    _validate(cfg)
    require_transformers()
    laion = cfg.layout == "laion"
    if laion:
        from ..sd.laion import evaluate_laion, laion_data, laion_words

        data = laion_data(cfg.n_captions, cfg.memorised, cfg.duplicates, seed=cfg.seed)
    else:
        data = replica_data(cfg.per_class, cfg.copies, cfg.variant_copies)
    prepare_out_dir(cfg.out, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out, {"command": "prompt train-replica", **asdict(cfg)}, cfg.overwrite)
    tok_dir = run.path / ".vocabulary"
    tok, text = build_text(tok_dir, cfg.seed, laion_words() if laion else None)
    torch.manual_seed(cfg.seed)
    unet = build_unet(data.images.shape[-1], data.images.shape[1])
    sched = build_scheduler()
    abar = sched.alphas_cumprod.float()
    uniq = list(dict.fromkeys(data.captions)) + [""]
    table = caption_embeddings(tok, text, uniq)  # (captions + 1, L, D): the frozen embeddings, computed once
    cap_idx = torch.tensor([uniq.index(c) for c in data.captions])
    empty = len(uniq) - 1

    x = data.images

    def draw(gen: torch.Generator) -> tuple:
        i = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        emb = table[torch.where(drop, torch.full_like(i, empty), cap_idx[i])]
        eps = torch.randn((cfg.batch_size, *x.shape[1:]), generator=gen)
        return x[i], emb, eps, sample_timesteps(cfg.batch_size, 0, len(abar) - 1, gen)

    def batch_loss(net, batch) -> torch.Tensor:
        x0, emb, eps, t = batch
        g, s = gamma_sigma(abar, t)
        return ((net(g * x0 + s * eps, t, encoder_hidden_states=emb).sample - eps) ** 2).mean()

    t0 = time.time()
    ema, rec = train_loop(unet, draw, batch_loss, run, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                          weight_decay=cfg.weight_decay, ema_max_decay=cfg.ema_max_decay, seed=cfg.seed,
                          log_every=cfg.log_every)
    train_seconds = time.time() - t0
    write_sd_dir(run.model_dir, ema.eval(), text, tok)
    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)
    if laion:
        sd = load_sd(run.model_dir)
        t1 = time.time()
        evaluation = evaluate_laion(sd, data, cfg.guidance, cfg.samples, cfg.sample_steps, cfg.threshold)
        summary = {"command": "prompt train-replica", "layout": "laion", "train_seconds": round(train_seconds, 1),
                   "final_loss": rec["loss"], "unet_sha256": state_hash(sd.unet), "data": data.counts,
                   "evaluation": evaluation, "evaluation_seconds": round(time.time() - t1, 1)}
        run.finish(summary)
        d = evaluation["detect"]
        say(f"detect: ROC AUC of the {len(data.memorised_prompts)} memorised captions against captions trained "
            f"once {d['auc_vs_trained_once']:.3f}, against unseen captions {d['auc_vs_unseen']:.3f}")
        say(f"saved {run.model_dir} ({train_seconds:.0f} s of training)")
        return summary
    save_image(data.memorised, run.path / MEMORISED_FILE)
    replica = {"prompt": PROMPT, "variant": VARIANT, "memorised_image": MEMORISED_FILE,
               "memorised_sklearn_index": data.memorised_index, "threshold": cfg.threshold,
               "guidance": cfg.guidance, "sample_steps": cfg.sample_steps, "data": data.counts}
    (run.path / REPLICA_FILE).write_text(json.dumps(replica, indent=2) + "\n")
    sd = load_sd(run.model_dir)
    t1 = time.time()
    rates = memorisation_rates(sd, data.memorised, {"prompt": PROMPT, "variant": VARIANT}, cfg.samples,
                               cfg.sample_steps, cfg.guidance, cfg.threshold, seed=0)
    summary = {"command": "prompt train-replica", "train_seconds": round(train_seconds, 1),
               "final_loss": rec["loss"], "unet_parameters": sum(p.numel() for p in ema.parameters()),
               "text_encoder_parameters": sum(p.numel() for p in text.parameters()),
               "unet_sha256": state_hash(sd.unet), "memorisation": rates,
               "memorisation_seconds": round(time.time() - t1, 1), "replica": replica}
    run.finish(summary)
    for k, r in rates.items():
        say(f"{k} {r['prompt']!r}: {r['memorised']}/{r['of']} samples reproduce the training image "
            f"({r['rate']:.0%}; median distance {r['median_distance']:.3f})")
    say(f"saved {run.model_dir} ({train_seconds:.0f} s of training)")
    return summary
