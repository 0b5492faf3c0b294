"""A small domain classifier for 28x28 MNIST T-Shirt images, and the quality metrics computed with it.

The SISS paper (Alberti et al., ICLR 2025, section 5.2) scores MNIST T-Shirt sample quality with an Inception Score
computed by an MNIST classifier (the authors used a ResNet-18), not by Inception. This module trains a much smaller
CNN on the 4,500 training digits of the built-in data (classes 0-9) plus Fashion-MNIST T-shirts (class 10), and
computes from it:

- ``classifier_inception_score``: IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) over splits;
- ``classifier_fid``: the Frechet distance between Gaussian fits of its penultimate features (Heusel et al. 2017).

Both are named for the classifier on purpose: their values are not comparable with Inception-based IS or FID.

Train and save the shipped classifier with ``python -m diffunlearn.metrics.classifier --out DIR --steps N --seed S``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "diffunlearn-domain-classifier"
TSHIRT_CLASS = 10
FASHION_TSHIRT_LABEL = 0


class DomainClassifier(nn.Module):
    """Three 3x3 conv blocks (28 -> 14 -> 7 -> 3) and a ``feature_dim`` hidden layer; inputs in model space [-1, 1].

    ``features(x)`` is the penultimate (post-ReLU) layer used by :func:`classifier_fid`; ``forward(x)`` the logits.
    """

    def __init__(self, num_classes: int = 11, in_channels: int = 1, image_size: int = 28, feature_dim: int = 128,
                 widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.config = {"num_classes": int(num_classes), "in_channels": int(in_channels), "image_size": int(image_size),
                       "feature_dim": int(feature_dim), "widths": [int(w) for w in widths]}
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.conv = nn.Sequential(*layers)
        side = image_size
        for _ in widths:
            side //= 2
        self.hidden = nn.Linear(c * side * side, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.hidden(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------- data and training


def build_mnist_tshirt_classifier_data(n_tshirts: int = 1000, held_out: int = 500, mnist_dir: str | None = None,
                                       fashion_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images (model space) and labels: the built-in data's training digits (classes 0-9; the ``held_out``
    digits of ``data._split_digits`` are left out so they can measure accuracy) and the first ``n_tshirts``
    Fashion-MNIST train T-shirts (class 10; the target T-shirt, train index 1, is among them)."""
    from ..data import _split_digits, fashion_mnist, to_model_space

    xd, yd, _, _ = _split_digits(mnist_dir, int(held_out))
    fx, fy = fashion_mnist("train", fashion_dir)
    tees = fx[fy == FASHION_TSHIRT_LABEL][: int(n_tshirts)]
    images = to_model_space(np.concatenate([xd, tees]), "classifier data")
    labels = torch.from_numpy(np.concatenate([yd.astype(np.int64), np.full(len(tees), TSHIRT_CLASS)]))
    return images, labels


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels, padding with background (-1): generated digits are not as
    well centred as MNIST's, and 4,500 digits are few."""
    if max_shift <= 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=gen)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(off.tolist())])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 2000, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0, num_classes: int = 11, max_shift: int = 2) -> DomainClassifier:
    """Cross-entropy training with Adam and a cosine learning-rate decay; initialisation, batches and shifts all
    come from ``seed``, so the same call gives the same weights. Returns the model in eval mode."""
    if images.ndim != 4 or len(images) != len(labels):
        raise UserError(f"need (N, C, H, W) images and N labels, got {tuple(images.shape)} and {len(labels)}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"labels must lie in 0..{num_classes - 1}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainClassifier(num_classes, images.shape[1], images.shape[-1])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(int(steps), 1))
    model.train()
    for _ in range(int(steps)):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(_shift(images[idx], max_shift, gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# ---------------------------------------------------------------- saving and loading


def save_classifier(model: DomainClassifier, out: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture, plus ``extra`` under ``"training"``)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = out / (WEIGHTS_NAME + ".partial"), out / (CONFIG_NAME + ".partial")
    tmp_c.write_text(json.dumps({"format": FORMAT, "version": 1, **model.config, "training": extra or {}}, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp_w))
    # safetensors creates the file owner-only; give it the same permissions as the config (the umask's)
    os.chmod(tmp_w, tmp_c.stat().st_mode & 0o777)
    os.replace(tmp_w, out / WEIGHTS_NAME)
    os.replace(tmp_c, out / CONFIG_NAME)
    return out


def load_classifier(path: str | os.PathLike) -> DomainClassifier:
    """Load a classifier saved by :func:`save_classifier`; missing, corrupt or mismatched files raise ``UserError``."""
    from safetensors.torch import load_file

    root = Path(path)
    cfg_path, w_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"{root} is not a saved domain classifier (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt classifier config {cfg_path}: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise UserError(f"{cfg_path} is not a {FORMAT} config")
    try:
        model = DomainClassifier(cfg["num_classes"], cfg["in_channels"], cfg["image_size"], cfg["feature_dim"],
                                 tuple(cfg["widths"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"classifier config {cfg_path} is incomplete or invalid: {e}") from None
    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise UserError(f"corrupt or truncated classifier weights {w_path}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"classifier weights {w_path} do not match its config: {str(e).splitlines()[0]}") from None
    return model.eval()


# ---------------------------------------------------------------- metrics


def _batched(fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(images[i:i + batch_size].float()) for i in range(0, len(images), batch_size)]).double()


def classifier_probs(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """p(y|x) as float64, (N, num_classes)."""
    return _batched(lambda x: F.softmax(model(x).double(), dim=1), images, batch_size)


def classifier_features(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Penultimate-layer features as float64, (N, feature_dim)."""
    return _batched(model.features, images, batch_size).numpy()


def inception_score_from_probs(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` on each of ``splits`` contiguous chunks, ``p(y)`` the chunk's mean prediction
    (Salimans et al. 2016, as computed by their released code); returns the mean and standard deviation over chunks."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if int(splits) < 1 or len(probs) < int(splits):
        raise UserError(f"an Inception Score over {splits} splits needs at least {splits} images, got {len(probs)}")
    scores = []
    for part in np.array_split(np.arange(len(probs)), int(splits)):
        p = probs[part]
        py = p.mean(0, keepdim=True)
        # xlogy makes 0 log 0 = 0, so perfectly confident predictions stay finite
        kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, py)).sum(1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def classifier_inception_score(model: nn.Module, images: torch.Tensor, splits: int = 10,
                               batch_size: int = 500) -> tuple[float, float]:
    """Inception Score computed with the domain classifier (not Inception): (mean, std) over ``splits`` chunks."""
    return inception_score_from_probs(classifier_probs(model, images, batch_size), splits)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, the squared 2-Wasserstein distance between two Gaussians
    (Dowson & Landau 1982; the FID formula of Heusel et al. 2017)."""
    import warnings

    from scipy.linalg import LinAlgWarning, sqrtm

    with warnings.catch_warnings():
        # ReLU features that never fire (or fewer images than features) make the covariances singular; sqrtm warns
        # but stays accurate there, and a non-finite result is caught below
        warnings.simplefilter("ignore", LinAlgWarning)
        covmean = sqrtm(cov1 @ cov2)
        if not np.isfinite(covmean).all():
            # pytorch-fid's remedy when sqrtm breaks down: a tiny ridge on both covariances
            ridge = np.eye(len(cov1)) * 1e-6
            covmean = sqrtm((cov1 + ridge) @ (cov2 + ridge))
    covmean = np.real(covmean)  # the imaginary part is rounding noise from near-zero eigenvalues
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))
    # a squared distance cannot be negative: what remains below zero is the same rounding noise
    return max(d, 0.0)


def classifier_fid(model: nn.Module, images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 500) -> float:
    """Frechet distance between Gaussian fits of the domain classifier's penultimate features of two image sets
    (an FID computed with the domain classifier, not Inception)."""
    if len(images_a) < 2 or len(images_b) < 2:
        raise UserError("a Frechet distance needs at least 2 images in each set")
    fa, fb = classifier_features(model, images_a, batch_size), classifier_features(model, images_b, batch_size)
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def accuracy(model: nn.Module, images: torch.Tensor, labels) -> float:
    pred = classifier_probs(model, images).argmax(1)
    return float((pred == torch.as_tensor(labels).long()).double().mean())


# ---------------------------------------------------------------- entry point


def run_train_classifier(out: str | os.PathLike, steps: int = 2000, seed: int = 0, batch_size: int = 128,
                         lr: float = 1e-3) -> dict:
    """Train the MNIST T-Shirt domain classifier, save it to ``out`` and print its held-out accuracy: on the 500
    held-out digits of the built-in data and on the 1,000 Fashion-MNIST test T-shirts (never seen in training)."""
    from ..data import _split_digits, fashion_mnist, to_model_space, tshirt_image

    images, labels = build_mnist_tshirt_classifier_data()
    start = time.perf_counter()
    model = train_classifier(images, labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    seconds = time.perf_counter() - start
    _, _, xh, yh = _split_digits(None, 500)
    tx, ty = fashion_mnist("test")
    tees = tx[ty == FASHION_TSHIRT_LABEL]
    others = tx[ty != FASHION_TSHIRT_LABEL]
    target = to_model_space(tshirt_image()[None], "target")
    report = {
        "steps": int(steps), "seed": int(seed), "batch_size": int(batch_size), "lr": float(lr),
        "train_images": len(images), "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
        "heldout_digit_accuracy": accuracy(model, to_model_space(xh, "held-out digits"), yh),
        "heldout_tshirt_accuracy": accuracy(model, to_model_space(tees, "test T-shirts"), np.full(len(tees), 10)),
        # other garments are out of domain: how many land in the T-shirt class bounds false target detections
        "other_fashion_as_tshirt": float((classifier_probs(model, to_model_space(others, "fashion")).argmax(1)
                                          == TSHIRT_CLASS).double().mean()),
        "target_tshirt_class": int(classifier_probs(model, target).argmax(1)),
    }
    save_classifier(model, out, report)
    return report
