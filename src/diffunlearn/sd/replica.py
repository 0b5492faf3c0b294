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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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


__all__ = ["PROMPT", "VARIANT", "ReplicaData", "replica_data",
           "write_vocabulary", "build_text", "caption_embeddings", "write_sd_dir", "build_unet", "memorisation_rates"]
