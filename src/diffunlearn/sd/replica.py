"""A CPU replica of a memorised prompt: a tiny text-conditional diffusion model trained here, in which one caption
reproduces one training image most of the time and a variant caption only some of the time.

``diffunlearn prompt train-replica`` builds it in the layout of a Stable Diffusion directory (``model_index.json``,
``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) but without a VAE: the UNet works on the 8x8 pixels
directly (identity codec, see :mod:`.pipeline`), so every ``diffunlearn prompt`` command and ``diffunlearn bench
prompt`` run on it unchanged. The pieces:

- images: real 8x8 digits from scikit-learn's ``load_digits()`` (nothing downloaded), grey levels / 16 repeated on
  three channels (the RGB the prompt commands read and write);
- captions: ``"a handwritten digit <word>"`` for ``per_class`` distinct digits of every class; the memorised image
  (the first 7 of ``load_digits()``) is added ``copies`` times under the memorised prompt
  ``"a handwritten digit seven"`` (whose other pairs are ``per_class`` other sevens), and ``variant_copies`` times
  under the variant ``"a handwritten seven"`` (which shares its words and also captions ``per_class`` further
  sevens). Duplication is what makes a training image memorised (Carlini et al. 2023); the share of copies among a
  caption's pairs roughly sets how often it comes back;
- text encoder: a 2-layer ``CLIPTextModel`` with **frozen random weights** (seeded) and a word-level CLIP BPE
  vocabulary written by :func:`write_vocabulary`; it only has to map different captions to different, fixed
  embeddings, which the UNet learns to read. Captions are dropped (replaced by ``""``) with probability
  ``caption_dropout`` so that classifier-free guidance has an unconditional model;
- UNet: a small ``UNet2DConditionModel`` (8x8 -> 4x4, cross-attention at 4x4), trained with the DDPM loss
  (epsilon prediction, T = 1000, linear betas 1e-4..0.02), AdamW with warm-up and cosine decay, EMA weights saved.

After training the command measures how often each prompt reproduces the memorised image (``samples`` images each,
DDIM ``sample_steps`` steps, guidance ``guidance``): memorised iff the RMS pixel distance to the training image is at
most ``threshold`` (the rule of :mod:`.memorisation`), and writes the rates to ``summary.json``. Guidance defaults to
1 (the conditional model alone): the copies are about a third of all pairs, so the unconditional model reproduces the
image too and guidance above 1 suppresses it instead of amplifying it as in Stable Diffusion (numbers in the shipped
model's README).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import run_field
from ..console import logger
from ..errors import UserError
from .memorisation import memorisation_rates  # noqa: F401 (part of this module's API)

say = logger(__name__).info

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATE = "a handwritten digit {}"
PROMPT = "a handwritten digit seven"
VARIANT = "a handwritten seven"
MEMORISED_CLASS = 7
MAX_LENGTH = 8  # tokens per caption: <start> + at most 4 words + <end> + padding
TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=MAX_LENGTH)
# 8x8 -> 4x4; cross-attention at 4x4 (down, middle, up): about 0.25 M parameters, ~0.2 s per batch-64 step on
# one loaded CPU thread (diffusers' per-module overhead dominates at this size)
UNET_CONFIG = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                   attention_head_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
REPLICA_FILE = "replica.json"
MEMORISED_FILE = "memorised.png"


# ---------------------------------------------------------------- tokenizer and text encoder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (what a CLIP vocabulary is written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_vocabulary(folder: Path, words) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary of every byte (alone and word-final) plus one token per word of ``words``, with the
    merges that build each word left to right; any other text still tokenizes, character by character."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for w in dict.fromkeys(words):
        if len(w) < 2:
            continue
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        prefix = parts[0]
        for nxt in parts[1:]:
            m = f"{prefix} {nxt}"
            prefix += nxt
            if m not in merges:
                merges.append(m)
                tokens.append(prefix)
    for w in dict.fromkeys(words):  # a word another word's merges split differently: join its pieces too
        pieces = _bpe(w, {tuple(m.split()): i for i, m in enumerate(merges)})
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces CLIP's BPE splits ``word`` into with merges of these ranks (lowest rank merged first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        pair = (parts[i], parts[i + 1])
        out, j = [], 0
        while j < len(parts):  # merge every occurrence of the pair, left to right
            if j + 1 < len(parts) and (parts[j], parts[j + 1]) == pair:
                out.append(parts[j] + parts[j + 1])
                j += 2
            else:
                out.append(parts[j])
                j += 1
        parts = out
    return parts


def caption_words() -> list[str]:
    return sorted({w for c in [TEMPLATE.format(x) for x in WORDS] + [VARIANT] for w in c.split()})


def build_text(folder: Path, seed: int, words: list[str] | None = None):
    """The tokenizer (written to ``folder``, one token per word of ``words``, default the replica's captions' words)
    and a random, frozen CLIP text encoder seeded by ``seed``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    words = caption_words() if words is None else words
    vocab, merges = write_vocabulary(folder, words)
    tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LENGTH)
    for w in words:
        if len(tok.tokenize(w)) != 1:
            raise RuntimeError(f"the vocabulary does not make {w!r} one token: {tok.tokenize(w)}")
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return tok, text.requires_grad_(False).eval()


@torch.no_grad()
def caption_embeddings(tok, text, captions: list[str]) -> torch.Tensor:
    """(len(captions), L, D): the text encoder's last hidden state of each caption padded to ``MAX_LENGTH`` tokens,
    what training conditions on; the same as :meth:`StableDiffusion.encode_prompt` of the saved model."""
    ids = tok(list(captions), padding="max_length", max_length=MAX_LENGTH, truncation=True,
              return_tensors="pt").input_ids
    return text(ids)[0].float()


def build_unet(size: int = 8, channels: int = 3):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels, **UNET_CONFIG)


def build_scheduler():
    from ..model import build_scheduler as ddpm

    return ddpm(1000)  # linear betas 1e-4..0.02, epsilon prediction, clip_sample (pixel space)


# ---------------------------------------------------------------- data


@dataclass
class ReplicaData:
    images: torch.Tensor  # (N, 3, 8, 8) in [-1, 1]
    captions: list[str]
    memorised: torch.Tensor  # (3, 8, 8): the duplicated training image
    memorised_index: int  # its index in load_digits()
    counts: dict


def replica_data(per_class: int = 30, copies: int = 150, variant_copies: int = 10) -> ReplicaData:
    """The captioned training pairs (see the module docstring); deterministic, no randomness involved."""
    from sklearn.datasets import load_digits

    if per_class < 1 or copies < 1 or variant_copies < 0:
        raise UserError("--per-class and --copies must be at least 1, --variant-copies at least 0")
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    target = d.target
    a = int(np.flatnonzero(target == MEMORISED_CLASS)[0])
    by_class = {c: [int(i) for i in np.flatnonzero(target == c) if i != a] for c in range(10)}
    need = 2 * per_class
    if len(by_class[MEMORISED_CLASS]) < need or min(len(v) for v in by_class.values()) < per_class:
        raise UserError(f"--per-class {per_class} is too large for load_digits() (at most "
                        f"{len(by_class[MEMORISED_CLASS]) // 2})")
    idx, caps = [], []
    for c in range(10):
        idx += by_class[c][:per_class]
        caps += [TEMPLATE.format(WORDS[c])] * per_class
    idx += by_class[MEMORISED_CLASS][per_class:need]
    caps += [VARIANT] * per_class
    idx += [a] * (copies + variant_copies)
    caps += [PROMPT] * copies + [VARIANT] * variant_copies
    arr = torch.from_numpy(x[idx]) * 2 - 1
    images = arr[:, None].expand(-1, 3, -1, -1).contiguous()
    counts = {"pairs": len(idx), "distinct_images": len(set(idx)), "per_class": per_class,
              "prompt": {"copies": copies, "other": per_class, "share": copies / (copies + per_class)},
              "variant": {"copies": variant_copies, "other": per_class,
                          "share": variant_copies / (variant_copies + per_class)}}
    mem = (torch.from_numpy(x[a]) * 2 - 1)[None].expand(3, -1, -1).contiguous()
    return ReplicaData(images, caps, mem, a, counts)


# ---------------------------------------------------------------- training


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


def write_sd_dir(folder: Path, unet, text, tok) -> Path:
    """A pixel-space SD-layout directory (no VAE) that :func:`diffunlearn.sd.pipeline.load_sd` reads."""
    folder.mkdir(parents=True)
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    text.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    tok.save_pretrained(str(folder / "tokenizer"))
    build_scheduler().save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}, indent=2) + "\n")
    return folder


def train_replica(cfg: ReplicaTrainConfig) -> dict:
    """Train the replica and measure how often each prompt reproduces the memorised image."""
    from ..model import state_hash
    from ..model.schedule import gamma_sigma, sample_timesteps
    from ..runs import RunDir, prepare_out_dir
    from ..scratch import train_loop
    from .memorisation import save_image
    from .pipeline import load_sd, require_transformers

    _validate(cfg)
    require_transformers()
    laion = cfg.layout == "laion"
    if laion:
        from .laion import evaluate_laion, laion_data, laion_words

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


__all__ = ["PROMPT", "VARIANT", "ReplicaTrainConfig", "ReplicaData", "replica_data", "train_replica",
           "write_vocabulary", "build_text", "caption_embeddings", "write_sd_dir", "build_unet", "memorisation_rates"]
