"""What one model is measured on: the forget set A and a reference set, each measure with its settings.

Every measure takes the same inputs for every model, so the models differ only through their weights:

- noise-and-denoise similarity (:mod:`diffunlearn.metrics.similarity`): the image noised to step ``t`` with noise
  seeded by the image itself, denoised by ancestral DDPM (every step, or ``similarity_steps`` evenly spaced ones);
- per-image denoising loss over ``loss_draws`` fixed (t, eps) pairs shared by every image and model
  (:func:`diffunlearn.metrics.membership.denoising_losses`);
- NLL in bits/dim by the probability-flow ODE (:func:`diffunlearn.metrics.nll.nll_bits_per_dim`) at the budget's
  tolerance, with the Monte Carlo standard error over its Hutchinson probes;
- generation: ``samples`` images by ancestral DDPM on ``sample_steps`` steps, image ``i`` seeded by ``(seed, i)``
  (:func:`diffunlearn.sampling.ddpm_sample`), and each image's L2 distance to its nearest sample (pixels in [0, 1]).

A class-conditional model is measured with each image conditioned on its own class, and samples conditioned on the
classes of A in turn (the reference images are then of A's classes too: see ``verify``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..data import content_hash
from ..errors import UserError
from ..models import DiffusionModel


@dataclass(frozen=True)
class Budget:
    """How much each measure costs (see :data:`BUDGETS`)."""

    name: str
    reference_images: int  # reference images for the loss, membership AUC and nearest-sample distances
    similarity_items: int  # distinct items of A whose similarity is measured
    similarity_reference: int  # reference images whose similarity is measured
    similarity_steps: int | None  # ancestral steps back from t (None: all t of them, the protocol)
    loss_draws: int  # shared (t, eps) pairs of the denoising loss
    nll_items: int  # distinct items of A whose NLL is computed
    nll_reference: int  # reference images whose NLL is computed
    nll_probes: int  # Hutchinson probes (2 or more give a Monte Carlo error)
    nll_tol: float  # RK45 rtol = atol
    samples: int  # generated images
    sample_steps: int  # ancestral DDPM steps per sample
    strip_items: int = 8  # items of A shown as original | before | after

    def describe(self) -> dict:
        return asdict(self)

    @property
    def nll_name(self) -> str:
        exact = self.nll_tol <= 1e-5
        return (f"probability-flow ODE NLL, RK45 rtol = atol = {self.nll_tol:g}, {self.nll_probes} Hutchinson "
                f"probes{'' if exact else ' (a loose-tolerance estimate of the exact NLL)'}")

    @property
    def similarity_name(self) -> str:
        return "every step" if self.similarity_steps is None else f"{self.similarity_steps} evenly spaced steps"


BUDGETS = {
    # one 28x28 image of A: about 11 s per model on one thread (README: measured)
    "fast": Budget("fast", reference_images=32, similarity_items=16, similarity_reference=8, similarity_steps=25,
                   loss_draws=8, nll_items=2, nll_reference=4, nll_probes=2, nll_tol=1e-2, samples=32,
                   sample_steps=20),
    # the protocols' own settings: minutes per model for 28x28 images (the NLL dominates)
    "full": Budget("full", reference_images=128, similarity_items=64, similarity_reference=32, similarity_steps=None,
                   loss_draws=32, nll_items=8, nll_reference=8, nll_probes=4, nll_tol=1e-5, samples=256,
                   sample_steps=100, strip_items=16),
}


def get_budget(budget: str | Budget) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if budget not in BUDGETS:
        raise UserError(f"unknown verification budget {budget!r}: choose {', '.join(BUDGETS)}")
    return BUDGETS[budget]


@dataclass
class Subjects:
    """The images every model is measured on: the distinct items of A (identical copies measured once) and the
    reference images, with the subsets the costly measures use."""

    forget: torch.Tensor  # distinct items of A, (U, C, H, W)
    item_of: list[int]  # for each item of A (in order), its row in ``forget``
    reference: torch.Tensor  # (R, C, H, W)
    budget: Budget
    #: class labels of ``forget`` and ``reference`` for a class-conditional model (every measure conditions on them)
    forget_labels: torch.Tensor | None = None
    reference_labels: torch.Tensor | None = None

    @classmethod
    def build(cls, forget_images: torch.Tensor, reference: torch.Tensor, budget: Budget,
              forget_labels: torch.Tensor | None = None, reference_labels: torch.Tensor | None = None) -> "Subjects":
        rows: dict[str, int] = {}
        item_of, keep = [], []
        for i, x in enumerate(forget_images):
            h = content_hash(x) + ("" if forget_labels is None else f"/{int(forget_labels[i])}")
            if h not in rows:
                rows[h] = len(keep)
                keep.append(i)
            item_of.append(rows[h])
        return cls(forget_images[keep], item_of, reference, budget,
                   None if forget_labels is None else forget_labels[keep], reference_labels)

    def labels(self, n_forget: int, n_reference: int) -> torch.Tensor | None:
        """The labels of ``cat([forget[:n_forget], reference[:n_reference]])`` (None: unconditional)."""
        if self.forget_labels is None:
            return None
        return torch.cat([self.forget_labels[:n_forget], self.reference_labels[:n_reference]])

    def sample_labels(self, n: int) -> torch.Tensor | None:
        """Labels of the generated samples: the classes of A in turn (None: unconditional)."""
        if self.forget_labels is None:
            return None
        classes = torch.unique(self.forget_labels)
        return classes[torch.arange(n) % len(classes)]

    def counts(self) -> dict:
        b = self.budget
        u, r = len(self.forget), len(self.reference)
        return {"forget_distinct": u, "similarity_items": min(u, b.similarity_items),
                "similarity_reference": min(r, b.similarity_reference), "nll_items": min(u, b.nll_items),
                "nll_reference": min(r, b.nll_reference), "loss_items": u, "loss_reference": r,
                "strip_items": min(u, b.strip_items, b.similarity_items)}


@dataclass
class Measured:
    """One model's measures. ``*_a``: per distinct item of A (its measured subset); ``*_ref``: per reference image."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    denoised: torch.Tensor | None = None  # noise-and-denoise results of the strip items
    nearest_samples: torch.Tensor | None = None  # each strip item's nearest sample
    sample_to_forget: torch.Tensor | None = None  # each sample's distance to its nearest item of A
    seconds: dict[str, float] = field(default_factory=dict)

    def check_finite(self, who: str) -> None:
        for k, v in self.values.items():
            if not k.endswith("_stderr") and v.numel() and not torch.isfinite(v).all():
                raise FloatingPointError(f"the {who} model gives NaN or Inf for {k.replace('_', ' ')}: its weights "
                                         "or outputs are not finite")


PARTS = ("similarity", "loss", "nll", "generation")


def measure_model(model: DiffusionModel, s: Subjects, backend, similarity_t: int, seed: int = 0,
                  parts: tuple[str, ...] = PARTS, log=None) -> Measured:
    """Every measure in ``parts`` of ``model`` on ``s`` (see the module docstring)."""
    from ..metrics.membership import denoising_losses
    from ..metrics.nll import nll_bits_per_dim
    from ..metrics.rates import pixel_distances
    from ..metrics.similarity import noise_and_denoise_similarity
    from ..sampling import ddpm_sample

    b, n = s.budget, s.counts()
    out = Measured()
    if "similarity" in parts:
        t0 = time.time()
        images = torch.cat([s.forget[:n["similarity_items"]], s.reference[:n["similarity_reference"]]])
        sim = noise_and_denoise_similarity(model, images, backend, similarity_t, seed, steps=b.similarity_steps,
                                           labels=s.labels(n["similarity_items"], n["similarity_reference"]))
        out.values["similarity_a"] = sim.scores[:n["similarity_items"]]
        out.values["similarity_ref"] = sim.scores[n["similarity_items"]:]
        out.denoised = sim.denoised[:n["strip_items"]]
        out.seconds["similarity"] = time.time() - t0
    if "loss" in parts:
        t0 = time.time()
        losses = denoising_losses(model, torch.cat([s.forget, s.reference]), b.loss_draws, seed=seed,
                                  labels=s.labels(len(s.forget), len(s.reference)))
        out.values["loss_a"], out.values["loss_ref"] = losses[:len(s.forget)], losses[len(s.forget):]
        out.seconds["loss"] = time.time() - t0
    if "nll" in parts:
        t0 = time.time()
        images = torch.cat([s.forget[:n["nll_items"]], s.reference[:n["nll_reference"]]])
        r = nll_bits_per_dim(model, images, b.nll_probes, b.nll_tol, b.nll_tol, seed=seed,
                             batch_size=len(images) * b.nll_probes, labels=s.labels(n["nll_items"], n["nll_reference"]))
        k = n["nll_items"]
        out.values.update(nll_a=r.bpd[:k].float(), nll_ref=r.bpd[k:].float())
        out.values.update(nll_a_stderr=r.stderr[:k].float(), nll_ref_stderr=r.stderr[k:].float())
        out.seconds["nll"] = time.time() - t0
    if "generation" in parts:
        t0 = time.time()
        samples = ddpm_sample(model, b.samples, b.sample_steps, seed, labels=s.sample_labels(b.samples))
        to_a = pixel_distances(samples, s.forget)  # (N, U)
        out.values["nearest_a"] = to_a.min(0).values
        out.values["nearest_ref"] = pixel_distances(samples, s.reference).min(0).values
        out.sample_to_forget = to_a.min(1).values
        out.nearest_samples = samples[to_a[:, :n["strip_items"]].argmin(0)] if n["strip_items"] else samples[:0]
        out.seconds["generation"] = time.time() - t0
    if log is not None:
        log("  " + ", ".join(f"{k} {v:.1f} s" for k, v in out.seconds.items()))
    return out
