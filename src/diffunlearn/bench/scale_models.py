"""Real-size models and data for ``diffunlearn bench scale``, built here with nothing downloaded.

- Models are built from the published architecture configs in ``published.json`` (``google/ddpm-celebahq-256``: a
  ``UNet2DModel`` and its ``DDPMScheduler``; ``CompVis/stable-diffusion-v1-4``: ``UNet2DConditionModel``,
  ``AutoencoderKL``, ``CLIPTextModel`` and its scheduler) with seeded random weights, and saved as local diffusers
  directories in safetensors: the layouts ``load_model`` and ``load_sd`` read. The CLIP tokenizer is a local BPE
  vocabulary (:func:`diffunlearn.sd.replica.write_vocabulary`); the text encoder keeps the published vocabulary size,
  so its parameter count is the published one. ``quick`` builds tiny models of the same families instead.
- The data is a synthetic, deterministic stand-in for CelebA-HQ: ``n`` RGB PNGs of ``size`` x ``size``, image ``i`` a
  smooth colour field with a few soft blobs drawn from a generator seeded by ``(seed, i)``, so a folder of ``n``
  images is the first ``n`` of any larger one and PNG compresses it well.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

#: tiny overrides of the published configs for --quick (same model families, a few thousand parameters each)
QUICK = {
    "ddpm": {"block_out_channels": [8, 8, 16, 16, 32, 32], "norm_num_groups": 4, "sample_size": 32},
    "unet": {"block_out_channels": [16, 16, 32, 32], "norm_num_groups": 4, "layers_per_block": 1, "sample_size": 8,
             "attention_head_dim": 4, "cross_attention_dim": 32},
    "vae": {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4, "layers_per_block": 1, "sample_size": 64},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 1000},
}

#: words the local CLIP vocabulary makes single tokens (the benchmark's prompts)
PROMPT = "a portrait photo of a smiling woman"
DETECT_PROMPTS = (PROMPT, "a watercolour painting of a lighthouse")


def published() -> dict:
    """The published configs, with their sources and parameter counts."""
    return json.loads(resources.files("diffunlearn.bench").joinpath("published.json").read_text())


def _args(config: dict, quick_overrides: dict | None = None) -> dict:
    """Constructor arguments of a config: metadata keys (``_class_name``, ...) dropped, quick overrides applied."""
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    out.update(quick_overrides or {})
    return out


def ddpm_unet(quick: bool = False):
    from diffusers import UNet2DModel

    return UNet2DModel(**_args(published()["ddpm-celebahq-256"]["unet"]["config"], QUICK["ddpm"] if quick else None))


def sd_unet(quick: bool = False):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_args(published()["stable-diffusion-v1-4"]["unet"]["config"],
                                        QUICK["unet"] if quick else None))


def sd_vae(quick: bool = False):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_args(published()["stable-diffusion-v1-4"]["vae"]["config"],
                                 QUICK["vae"] if quick else None))


def sd_text_encoder(quick: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = _args(published()["stable-diffusion-v1-4"]["text_encoder"]["config"],
                QUICK["text_encoder"] if quick else None)
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    return CLIPTextModel(CLIPTextConfig(**cfg))


#: component -> (builder, key of its published parameter count)
COMPONENTS = {"ddpm-unet": (ddpm_unet, ("ddpm-celebahq-256", "unet")),
              "sd-unet": (sd_unet, ("stable-diffusion-v1-4", "unet")),
              "sd-vae": (sd_vae, ("stable-diffusion-v1-4", "vae")),
              "sd-text-encoder": (sd_text_encoder, ("stable-diffusion-v1-4", "text_encoder"))}


def parameter_counts(quick: bool = False) -> dict[str, dict]:
    """Each component built on the meta device (no memory, no time): its parameter count and the published one."""
    pub = published()
    out = {}
    for name, (build, (model, part)) in COMPONENTS.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in build(quick).parameters())
        out[name] = {"parameters": n, "published": None if quick else pub[model][part]["parameters"]}
    return out


def _seeded(build, seed: int, quick: bool):
    torch.manual_seed(seed)
    return build(quick)


def write_ddpm(folder: Path, seed: int = 0, quick: bool = False) -> Path:
    """A ``DDPMPipeline`` directory of ``google/ddpm-celebahq-256``'s shape with seeded random weights."""
    from diffusers import DDPMScheduler

    from ..model import DiffusionModel, save_model

    sched = DDPMScheduler(**_args(published()["ddpm-celebahq-256"]["scheduler"]["config"]))
    return save_model(DiffusionModel(_seeded(ddpm_unet, seed, quick), sched), folder)


def write_sd(folder: Path, seed: int = 0, quick: bool = False) -> Path:
    """A Stable Diffusion v1.4-shaped directory (``StableDiffusionPipeline.save_pretrained`` layout, safetensors)
    with seeded random weights and a local tokenizer; written beside ``folder`` and renamed into place."""
    from transformers import CLIPTokenizer

    from ..runs import atomic_dir
    from ..sd.pipeline import require_transformers
    from ..sd.replica import write_vocabulary

    require_transformers()
    sd = published()["stable-diffusion-v1-4"]
    words = sorted({w for p in DETECT_PROMPTS for w in p.split()})

    def write(tmp: Path) -> None:
        vocab, merges = write_vocabulary(tmp / ".vocabulary", words)
        tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=sd["tokenizer"]["config"]["model_max_length"])
        tok.save_pretrained(str(tmp / "tokenizer"))
        shutil.rmtree(tmp / ".vocabulary")
        for i, (name, build) in enumerate((("unet", sd_unet), ("vae", sd_vae), ("text_encoder", sd_text_encoder))):
            module = _seeded(build, seed + i, quick)
            if name == "text_encoder" and len(tok) > module.config.vocab_size:
                raise RuntimeError(f"the local vocabulary ({len(tok)}) exceeds the text encoder's")
            module.save_pretrained(str(tmp / name), safe_serialization=True)
            del module
        (tmp / "scheduler").mkdir()  # the published file as it is (PNDM's keys and clip_sample, read by DDPMScheduler)
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd["scheduler"]["config"], indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False}, indent=2) + "\n")

    return atomic_dir(folder, write)


# ---------------------------------------------------------------- synthetic CelebA-HQ-sized images


def synthetic_image(i: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """Image ``i`` (uint8, size x size x 3): a bilinear colour field over a 4x4 grid plus three soft blobs, all drawn
    from a generator seeded by ``(seed, i)``; independent of how many images are written."""
    rng = np.random.default_rng([seed, i])
    grid = rng.random((4, 4, 3))
    u = np.linspace(0, 3, size)
    i0 = np.minimum(u.astype(int), 2)
    f = (u - i0)[:, None]
    rows = grid[i0] * (1 - f[..., None]) + grid[i0 + 1] * f[..., None]  # (size, 4, 3)
    img = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]  # (size, size, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(3):
        cy, cx, r = rng.random(), rng.random(), 0.05 + 0.2 * rng.random()
        colour = rng.random(3)
        w = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - w) + colour * w
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def synthetic_folder(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """``root/synthetic-<size>px-seed<seed>-n<n>``: ``n`` PNGs written once (atomically) and reused after. The free
    disk space is checked first against the size of the first images times ``n``."""
    from PIL import Image

    from ..runs import atomic_dir

    folder = Path(root) / f"synthetic-{size}px-seed{seed}-n{n}"
    marker = {"n": n, "size": size, "seed": seed, "generator": "synthetic_image v1"}
    if (folder / "synthetic.json").is_file() and json.loads((folder / "synthetic.json").read_text()) == marker:
        return folder
    if folder.exists():
        raise UserError(f"{folder} exists but is not a complete synthetic folder: remove it and rerun")
    folder.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        for i in range(n):
            Image.fromarray(synthetic_image(i, size, seed)).save(tmp / f"{i:06d}.png")
            if i == min(n, 20) - 1:  # estimate the whole folder from the first images before writing the rest
                per = sum(p.stat().st_size for p in tmp.glob("*.png")) / (i + 1)
                free = shutil.disk_usage(tmp).free
                if per * (n - i - 1) > free - 2 * 2**30:
                    raise UserError(f"{n} images of {size}x{size} need about {per * n / 2**30:.1f} GiB but "
                                    f"{free / 2**30:.1f} GiB are free (2 GiB kept free): lower --n or free space")
        (tmp / "synthetic.json").write_text(json.dumps(marker) + "\n")

    return atomic_dir(folder, write)


__all__ = ["published", "parameter_counts", "write_ddpm", "write_sd", "synthetic_image", "synthetic_folder",
           "PROMPT", "DETECT_PROMPTS", "QUICK"]
