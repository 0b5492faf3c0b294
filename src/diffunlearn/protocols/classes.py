"""Forgetting a whole class (EraseDiff's protocol, Wu et al. 2024, Tables 1 and 3) on MNIST digits.

A model trained on the ``mnist`` data set (4,500 real digits, labels 0-9) forgets every training image of one class.
Measured with the shipped domain classifier (not Inception, not EraseDiff's ResNet):

- **conditional** model: ``per_class`` samples conditioned on each class (sample ``i`` seeded by ``(seed, i)``, the
  classes in order); the classifier's accuracy on the forgotten class's samples (lower: forgotten) and on the
  remaining classes' (higher: kept); classifier FID of the forgotten class's samples against its training images,
  and of the remaining classes' samples against theirs; the noise KL of the forgotten and of the remaining classes'
  training images; membership AUC of the forgotten class's training images against held-out images of that class
  (denoising loss; 0.5: no trace of training); the weight distance to the retrained model;
- **unconditional** model: ``n_samples`` unconditional samples; the rate of the forgotten class among them (with
  its exact interval), classifier FID of all samples against the kept training digits, the noise KL and membership
  AUC as above (unconditioned).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..model.sampling import SAMPLE_BATCH


@dataclass
class ClassProtocol:
    """Data, classifier and reference sets of one forgotten class, loaded once."""

    forget_class: int
    images: torch.Tensor  # the training digits, (N, 1, 28, 28)
    labels: torch.Tensor  # their classes (N,)
    held_out: torch.Tensor
    held_out_labels: torch.Tensor
    classifier: torch.nn.Module

    @classmethod
    def load(cls, forget_class: int = 7, data: str = "mnist") -> "ClassProtocol":
        from ..data import load_data
        from ..metrics.classifier import load_classifier
        from ..pretrained import pretrained_dir

        d = load_data(data)
        return cls(int(forget_class), d.images.load(), d.labels, d.held_out, d.held_out_labels,
                   load_classifier(pretrained_dir("mnist-classifier")))

    @property
    def forget_idx(self) -> list[int]:
        return torch.nonzero(self.labels == self.forget_class).flatten().tolist()

    def split(self):
        """(X \\ A, A, labels of X \\ A, labels of A)."""
        mask = self.labels == self.forget_class
        return self.images[~mask], self.images[mask], self.labels[~mask], self.labels[mask]

    def _membership_kl(self, model, conditional: bool, n: int, seed: int) -> dict:
        from ..metrics.classes import noise_kl
        from ..metrics.membership import denoising_losses, loss_auc

        g = torch.Generator().manual_seed(seed + 101)
        fmask = self.labels == self.forget_class
        forget = self.images[fmask][torch.randperm(int(fmask.sum()), generator=g)[:n]]
        others = torch.nonzero(~fmask & (self.labels < 10)).flatten()
        rest_idx = others[torch.randperm(len(others), generator=g)[:n]]
        rest, rest_y = self.images[rest_idx], self.labels[rest_idx]
        held = self.held_out[self.held_out_labels == self.forget_class]
        fy = torch.full((len(forget),), self.forget_class)
        hy = torch.full((len(held),), self.forget_class)
        lab = (lambda y: y) if conditional else (lambda y: None)  # noqa: E731
        lm = denoising_losses(model, forget, 8, seed, labels=lab(fy))
        lh = denoising_losses(model, held, 8, seed, labels=lab(hy))
        kl_f = noise_kl(model, forget, lab(fy), seed=seed)
        kl_r = noise_kl(model, rest, lab(rest_y), seed=seed)
        return {"membership_auc": {"value": loss_auc(lm, lh), "members": len(forget), "held_out": len(held),
                                   "draws": 8},
                "noise_kl": {"forgotten": float(kl_f.mean()), "remaining": float(kl_r.mean()), "images": n,
                             "draws": 8}}

    def evaluate(self, model, per_class: int = 64, n_samples: int = 1024, sample_steps: int = 50,
                 guidance: float = 1.0, seed: int = 0, measure_images: int = 128,
                 batch_size: int = SAMPLE_BATCH) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """Every measure of one model (see the module docstring); returns metrics, samples and their labels."""
        from ..metrics.classes import class_accuracy, class_rate, predicted_classes
        from ..metrics.classifier import classifier_fid
        from ..model.sampling import ddpm_sample

        t0 = time.time()
        c = self.forget_class
        metrics: dict = {}
        digits = self.labels < 10
        if model.conditional:
            labels = torch.arange(10).repeat_interleave(per_class)
            samples = ddpm_sample(model, len(labels), sample_steps, seed, batch_size, labels=labels, guidance=guidance)
            pred = predicted_classes(self.classifier, samples)
            acc = class_accuracy(pred, labels)
            remaining = [k for k in acc if k != c]
            fmask = labels == c
            metrics["accuracy_forgotten"] = acc[c]
            metrics["accuracy_remaining"] = {"mean": sum(acc[k]["accuracy"] for k in remaining) / len(remaining),
                                             "per_class": {str(k): acc[k]["accuracy"] for k in remaining}}
            metrics["fid_forgotten"] = classifier_fid(self.classifier, samples[fmask], self.images[self.labels == c])
            metrics["fid_remaining"] = classifier_fid(self.classifier, samples[~fmask],
                                                      self.images[digits & (self.labels != c)])
            metrics["sampling"] = {"per_class": per_class, "steps": sample_steps, "seed": seed, "guidance": guidance}
        else:
            labels = None
            samples = ddpm_sample(model, n_samples, sample_steps, seed, batch_size)
            pred = predicted_classes(self.classifier, samples)
            metrics["class_rate"] = class_rate(pred, c)
            metrics["class_rate"]["indices"] = torch.nonzero(pred == c).flatten().tolist()
            metrics["predicted_histogram"] = torch.bincount(pred, minlength=11).tolist()
            metrics["fid_kept"] = classifier_fid(self.classifier, samples, self.images[digits & (self.labels != c)])
            metrics["sampling"] = {"n": n_samples, "steps": sample_steps, "seed": seed}
        metrics.update(self._membership_kl(model, model.conditional, measure_images, seed))
        metrics["seconds"] = round(time.time() - t0, 1)
        return metrics, samples, labels


def class_grid(samples: torch.Tensor, labels: torch.Tensor | None, forget_class: int, keep_class: int,
               n: int = 16) -> tuple[torch.Tensor, list[str]]:
    """Tiles for a grid: ``n`` samples of the forgotten class, then ``n`` of a remaining class (conditional); the
    first ``2 n`` samples otherwise."""
    if labels is None:
        return samples[:2 * n], [""] * min(len(samples), 2 * n)
    f = samples[labels == forget_class][:n]
    k = samples[labels == keep_class][:n]
    return torch.cat([f, k]), [f"class {forget_class}"] * len(f) + [f"class {keep_class}"] * len(k)


__all__ = ["ClassProtocol", "class_grid"]
