"""Latent (unconditional) diffusion models: a UNet that denoises autoencoder latents, as in diffusers' ``LDMPipeline``.

A model directory that also holds ``vqvae/`` (a ``VQModel``, the ``LDMPipeline`` layout) or ``vae/`` (an
``AutoencoderKL``) loads with a :class:`LatentCodec` attached to its :class:`~diffunlearn.model.DiffusionModel`.
Everything that trains or measures the UNet then works in latent space; only two places cross the autoencoder:

- loading data for unlearning (``run_unlearn``): images are encoded once, so the trainer only ever sees latents. A
  data set on disk (an :class:`~diffunlearn.data.arrays.ImageArray`) is encoded chunk by chunk into a
  memory-mapped ``.npy`` in the cache folder (:mod:`diffunlearn.data.cache`), keyed by the autoencoder's weight hash
  and the data set's
  identity, after checking that it fits on the disk: later runs on the same data and autoencoder read it back, and
  no process holds the latents in memory. Images given as a tensor (the Python API) are encoded in memory, cached in
  the codec by the SHA-256 of the batch;
- sampling (``sampling.ddpm_sample``): the final latents are decoded to images.

Conventions follow diffusers' ``LDMPipeline``: latent = ``scaling_factor * (encode(x) - shift_factor)`` and images
= ``decode(latent / scaling_factor + shift_factor)`` (``shift_factor`` only for ``AutoencoderKL`` configs that set
it). A ``VQModel`` encodes to its pre-quantisation latents and quantises when decoding (what the LDM was trained on);
an ``AutoencoderKL`` encodes to the mean of its latent distribution (deterministic, so cached latents are the same
on every run). The autoencoder is never trained: saving an unlearned model copies its folder byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..data.arrays import ImageArray, NumpyImages
from ..errors import UserError
from ..runs.safeload import check_finite, check_weights

#: folder name -> diffusers class name
CODEC_FOLDERS = {"vqvae": "VQModel", "vae": "AutoencoderKL"}


class LatentCodec:
    """An autoencoder that maps images (N, C, H, W) in [-1, 1] to the UNet's latents and back."""

    def __init__(self, module: torch.nn.Module, kind: str, source_dir: str | Path | None = None,
                 batch_size: int = 64):
        if kind not in CODEC_FOLDERS:
            raise UserError(f"unknown autoencoder kind {kind!r}: expected one of {', '.join(CODEC_FOLDERS)}")
        self.module = module.eval().requires_grad_(False)
        self.kind = kind
        self.source_dir = Path(source_dir) if source_dir else None
        self.batch_size = int(batch_size)
        self._cache: dict[str, torch.Tensor] = {}
        self._weights_hash: str | None = None

    # ------------------------------------------------------------ shapes

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.module.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.module.config.in_channels)

    @property
    def latent_channels(self) -> int:
        cfg = self.module.config
        return int(cfg.get("vq_embed_dim") or cfg.latent_channels) if self.kind == "vqvae" else int(cfg.latent_channels)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The image shape (C, H, W) whose latents have ``latent_shape``."""
        _, h, w = latent_shape
        return (self.image_channels, h * self.downsample, w * self.downsample)

    # ------------------------------------------------------------ scaling

    def _scale(self) -> tuple[float, float]:
        cfg = self.module.config
        shift = cfg.get("shift_factor") if self.kind == "vae" else None
        return float(cfg.get("scaling_factor", 1.0) or 1.0), float(shift or 0.0)

    # ------------------------------------------------------------ encode / decode

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale()
        device = next(self.module.parameters()).device
        out = []
        for b0 in range(0, len(images), self.batch_size):
            x = images[b0:b0 + self.batch_size].to(device).float()
            enc = self.module.encode(x)
            z = enc.latents if self.kind == "vqvae" else enc.latent_dist.mean
            out.append(((z - shift) * scale).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def encode(self, images, cache: str | os.PathLike | None = None):
        """Latents of ``images``: for a tensor, a tensor (computed once per distinct batch, then served from the
        in-memory cache); for an image array, a memory-mapped array of latents cached on disk
        (:meth:`encode_to_disk`)."""
        if images.ndim != 4 or tuple(images.shape[1:2]) != (self.image_channels,):
            raise UserError(f"the autoencoder takes (N, {self.image_channels}, H, W) images, got "
                            f"{tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise UserError(f"image size {tuple(images.shape[-2:])} is not a multiple of the autoencoder's "
                            f"downsampling factor {self.downsample}")
        if isinstance(images, ImageArray):
            return self.encode_to_disk(images, cache)
        key = hashlib.sha256(images.detach().cpu().float().contiguous().numpy().tobytes()
                             + str(tuple(images.shape)).encode()).hexdigest()
        if key not in self._cache:
            self._cache[key] = self._encode(images)
        return self._cache[key].clone()

    def cache_key(self, images: ImageArray) -> str:
        """What the latents of ``images`` depend on: the autoencoder's weights and scaling, and the images."""
        from ..runs.safeload import state_hash

        if self._weights_hash is None:
            self._weights_hash = state_hash(self.module)
        what = {"kind": self.kind, "weights": self._weights_hash, "scale": self._scale(), "data": images.identity(),
                "shape": list(images.shape)}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def encode_to_disk(self, images: ImageArray, cache: str | os.PathLike | None = None) -> NumpyImages:
        """The latents of every image, encoded once in chunks of ``batch_size`` into a cached ``.npy`` (float32) and
        read back through a memory map. Stops with a UserError, before writing, when the file would not fit."""
        from ..data.cache import ensure_free_space, entry, locked, publish

        h, w = images.shape[-2] // self.downsample, images.shape[-1] // self.downsample
        shape = (len(images), self.latent_channels, h, w)
        path = entry("latents", self.cache_key(images), cache)
        with locked(path):
            if not path.is_file():
                nbytes = int(np.prod(shape)) * 4
                ensure_free_space(path.parent, nbytes, f"caching the latents of {len(images)} images")
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                try:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                    for s, chunk in images.chunks(self.batch_size):
                        out[s:s + len(chunk)] = self._encode(chunk).numpy()
                    out.flush()
                    del out
                    publish(tmp, path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
        return NumpyImages(path, "raw")

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents (a ``VQModel`` quantises them first)."""
        scale, shift = self._scale()
        device = next(self.module.parameters()).device
        out = []
        for b0 in range(0, len(latents), self.batch_size):
            z = latents[b0:b0 + self.batch_size].to(device).float() / scale + shift
            out.append(self.module.decode(z).sample.clamp(-1, 1).cpu())
        return torch.cat(out) if out else torch.empty(0)

    # ------------------------------------------------------------ disk

    def save(self, folder: Path) -> None:
        """Write the autoencoder to ``folder/<kind>``: its source folder copied unchanged when there is one."""
        dest = Path(folder) / self.kind
        if self.source_dir is not None and self.source_dir.is_dir():
            shutil.copytree(self.source_dir, dest)
        else:
            self.module.save_pretrained(str(dest), safe_serialization=True)


def find_codec_dir(root: Path) -> tuple[str, Path] | None:
    """``(kind, folder)`` of the autoencoder inside a model directory, or None; two autoencoders are an error."""
    found = [(k, root / k) for k in CODEC_FOLDERS if (root / k / "config.json").is_file()]
    if len(found) > 1:
        raise UserError(f"{root} holds both vqvae/ and vae/: keep the one the UNet was trained with")
    return found[0] if found else None


def load_codec(root: Path, allow_pickle: bool = False) -> LatentCodec | None:
    """The autoencoder of a model directory (``vqvae/`` VQModel or ``vae/`` AutoencoderKL), or None."""
    found = find_codec_dir(root)
    if found is None:
        return None
    kind, folder = found
    check_weights(folder, allow_pickle)
    import diffusers

    cls = getattr(diffusers, CODEC_FOLDERS[kind])
    try:
        module = cls.from_pretrained(str(folder), use_safetensors=not allow_pickle or None, local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot load the {CODEC_FOLDERS[kind]} from {folder}: {str(e).splitlines()[0]}") from None
    check_finite(module, str(folder))
    return LatentCodec(module, kind, folder)


def write_latent_pipeline(model, folder: Path) -> None:
    """Add the autoencoder to a saved ``DDPMPipeline`` folder and make its ``model_index.json`` an ``LDMPipeline``'s
    (``vqvae``); a ``vae/`` AutoencoderKL is listed under ``vae`` (diffusers' LDMPipeline itself takes a VQModel)."""
    import json

    codec = model.codec
    codec.save(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = "LDMPipeline"
    index[codec.kind] = ["diffusers", CODEC_FOLDERS[codec.kind]]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
