"""What one model is measured on: the forget set A and a reference set, each measure with its settings.

Every measure takes the same inputs for every model, so the models differ only through their weights:

- noise-and-denoise similarity (:mod:`diffunlearn.metrics.similarity`): the image noised to step ``t`` with noise
  seeded by the image itself, denoised by ancestral DDPM (every step, or ``similarity_steps`` evenly spaced ones);
- per-image denoising loss over ``loss_draws`` fixed (t, eps) pairs shared by every image and model
  (:func:`diffunlearn.metrics.membership.denoising_losses`);
- NLL in bits/dim by the probability-flow ODE (:func:`diffunlearn.metrics.nll.nll_bits_per_dim`) at the budget's
  tolerance, with the Monte Carlo standard error over its Hutchinson probes;
- generation (:mod:`.generation`): near-copies of A among samples at the seeds where the model before drew A (the
  targeted test) and at fresh seeds, image ``i`` seeded by ``(seed, i)``.

A class-conditional model is measured with each image conditioned on its own class, and samples conditioned on the
classes of A in turn (the reference images are then of A's classes too: see ``verify``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..data import content_hash
from ..errors import UserError
from ..model import DiffusionModel


@dataclass(frozen=True)
class Budget:
    """How much each measure costs (see :data:`BUDGETS`)."""

    name: str
    reference_images: int  # reference images for the loss and membership AUC
    similarity_items: int  # distinct items of A whose similarity is measured
    similarity_reference: int  # reference images whose similarity is measured
    similarity_steps: int | None  # ancestral steps back from t (None: all t of them, the protocol)
    loss_draws: int  # shared (t, eps) pairs of the denoising loss
    nll_items: int  # distinct items of A whose NLL is computed (0: no NLL at this budget)
    nll_reference: int  # reference images whose NLL is computed
    nll_probes: int  # Hutchinson probes (2 or more give a Monte Carlo error)
    nll_tol: float  # RK45 rtol = atol
    search_seeds: int  # seeds searched under the model before for near-copies of A (the targeted test)
    samples: int  # fresh samples of the model after (seeds never searched): the copy rate and its bound
    sample_steps: int  # sampler steps per sample
    sampler: str = "dpm++sde"  # the sampler of every generated sample (dpm++sde at 20 steps keeps the copy rate)
    neighbour_pool: int = 4096  # at most this many other images set A's near-copy distance
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

    def fresh_bound(self, samples: int | None = None) -> float:
        """The copy rate that ``samples`` (default: this budget's) clean fresh samples bound (exact 95%)."""
        from .verdicts import copy_rate_bound

        return copy_rate_bound(self.samples if samples is None else samples)

    def network_evaluations(self, items: int = 1, similarity_t: int = 250, copy_rate: float = 0.07) -> dict:
        """UNet evaluations per measure for ``items`` distinct items of A (the NLL's ODE is not counted: its steps
        depend on the model), for the model before and the unlearned one. ``copy_rate``: the model before's rate,
        which sets how many targeted seeds are drawn again."""
        sim = (min(items, self.similarity_items) + self.similarity_reference) * (self.similarity_steps or similarity_t)
        loss = (items + self.reference_images) * self.loss_draws
        targeted = round(copy_rate * self.search_seeds) * self.sample_steps
        return {"similarity": 2 * sim, "loss": 2 * loss, "search (model before, once)": self.search_seeds *
                self.sample_steps, "targeted": targeted, "fresh": self.samples * self.sample_steps}

    def resolves(self) -> str:
        """What this budget can detect, in one line (``verify --help`` and the report)."""
        from .verdicts import MIN_REFERENCE

        nll = (f"NLL of {self.nll_items} item(s) and {self.nll_reference} reference images" if self.nll_items
               else "no NLL")
        return (f"{self.samples} fresh samples (a clean run bounds the copy rate below "
                f"{100 * self.fresh_bound():.2g}%), {self.search_seeds} seeds searched under the model before for the "
                f"targeted test, similarity of {self.similarity_reference} and loss of {self.reference_images} "
                f"reference images ({MIN_REFERENCE} or more resolve the 95% tail), {nll}")


BUDGETS = {
    # MNIST 28x28, one image of A: about 100 s for the model before and after together on one thread, plus about a
    # minute for the model before's search the first time (cached); see docs/results/verify-ladder
    "fast": Budget("fast", reference_images=32, similarity_items=16, similarity_reference=32, similarity_steps=25,
                   loss_draws=8, nll_items=0, nll_reference=0, nll_probes=2, nll_tol=1e-2, search_seeds=512,
                   samples=400, sample_steps=20),
    # closer to the protocols: similarity on every step, the NLL, 2,048 fresh samples (a clean run: below 0.18%)
    "full": Budget("full", reference_images=128, similarity_items=32, similarity_reference=32, similarity_steps=None,
                   loss_draws=32, nll_items=4, nll_reference=20, nll_probes=2, nll_tol=1e-3, search_seeds=2048,
                   samples=2048, sample_steps=20, strip_items=16),
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

    def sample_labels_of(self, indices) -> torch.Tensor | None:
        """Labels of the samples numbered ``indices``: sample ``i`` is of A's ``i``-th class in turn (None:
        unconditional), so a seed has the same class whichever samples are drawn with it."""
        if self.forget_labels is None:
            return None
        classes = torch.unique(self.forget_labels)
        return classes[torch.as_tensor(list(indices), dtype=torch.long) % len(classes)]

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
    seconds: dict[str, float] = field(default_factory=dict)

    def check_finite(self, who: str) -> None:
        for k, v in self.values.items():
            if not k.endswith("_stderr") and v.numel() and not torch.isfinite(v).all():
                raise FloatingPointError(f"the {who} model gives NaN or Inf for {k.replace('_', ' ')}: its weights "
                                         "or outputs are not finite")


PARTS = ("similarity", "loss", "nll")


def measure_spaces(model: DiffusionModel) -> dict[str, str]:
    """Where each measure is taken: a latent model's loss and NLL are in its latent space (the space it was trained
    in), its similarity and generated samples are compared in pixel space after decoding."""
    if model.codec is None:
        return {"loss": "pixel space", "nll": "pixel space (bits per pixel dimension)", "similarity": "pixel space",
                "generation": "pixel space"}
    latent = f"latent space of the model's {model.codec.kind} ({'x'.join(map(str, model.sample_shape))} latents)"
    return {"loss": latent, "nll": f"{latent}, bits per latent dimension (no 8-bit pixel offset)",
            "similarity": "pixel space: the latent is noised and denoised, then decoded",
            "generation": "pixel space: samples decoded by the autoencoder"}


def measure_model(model: DiffusionModel, s: Subjects, backend, similarity_t: int, seed: int = 0,
                  parts: tuple[str, ...] = PARTS, log=None) -> Measured:
    """Every measure in ``parts`` of ``model`` on ``s`` (see the module docstring)."""
    from ..metrics.membership import denoising_losses
    from ..metrics.nll import nll_bits_per_dim
    from ..metrics.similarity import noise_and_denoise_similarity

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
        # a latent model's loss is its training loss: on the images' latents
        losses = denoising_losses(model, model.encode(torch.cat([s.forget, s.reference])), b.loss_draws, seed=seed,
                                  labels=s.labels(len(s.forget), len(s.reference)))
        out.values["loss_a"], out.values["loss_ref"] = losses[:len(s.forget)], losses[len(s.forget):]
        out.seconds["loss"] = time.time() - t0
    if "nll" in parts and n["nll_items"]:
        t0 = time.time()
        images = model.encode(torch.cat([s.forget[:n["nll_items"]], s.reference[:n["nll_reference"]]]))
        r = nll_bits_per_dim(model, images, b.nll_probes, b.nll_tol, b.nll_tol, seed=seed,
                             batch_size=len(images) * b.nll_probes, labels=s.labels(n["nll_items"], n["nll_reference"]))
        k = n["nll_items"]
        out.values.update(nll_a=r.bpd[:k].float(), nll_ref=r.bpd[k:].float())
        out.values.update(nll_a_stderr=r.stderr[:k].float(), nll_ref_stderr=r.stderr[k:].float())
        out.seconds["nll"] = time.time() - t0
    if log is not None:
        log("  " + ", ".join(f"{k} {v:.1f} s" for k, v in out.seconds.items()))
    return out
