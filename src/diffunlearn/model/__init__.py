"""Loading and saving diffusers models, and the named UNet sizes the project trains.

A model directory is what ``DDPMPipeline.save_pretrained`` writes (``model_index.json``, ``unet/``, ``scheduler/``);
a bare ``UNet2DModel`` folder (``config.json`` + weights) with an optional ``scheduler_config.json`` also loads.
A directory that also holds ``vqvae/`` (VQModel, the ``LDMPipeline`` layout) or ``vae/`` (AutoencoderKL) is a latent
model: it loads with a :class:`~diffunlearn.model.latent.LatentCodec` attached, and saving copies the autoencoder
unchanged.
Weights are read from safetensors only unless ``allow_pickle`` is set; nothing is ever fetched from a hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..runs.safeload import check_finite, check_weights, state_hash  # noqa: F401 (state_hash: part of the API)

# name -> UNet2DModel keyword arguments (sample_size and channels are filled in from the data)
ARCHITECTURES: dict[str, dict] = {
    # 1.1 M parameters; 28x28 with attention at 7x7 (the CPU-sized MNIST model of MEASURED.md)
    "mnist-small": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32),
    # the paper's MNIST UNet: blocks (64, 128, 256), attention at the middle level
    "mnist-paper": dict(block_out_channels=(64, 128, 256), layers_per_block=2,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32),
    # the toy benchmark's 8x8 model
    "toy": dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8),
    "toy-small": dict(block_out_channels=(16, 32), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=8),  # 164 k parameters: `diffunlearn bench toy`
    # tests: a few thousand parameters, still every kind of block
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8),
}


def build_unet(arch: str, sample_size: int, channels: int, num_classes: int | None = None, null_class: bool = True):
    """A ``UNet2DModel`` of a named size; with ``num_classes`` K it is class-conditional with K + 1 class embeddings:
    the classes 0..K-1 and the null class K that classifier-free guidance needs (K embeddings without
    ``null_class``)."""
    from diffusers import UNet2DModel

    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    extra = {} if num_classes is None else {"num_class_embeds": int(num_classes) + int(bool(null_class))}
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, **ARCHITECTURES[arch],
                       **extra)


#: a class-conditional model directory's class names (one per class index) and its null class, beside model_index.json
CLASSES_FILE = "classes.json"


def build_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=1e-4, beta_end=0.02, clip_sample=True, prediction_type="epsilon")


@dataclass
class DiffusionModel:
    """A noise-prediction network and its noise schedule, as loaded from (or saved to) a diffusers directory."""

    unet: torch.nn.Module
    scheduler: object
    source: str = ""
    #: a latent model's autoencoder (:class:`diffunlearn.model.latent.LatentCodec`); None for a pixel-space model
    codec: object = None
    #: a class-conditional model's class names, one per class index (None: unconditional)
    classes: list[str] | None = None

    def __post_init__(self):
        if self.conditional and self.classes is None:
            self.classes = [str(i) for i in range(self._class_embeds)]

    @property
    def _class_embeds(self) -> int | None:
        n = getattr(getattr(self.unet, "config", None), "num_class_embeds", None)
        return None if n is None else int(n)

    @property
    def conditional(self) -> bool:
        """True for a class-conditional UNet (``num_class_embeds`` set): every forward pass needs class labels."""
        return self._class_embeds is not None

    @property
    def null_class(self) -> int | None:
        """The class index classifier-free guidance uses for "no class" (the one past the named classes), or None
        when the model has no such embedding (then guidance is not available)."""
        if not self.conditional:
            return None
        return len(self.classes) if self._class_embeds == len(self.classes) + 1 else None

    def class_index(self, name: str) -> int:
        """The index of a class given by name (or by its index written as a number)."""
        from ..data.labels import class_index

        i = class_index(self.classes, name)
        if i is None:
            raise UserError(f"class {name!r} is not one of the model's classes ({', '.join(self.classes)})")
        return i

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def alphas_cumprod(self, device=None) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.unet.parameters())
        latent = f", latent ({self.codec.kind})" if self.codec is not None else ""
        latent += f", {len(self.classes)} classes" if self.conditional else ""
        return (f"DiffusionModel({type(self.unet).__name__}, {n / 1e6:.2f} M parameters, sample {self.sample_shape}, "
                f"T={self.num_train_timesteps}{latent}, source={self.source!r})")

    def check_data(self, shape: tuple[int, ...], what: str = "data") -> None:
        if tuple(shape) != self.sample_shape:
            raise UserError(f"{what} images are {tuple(shape)} (C, H, W) but the model takes {self.sample_shape}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape of the model's images: ``sample_shape``, or what the autoencoder decodes it to."""
        return self.codec.image_shape(self.sample_shape) if self.codec is not None else self.sample_shape

    def check_images(self, shape: tuple[int, ...], what: str = "data") -> None:
        if tuple(shape) != self.image_shape:
            raise UserError(f"{what} images are {tuple(shape)} (C, H, W) but the model takes {self.image_shape}")

    def encode(self, images, what: str = "data", cache: str | os.PathLike | None = None):
        """Images -> the UNet's space: checked and returned as they are, or a latent model's latents (cached: in
        memory for a tensor, in the ``cache`` folder on disk for an image array; see
        :mod:`diffunlearn.model.latent`)."""
        self.check_images(tuple(images.shape[1:]), what)
        return images if self.codec is None else self.codec.encode(images, cache)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's space -> images in [-1, 1] (a latent model decodes with its autoencoder)."""
        return x.clamp(-1, 1) if self.codec is None else self.codec.decode(x)


def resolve_model_dir(path: str | os.PathLike) -> str:
    """A shipped model's name, a run directory (holding ``model/``) or a model directory -> the model directory."""
    from ..pretrained import available, pretrained_dir

    p = Path(path)
    if not p.exists() and str(path) in available():
        p = pretrained_dir(str(path))
    if (p / "model" / "model_index.json").is_file() or (p / "model" / "unet").is_dir():
        return str(p / "model")
    return str(p)


def load_model(path: str | os.PathLike, allow_pickle: bool = False, variant: str | None = None) -> DiffusionModel:
    """Load a UNet2DModel and its DDPMScheduler from a local diffusers directory (never from a hub); ``path`` may also
    be a shipped model's name (``instance-base``) or a run directory holding ``model/``. ``variant`` picks weights
    saved as a variant (``diffusion_pytorch_model.fp16.safetensors``: ``variant="fp16"``)."""
    from diffusers import DDPMScheduler, UNet2DModel

    root = Path(resolve_model_dir(path))
    if not root.is_dir():
        raise UserError(f"model directory not found: {root}")
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"{root} is not a diffusers model directory (no unet/config.json or config.json)")
    check_weights(unet_dir, allow_pickle)
    _check_variant(unet_dir, variant)
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=not allow_pickle or None,
                                           local_files_only=True, variant=variant)
    except Exception as e:
        raise UserError(f"cannot load the UNet from {unet_dir}: {_diffusers_reason(e)}") from None
    check_finite(unet, str(unet_dir))
    sched_dir = root / "scheduler"
    try:
        if (sched_dir / "scheduler_config.json").is_file():
            scheduler = DDPMScheduler.from_pretrained(str(sched_dir), local_files_only=True)
        elif (root / "scheduler_config.json").is_file():
            scheduler = DDPMScheduler.from_pretrained(str(root), local_files_only=True)
        else:
            scheduler = build_scheduler(unet.config.get("num_train_timesteps") or 1000)
    except Exception as e:
        raise UserError(f"cannot load the scheduler from {root}: {str(e).splitlines()[0]}") from None
    unet.eval()
    from .latent import load_codec

    return DiffusionModel(unet, scheduler, source=str(root), codec=load_codec(root, allow_pickle),
                          classes=_read_classes(root, unet))


def _read_classes(root: Path, unet) -> list[str] | None:
    """A class-conditional model's class names from ``classes.json`` (written by :func:`save_model`); without the
    file, classes are named by their index and the model has no null class."""
    if unet.config.get("num_class_embeds") is None:
        return None
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        names = [str(c) for c in json.loads(path.read_text())["classes"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a class list ({e}): it must hold {{\"classes\": [names...]}}") from None
    n = int(unet.config.num_class_embeds)
    if len(names) not in (n, n - 1):
        raise UserError(f"{path} names {len(names)} classes but the UNet has {n} class embeddings (expected {n} "
                        f"classes, or {n - 1} and a null class)")
    return names


def _check_variant(folder: Path, variant: str | None) -> None:
    """Weights saved only as a variant need ``--variant``; a variant that is not there is named with those that are."""
    names = [p.name for p in folder.glob("diffusion_pytorch_model*")]
    variants = sorted({n.split(".")[1] for n in names if n.count(".") == 2})
    plain = any(n.count(".") == 1 for n in names)
    if variant is None and not plain and variants:
        raise UserError(f"the weights in {folder} are saved only as variant {', '.join(variants)}: pass --variant "
                        f"{variants[0]}")
    if variant is not None and variant not in variants:
        raise UserError(f"no weights of variant {variant!r} in {folder} "
                        f"(variants there: {', '.join(variants) or 'none'})")


def _diffusers_reason(e: Exception) -> str:
    """diffusers' error in one line, without its advice to pass ``ignore_mismatched_sizes`` (which would load random
    weights in place of the mismatched ones)."""
    text = str(e)
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return ("its weights do not match its config.json (tensor shapes differ): the config and the weights belong "
                "to different models; use the config.json saved with these weights")
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def save_model(model: DiffusionModel, out: str | os.PathLike, extra_files: dict[str, str] | None = None,
               overwrite: bool = False) -> Path:
    """Save as a ``DDPMPipeline`` directory (safetensors), atomically: written beside ``out`` and renamed into place.
    An existing ``out`` is replaced only with ``overwrite=True`` (and then kept until the new one is complete)."""
    from ..runs import atomic_dir

    if Path(out).exists() and not overwrite:
        raise UserError(f"{out} exists: choose another folder, or pass overwrite=True to replace it")

    def write(folder: Path) -> None:
        _write_pipeline(model, folder)
        for name, text in (extra_files or {}).items():
            (folder / name).write_text(text)

    return atomic_dir(out, write)


def _write_pipeline(model: DiffusionModel, folder: Path) -> None:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=model.unet, scheduler=model.scheduler).save_pretrained(str(folder), safe_serialization=True)
    if model.conditional:
        (folder / CLASSES_FILE).write_text(json.dumps({"classes": model.classes,
                                                       "null_class": model.null_class}) + "\n")
    if model.codec is not None:
        from .latent import write_latent_pipeline

        write_latent_pipeline(model, folder)


def model_summary(model: DiffusionModel) -> dict:
    n = sum(p.numel() for p in model.unet.parameters())
    classes = {"classes": model.classes} if model.conditional else {}
    return {"parameters": n, "sample_shape": list(model.sample_shape), "timesteps": model.num_train_timesteps,
            **classes, "scheduler": json.loads(json.dumps(dict(model.scheduler.config), default=str))}
