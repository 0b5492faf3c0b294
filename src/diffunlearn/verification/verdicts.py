"""Verdicts that state their power, each against reference images measured in the same run (never a fixed value).

Every verdict is a decision (:class:`Status`, from numbers alone) and its prose (written from the decision), kept
apart: ``decide_*`` functions decide, ``*_verdict`` functions add the words. Every verdict records how many items of
A, reference images and samples it rests on, and what they could and could not have detected.

**Rank measures** (noise-and-denoise similarity, denoising loss, NLL). Each item of A is placed among the reference
images under the same model: its *rank* is the fraction of reference images that look less memorised than it (higher
similarity, lower loss, lower NLL look more memorised; ties count half). The mean rank over A is an AUC (for the
loss, the membership AUC). An item *stands out* when its rank is above ``TAIL_HIGH`` and *falls below* when it is
under ``TAIL_LOW``. With ``R`` reference images, an item that is like them beats all of them with probability
``1 / (R + 1)``; the 95% tail can be told from chance only when that is at most 5%, so with fewer than
``MIN_REFERENCE`` (19) reference images the measure is **not tested**, whatever the values.

A measure the budget does not compute is **not measured** and left out of the overall verdict (the overall text
names it).

- *Held-out reference* (images never trained on): **not removed** when every item stands out now, **partly removed**
  when some do. Otherwise, with the model before given, a measure on which no more items of A stood out before than
  items like the reference would by chance (the 95% quantile of Binomial(n, 5%); none for one item) is **no
  signal** (A did not look memorised: nothing to remove; never counted as removal); A whose mean rank still lies
  more than two standard errors above one half is **not removed**; else **removed** (``removed (below
  reference)`` when most items fall below). Without the model before, removed means only that A now scores like
  images the model never saw.
- *Kept reference* (training images that stay; the default when no held-out image is given): an item that still
  stands out above the kept images is **not removed** (``partly removed`` when only some do). With the model before
  given, a measure on which no item stood out above the kept images before is **no signal**. An item that stood out
  and now falls below the kept images (looks less memorised than 95% of the training data that stays) is removed;
  when some or all only sank into the kept images' band, they still look like training data, which a kept
  reference cannot tell from removal: **inconclusive**. Without the model before: **removed** only when every
  item falls below the kept images, else **not shown**.

**Generation** (does the model still draw A?). A sample is a *near-copy* of an item ``a`` of A when its L2 distance
to ``a`` (pixels in [0, 1]) is below ``NEAR_COPY_FRACTION`` times the distance from ``a`` to the nearest other image
of the data (kept training images and held-out images, A's duplicates excluded), computed in the same run: a
near-copy is nearer to ``a`` than any real other image is. On MNIST T-Shirt this is L2 10.0, the protocol's
threshold. Two tests:

- *targeted seeds*: the seeds at which the model before draws a near-copy (a search over many seeds, cached), drawn
  again under the model after: any near-copy there means A is still drawn;
- *fresh seeds*: seeds never searched, for an unbiased rate with its exact (Clopper-Pearson) 95% interval.

**not removed** when any targeted or fresh sample is a near-copy; **no signal** when the model before drew none in
the seeds searched; **not tested** when the fresh samples are too few to bound the rate below ``max_copy_rate``;
else **removed** (no near-copy: rate below the interval's upper end).

**Quality.** The reference images' own values under the unlearned model against the model before (else the retrained
model), image by image: **degraded** when their mean moved in the worse direction by more than ``QUALITY_SPREAD``
times their spread (standard deviation over the reference images under the baseline); **kept** when the mean's
worsening plus two standard errors of the paired differences stays within that; otherwise **not resolved** (too
few images to tell a change of that size from noise).

**Overall.** ``removed`` only when every measure that showed A is resolved and none still shows it: any ``not
removed`` measure makes the deletion ``not removed`` (the model still shows A there, whatever the other measures
say), a ``partly removed`` one ``partly removed``; a measure that showed A but is
``not tested`` or ``inconclusive`` makes it ``inconclusive``; no measure showing A at all is ``inconclusive`` too
(with the model before given, a model that never memorised A, or did nothing, cannot pass).
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np
import torch

TAIL_HIGH = 0.95
TAIL_LOW = 0.05
MIN_REFERENCE = math.ceil(1.0 / (1.0 - TAIL_HIGH)) - 1  # 19: beating all of them has chance 1/20
QUALITY_SPREAD = 0.5
NEAR_COPY_FRACTION = 0.85
MAX_COPY_RATE = 0.01


class Status(str, Enum):
    """A verdict's decision. The value is what ``verification.json`` holds."""

    REMOVED = "removed"
    REMOVED_BELOW = "removed (below reference)"
    PARTLY_REMOVED = "partly removed"
    NOT_REMOVED = "not removed"
    NO_SIGNAL = "no signal"
    NOT_SHOWN = "not shown"
    NOT_TESTED = "not tested"
    NOT_MEASURED = "not measured"
    INCONCLUSIVE = "inconclusive"
    KEPT = "kept"
    DEGRADED = "degraded"
    NOT_RESOLVED = "not resolved"
    NO_BASELINE = "no baseline"


REMOVED = (Status.REMOVED.value, Status.REMOVED_BELOW.value)
#: statuses of a measure that did not show A (nothing to remove, or nothing to tell), or was not measured
QUIET = (Status.NO_SIGNAL.value, Status.NOT_SHOWN.value, Status.NOT_MEASURED.value)

#: measure -> (name in words, True when higher values look more memorised, format)
MEASURES = {
    "similarity": ("noise-and-denoise similarity", True, ".3f"),
    "loss": ("denoising loss", False, ".4g"),
    "nll": ("NLL (bits/dim)", False, ".2f"),
    "generation": ("near-copies of A among generated samples", False, ".2f"),
}
SHORT = {"similarity": "similarity", "loss": "loss", "nll": "NLL", "generation": "generation"}
MODEL_WORDS = {"before": "the model before", "after": "the unlearned model", "retrained": "the retrained model"}


def ranks(a: torch.Tensor, ref: torch.Tensor, higher_memorised: bool) -> np.ndarray:
    """Per item of ``a``: the fraction of ``ref`` that looks less memorised than it (ties half)."""
    a = np.asarray(a, dtype=float)[:, None]
    r = np.asarray(ref, dtype=float)[None, :]
    if r.size == 0:
        return np.full(len(a), np.nan)
    less = (r < a) if higher_memorised else (r > a)
    return (less.sum(1) + 0.5 * (r == a).sum(1)) / r.shape[1]


def tail_resolvable(n_reference: int) -> bool:
    """Whether ``n_reference`` images can place an item above their ``TAIL_HIGH`` quantile beyond chance (5%)."""
    return n_reference >= MIN_REFERENCE


def copy_rate_bound(n: int, count: int = 0) -> float:
    """The upper end of the exact two-sided 95% interval of a rate after ``count`` hits in ``n`` samples."""
    from ..metrics.rates import binomial_ci

    return binomial_ci(count, n)[1] if n > 0 else 1.0


def samples_for_rate(rate: float) -> int:
    """The fewest clean samples whose exact 95% upper bound is at most ``rate``: ``1 - 0.025^(1/n) <= rate``."""
    return math.ceil(math.log(0.025) / math.log1p(-rate))


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


# ---------------------------------------------------------------- rank measures


def decide_rank(n: int, n_ref: int, held_out: bool, stands_out: dict[str, int], falls_below: dict[str, int],
                mean_rank: float | None = None) -> Status:
    """The decision of a rank measure from its counts (see the module docstring). ``stands_out[m]`` and
    ``falls_below[m]``: items of A above / below the reference tail under model ``m`` (``after``; ``before`` when
    given); ``mean_rank``: A's mean rank under the unlearned model (its AUC), which must not stay above one half by
    more than two standard errors of ``n`` uniform ranks."""
    if n == 0:
        return Status.NOT_MEASURED
    if not tail_resolvable(n_ref):
        return Status.NOT_TESTED
    hi, lo = stands_out["after"], falls_below["after"]
    has_before = "before" in stands_out
    if hi:  # A stands out now: whatever it did before, it is not removed
        return Status.NOT_REMOVED if hi == n else Status.PARTLY_REMOVED
    if has_before and stands_out["before"] <= chance_tail(n):
        return Status.NO_SIGNAL  # no more items stood out before than items like the reference would by chance
    if held_out:
        if mean_rank is not None and mean_rank > 0.5 + 2 * math.sqrt(1 / 12 / n):
            return Status.NOT_REMOVED  # no single item above the tail, but A as a whole still ranks above them
        return Status.REMOVED_BELOW if lo > n / 2 else Status.REMOVED
    if has_before:
        return Status.REMOVED if lo == n else Status.INCONCLUSIVE
    return Status.REMOVED if lo == n else Status.NOT_SHOWN


def chance_tail(n: int) -> int:
    """How many of ``n`` items like the reference images may stand out by chance: the 95% quantile of
    Binomial(n, 1 - TAIL_HIGH) (0 for one item: a single item above the tail is a signal)."""
    from scipy.stats import binom

    return int(binom.ppf(0.95, n, 1.0 - TAIL_HIGH)) if n > 1 else 0


def forget_verdict(measure: str, vals: dict[str, tuple[np.ndarray, np.ndarray]], held_out: bool,
                   label: str | None = None) -> dict:
    """Verdict for one rank measure. ``vals[model] = (values of A's items, values of the reference images)`` for the
    models measured (``after`` always; ``before``, ``retrained`` when given)."""
    name, higher, fmt = MEASURES[measure]
    label = label or name
    out: dict = {"measure": measure, "label": label, "higher_looks_memorised": higher, "forget_mean": {},
                 "reference_mean": {}, "auc": {}, "stands_out": {}, "falls_below": {}}
    for m, (a, r) in vals.items():
        if len(a) == 0 or len(r) == 0:
            continue
        rk = ranks(a, r, higher)
        out["forget_mean"][m] = float(np.mean(a))
        out["reference_mean"][m] = float(np.mean(r))
        out["auc"][m] = float(np.mean(rk))
        out["stands_out"][m] = int((rk > TAIL_HIGH).sum())
        out["falls_below"][m] = int((rk < TAIL_LOW).sum())
    a_after, r_after = vals["after"]
    n, n_ref = len(a_after), len(r_after)
    out.update(items=n, reference_images=n_ref, reference_kind="held-out" if held_out else "kept",
               min_reference=MIN_REFERENCE)
    if n == 0 or n_ref == 0:
        status = Status.NOT_MEASURED
        out["stands_out"], out["falls_below"] = {}, {}
    else:
        status = decide_rank(n, n_ref, held_out, out["stands_out"], out["falls_below"], out["auc"]["after"])
    if n and n_ref and "before" in vals:  # the change before -> after against the reference images' own (words only)
        sign = -1.0 if higher else 1.0
        d_a = sign * (np.asarray(a_after, dtype=float) - np.asarray(vals["before"][0], dtype=float))
        d_r = sign * (np.asarray(r_after, dtype=float) - np.asarray(vals["before"][1], dtype=float))
        out["changed_more_than_reference"] = int((ranks(d_a, d_r, higher_memorised=True) > TAIL_HIGH).sum())
    out["status"] = status.value
    out["power"] = rank_power(n, n_ref, held_out)
    out["text"] = _rank_text(out, vals, fmt, held_out)
    return out


def rank_power(n: int, n_ref: int, held_out: bool) -> str:
    """What ``n`` items against ``n_ref`` reference images can and cannot detect, in words."""
    kind = "held-out" if held_out else "kept"
    if n == 0 or n_ref == 0:
        return "not measured at this budget"
    if not tail_resolvable(n_ref):
        return (f"{n} item(s) of A against {n_ref} {kind} reference images: {n_ref} images cannot place an item above "
                f"their {TAIL_HIGH:.0%} quantile beyond chance (an item like them beats all {n_ref} with chance "
                f"1/{n_ref + 1}; {MIN_REFERENCE} or more are needed): not tested at this budget")
    need = math.floor(TAIL_HIGH * n_ref) + 1
    return (f"{n} item(s) of A against {n_ref} {kind} reference images: an item stands out when it looks more "
            f"memorised than {need} of the {n_ref} (chance {n_ref - need + 1}/{n_ref + 1} for an item like them)")


def _rank_text(out: dict, vals: dict, fmt: str, held_out: bool) -> str:
    label, status, n, n_ref = out["label"], out["status"], out["items"], out["reference_images"]
    if status == Status.NOT_MEASURED.value:
        return f"The {label} was not measured at this budget (--budget full measures it): not tested."
    r_after = np.asarray(vals["after"][1], dtype=float)
    if "before" in vals:
        head = f"The {label} of A {_move(out['forget_mean']['before'], out['forget_mean']['after'], fmt)}"
    else:
        head = f"The {label} of A is {_f(out['forget_mean']['after'], fmt)} under the unlearned model"
    parts = [f"{head}; the {n_ref} reference images score {_band(r_after, fmt)} under the unlearned model"]
    if "retrained" in out["forget_mean"]:
        parts.append(f"the retrained model gives A {_f(out['forget_mean']['retrained'], fmt)} (reference "
                     f"{_f(out['reference_mean']['retrained'], fmt)})")
    text = "; ".join(parts) + "."
    so, fb = out["stands_out"], out["falls_below"]
    before_note = f" (before: {so['before']})" if "before" in so else ""
    text += (f" Items of A that stand out: {so['after']} of {n}{before_note}; that fall below: {fb['after']} of {n}"
             + (f" (before: {fb['before']})" if "before" in fb else "") + ". ")
    ref_words = "images the model never saw" if held_out else "the kept training images"
    moved = out.get("changed_more_than_reference")
    change = (f" ({moved} of {n} item(s) changed in the forgetting direction more than {TAIL_HIGH:.0%} of the "
              "reference images did; a change alone does not show removal)") if moved else ""
    text += {
        Status.REMOVED.value: f"A no longer stands out from {ref_words}" + (
            "" if held_out else ": it now looks less memorised than 95% of them") + ".",
        Status.REMOVED_BELOW.value: "A now looks less like training data than images the model never saw ("
                                    + ("as under the retrained model" if out["falls_below"].get("retrained", 0) > n / 2
                                       else "expected when A is unlike the reference images") + ").",
        Status.PARTLY_REMOVED.value: f"some of A still stands out from {ref_words}.",
        Status.NOT_REMOVED.value: f"A still looks more memorised than {ref_words}.",
        Status.NO_SIGNAL.value: f"A did not stand out under the model before either, so this measure shows no "
                                f"memorisation to remove; it is not counted as removal{change}.",
        Status.INCONCLUSIVE.value: "A no longer stands out above the kept training images but still looks like them: "
                                   "a kept-image reference cannot tell this from removal (give held-out images).",
        Status.NOT_SHOWN.value: "A looks like the kept training images; without held-out images or the model before "
                                "this cannot tell whether the model memorised it.",
        Status.NOT_TESTED.value: "Not tested at this budget.",
    }[status]
    return text + f" Power: {out['power']}."


# ---------------------------------------------------------------- generation


def near_copy_thresholds(items: torch.Tensor, others: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per item of A: the distance to its nearest image of ``others`` (real images other than A) and the near-copy
    threshold, ``NEAR_COPY_FRACTION`` times that distance (pixels in [0, 1], L2)."""
    from ..metrics.rates import pixel_distances

    nearest = pixel_distances(items, others).min(1).values.numpy().astype(float)
    return nearest, NEAR_COPY_FRACTION * nearest


def copy_hits(distances: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Which samples are near-copies: ``distances`` (samples, items of A) against each item's threshold."""
    th = np.asarray(thresholds, dtype=float)
    d = np.asarray(distances, dtype=float).reshape(len(distances), len(th))
    return (d < th[None, :]).any(1)


def decide_generation(targeted_before: int | None, targeted_after: int | None, fresh_count: int, fresh_n: int,
                      max_copy_rate: float) -> Status:
    """``targeted_before``: near-copies the model before drew in the seeds searched (None: no model before);
    ``targeted_after``: near-copies the unlearned model draws at those seeds; ``fresh_count`` of ``fresh_n``: near-
    copies among fresh seeds."""
    if fresh_count or targeted_after:
        return Status.NOT_REMOVED
    if targeted_before == 0:
        return Status.NO_SIGNAL
    if fresh_n == 0 or copy_rate_bound(fresh_n) > max_copy_rate:
        return Status.NOT_TESTED
    return Status.REMOVED


def generation_verdict(search: dict | None, targeted_after: list[int] | None, fresh: dict, thresholds: dict,
                       max_copy_rate: float, retrained: dict | None = None) -> dict:
    """The generation test's verdict. ``search``: the model before's search (``seeds`` searched, ``hits``: the seed
    numbers it drew a near-copy at), or None; ``targeted_after``: the seeds among those hits still drawing a
    near-copy under the unlearned model; ``fresh``: ``{n, count, indices, start}`` under the unlearned model;
    ``retrained``: the same fresh test under the retrained model, when given."""
    from ..metrics.rates import binomial_ci

    k, n = int(fresh["count"]), int(fresh["n"])
    lo, hi = binomial_ci(k, n) if n else (0.0, 1.0)
    t_before = None if search is None else len(search["hits"])
    t_after = None if targeted_after is None else len(targeted_after)
    status = decide_generation(t_before, t_after, k, n, max_copy_rate)
    out = {"measure": "generation", "label": MEASURES["generation"][0], "status": status.value,
           "samples": n + (0 if search is None else len(search["hits"])),
           "fresh": {**fresh, "rate": k / n if n else None, "ci95": [lo, hi]},
           "targeted": None if search is None else {
               "seeds_searched": int(search["seeds"]), "hits_before": search["hits"],
               "rate_before": len(search["hits"]) / max(1, int(search["seeds"])),
               "ci95_before": list(binomial_ci(len(search["hits"]), int(search["seeds"]))),
               "still_after": list(targeted_after or [])},
           "threshold": thresholds, "max_copy_rate": max_copy_rate, "retrained": retrained}
    out["power"] = generation_power(n, max_copy_rate, search)
    out["text"] = _generation_text(out)
    return out


def generation_power(n: int, max_copy_rate: float, search: dict | None) -> str:
    bound = copy_rate_bound(n) if n else 1.0
    parts = [f"{n} fresh samples with no near-copy bound the copy rate below {100 * bound:.2g}% (exact 95%)"
             + ("" if bound <= max_copy_rate else f", above the {100 * max_copy_rate:g}% asked: not tested at this "
                                                   f"budget ({samples_for_rate(max_copy_rate)} needed)")]
    if search is not None:
        s = int(search["seeds"])
        parts.append(f"the targeted test redraws the {len(search['hits'])} of {s} searched seeds at which the model "
                     f"before drew A (a model before that draws A at rate p leaves about p x {s} such seeds)")
    return "; ".join(parts)


def _pct(x: float) -> str:
    return f"{100 * x:.2g}%"


def _generation_text(out: dict) -> str:
    f, t, status = out["fresh"], out["targeted"], out["status"]
    th = out["threshold"]
    parts = []
    if t is not None:
        parts.append(f"The model before drew a near-copy of A at {len(t['hits_before'])} of {t['seeds_searched']} "
                     f"searched seeds ({_pct(t['rate_before'])}, 95% CI {_pct(t['ci95_before'][0])}-"
                     f"{_pct(t['ci95_before'][1])}); at those seeds the unlearned model draws {len(t['still_after'])}")
    parts.append(f"{f['count']} of {f['n']} fresh samples are near-copies (rate {_pct(f['rate'] or 0)}, 95% CI "
                 f"{_pct(f['ci95'][0])}-{_pct(f['ci95'][1])})")
    if out.get("retrained"):
        r = out["retrained"]
        parts.append(f"the retrained model: {r['count']} of {r['n']} fresh samples, nearest at "
                     f"{_f(r.get('nearest'), '.2f')}")
    text = "; ".join(parts) + (f". A near-copy lies within {th['words']}. ")
    text += {
        Status.REMOVED.value: "No sample is a near-copy: the model no longer draws A at a measurable rate.",
        Status.NOT_REMOVED.value: "The unlearned model still draws A.",
        Status.NO_SIGNAL.value: "The model before drew no near-copy in the seeds searched, so this test shows no "
                                "memorisation to remove; it is not counted as removal.",
        Status.NOT_TESTED.value: "No near-copy, but too few fresh samples to bound the rate below "
                                 f"{_pct(out['max_copy_rate'])}: not tested at this budget.",
    }[status]
    return text + f" Power: {out['power']}."


# ---------------------------------------------------------------- quality


def quality_verdict(measure: str, vals: dict[str, np.ndarray], label: str | None = None) -> dict:
    """The reference images' values under the unlearned model against the model before (else the retrained one)."""
    name, higher_memorised, fmt = MEASURES[measure]
    label = label or name
    # for quality, "worse" is the direction of forgetting: lower similarity, higher loss and NLL
    base = "before" if "before" in vals else ("retrained" if "retrained" in vals else None)
    after = np.asarray(vals["after"], dtype=float)
    out: dict = {"measure": measure, "label": label, "mean": {m: float(np.mean(v)) for m, v in vals.items() if len(v)},
                 "baseline": base, "reference_images": len(after)}
    if len(after) == 0:
        out.update(status=Status.NOT_TESTED.value, text=f"Reference images' {label}: not measured at this budget.")
        return out
    if base is None:
        out.update(status=Status.NO_BASELINE.value,
                   text=f"Reference images' {label}: {_f(after.mean(), fmt)} under the unlearned model over "
                        f"{len(after)} images; no model before or retrained model to compare with: not tested.")
        return out
    b = np.asarray(vals[base], dtype=float)
    spread = float(b.std(ddof=1)) if len(b) > 1 else 0.0
    d = (b - after) if higher_memorised else (after - b)  # per image, > 0 is worse
    worse = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    limit = QUALITY_SPREAD * spread
    out.update(spread=spread, worse_by=worse, stderr=se, limit=limit)
    if worse > limit:
        status = Status.DEGRADED
    elif worse + 2 * se <= limit:
        status = Status.KEPT
    else:
        status = Status.NOT_RESOLVED
    out["status"] = status.value
    how = {Status.KEPT: "kept", Status.DEGRADED: f"degraded (worse by more than {QUALITY_SPREAD:g} x the spread)",
           Status.NOT_RESOLVED: "not resolved (the images are too few or too noisy to tell a change of "
                                f"{QUALITY_SPREAD:g} x the spread from chance)"}[status]
    out["text"] = (f"Reference images' {label}: {_f(b.mean(), fmt)} under {MODEL_WORDS[base]}, {_f(after.mean(), fmt)}"
                   f" under the unlearned model, over {len(after)} images (spread {_f(spread, fmt)}; worse by "
                   f"{_f(worse, fmt)} +- {_f(2 * se, fmt)}, limit {_f(limit, fmt)}): {how}.")
    return out


# ---------------------------------------------------------------- overall


def decide_overall(statuses: dict[str, str]) -> Status:
    """The deletion's decision over every measure's status (see the module docstring)."""
    shown = {m: s for m, s in statuses.items() if s not in QUIET}
    if any(s == Status.NOT_REMOVED.value for s in shown.values()):
        return Status.NOT_REMOVED
    if any(s == Status.PARTLY_REMOVED.value for s in shown.values()):
        return Status.PARTLY_REMOVED
    removed = [m for m, s in shown.items() if s in REMOVED]
    if not removed or len(removed) < len(shown):
        return Status.INCONCLUSIVE
    return Status.REMOVED


def overall(forget: list[dict], quality: list[dict]) -> dict:
    """One line over every measure: removed / partly removed / not removed / inconclusive, and quality."""
    statuses = {v["measure"]: v["status"] for v in forget}
    status = decide_overall(statuses)
    by = {}
    for m, s in statuses.items():
        by.setdefault(s, []).append(SHORT[m])
    degraded = [SHORT[q["measure"]] for q in quality if q["status"] == Status.DEGRADED.value]
    text = "; ".join(f"{s} on {', '.join(ms)}" for s, ms in by.items())
    text = text[0].upper() + text[1:] if text else "No measure"
    text += {Status.REMOVED: ": every measure that showed A no longer does",
             Status.INCONCLUSIVE: ": not every measure that showed A could be resolved at this budget, or none "
                                  "showed A, so removal is not shown",
             Status.NOT_REMOVED: ": A is still there",
             Status.PARTLY_REMOVED: ": some items of A are still there"}[status]
    gen = next((v for v in forget if v["measure"] == "generation"), None)
    if gen is not None:
        f, t = gen["fresh"], gen.get("targeted")
        text += (f" (generation: {len(t['still_after'])} of {len(t['hits_before'])} targeted seeds and " if t else
                 " (generation: ") + (f"{f['count']} of {f['n']} fresh samples drew A; a clean {f['n']} bound the "
                                      f"rate below {_pct(copy_rate_bound(f['n']))})")
    judged = [q for q in quality if q["status"] in (Status.KEPT.value, Status.DEGRADED.value,
                                                    Status.NOT_RESOLVED.value)]
    kept = [q for q in judged if q["status"] == Status.KEPT.value]
    n_ref = max([q.get("reference_images", 0) for q in judged] or [0])
    if degraded:
        text += f". Quality degraded on {', '.join(degraded)}: the model is damaged, so the deletion does not pass."
    elif judged:
        text += f". Quality kept on {len(kept)} of {len(judged)} reference measures (up to {n_ref} reference images)"
        unresolved = [SHORT[q["measure"]] for q in judged if q["status"] == Status.NOT_RESOLVED.value]
        text += f"; not resolved on {', '.join(unresolved)}." if unresolved else "."
    else:
        text += ". Quality not judged (no model before or retrained model to compare with)."
    twins = next((v["threshold"] for v in forget if v["measure"] == "generation" and v["threshold"].get("twins")),
                 None)
    if twins:
        nearest = span([twins["nearest_other"][i] for i in twins["twins"]])
        text += (f" {len(twins['twins'])} item(s) of A have a near-duplicate among the other images (nearest at "
                 f"{nearest}, closer than 95% of the reference images' own "
                 f"nearest others, {twins['reference_nearest_other_p5']:.2f}): a model that never saw A may still "
                 "reproduce it, so compare with a retrained model (--reference).")
    return {"status": Status.DEGRADED.value if degraded else status.value, "deletion": status.value,
            "quality_degraded": degraded, "text": text}


def span(values) -> str:
    """``a-b`` for the smallest and largest of ``values`` (one number when they are equal), two decimals."""
    v = np.asarray(values, dtype=float)
    return f"{v.min():.2f}" if v.min() == v.max() else f"{v.min():.2f}-{v.max():.2f}"


__all__ = ["Status", "REMOVED", "QUIET", "MEASURES", "ranks", "decide_rank", "forget_verdict", "decide_generation",
           "generation_verdict", "near_copy_thresholds", "copy_hits", "quality_verdict", "decide_overall", "overall",
           "copy_rate_bound", "samples_for_rate", "tail_resolvable", "MIN_REFERENCE", "MAX_COPY_RATE"]
