"""Relearning audit: does what was removed come back after a little ordinary fine-tuning?

The unlearned model is fine-tuned for ``steps`` steps with the plain DDPM loss (the trainer with method ``naive``,
AdamW at ``lr``, batch ``batch_size``, seed ``seed``), once on X \\ A ("kept") and once on the ``knn`` nearest kept
neighbours of every item of A in pixel space ("neighbours": the images most likely to pull A back). A is then
measured again (noise-and-denoise similarity, denoising loss, membership AUC against the reference images). For each
measure, the *recovered fraction* is ``(attacked - after) / (before - after)``: 0 when nothing came back, 1 when the
attack undid the whole change the deletion made. When a retrained model is given it goes through the same attacks;
its fraction ``(attacked - retrained) / (before - retrained)`` is what fine-tuning alone gives a model that never
saw A, the yardstick for the unlearned model's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data import ImageSet
from ..errors import UserError
from .measures import Measured, Subjects, measure_model
from .verdicts import ranks

DEFAULT_STEPS = 50
WORDS = {"similarity": "similarity", "loss": "loss", "membership_auc": "membership AUC"}


@dataclass
class AuditSettings:
    steps: int = DEFAULT_STEPS
    lr: float = 5e-5
    batch_size: int = 32
    knn: int = 10
    seed: int = 0

    def __post_init__(self):
        if int(self.steps) < 1 or int(self.batch_size) < 1 or int(self.knn) < 1:
            raise UserError("the relearning audit needs steps, batch size and knn of at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"the relearning audit's learning rate must be a positive number, got {self.lr}")


def parse_audit(spec: str | None) -> int | None:
    """``relearn`` or ``relearn:K`` -> K steps (default 50); empty -> None."""
    spec = (spec or "").strip()
    if not spec:
        return None
    name, _, k = spec.partition(":")
    if name != "relearn":
        raise UserError(f"unknown audit {spec!r}: use relearn or relearn:K (K fine-tuning steps)")
    if not k:
        return DEFAULT_STEPS
    if not k.isdigit() or int(k) < 1:
        raise UserError(f"--audit relearn:K needs a whole number of steps K >= 1, got {k!r}")
    return int(k)


def forget_summary(m: Measured) -> dict:
    """A's mean similarity and loss, and the membership AUC of A's loss against the reference images'."""
    v = m.values
    return {"similarity": float(v["similarity_a"].mean()), "loss": float(v["loss_a"].mean()),
            "membership_auc": float(np.mean(ranks(v["loss_a"], v["loss_ref"], higher_memorised=False)))}


def recovered(before: float, start: float, attacked: float) -> float | None:
    """Fraction of the change ``before -> start`` that ``attacked`` undid (None when there was no change)."""
    change = before - start
    return None if change == 0 or not math.isfinite(change) else (attacked - start) / change


def relearn_audit(models: dict, measured: dict[str, Measured], subjects: Subjects, data: ImageSet,
                  forget_idx: list[int], settings: AuditSettings, backend, similarity_t: int, seed: int,
                  removed: dict[str, bool] | None = None, log=None) -> dict:
    """Run both attacks on the unlearned (and retrained) model. ``removed[k]``: whether the deletion removed A on
    measure ``k``; where it did not, nothing can be recovered and the fraction is None (a fraction of a change
    within noise would only be noise)."""
    from ..methods import make_method
    from ..methods.retrack import nearest_kept
    from ..trainer import TrainerConfig, unlearn

    say = log or (lambda _m: None)
    t0 = time.time()
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[forget_idx] = False
    kept = data.images[mask]
    near = torch.unique(nearest_kept(subjects.forget, kept, settings.knn).flatten())
    attacks = {"kept": kept, "neighbours": kept[near]}
    kept_y = None
    if models["after"].conditional:  # the attacks fine-tune on images with their own labels
        from ..data.labels import labels_for_model

        kept_y = labels_for_model(data, models["after"].classes)[mask]
    attack_labels = {"kept": kept_y, "neighbours": None if kept_y is None else kept_y[near]}
    cfg = TrainerConfig(steps=int(settings.steps), lr=float(settings.lr), batch_size=int(settings.batch_size),
                        seed=int(settings.seed))
    before = forget_summary(measured["before"]) if "before" in measured else None
    rows = []
    for role in [r for r in ("after", "retrained") if r in models]:
        start = forget_summary(measured[role])
        for name, images in attacks.items():
            say(f"audit: fine-tuning the {role} model {settings.steps} steps on {name} ({len(images)} images) ...")
            labels = None if kept_y is None else (attack_labels[name], subjects.forget_labels)
            attacked_model = unlearn(models[role], images, subjects.forget, make_method("naive"), cfg, labels=labels)
            m = measure_model(attacked_model, subjects, backend, similarity_t, seed, parts=("similarity", "loss"))
            m.check_finite(f"fine-tuned {role}")
            got = forget_summary(m)
            row = {"model": role, "attack": name, "images": len(images), "start": start, "attacked": got}
            if before is not None:
                row["recovered"] = {k: None if role == "after" and removed and not removed.get(k, True)
                                    else recovered(before[k], start[k], got[k]) for k in got}
            rows.append(row)
    return {"settings": asdict(settings), "before": before, "rows": rows, "seconds": round(time.time() - t0, 2),
            "definition": "Fine-tune with the plain DDPM loss (trainer, method naive), on X \\ A ('kept') and on the "
                          f"{settings.knn} nearest kept neighbours of each item of A in pixel space ('neighbours'); "
                          "recovered = (attacked - start) / (before - start) per measure, start being the model "
                          "before the attack (the unlearned or the retrained one); not given where the deletion did "
                          "not remove A on that measure",
            "text": audit_text(rows)}


def audit_text(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        rec = r.get("recovered")
        if not rec:
            parts.append(f"the {r['model']} model fine-tuned on {r['attack']}: A's similarity "
                         f"{r['start']['similarity']:.3f} -> {r['attacked']['similarity']:.3f}, membership AUC "
                         f"{r['start']['membership_auc']:.2f} -> {r['attacked']['membership_auc']:.2f}")
            continue
        fr = ", ".join(f"{WORDS[k]} {_pct(v)}" for k, v in rec.items() if v is not None)
        parts.append(f"the {r['model']} model fine-tuned on {r['attack']} recovers {fr} of the change" if fr else
                     f"the {r['model']} model had nothing removed to recover (fine-tuned on {r['attack']}: A's "
                     f"similarity {r['start']['similarity']:.3f} -> {r['attacked']['similarity']:.3f})")
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "." if parts else ""


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"
