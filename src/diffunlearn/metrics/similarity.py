"""Noise-and-denoise similarity (the SISS paper's CelebA-HQ protocol): how well a model still reproduces an image.

The target ``x0`` is noised to step ``t`` of the forward process with seeded noise, ``x_t ~ q(x_t | x0)`` (the
scheduler's ``add_noise``), then denoised by the ancestral DDPM sampler through every step back to a clean image,
which is compared with ``x0``. A model that memorised ``x0`` returns it (paper: SSCD cosine 0.87); after unlearning
it returns some other image (0.36 after SISS).

Steps are counted as in Ho et al. (2020): ``x_t`` has had ``t`` noising steps, ``t = 0`` is the clean image. diffusers
numbers its timesteps from 0 for the first noise level, so ``t = 250`` noises with scheduler timestep 249 and runs
the 250 ancestral steps 249 -> 0; ``t = 0`` returns ``x0`` unchanged.

Image ``i`` draws its forward noise and every sampling step's noise from one generator seeded by ``seed`` and the
SHA-256 of the image itself, so its result depends on the image, the model and the seed only (not on its batch or
position in it): the same image measured before and after a deletion request sees the same noise.

Backends, each named in every result (``"similarity"``):

- ``sscd``: cosine of SSCD copy-detection embeddings (Pizzi et al. 2022), from a local TorchScript file only
  (``sscd_disc_mixup.torchscript.pt``; never downloaded): RGB in [0, 1], smaller edge resized to 288 (the SSCD
  authors' evaluation size), ImageNet normalisation.
- ``pixel-cosine`` (weight-free fallback): cosine of the mean-centred pixel vectors, i.e. the Pearson correlation
  of the two images' pixels. 1 for identical images (and for any brightness/contrast change of one), about 0 for
  unrelated ones, in [-1, 1] like the SSCD cosine; an image with no variation at all scores 0.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import content_hash
from ..errors import UserError
from ..model import DiffusionModel
from ..model.sampling import image_generators, initial_noise
from ..model.schedule import predict_noise

SIMILARITY_T = 250
SSCD_SIZE = 288
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelCosine:
    """Cosine of mean-centred pixel vectors (needs no network)."""

    name = "pixel-cosine"

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.flatten(1).double(), b.flatten(1).double()
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return F.cosine_similarity(a, b, dim=1, eps=1e-12).float()


class SSCD:
    """Cosine of SSCD embeddings from a local TorchScript file."""

    name = "sscd"

    def __init__(self, path: str | Path, size: int = SSCD_SIZE):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"SSCD model file not found: {path} (a TorchScript file such as "
                            "sscd_disc_mixup.torchscript.pt; nothing is downloaded)")
        try:
            with warnings.catch_warnings():  # SSCD is published as TorchScript only; torch deprecates loading it
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:
            raise UserError(f"cannot load SSCD TorchScript model {path}: {str(e).splitlines()[0]}") from None
        self.size = int(size)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise UserError(f"SSCD takes RGB or greyscale images, got {x.shape[1]} channels")
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                          align_corners=False)
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return F.normalize(self.net(x).float(), dim=1)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.embed(a) * self.embed(b)).sum(1)


def load_similarity(sscd: str | Path | None = None) -> PixelCosine | SSCD:
    """The SSCD backend when given the path of its TorchScript file, otherwise the weight-free ``pixel-cosine``."""
    return SSCD(sscd) if sscd else PixelCosine()


@dataclass
class SimilarityResult:
    """Per-image similarity of ``denoised`` to the targets, and the name of the backend that measured it."""

    similarity: str
    t: int
    seed: int
    scores: torch.Tensor
    denoised: torch.Tensor

    def to_dict(self) -> dict:
        """JSON-ready summary (without the images)."""
        return {"similarity": self.similarity, "t": self.t, "seed": self.seed,
                "mean": float(self.scores.mean()) if len(self.scores) else None,
                "scores": [round(float(s), 6) for s in self.scores]}


def _generators(images: torch.Tensor, seed: int) -> list[torch.Generator]:
    return image_generators(seed, [int(content_hash(x)[:12], 16) for x in images])


@torch.inference_mode()
def noise_and_denoise(model: DiffusionModel, images: torch.Tensor, t: int = SIMILARITY_T, seed: int = 0,
                      batch_size: int = 64, steps: int | None = None,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """Noise each image ``t`` steps forward (seeded), denoise it with ancestral DDPM; (N, C, H, W) images in
    [-1, 1]. A latent model noises and denoises the image's latent and returns the decoded result (at ``t = 0`` the
    autoencoder's reconstruction).

    ``steps``: ancestral steps back to 0 on evenly spaced timesteps (strided DDPM, like sampling with fewer steps);
    ``None`` (the protocol) takes every one of the ``t`` steps. ``labels``: each image's class, for a
    class-conditional model (denoised conditioned on it).
    """
    T = model.num_train_timesteps
    if not 0 <= int(t) <= T:
        raise UserError(f"the noise-and-denoise step t must lie in [0, {T}], got {t}")
    if images.ndim != 4:
        raise UserError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    model.check_images(tuple(images.shape[1:]), "similarity")
    if steps is not None and int(steps) < 1:
        raise UserError(f"the noise-and-denoise needs at least one step, got {steps}")
    if int(t) == 0:
        return images.float().clone() if model.codec is None else model.decode(model.encode(images.float()))
    sched = copy.deepcopy(model.scheduler)
    if steps is None or int(steps) >= int(t):
        sched.set_timesteps(T)  # every training timestep: the previous step of s is s - 1
        path = list(range(int(t) - 1, -1, -1))
    else:  # strided: each step goes to the next timestep of the list, the last to the clean image
        path = sorted({round(x) for x in torch.linspace(0, int(t) - 1, int(steps)).tolist()}, reverse=True)
        sched.set_timesteps(timesteps=path)
    unet = model.unet
    device = next(unet.parameters(), torch.empty(0)).device
    was_training = unet.training
    unet.eval()
    out = []
    try:
        for b0 in range(0, len(images), batch_size):
            pixels = images[b0:b0 + batch_size].float()
            x0 = model.encode(pixels)  # a latent model noises and denoises the image's latent, then decodes it
            y = None if labels is None else labels[b0:b0 + batch_size].to(device)
            gens = _generators(pixels, seed)
            start = torch.full((len(x0),), int(t) - 1, dtype=torch.long)
            x = sched.add_noise(x0, initial_noise(tuple(x0.shape[1:]), gens), start).to(device)
            for s in path:
                eps = predict_noise(unet, x, torch.full((len(x),), s, dtype=torch.long, device=device), y)
                x = sched.step(eps, s, x, generator=gens).prev_sample
            out.append(model.decode(x).cpu())
    finally:
        unet.train(was_training)
    return torch.cat(out) if out else torch.empty((0, *images.shape[1:]))


def noise_and_denoise_similarity(model: DiffusionModel, images: torch.Tensor, backend: PixelCosine | SSCD | None = None,
                                 t: int = SIMILARITY_T, seed: int = 0, batch_size: int = 64,
                                 steps: int | None = None, labels: torch.Tensor | None = None) -> SimilarityResult:
    """Similarity of each image to its noise-and-denoise reconstruction (higher: the model still reproduces it)."""
    backend = backend or PixelCosine()
    denoised = noise_and_denoise(model, images, t, seed, batch_size, steps, labels)
    scores = backend(images.float(), denoised) if len(images) else torch.empty(0)
    return SimilarityResult(backend.name, int(t), int(seed), scores.cpu(), denoised)
