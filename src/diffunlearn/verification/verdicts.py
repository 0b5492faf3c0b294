"""Verdicts in words, each against reference images measured in the same run (never against a fixed value).

**Forget set.** For every measure, each item of A is placed among the reference images under the same model: its
*rank* is the fraction of reference images that look less memorised than it (higher similarity, lower loss, lower
NLL, a closer nearest sample all look more memorised; ties count half). The mean rank over A is an AUC; for the
denoising loss it is exactly the membership AUC. An item *stands out* when its rank is above ``TAIL_HIGH`` (it looks
more memorised than 95% of the reference images), and *falls below* when its rank is under ``TAIL_LOW``.

- Held-out reference (images never trained on): an item is removed when it no longer stands out. ``removed``: no
  item stands out (``removed (below reference)`` when most fall below: A now looks less like training data than
  unseen images do, which a retrained model also gives an image unlike the reference images, e.g. a T-shirt among
  digits; otherwise a test on that measure could notice it); ``partly removed``; ``not removed``. With the model
  before given and no item standing out under it either, the measure shows no memorisation: ``no signal``.
- Kept reference (training images that stay): an item is removed when it falls below the kept images; ``not shown``
  when it still looks like them (without held-out images this cannot tell a model that memorises from one that
  does not).
- Change rule, when the level rule sees nothing (``no signal``, ``not shown``) and the model before is given: each
  item's change before -> after in the forgetting direction against the reference images' own changes. ``changed``
  when every item changed more than 95% of the reference images did (``partly changed``: some): the model changed
  on A specifically, for measures whose level differs from image to image (an NLL depends on how complex the image
  is, so a simple image can have a low NLL without being memorised).

**Quality.** The reference images' own values under the unlearned model against the model before (or the retrained
model when no model before is given), image by image: ``degraded`` when their mean moved in the worse direction by
more than ``QUALITY_SPREAD`` times their spread (standard deviation over the reference images under the baseline
model), else ``kept``.
"""

from __future__ import annotations

import numpy as np
import torch

TAIL_HIGH = 0.95
TAIL_LOW = 0.05
QUALITY_SPREAD = 0.5
NEAR_COPY_PERCENTILE = 5.0

#: measure -> (name in words, True when higher values look more memorised, format)
MEASURES = {
    "similarity": ("noise-and-denoise similarity", True, ".3f"),
    "loss": ("denoising loss", False, ".4g"),
    "nll": ("NLL (bits/dim)", False, ".2f"),
    "nearest": ("distance to the nearest generated sample", False, ".2f"),
}
MODEL_WORDS = {"before": "the model before", "after": "the unlearned model", "retrained": "the retrained model"}


def ranks(a: torch.Tensor, ref: torch.Tensor, higher_memorised: bool) -> np.ndarray:
    """Per item of ``a``: the fraction of ``ref`` that looks less memorised than it (ties half)."""
    a = np.asarray(a, dtype=float)[:, None]
    r = np.asarray(ref, dtype=float)[None, :]
    if r.size == 0:
        return np.full(len(a), np.nan)
    less = (r < a) if higher_memorised else (r > a)
    return (less.sum(1) + 0.5 * (r == a).sum(1)) / r.shape[1]


def _f(x, fmt: str) -> str:
    return "n/a" if x is None or not np.isfinite(x) else format(float(x), fmt)


def _move(before: float, after: float, fmt: str) -> str:
    if _f(before, fmt) == _f(after, fmt):
        return f"stayed at {_f(after, fmt)}"
    return f"{'rose' if after > before else 'fell'} from {_f(before, fmt)} to {_f(after, fmt)}"


def _band(v: np.ndarray, fmt: str) -> str:
    if len(v) < 2:
        return _f(float(v.mean()) if len(v) else None, fmt)
    lo, hi = np.percentile(v, [5, 95])
    return f"{_f(float(v.mean()), fmt)} (5-95%: {_f(lo, fmt)}-{_f(hi, fmt)})"


def forget_verdict(measure: str, vals: dict[str, tuple[np.ndarray, np.ndarray]], held_out: bool,
                   label: str | None = None) -> dict:
    """Verdict for one measure. ``vals[model] = (values of A's items, values of the reference images)`` for the
    models measured (``after`` always; ``before``, ``retrained`` when given)."""
    name, higher, fmt = MEASURES[measure]
    label = label or name
    out: dict = {"measure": measure, "label": label, "higher_looks_memorised": higher, "forget_mean": {},
                 "reference_mean": {}, "auc": {}, "stands_out": {}, "falls_below": {}}
    for m, (a, r) in vals.items():
        rk = ranks(a, r, higher)
        out["forget_mean"][m] = float(np.mean(a))
        out["reference_mean"][m] = float(np.mean(r))
        out["auc"][m] = float(np.mean(rk))
        out["stands_out"][m] = int((rk > TAIL_HIGH).sum())
        out["falls_below"][m] = int((rk < TAIL_LOW).sum())
    a_after, r_after = vals["after"]
    n, n_ref = len(a_after), len(r_after)
    out.update(items=n, reference_images=n_ref)
    hi, lo = out["stands_out"]["after"], out["falls_below"]["after"]
    if held_out:
        if "before" in vals and out["stands_out"]["before"] == 0:
            status = "no signal"
        elif hi == 0:
            status = "removed (below reference)" if lo > n / 2 else "removed"
        else:
            status = "not removed" if hi == n else "partly removed"
    else:
        status = "removed" if lo == n else ("partly removed" if lo else "not shown")
    moved = None
    if status in ("no signal", "not shown") and "before" in vals:
        # the change rule: did the model change on A more than on the reference images?
        sign = -1.0 if higher else 1.0
        d_a = sign * (np.asarray(a_after, dtype=float) - np.asarray(vals["before"][0], dtype=float))
        d_r = sign * (np.asarray(r_after, dtype=float) - np.asarray(vals["before"][1], dtype=float))
        moved = int((ranks(d_a, d_r, higher_memorised=True) > TAIL_HIGH).sum())
        out["changed_more_than_reference"] = moved
        if moved:
            status = "changed" if moved == n else "partly changed"
    out["status"] = status
    ref_words = "images the model never saw" if held_out else "the kept training images"
    if "before" in vals:
        head = f"The {label} of A {_move(out['forget_mean']['before'], out['forget_mean']['after'], fmt)}"
    else:
        head = f"The {label} of A is {_f(out['forget_mean']['after'], fmt)} under the unlearned model"
    parts = [f"{head}; reference images score {_band(np.asarray(r_after, dtype=float), fmt)} under the unlearned "
             "model"]
    if "retrained" in vals:
        parts.append(f"the retrained model gives A {_f(out['forget_mean']['retrained'], fmt)} (reference "
                     f"{_f(out['reference_mean']['retrained'], fmt)})")
    text = "; ".join(parts) + "."
    before_note = f" (before: {out['stands_out']['before']})" if "before" in vals else ""
    if held_out:
        text += (f" Items of A that still stand out (look more memorised than {TAIL_HIGH:.0%} of the {n_ref} "
                 f"reference images): {hi} of {n}{before_note}; ")
    else:
        text += (f" Items of A that now look less memorised than {TAIL_HIGH:.0%} of the {n_ref} kept reference "
                 f"images: {lo} of {n}; ")
    if "retrained" in vals:
        below = ("as under the retrained model (A is unlike the reference images)"
                 if out["falls_below"]["retrained"] > n / 2 else
                 "the retrained model does not do this, so a test on this measure could notice the difference")
    else:
        below = ("expected when A is unlike the reference images (another kind of image); otherwise a test on this "
                 "measure could notice the difference")
    change = (f"but {moved} of {n} changed in the forgetting direction by more than {TAIL_HIGH:.0%} of the reference "
              "images did, so the model changed on A specifically (this measure's level differs from image to "
              "image, so A's level cannot be compared with theirs)") if moved is not None else ""
    text += {
        "removed": f"A now looks like {ref_words}.",
        "removed (below reference)": f"A now looks less like training data than images the model never saw: {below}.",
        "partly removed": "some of A still looks like training data.",
        "not removed": "A still looks like training data.",
        "no signal": "A did not stand out before either, so this measure shows no memorisation to remove"
                     + ("; nor did the model change on A more than on the reference images" if moved == 0 else "")
                     + ".",
        "changed": f"A did not stand out from the reference before, {change}.",
        "partly changed": f"A did not stand out from the reference before, {change}.",
        "not shown": "A still looks like the kept training images; without held-out images this cannot tell whether "
                     "the model memorised it" + ("; nor did the model change on A more than on them"
                                                 if moved == 0 else "") + ".",
    }[status]
    out["text"] = text
    return out


def quality_verdict(measure: str, vals: dict[str, np.ndarray], label: str | None = None) -> dict:
    """The reference images' values under the unlearned model against the model before (else the retrained one)."""
    name, higher_memorised, fmt = MEASURES[measure]
    label = label or name
    # for quality, "worse" is the direction of forgetting: lower similarity, higher loss, NLL and distance
    higher_better = higher_memorised
    base = "before" if "before" in vals else ("retrained" if "retrained" in vals else None)
    after = np.asarray(vals["after"], dtype=float)
    out: dict = {"measure": measure, "label": label, "mean": {m: float(np.mean(v)) for m, v in vals.items()},
                 "baseline": base, "reference_images": len(after)}
    if base is None:
        out.update(status="no baseline", text=f"Reference images' {label}: {_f(after.mean(), fmt)} under the "
                                              "unlearned model; no model before or retrained model to compare with.")
        return out
    b = np.asarray(vals[base], dtype=float)
    spread = float(b.std(ddof=1)) if len(b) > 1 else 0.0
    worse = (b.mean() - after.mean()) if higher_better else (after.mean() - b.mean())
    out.update(spread=spread, worse_by=float(worse))
    out["status"] = "degraded" if worse > QUALITY_SPREAD * spread else "kept"
    how = "kept" if out["status"] == "kept" else f"degraded (worse by more than {QUALITY_SPREAD:g} x the spread)"
    out["text"] = (f"Reference images' {label}: {_f(b.mean(), fmt)} under {MODEL_WORDS[base]}, {_f(after.mean(), fmt)}"
                   f" under the unlearned model (spread over images {_f(spread, fmt)}): {how}.")
    return out


def near_copies(sample_to_forget: torch.Tensor, nearest_ref: torch.Tensor) -> dict:
    """Samples closer to an item of A than the ``NEAR_COPY_PERCENTILE``-th percentile of the reference images'
    nearest-sample distances under the same model, with an exact 95% binomial interval."""
    from ..metrics.rates import binomial_ci

    tau = float(np.percentile(np.asarray(nearest_ref, dtype=float), NEAR_COPY_PERCENTILE))
    d = np.asarray(sample_to_forget, dtype=float)
    k, n = int((d <= tau).sum()), len(d)
    lo, hi = binomial_ci(k, n)
    return {"count": k, "n": n, "rate": k / n, "ci95": [lo, hi], "threshold": tau,
            "threshold_rule": f"{NEAR_COPY_PERCENTILE:g}th percentile of the reference images' nearest-sample "
                              "distances under the same model"}


def near_copy_text(copies: dict[str, dict]) -> str:
    parts = [f"{c['count']} of {c['n']} samples from {MODEL_WORDS[m]} (95% CI "
             f"{100 * c['ci95'][0]:.0f}-{100 * c['ci95'][1]:.0f}%, threshold {c['threshold']:.2f})"
             for m, c in copies.items()]
    return (f"Near-copies of A: {'; '.join(parts)}. A near-copy is a sample closer to an item of A than the "
            f"{NEAR_COPY_PERCENTILE:g}th percentile of the reference images' distances to their nearest sample under "
            "the same model (pixels in [0, 1], L2).")


REMOVED = ("removed", "removed (below reference)", "changed")


def overall(forget: list[dict], quality: list[dict]) -> dict:
    """One line over every measure: removed / partly removed / not removed / inconclusive, and quality."""
    signal = [v for v in forget if v["status"] not in ("no signal", "not shown")]
    short = {k: v[0].replace(" (bits/dim)", "") for k, v in MEASURES.items()}
    degraded = [short[q["measure"]] for q in quality if q["status"] == "degraded"]
    removed = [short[v["measure"]] for v in signal if v["status"] in REMOVED]
    if not signal:
        status = "inconclusive"
    elif len(removed) == len(signal):
        status = "removed"
    elif removed or any(v["status"] in ("partly removed", "partly changed") for v in signal):
        status = "partly removed"
    else:
        status = "not removed"
    quiet = [short[v["measure"]] for v in forget if v["status"] in ("no signal", "not shown")]
    if signal:
        text = f"A was removed on {len(removed)} of {len(signal)} measures that showed it"
        text += f" ({', '.join(removed)})" if removed else ""
        text += f"; no signal on {', '.join(quiet)}" if quiet else ""
    else:
        text = f"No measure showed A as memorised, so none can show it removed ({', '.join(quiet)})"
    judged = [q for q in quality if q["status"] in ("kept", "degraded")]
    if degraded:
        text += f". Quality degraded on {', '.join(degraded)}: the model is damaged, so the deletion does not pass."
    elif judged:
        text += f". Quality kept on all {len(judged)} reference measures."
    else:
        text += ". Quality not judged (no model before or retrained model to compare with)."
    return {"status": "degraded" if degraded else status, "deletion": status, "quality_degraded": degraded,
            "text": text}
