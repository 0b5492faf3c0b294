"""A local Stable Diffusion v1.x directory: loading, prompt encoding, latents, sampling and saving.

The directory is what ``StableDiffusionPipeline.save_pretrained`` writes: ``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/`` (``safety_checker/`` and ``feature_extractor/`` are copied, never
loaded). Weights are read from safetensors only (pickle files can run code when loaded), with ``local_files_only``
and without remote code; nothing is fetched from a hub. Only the UNet is ever trained; the VAE and text encoder are
frozen, and unlearning happens on the VAE latents of the images, computed once.

A directory whose ``model_index.json`` names no VAE (``"vae": [null, null]``, and no ``vae/`` folder) is a
pixel-space model: the codec is the identity (images are the UNet's samples, scaling factor 1), and DDIM clips its
``x_0`` prediction to [-1, 1] as the stored schedule says. The shipped CPU replica ``prompt-digits`` is one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..model import DiffusionModel
from ..model.sampling import initial_noise, seeded_batches
from ..runs.safeload import PICKLE_SUFFIXES, check_finite, check_weights

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
OPTIONAL = ("vae",)  # no VAE: a pixel-space model (identity codec)


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Stable Diffusion needs transformers: pip install 'diffunlearn[sd]'") from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one), ``cpu`` or ``cuda[:N]``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from None


class FixedPromptUNet(torch.nn.Module):
    """``eps_theta(x, t) = unet(x, t, c)`` with the prompt embedding ``c`` held fixed: a conditional model treated as an
    unconditional one (SISS paper, section 5.3), so every image, kept or forgotten, is conditioned on the same prompt.

    The embedding is a non-persistent buffer: it moves with the module, is never trained and is not saved. ``config``
    is the UNet's, so the trainer reads the latent shape from it."""

    def __init__(self, unet: torch.nn.Module, prompt_embeds: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)

    @property
    def config(self):
        return self.unet.config

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.prompt_embeds.to(dtype=x.dtype).expand(x.shape[0], -1, -1)
        return self.unet(x, t, encoder_hidden_states=c).sample

    def enable_gradient_checkpointing(self):
        self.unet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self):
        self.unet.disable_gradient_checkpointing()


def guided_noise(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``eps_u + w (eps_c - eps_u)``, both in one batch; ``w = 1`` is
    exactly the conditional prediction (no unconditional pass)."""
    n = x.shape[0]
    if guidance == 1.0:
        return unet(x, t, encoder_hidden_states=cond.expand(n, -1, -1)).sample
    emb = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
    eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@dataclass
class StableDiffusion:
    """The components of a Stable Diffusion v1.x directory. ``scheduler`` is the training-time DDPM schedule read from
    ``scheduler/scheduler_config.json`` (what the unlearning losses use); sampling builds a DDIM scheduler from it."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None  # None: pixel space (identity codec)
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    source: str = ""
    device: torch.device = torch.device("cpu")

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.vae is None:
            return self.latent_shape
        _, h, w = self.latent_shape
        return (3, h * self.vae_scale_factor, w * self.vae_scale_factor)

    @property
    def scaling_factor(self) -> float:
        return 1.0 if self.vae is None else float(self.vae.config.scaling_factor)

    def to(self, device) -> "StableDiffusion":
        self.device = torch.device(device)
        for m in (self.unet, self.vae, self.text_encoder):
            if m is not None:
                m.to(self.device)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """The text encoder's last hidden state for ``prompt`` padded to the tokenizer's length: (1, L, D), as the SD
        v1 pipeline computes it (``""`` is the unconditional embedding)."""
        length = min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))
        ids = self.tokenizer([prompt], padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0].float()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """VAE latents of model-space images (N, 3, H, W) in [-1, 1]: the posterior mean times ``scaling_factor``,
        deterministic so that it is computed once and cached for the whole run. Pixel space: the images themselves."""
        self.check_images(tuple(images.shape[1:]))
        if self.vae is None:
            return images.float().cpu().clone()
        out = [self.vae.encode(images[i:i + batch_size].to(self.device)).latent_dist.mode() * self.scaling_factor
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        if self.vae is None:
            return latents.float().clamp(-1, 1).cpu()
        out = [self.vae.decode(latents[i:i + batch_size].to(self.device) / self.scaling_factor).sample
               for i in range(0, len(latents), batch_size)]
        return torch.cat(out).float().clamp(-1, 1).cpu()

    def check_images(self, shape: tuple[int, ...], what: str = "images") -> None:
        if tuple(shape) != self.image_shape:
            raise UserError(f"{what} are {tuple(shape)} (C, H, W) but the model makes {self.image_shape}: "
                            "use images generated by `diffunlearn prompt build` or resize them")

    def ddim(self, steps: int):
        """A DDIM scheduler (Song et al. 2021, eta = 0) on the model's training schedule. Latents are not bounded, so
        ``clip_sample`` is off whatever the stored config says; a pixel-space model keeps the stored setting."""
        from diffusers import DDIMScheduler

        clip = bool(self.scheduler.config.get("clip_sample", False)) if self.vae is None else False
        sched = DDIMScheduler.from_config(self.scheduler.config, clip_sample=clip)
        sched.set_timesteps(steps)
        return sched

    @torch.no_grad()
    def sample(self, prompt_embeds: torch.Tensor, n: int, seed: int = 0, steps: int = 50, guidance: float = 7.5,
               start: int = 0, batch_size: int = 8, unet: torch.nn.Module | None = None,
               uncond: torch.Tensor | None = None, decode: bool = True, progress: bool = False,
               indices=None) -> torch.Tensor:
        """DDIM sampling with classifier-free guidance; image ``i`` starts from the noise of generator ``(seed,
        start + i)`` (with ``indices``, the images of those numbers alone), so it is the same whatever the batch size
        and before/after samples line up one to one. Returns model-space images (n, 3, H, W) in [-1, 1], or latents
        with ``decode=False``."""
        unet = self._conditional(unet).eval()
        dev = next(unet.parameters()).device  # the UNet being trained may sit elsewhere than the VAE
        uncond = self.encode_prompt("") if uncond is None else uncond
        cond, uncond = prompt_embeds.to(dev), uncond.to(dev)
        sched = self.ddim(steps)
        out = []
        for gens in seeded_batches(n, batch_size, seed, start, progress, indices):
            x = initial_noise(self.latent_shape, gens).to(dev) * sched.init_noise_sigma
            for t in sched.timesteps:
                eps = guided_noise(unet, sched.scale_model_input(x, t), t, cond, uncond, guidance)
                x = sched.step(eps, t, x).prev_sample
            out.append(self.decode_latents(x) if decode else x.cpu())
        return torch.cat(out) if out else torch.empty((0, *(self.image_shape if decode else self.latent_shape)))

    def _conditional(self, unet):
        unet = self.unet if unet is None else unet
        return unet.unet if isinstance(unet, FixedPromptUNet) else unet

    def as_unconditional(self, prompt_embeds: torch.Tensor) -> DiffusionModel:
        """The UNet with ``prompt_embeds`` fixed, and the training schedule: what :func:`diffunlearn.trainer.unlearn`
        trains. The UNet is shared, not copied (the trainer copies it)."""
        return DiffusionModel(FixedPromptUNet(self.unet, prompt_embeds), self.scheduler, source=self.source)


def _declared(root: Path) -> list[str]:
    """The components the directory must hold: all of COMPONENTS, less an optional one that its model_index.json sets
    to ``[null, null]``, or omits while the folder is absent too."""
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    index = index if isinstance(index, dict) else {}
    out = []
    for c in COMPONENTS:
        if c in OPTIONAL:
            entry = index.get(c, "absent")
            if entry is None or entry == [None, None] or (entry == "absent" and not (root / c).is_dir()):
                continue
        out.append(c)
    return out


def _is_sd_dir(root: Path) -> bool:
    return (root / "model_index.json").is_file() and all((root / c).is_dir() for c in _declared(root))


def resolve_sd_dir(path: str | os.PathLike) -> Path:
    """An SD directory, a run directory written by ``diffunlearn prompt unlearn`` (holding ``model/``), or the name of
    a shipped model (``prompt-digits``)."""
    root = Path(path)
    if not root.exists():
        from ..pretrained import available, pretrained_dir

        if str(path) in available():
            root = pretrained_dir(str(path))
    if not root.is_dir():
        raise UserError(f"model directory not found: {root}")
    if not _is_sd_dir(root) and _is_sd_dir(root / "model"):
        return root / "model"
    if not _is_sd_dir(root):
        missing = [c for c in ("model_index.json", *_declared(root)) if not (root / c).exists()]
        raise UserError(f"{root} is not a Stable Diffusion diffusers directory (missing {', '.join(missing)})")
    return root


def load_sd(path: str | os.PathLike, allow_pickle: bool = False, device: str | torch.device = "cpu") -> StableDiffusion:
    """Load the five components of a local SD v1.x directory (four for a pixel-space model without a VAE);
    ``UserError`` on anything missing or unsafe."""
    require_transformers()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = resolve_sd_dir(path)
    has_vae = "vae" in _declared(root)
    for part in ("unet", "vae", "text_encoder") if has_vae else ("unet", "text_encoder"):
        check_weights(root / part, allow_pickle)
    safe = None if allow_pickle else True

    def load(what, fn):
        try:
            return fn()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot load the {what} from {root / what}: {str(e).strip().splitlines()[0]}") from None

    kw = dict(local_files_only=True, use_safetensors=safe)
    fp32 = dict(kw, torch_dtype=torch.float32)
    unet = load("unet", lambda: UNet2DConditionModel.from_pretrained(str(root / "unet"), **fp32))
    vae = load("vae", lambda: AutoencoderKL.from_pretrained(str(root / "vae"), **fp32)) if has_vae else None
    text_encoder = load("text_encoder", lambda: CLIPTextModel.from_pretrained(str(root / "text_encoder"), **kw).float())
    tokenizer = load("tokenizer", lambda: CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True))
    scheduler = load("scheduler", lambda: DDPMScheduler.from_pretrained(str(root / "scheduler"), local_files_only=True))
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        if module is not None:
            check_finite(module, str(root / part))
    if scheduler.config.prediction_type != "epsilon":
        raise UserError(f"{root} predicts {scheduler.config.prediction_type!r}; only epsilon-prediction models "
                        "(Stable Diffusion v1.x) are supported")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise UserError(f"{root}: the UNet attends to {unet.config.cross_attention_dim}-dim text but the text encoder "
                        f"gives {text_encoder.config.hidden_size}")
    if vae is None and unet.config.in_channels != unet.config.out_channels:
        raise UserError(f"{root} has no VAE (pixel space) but its UNet maps {unet.config.in_channels} channels to "
                        f"{unet.config.out_channels}")
    for m in (vae, text_encoder):
        if m is not None:
            m.requires_grad_(False).eval()
    unet.eval()
    sd = StableDiffusion(unet, vae, text_encoder, tokenizer, scheduler, source=str(root))
    return sd.to(device)


def _unet_weights(names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(".safetensors") or n.endswith(PICKLE_SUFFIXES) or n.endswith(".index.json")]


def save_sd(sd: StableDiffusion, unet: torch.nn.Module, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a full SD directory: every other component copied byte-for-byte from ``sd.source``, ``unet/`` replaced by
    ``unet`` in safetensors. Written beside ``out`` and renamed into place, so ``out`` appears only when complete;
    the input directory is only read."""
    src, out = Path(sd.source).resolve(), Path(out)
    dst = out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise UserError(f"{out} must not contain or be inside the input model directory {src}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: choose another output or allow overwriting")
    if isinstance(unet, FixedPromptUNet):
        unet = unet.unet
    from ..runs import atomic_dir

    def ignore(folder, names):
        return _unet_weights(names) if Path(folder).resolve() == src / "unet" else []

    def write(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=ignore)
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)

    return atomic_dir(out, write)
