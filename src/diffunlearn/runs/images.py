"""Pictures the tool writes: model-space images upscaled (nearest neighbour) to a readable size and labelled.

Every PNG the command line writes goes through here: a grid of samples is upscaled by a whole factor until it is at
least ``MIN_GRID_WIDTH`` pixels wide, a strip (original | before | after) until each image is at least
``MIN_STRIP_SIDE`` pixels on its shorter side, and labels are drawn with PIL under the tiles (DejaVu Sans, which
matplotlib ships, so the text looks the same on every machine).
"""

from __future__ import annotations

import base64
import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

MIN_STRIP_SIDE = 128
MIN_GRID_WIDTH = 512
BACKGROUND = 255
INK = (20, 20, 20)
GAP = 4


@lru_cache(maxsize=8)
def font(size: int = 13):
    """DejaVu Sans at ``size`` pixels (from matplotlib's own files), else PIL's default font."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # no FreeType: PIL's bitmap font still draws readable text
        return ImageFont.load_default()


def to_pil(image: torch.Tensor | np.ndarray):
    """One model-space image (C, H, W) in [-1, 1], or uint8 (H, W[, C]), as a greyscale or RGB PIL image."""
    from PIL import Image

    from ..data import to_uint8

    if isinstance(image, torch.Tensor):
        arr = to_uint8(image[None])[0]
    else:
        arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("L" if arr.ndim == 2 else "RGB")


def upscale(img, min_side: int):
    """Nearest-neighbour upscale by the smallest whole factor that makes the shorter side at least ``min_side``."""
    k = max(1, math.ceil(min_side / max(1, min(img.size))))
    return img.resize((img.width * k, img.height * k), resample=0) if k > 1 else img


def _text_size(draw, text: str, f) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=f)
    return box[2] - box[0], box[3] - box[1]


def _wrap(draw, text: str, f, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        words, line = para.split(" "), ""
        for w in words:
            trial = f"{line} {w}".strip()
            if line and _text_size(draw, trial, f)[0] > width:
                lines.append(line)
                line = w
            else:
                line = trial
        lines.append(line)
    return lines


def _canvas(width: int, height: int):
    from PIL import Image

    return Image.new("RGB", (width, height), (BACKGROUND,) * 3)


def tiles(images, labels: list[str] | None = None, ncol: int | None = None, tile_side: int = 0,
          title: str | None = None, label_size: int = 12):
    """Images (model-space tensor (N, C, H, W), or PIL images) in a grid with ``ncol`` columns, each upscaled to at
    least ``tile_side`` pixels and captioned by its label; an optional title above. Returns a PIL RGB image."""
    from PIL import Image, ImageDraw

    pics = [im if isinstance(im, Image.Image) else to_pil(im) for im in images]
    n = len(pics)
    ncol = max(1, min(ncol or math.ceil(math.sqrt(max(n, 1))), max(n, 1)))
    nrow = math.ceil(n / ncol) if n else 0
    pics = [upscale(p, tile_side).convert("RGB") for p in pics]
    tw = max((p.width for p in pics), default=0)
    th = max((p.height for p in pics), default=0)
    f = font(label_size)
    probe = ImageDraw.Draw(_canvas(1, 1))
    cap = [_wrap(probe, lab, f, max(tw, 40)) for lab in (labels or [])]
    line_h = _text_size(probe, "Ag", f)[1] + 3
    cap_h = (max(len(c) for c in cap) * line_h + 2) if cap else 0
    head = _wrap(probe, title, font(label_size + 2), ncol * (tw + GAP)) if title else []
    head_h = len(head) * (line_h + 2) + (GAP if head else 0)
    width = ncol * (tw + GAP) + GAP
    out = _canvas(width, head_h + nrow * (th + cap_h + GAP) + GAP)
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(head):
        draw.text((GAP, GAP + i * (line_h + 2)), line, fill=INK, font=font(label_size + 2))
    for i, p in enumerate(pics):
        r, c = divmod(i, ncol)
        x, y = GAP + c * (tw + GAP), head_h + GAP + r * (th + cap_h + GAP)
        out.paste(p, (x + (tw - p.width) // 2, y))
        for j, line in enumerate(cap[i] if i < len(cap) else []):
            lw = _text_size(draw, line, f)[0]
            draw.text((x + max(0, (tw - lw) // 2), y + th + 2 + j * line_h), line, fill=INK, font=f)
    return out


def grid(images: torch.Tensor, ncol: int | None = None, labels: list[str] | None = None, title: str | None = None,
         min_width: int = MIN_GRID_WIDTH):
    """A grid of samples, tiles upscaled by a whole factor so that the grid is at least ``min_width`` pixels wide."""
    n = len(images)
    ncol = max(1, min(ncol or math.ceil(math.sqrt(max(n, 1))), max(n, 1)))
    side = min(images.shape[-2:]) if n else 1
    k = max(1, math.ceil((min_width - GAP - ncol * GAP) / (ncol * side)))
    return tiles(images, labels, ncol, tile_side=side * k, title=title)


def strip(images, labels: list[str], title: str | None = None, min_side: int = MIN_STRIP_SIDE):
    """One row (e.g. original | before | after), every image at least ``min_side`` pixels on its shorter side."""
    return tiles(images, labels, ncol=len(images), tile_side=min_side, title=title, label_size=13)


def stack(pictures: list, gap: int = GAP):
    """PIL images one under the other, left-aligned."""
    width = max((p.width for p in pictures), default=1)
    out = _canvas(width, sum(p.height for p in pictures) + gap * max(0, len(pictures) - 1) or 1)
    y = 0
    for p in pictures:
        out.paste(p.convert("RGB"), (0, y))
        y += p.height + gap
    return out


def save_png(img, path: str | Path) -> Path:
    path = Path(path)
    img.save(path, format="PNG", optimize=True)
    return path


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(img) -> str:
    """``data:image/png;base64,...`` of a PIL image: embeds it in a self-contained HTML file."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


def encode_image(image: torch.Tensor) -> str:
    """One model-space image as base64 PNG at its own resolution (compact, lossless for 8-bit images)."""
    return base64.b64encode(png_bytes(to_pil(image))).decode("ascii")


def decode_image(text: str):
    """The PIL image :func:`encode_image` stored."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text))).copy()
