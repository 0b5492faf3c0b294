"""Sample quality while unlearning: CLIP-IQA when CLIP weights are on disk, otherwise a named weight-free proxy.

The SISS paper counts a Stable Diffusion run as successful only if CLIP-IQA stays at or above 0.35 (section 5.3).
CLIP-IQA needs CLIP weights, which are never downloaded here; without them the proxy is the variance of the
Laplacian (sharpness), judged relative to the model before unlearning: it must stay within a factor ``band`` either
way, which catches both blurring and the high-frequency noise of a collapsing model. It is no substitute for CLIP-IQA
and is always reported under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IQA_PROMPTS = ("Good photo.", "Bad photo.")


@dataclass
class QualityCheck:
    """Whether a mean quality score holds: absolute (``value >= floor``) or relative to the first evaluation
    (``1/band <= value / start <= band``)."""

    name: str
    floor: float | None = None
    band: float | None = None

    def holds(self, value: float, start: float) -> bool:
        if self.floor is not None:
            return value >= self.floor
        if start <= 0:
            return value <= 0
        return 1 / self.band <= value / start <= self.band

    def describe(self) -> str:
        if self.floor is not None:
            return f"{self.name} >= {self.floor}"
        return f"{self.name} within x{self.band} of its value before unlearning"


class LaplacianSharpness:
    """Variance of the 3x3 Laplacian of the luma (pixels in [0, 1]), per image: a weight-free sharpness proxy."""

    name = "laplacian-variance (weight-free sharpness proxy, not CLIP-IQA)"

    def __init__(self, band: float = 2.0):
        if not band > 1:
            raise UserError(f"the quality band must be > 1, got {band}")
        self.check = QualityCheck(self.name, band=band)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = (images.float().clamp(-1, 1) + 1) / 2
        luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None] if x.shape[1] == 3 else x[:, :1]
        k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
        return F.conv2d(luma, k).flatten(1).var(dim=1).double().numpy()


class ClipIQA:
    """CLIP-IQA (Wang et al. 2023): ``softmax(s * [cos(img, 'Good photo.'), cos(img, 'Bad photo.')])[0]`` with CLIP's
    logit scale ``s``, from a local transformers CLIP directory (safetensors, ``local_files_only``). The original used
    a ResNet-50 CLIP; any CLIP directory gives the same kind of score, not the same numbers."""

    def __init__(self, folder: str, floor: float = 0.35, allow_pickle: bool = False, device="cpu"):
        from .pipeline import require_transformers

        require_transformers()
        from transformers import CLIPModel, CLIPTokenizer

        from ..runs.safeload import check_weights

        path = Path(folder)
        if not path.is_dir():
            raise UserError(f"CLIP directory not found: {path}")
        check_weights(path, allow_pickle)
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True,
                                                   use_safetensors=None if allow_pickle else True).float().eval()
            tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            raise UserError(f"cannot load CLIP from {path}: {str(e).strip().splitlines()[0]}") from None
        self.device = torch.device(device)
        self.model.to(self.device)
        self.name = f"CLIP-IQA ({path.name})"
        self.check = QualityCheck(self.name, floor=floor)
        ids = tok(list(CLIP_IQA_PROMPTS), padding=True, return_tensors="pt")
        with torch.no_grad():
            self.text = F.normalize(_features(self.model.get_text_features(**ids.to(self.device))), dim=-1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        size = int(self.model.config.vision_config.image_size)
        x = (images.float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        s = size / min(h, w)
        x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                          antialias=True, align_corners=False)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size].clamp(0, 1)
        x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        img = F.normalize(_features(self.model.get_image_features(pixel_values=x.to(self.device))), dim=-1)
        logits = self.model.logit_scale.exp() * img @ self.text.T
        return logits.softmax(-1)[:, 0].double().cpu().numpy()


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def quality_measure(clip: str = "", clip_floor: float = 0.35, band: float = 2.0, allow_pickle: bool = False,
                    device="cpu"):
    """CLIP-IQA from ``clip`` if given, else the Laplacian sharpness proxy."""
    if clip:
        return ClipIQA(clip, clip_floor, allow_pickle, device)
    return LaplacianSharpness(band)
