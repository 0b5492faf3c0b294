"""The instance protocol: forgetting one non-duplicated training image, the SISS paper's CelebA-HQ protocol (its
Table 1 and Figure 3) at CPU scale.

For each of ``targets`` training images drawn at random (fixed ``target_seed``), a model is measured on that image
(A = {a}, X \\ A = the others):

- *similarity*: the noise-and-denoise similarity of the target (``metrics.similarity``: forward noise to step
  ``similarity_t``, ancestral DDPM back to 0, both seeded by the image; pixel cosine, or SSCD with ``--sscd``).
  A model that still holds the image returns it (high); the paper's SSCD went 0.87 -> 0.36 under SISS.
- *NLL* of the target in bits/dim (``metrics.nll``, probability-flow ODE): higher = more forgotten.
- *membership AUC* of the target against every held-out image by per-image denoising loss (``metrics.membership``):
  the fraction of held-out images the model denoises worse than the target. A memorised image scores near 1; an
  image the model never saw is a uniform draw among held-out ones (0.5 on average).
- *quality* (the paper's FID): the NLL in bits/dim of ``quality_images`` held-out digits (lower is better: the model
  still describes unseen digits), and the noise-and-denoise similarity of ``kept_images`` other training images
  (higher is better: what was not deleted is still reproduced).
- the *strip* (the paper's Figure 3): the noise-and-denoised target every few unlearning steps.

The *held-out reference* is the model's numbers on images it never saw (similarity, NLL, leave-one-out membership
AUC of the ``quality_images`` held-out digits): what a model that never trained on the target would give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import UserError


class InstanceSettings(Protocol):
    """The settings the protocol reads (``bench instance``'s config has them all)."""

    model: str
    data: str
    held_out: str
    targets: int
    target_seed: int
    seed: int
    similarity_t: int
    similarity_seed: int
    sscd: str
    nll_probes: int
    nll_tol: float
    quality_images: int
    kept_images: int
    membership_draws: int


@dataclass
class InstanceSetup:
    """The model, its training data X, held-out images and the targets, loaded and checked once."""

    cfg: InstanceSettings
    model_dir: str
    model: object
    data: object
    held: torch.Tensor
    targets: list[int]

    @classmethod
    def load(cls, cfg: InstanceSettings) -> "InstanceSetup":
        from ..data import load_data
        from ..model import load_model, resolve_model_dir

        model_dir = resolve_model_dir(cfg.model)
        model = load_model(model_dir)
        data = load_data(cfg.data)
        model.check_data(data.shape, "data")
        if cfg.held_out:
            held = load_data(cfg.held_out).images
        elif data.held_out is not None:
            held = data.held_out
        else:
            raise UserError(f"data {cfg.data!r} has no held-out images: pass --held-out SPEC")
        model.check_data(tuple(held.shape[1:]), "held-out")
        if len(held) < cfg.quality_images:
            raise UserError(f"--quality-images {cfg.quality_images} exceeds the {len(held)} held-out images")
        if not 0 <= cfg.similarity_t <= model.num_train_timesteps:
            raise UserError(f"--similarity-t must lie in [0, {model.num_train_timesteps}], got {cfg.similarity_t}")
        if cfg.kept_images > len(data) - 1:
            raise UserError(f"--kept-images must be at most {len(data) - 1}")
        return cls(cfg, model_dir, model, data, held, choose_targets(len(data), cfg.targets, cfg.target_seed))

    def similarity(self):
        from ..metrics.similarity import load_similarity

        return load_similarity(self.cfg.sscd or None)


def choose_targets(n: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices of X drawn at random with ``seed``; the draw for ``k + 1`` extends the one for ``k``."""
    if not 1 <= k < n:
        raise UserError(f"--targets must lie in [1, {n - 1}] for a data set of {n} images, got {k}")
    return [int(i) for i in np.random.default_rng(int(seed)).permutation(n)[:k]]


def kept_subset(n: int, target: int, k: int, seed: int) -> list[int]:
    """The ``k`` other training images whose similarity is measured alongside target ``target`` (fixed per target)."""
    rng = np.random.default_rng([int(seed), int(target), 17])
    return [int(i) for i in rng.permutation([i for i in range(n) if i != target])[:k]]


def _flat(x: torch.Tensor) -> list[float]:
    return [round(float(v), 5) for v in x.flatten()]


def evaluate(model, setup: InstanceSetup, target: int) -> dict:
    """Every measure of one model for one target (the model may be the shipped one, an unlearned or a retrained one)."""
    from ..metrics.membership import denoising_losses, loss_auc
    from ..metrics.nll import nll_bits_per_dim
    from ..metrics.similarity import noise_and_denoise_similarity

    cfg = setup.cfg
    x = setup.data.images
    a = x[target:target + 1]
    backend = setup.similarity()
    sim = noise_and_denoise_similarity(model, a, backend, cfg.similarity_t, cfg.similarity_seed)
    others = x[kept_subset(len(x), target, cfg.kept_images, cfg.seed)]
    kept_sim = noise_and_denoise_similarity(model, others, backend, cfg.similarity_t, cfg.similarity_seed)
    q = setup.held[:cfg.quality_images]
    both = torch.cat([a, q])  # one ODE solve for every (image, probe) copy
    nll = nll_bits_per_dim(model, both, cfg.nll_probes, cfg.nll_tol, cfg.nll_tol, seed=0,
                           batch_size=len(both) * cfg.nll_probes)
    la = denoising_losses(model, a, cfg.membership_draws, seed=0)
    lh = denoising_losses(model, setup.held, cfg.membership_draws, seed=0)
    return {
        "similarity": float(sim.scores[0]), "similarity_backend": sim.similarity, "denoised": _flat(sim.denoised[0]),
        "nll_bpd": float(nll.bpd[0]), "quality_nll_bpd": float(nll.bpd[1:].mean()),
        "kept_similarity": float(kept_sim.scores.mean()),
        "membership_auc": loss_auc(la, lh), "target_loss": float(la[0]), "held_out_loss": float(lh.mean()),
    }


def held_out_reference(setup: InstanceSetup) -> dict:
    """The shipped model on images it never saw: per held-out image its similarity, NLL, and membership AUC against
    the other held-out images (leave one out). What a model that never trained on the target would give it."""
    from ..metrics.membership import denoising_losses, loss_auc
    from ..metrics.nll import nll_bits_per_dim
    from ..metrics.similarity import noise_and_denoise_similarity

    cfg, model = setup.cfg, setup.model
    q = setup.held[:cfg.quality_images]
    sim = noise_and_denoise_similarity(model, q, setup.similarity(), cfg.similarity_t, cfg.similarity_seed)
    nll = nll_bits_per_dim(model, q, cfg.nll_probes, cfg.nll_tol, cfg.nll_tol, seed=0,
                           batch_size=len(q) * cfg.nll_probes)
    lh = denoising_losses(model, setup.held, cfg.membership_draws, seed=0)
    aucs = [loss_auc(lh[i:i + 1], torch.cat([lh[:i], lh[i + 1:]])) for i in range(len(q))]
    x = setup.data.images
    train_sim = noise_and_denoise_similarity(model, x[:len(q)], setup.similarity(), cfg.similarity_t,
                                             cfg.similarity_seed)
    return {"n": len(q), "similarity": [float(s) for s in sim.scores], "nll_bpd": [float(b) for b in nll.bpd],
            "membership_auc": aucs, "similarity_backend": sim.similarity,
            "train_similarity": [float(s) for s in train_sim.scores],
            "denoised": [_flat(d) for d in sim.denoised[:4]]}


class Strip:
    """Records the noise-and-denoised target during unlearning: at step 0 (the starting model) and every ``every``
    steps and the last one (a trainer callback). ``points`` is what the cell stores and :func:`strip_png` draws."""

    def __init__(self, setup: InstanceSetup, forget: torch.Tensor, scheduler, every: int, last: int):
        self.setup, self.forget, self.scheduler, self.every, self.last = setup, forget, scheduler, every, last
        self.backend = setup.similarity()
        self.points: list[dict] = []

    def record(self, step: int, unet) -> None:
        from ..metrics.similarity import noise_and_denoise
        from ..model import DiffusionModel

        cfg = self.setup.cfg
        d = noise_and_denoise(DiffusionModel(unet, self.scheduler), self.forget, cfg.similarity_t,
                              cfg.similarity_seed)
        self.points.append({"step": step, "similarity": float(self.backend(self.forget, d)[0]),
                            "denoised": _flat(d[0])})

    def __call__(self, step: int, unet) -> None:
        if step % self.every == 0 or step == self.last:
            self.record(step, unet)


def strip_png(cells: list[dict], image: torch.Tensor, similarity_t: int, path: Path) -> None:
    """The paper's Figure 3: per method (rows), the target ``image`` and its noise-and-denoised reconstruction at each
    recorded step (columns), with the similarity under each image. ``cells``: the cells of one target with a strip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = cells[0]["target"]
    steps = sorted({p["step"] for c in cells for p in c["strip"]})
    shape = tuple(image.shape)
    ncol = len(steps) + 1
    fig, axes = plt.subplots(len(cells), ncol, figsize=(1.25 * ncol + 1.6, 1.35 * len(cells) + 0.6), squeeze=False)

    def show(ax, img, title=None):
        a = ((np.asarray(img, dtype=np.float32).reshape(shape) + 1) / 2).clip(0, 1)
        a = a[0] if shape[0] == 1 else a.transpose(1, 2, 0)
        ax.imshow(a, cmap="gray" if shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        if title is not None:
            ax.set_xlabel(title, fontsize=7)

    for i, c in enumerate(cells):
        show(axes[i, 0], image.numpy(), "target")
        axes[i, 0].set_ylabel(c["label"], fontsize=8, rotation=0, ha="right", va="center")
        by_step = {p["step"]: p for p in c["strip"]}
        for j, s in enumerate(steps, 1):
            if s in by_step:
                show(axes[i, j], by_step[s]["denoised"], f"{by_step[s]['similarity']:.2f}")
            else:
                axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(f"step {s}", fontsize=8)
    fig.suptitle(f"Noise-and-denoise (t = {similarity_t}) of target {target} during unlearning; number = similarity",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


__all__ = ["InstanceSettings", "InstanceSetup", "Strip", "choose_targets", "evaluate", "held_out_reference",
           "kept_subset", "strip_png"]
