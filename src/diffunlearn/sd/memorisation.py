"""Which generated images are the memorised one: labelling a prompt's data set and counting memorised samples.

One rule everywhere: an image is memorised when its pixel distance to a **reference** image is at most a
**threshold**. The distance is the root-mean-square difference of pixels in [0, 1] (RGB), after area-averaging both
images to at most :data:`FEATURE_SIDE` pixels a side (fast, and insensitive to fine texture); 0 means identical, 1 is
the largest possible.

- With a reference (the known memorised training image, resized to the generated size) the threshold is the user's.
- Without one, k-means with 2 clusters on those pixels (SISS paper, section 5.3) finds the memorised images: copies
  of one training image are near-identical, so the memorised cluster is the **tighter** one, the one whose members
  lie closer to their centroid on average (not necessarily the smaller: a strongly memorised prompt yields mostly
  copies). A cluster of one image has no spread to compare and is memorised only if the other is also one image.
  The reference is then the medoid of that cluster (the member closest to all others, a real generated image), and
  the threshold is the exact two-class split (1-D k-means, i.e. Otsu's criterion) of all images' distances to it,
  placed mid-gap. In many dimensions pixel k-means can also pull a few unrelated images into the copies' cluster
  (unrelated images are all about equally far from each other); the distance split leaves them out.
- When labels come from the user (an edited ``labels.csv``), the reference is the medoid of the images labelled
  memorised and the threshold the cut that agrees best with those labels.

The same reference and threshold count memorised samples while unlearning, so ``labels.csv`` and the counts agree.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

FEATURE_SIDE = 64
DEFAULT_THRESHOLD = 0.15  # RMS pixel distance in [0, 1]; memorised regenerations sit well below, unrelated images above
FORGET_LABELS = {"forget", "a", "memorised", "memorized", "1"}
KEEP_LABELS = {"keep", "kept", "x\\a", "not-memorised", "not-memorized", "0"}
LABELS_FILE, RULE_FILE, REFERENCE_FILE = "labels.csv", "memorisation.json", "reference.png"


def pixel_features(images: torch.Tensor) -> np.ndarray:
    """Model-space images (N, C, H, W) in [-1, 1] -> (N, D) float64 pixels in [0, 1], at most FEATURE_SIDE a side."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    h, w = x.shape[-2:]
    if max(h, w) > FEATURE_SIDE:
        s = FEATURE_SIDE / max(h, w)
        x = F.adaptive_avg_pool2d(x, (max(1, round(h * s)), max(1, round(w * s))))
    return x.flatten(1).double().numpy()


def rms_distance(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.sqrt(((features - reference[None]) ** 2).mean(axis=1))


@dataclass
class MemorisationRule:
    """Memorised iff ``rms_distance(image, reference) <= threshold``. ``how`` is ``kmeans`` or ``reference``."""

    reference: torch.Tensor  # one model-space image (C, H, W)
    threshold: float
    how: str

    def distances(self, images: torch.Tensor) -> np.ndarray:
        if tuple(images.shape[1:]) != tuple(self.reference.shape):
            raise UserError(f"images are {tuple(images.shape[1:])} but the reference image is "
                            f"{tuple(self.reference.shape)}")
        return rms_distance(pixel_features(images), pixel_features(self.reference[None])[0])

    def is_memorised(self, images: torch.Tensor) -> np.ndarray:
        return self.distances(images) <= self.threshold

    def describe(self) -> dict:
        return {"rule": "memorised iff RMS pixel distance (pixels in [0, 1], at most "
                        f"{FEATURE_SIDE} px a side) to the reference <= threshold",
                "how": self.how, "threshold": self.threshold, "reference": REFERENCE_FILE}


def kmeans_memorised(images: torch.Tensor, seed: int = 0) -> tuple[np.ndarray, dict]:
    """k-means (k = 2) on pixels; returns a boolean mask of the tighter cluster (the memorised one) and diagnostics."""
    from sklearn.cluster import KMeans

    if len(images) < 2:
        raise UserError("k-means labelling needs at least 2 images")
    feats = pixel_features(images)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(feats)
    labels = km.labels_
    sizes = [int((labels == k).sum()) for k in (0, 1)]
    spreads = [float(rms_distance(feats[labels == k], km.cluster_centers_[k]).mean()) if sizes[k] else float("inf")
               for k in (0, 1)]
    key = [(spreads[k] if sizes[k] > 1 or sizes[1 - k] == 1 else float("inf"), sizes[k]) for k in (0, 1)]
    mem = min((0, 1), key=lambda k: key[k])
    info = {"sizes": {"memorised": sizes[mem], "other": sizes[1 - mem]},
            "spread": {"memorised": spreads[mem], "other": spreads[1 - mem]},
            "centroid_distance": float(np.sqrt(((km.cluster_centers_[0] - km.cluster_centers_[1]) ** 2).mean()))}
    return labels == mem, info


def medoid(images: torch.Tensor) -> int:
    """Index of the image with the smallest summed distance to all the others."""
    f = pixel_features(images)
    d = np.sqrt(((f[:, None] - f[None]) ** 2).mean(-1))
    return int(d.sum(1).argmin())


def split_threshold(d: np.ndarray, memorised: np.ndarray) -> float:
    """The threshold separating ``d[memorised]`` from ``d[~memorised]``: the middle of the gap when there is one,
    otherwise the cut (at an observed distance) with the fewest disagreements, the smallest on ties."""
    a, x = d[memorised], d[~memorised]
    if len(x) == 0:
        return float(a.max())
    if a.max() < x.min():
        return float((a.max() + x.min()) / 2)
    cuts = np.unique(d)
    errors = [int(((d <= c) != memorised).sum()) for c in cuts]
    return float(cuts[int(np.argmin(errors))])


def two_means_threshold(d: np.ndarray) -> float:
    """The cut of 1-D values into two classes with the largest between-class variance (exact 1-D k-means), placed
    in the middle of the gap; with all values equal, the common value (everything memorised)."""
    s = np.sort(np.asarray(d, np.float64))
    n, best, cut = len(s), -1.0, float(s[-1])
    csum = np.cumsum(s)
    for i in range(1, n):
        if s[i] == s[i - 1]:
            continue
        lo, hi = csum[i - 1] / i, (csum[-1] - csum[i - 1]) / (n - i)
        score = i * (n - i) * (hi - lo) ** 2
        if score > best:
            best, cut = score, float((s[i - 1] + s[i]) / 2)
    return cut


def rule_from_labels(images: torch.Tensor, memorised: np.ndarray, how: str = "kmeans") -> MemorisationRule:
    """Reference = the medoid of the memorised images, threshold = :func:`split_threshold` of distances to it."""
    memorised = np.asarray(memorised, bool)
    if not memorised.any():
        raise UserError("no image is labelled memorised, so there is nothing to compare samples with")
    idx = np.flatnonzero(memorised)
    ref = images[idx[medoid(images[idx])]]
    d = rms_distance(pixel_features(images), pixel_features(ref[None])[0])
    return MemorisationRule(ref.clone(), split_threshold(d, memorised), how)


def label_images(images: torch.Tensor, reference: torch.Tensor | None = None, threshold: float = DEFAULT_THRESHOLD,
                 seed: int = 0) -> tuple[np.ndarray, MemorisationRule, dict]:
    """Label images memorised or not by a reference (if given) or k-means; returns (mask, rule, diagnostics)."""
    if reference is not None:
        rule = MemorisationRule(reference, float(threshold), "reference")
        return rule.is_memorised(images), rule, {}
    mask, info = kmeans_memorised(images, seed)
    idx = np.flatnonzero(mask)
    ref = images[idx[medoid(images[idx])]].clone()
    d = rms_distance(pixel_features(images), pixel_features(ref[None])[0])
    rule = MemorisationRule(ref, two_means_threshold(d), "kmeans")
    final = d <= rule.threshold
    info["disagree_with_kmeans"] = int((final != mask).sum())
    return final, rule, info


# ---------------------------------------------------------------- the data folder


def load_image(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One RGB image as a model-space tensor (3, H, W), resized (bicubic) to ``size = (H, W)`` if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1


def save_image(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    from ..data import to_uint8

    Image.fromarray(to_uint8(image[None])[0]).save(path)


def write_labels(folder: Path, files: list[str], memorised: np.ndarray, distances: np.ndarray) -> None:
    with open(folder / LABELS_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "distance"])
        for name, m, d in zip(files, memorised, distances):
            w.writerow([name, "forget" if m else "keep", f"{d:.5f}"])


@dataclass
class PromptData:
    """A prompt's data set: images (model space), which are memorised (A), the prompt and rule it was built with."""

    images: torch.Tensor
    files: list[str]
    memorised: np.ndarray
    prompt: str | None
    rule: MemorisationRule | None
    folder: Path

    @property
    def forget(self) -> torch.Tensor:
        return self.images[torch.from_numpy(self.memorised)]

    @property
    def kept(self) -> torch.Tensor:
        return self.images[torch.from_numpy(~self.memorised)]


def read_prompt_data(folder: str | Path) -> PromptData:
    """Read a folder written by ``diffunlearn prompt build`` (possibly with hand-edited labels): ``labels.csv`` rows
    ``file,label[,distance]``, label ``forget`` (memorised, A) or ``keep`` (X \\ A), files relative to the folder.

    The rule stored in ``memorisation.json`` is kept when it came from the user's reference image; a k-means rule is
    re-derived from the current labels, so edits to ``labels.csv`` carry over to the memorised counts."""
    folder = Path(folder)
    labels = folder / LABELS_FILE
    if not labels.is_file():
        raise UserError(f"no {LABELS_FILE} in {folder}: build the data set with `diffunlearn prompt build`")
    with open(labels, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["file", "label"]:
        raise UserError(f"{labels} must start with the header file,label[,distance]")
    files, mem = [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise UserError(f"{labels} line {n}: expected file,label")
        lab = row[1].strip().lower()
        if lab not in FORGET_LABELS | KEEP_LABELS:
            raise UserError(f"{labels} line {n}: label {row[1]!r} must be 'forget' (memorised) or 'keep'")
        path = folder / row[0].strip()
        if not path.is_file():
            raise UserError(f"{labels} line {n}: image {path} not found")
        files.append(row[0].strip())
        mem.append(lab in FORGET_LABELS)
    memorised = np.array(mem, bool)
    if not memorised.any():
        raise UserError(f"{labels}: no image is labelled 'forget' (memorised): there is nothing to unlearn")
    if memorised.all():
        raise UserError(f"{labels}: every image is labelled 'forget': unlearning needs images to keep (label 'keep'); "
                        "modify the prompt so that some samples are not memorised (SISS paper, section 5.3)")
    loaded = [load_image(folder / p) for p in files]
    shapes = sorted({tuple(im.shape) for im in loaded})
    if len(shapes) != 1:
        raise UserError(f"images in {folder} differ in size: {shapes[:3]}")
    images = torch.stack(loaded)
    meta = {}
    if (folder / RULE_FILE).is_file():
        try:
            meta = json.loads((folder / RULE_FILE).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"cannot parse {folder / RULE_FILE}: {e}") from None
    if meta.get("how") == "reference" and (folder / REFERENCE_FILE).is_file():
        rule = MemorisationRule(load_image(folder / REFERENCE_FILE, images.shape[-2:]), float(meta["threshold"]),
                                "reference")
    else:
        rule = rule_from_labels(images, memorised)
    return PromptData(images, files, memorised, meta.get("prompt"), rule, folder)


@torch.no_grad()
def memorisation_rates(sd, reference: torch.Tensor, prompts: dict[str, str], n: int, steps: int, guidance: float,
                       threshold: float, seed: int = 0) -> dict:
    """Per prompt: the share of ``n`` samples within ``threshold`` (RMS pixel distance) of ``reference``."""
    rule = MemorisationRule(reference, threshold, "reference")
    out = {}
    for key, p in prompts.items():
        images = sd.sample(sd.encode_prompt(p), n, seed, steps, guidance, batch_size=64)
        d = rule.distances(images)
        out[key] = {"prompt": p, "memorised": int((d <= threshold).sum()), "of": n,
                    "rate": float((d <= threshold).mean()), "median_distance": float(np.median(d))}
    return out
