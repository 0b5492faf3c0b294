"""``verify``: measure the forget set A and reference images on the models before, after and retrained, and judge
the deletion in words (see :mod:`.measures` for the measures, :mod:`.verdicts` for the rules)."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..data import ImageSet, content_hash
from ..errors import UserError
from ..metrics.similarity import SIMILARITY_T
from ..model import DiffusionModel
from .measures import BUDGETS, Budget, Measured, Subjects, get_budget, measure_model, measure_spaces
from .results import Outcome, Overall, Verdict, Verification
from .verdicts import (
    MAX_COPY_RATE,
    NEAR_COPY_FRACTION,
    copy_hits,
    forget_verdict,
    generation_verdict,
    near_copy_thresholds,
    overall,
    quality_verdict,
    samples_for_rate,
    span,
)

ROLES = ("before", "after", "retrained")


def check_models(models: dict[str, DiffusionModel], shape: tuple[int, ...]) -> None:
    """Every model takes images of ``shape``, uses the same noise schedule and, for latent models, the same
    autoencoder (a loss or NLL in one latent space says nothing about another)."""
    words = {"before": "the model before (--before)", "after": "the model (--model)",
             "retrained": "the retrained reference (--reference)"}
    for role, m in models.items():
        if tuple(m.image_shape) != tuple(shape):
            raise UserError(f"{words[role]} takes images of shape {tuple(m.image_shape)} (C, H, W) but the data "
                            f"are {tuple(shape)}: every model must take the data's images")
    after = models["after"]
    for role, m in models.items():
        if _codec_identity(m) != _codec_identity(after):
            raise UserError(f"{words[role]} and {words['after']} do not share one autoencoder (one is a latent model "
                            "and the other not, or their vqvae/ or vae/ weights differ): their losses would be "
                            "measured in different spaces; verify against models with the model's own autoencoder")
        if m.conditional != after.conditional or (m.conditional and m.classes != after.classes):
            raise UserError(f"{words[role]} and {words['after']} do not have the same classes: one is class-"
                            "conditional and the other not, or their class names differ")
        if m.num_train_timesteps != after.num_train_timesteps or not torch.allclose(
                m.alphas_cumprod(), after.alphas_cumprod()):
            raise UserError(f"{words[role]} uses another noise schedule than {words['after']}: the measures would "
                            "not be comparable")


def _codec_identity(m: DiffusionModel) -> tuple | None:
    from ..runs.safeload import state_hash

    return None if m.codec is None else (m.codec.kind, tuple(m.sample_shape), state_hash(m.codec.module))


def choose_reference(data: ImageSet, forget_idx: list[int], n: int, seed: int, held_out: torch.Tensor | None = None,
                     reference_idx: list[int] | None = None) -> tuple[torch.Tensor, dict]:
    """Held-out images (``held_out``, else the data set's own), else kept images (``reference_idx``, else a seeded
    sample of X \\ A); at most ``n``, a seeded sample when there are more. Returns the images and their description."""
    if held_out is None and data.held_out is not None and reference_idx is None:
        held_out = data.held_out
    g = torch.Generator().manual_seed(int(seed) + 7919)
    if held_out is not None:
        pick = torch.randperm(len(held_out), generator=g)[:n].sort().values
        return held_out[pick], {"kind": "held-out", "count": len(pick), "available": len(held_out),
                                "indices": pick.tolist(),
                                "words": "held-out images (never trained on)"}
    forget = set(forget_idx)
    pool = list(reference_idx) if reference_idx is not None else [i for i in range(len(data)) if i not in forget]
    pick = _pick_kept(data, forget, pool, n, g)
    return data.images[pick], {"kind": "kept", "count": len(pick), "available": len(pool), "indices": pick,
                               "names": [data.names[i] for i in pick],
                               "words": "kept training images (no held-out images given)"}


def labelled_reference(data: ImageSet, forget_idx: list[int], classes: list[str], n: int, seed: int,
                       reference_idx: list[int] | None = None, held_out: torch.Tensor | None = None,
                       held_out_labels: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """The reference images of a class-conditional model (whose class names are ``classes``): images of A's own
    classes, so that membership compares A with images of its class that the model was not trained on. Held-out
    images of those classes (``held_out`` with ``held_out_labels`` as the model's class indices, else the data set's
    own), else kept images of those classes (``reference_idx``, else a seeded sample). Returns the images, their
    description, their labels and the labels of A (as the model's indices)."""
    from ..data.labels import labels_for_model

    labels = labels_for_model(data, classes)
    wanted = set(labels[forget_idx].tolist())
    words = ", ".join(classes[c] for c in sorted(wanted))
    g = torch.Generator().manual_seed(int(seed) + 7919)
    if held_out is None and data.held_out is not None and data.held_out_labels is not None and reference_idx is None:
        held_out, held_out_labels = data.held_out, labels_for_model(data, classes, held_out=True)
    if held_out is not None:
        pool = [i for i in range(len(held_out_labels)) if int(held_out_labels[i]) in wanted]
        if pool:
            pick = _sample(pool, n, g)
            return held_out[pick], {"kind": "held-out", "count": len(pick), "available": len(pool),
                                    "indices": pick, "classes": words,
                                    "words": f"held-out images of class {words} (never trained on)"}, \
                held_out_labels[pick], labels[forget_idx]
    forget = set(forget_idx)
    rest = [i for i in range(len(data)) if i not in forget]
    pool = list(reference_idx) if reference_idx is not None else [i for i in rest if int(labels[i]) in wanted]
    what = f"kept training images of class {words} (no held-out images of it)"
    if not pool and reference_idx is None:  # a whole class forgotten, nothing held out: the other classes' images
        pool, what = rest, f"kept training images of the other classes (every image of class {words} is forgotten " \
                           "and none is held out)"
    pick = _pick_kept(data, forget, pool, n, g)
    return data.images[pick], {"kind": "kept", "count": len(pick), "available": len(pool), "indices": pick,
                               "names": [data.names[i] for i in pick], "classes": words, "words": what}, \
        labels[pick], labels[forget_idx]


def _pick_kept(data: ImageSet, forget: set[int], pool: list[int], n: int, g: torch.Generator) -> list[int]:
    """At most ``n`` indices of ``pool`` (kept images: none of A), a seeded sample, sorted."""
    bad = [i for i in pool if i in forget or not 0 <= i < len(data)]
    if bad:
        raise UserError(f"reference index {bad[0]} is in the forget set or outside the data set")
    if not pool:
        raise UserError("no reference images: give held-out images or keep at least one image of the data set")
    return _sample(pool, n, g)


def _sample(pool: list[int], n: int, g: torch.Generator) -> list[int]:
    """At most ``n`` of ``pool``, a sample seeded by ``g``, sorted."""
    return sorted(pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:n])


def _check_forget(data: ImageSet, forget_idx) -> list[int]:
    from ..data import check_forget_indices

    idx = [int(i) for i in forget_idx]
    check_forget_indices(idx, data)
    return idx


def _encode(images: torch.Tensor) -> list[str]:
    from ..runs.images import encode_image

    return [encode_image(x) for x in images]


def _rounded(v: torch.Tensor, digits: int = 6) -> list[float]:
    return [round(float(x), digits) for x in v]


def _as_imageset(data) -> ImageSet:
    if isinstance(data, ImageSet):
        return data
    if isinstance(data, torch.Tensor):
        return ImageSet(data, [f"{i:06d}" for i in range(len(data))])
    raise UserError(f"data must be an ImageSet or an (N, C, H, W) tensor, got {type(data).__name__}")


def verify(after: DiffusionModel, data: ImageSet | torch.Tensor, forget_idx, *, before: DiffusionModel | None = None,
           retrained: DiffusionModel | None = None, reference_idx: list[int] | None = None,
           held_out: torch.Tensor | None = None, budget: str | Budget = "fast", sscd: str | None = None,
           seed: int = 0, similarity_t: int = SIMILARITY_T, audit=None, log=None,
           held_out_labels: torch.Tensor | None = None, max_copy_rate: float = MAX_COPY_RATE,
           samples: int | None = None, cache_dir: str | None = None, fresh_block: int = 0) -> Verification:
    """Measure whether the items ``forget_idx`` of ``data`` (the forget set A) are gone from ``after``.

    For every item of A and for reference images (``held_out``, else the data set's own held-out images, else the
    kept images ``reference_idx``, else a seeded sample of X \\ A; the result names which), on each model given
    (``before``, ``after``, ``retrained``): noise-and-denoise similarity at ``similarity_t`` (pixel cosine, or SSCD
    from the local TorchScript file ``sscd``), the per-image denoising loss over fixed (t, eps) pairs and the
    membership AUC of A against the reference images, the NLL in bits/dim (``full`` budget), and the generation test:
    near-copies of A at the seeds where ``before`` drew A (searched once and cached under ``cache_dir``) and among
    fresh samples, with an exact 95% interval. Each verdict states what its counts could detect; the deletion is
    "removed" only when every measure that showed A is resolved and none still shows it
    (:mod:`diffunlearn.verification.verdicts`). The same measures on the reference images judge the quality kept.

    Budgets (:data:`diffunlearn.verification.measures.BUDGETS`; :meth:`Budget.resolves` says what each detects):

    - ``fast``: 400 fresh samples (a clean run bounds the copy rate below 0.92%) and 512 searched seeds, DPM-Solver++
      SDE on 20 steps; similarity (25 steps back from t) of up to 16 items and 32 reference images; loss over 8
      pairs on every item and 32 reference images; no NLL.
    - ``full``: 2,048 fresh samples (below 0.18%) and 2,048 searched seeds; similarity on every step of up to 32
      items and 32 reference images; loss over 32 pairs and 128 reference images; NLL (rtol = atol = 1e-3, 2 probes)
      of up to 4 items and 20 reference images.

    ``fresh_block``: which block of ``samples`` fresh seeds to draw (0: the first after the searched ones); each
    confirmation of ``unlearn --until removed`` draws its own, so no check reuses another's fresh samples.

    ``max_copy_rate``: the copy rate the generation test must be able to rule out (default 1%); a budget whose
    fresh samples cannot reach it is an error that says how many would (``samples`` overrides the budget's).

    A class-conditional model is measured with each image under its own class, against reference images of A's
    classes (``held_out_labels``: the labels of ``held_out`` as the model's class indices).

    ``audit``: ``None``, or :class:`diffunlearn.verification.audit.AuditSettings` (or a step count) to also run the
    relearning audit. Returns a :class:`~diffunlearn.verification.results.Verification` (its ``to_dict()`` is what
    ``verification.json`` holds). No model is modified.
    """
    from ..metrics.similarity import load_similarity

    t_start = time.time()
    say = log or (lambda _msg: None)
    data = _as_imageset(data)
    b = check_budget(budget, max_copy_rate, samples)
    idx = _check_forget(data, forget_idx)
    models = {k: m for k, m in (("before", before), ("after", after), ("retrained", retrained)) if m is not None}
    check_models(models, data.shape)
    if held_out is not None:
        after.check_images(tuple(held_out.shape[1:]), "held-out")
    if not 0 <= int(similarity_t) <= after.num_train_timesteps:
        raise UserError(f"the similarity step must lie in [0, {after.num_train_timesteps}], got {similarity_t}")
    if len(idx) >= len(data) and held_out is None and data.held_out is None:
        raise UserError("the forget set is the whole data set and no held-out images are given: nothing to compare "
                        "A with")
    subjects, ref_info = build_subjects(after, data, idx, b, seed, held_out, reference_idx, held_out_labels)
    backend = load_similarity(sscd)  # a bad SSCD file fails before anything is measured
    counts = subjects.counts()
    measured: dict[str, Measured] = {}
    for role, m in models.items():
        say(f"verify: measuring {role} ({b.name} budget) ...")
        measured[role] = measure_model(m, subjects, backend, similarity_t, seed, log=say)
        measured[role].check_finite({"before": "before", "after": "unlearned", "retrained": "retrained"}[role])
    others = _other_images(data, idx, held_out if held_out is not None else data.held_out, b.neighbour_pool, seed)
    gen = generation_test(models, subjects, others, b, seed, max_copy_rate, cache_dir, say, fresh_block)
    result = _assemble(measured, subjects, counts, ref_info, b, backend.name, similarity_t, seed, data, idx, models,
                       gen)
    if audit is not None:
        from .audit import AuditSettings, relearn_audit

        settings = audit if isinstance(audit, AuditSettings) else AuditSettings(steps=int(audit))
        gone = {v.measure: v.removed for v in result.verdicts}
        removed = {"similarity": gone["similarity"], "loss": gone["loss"], "membership_auc": gone["loss"]}
        result.audit = relearn_audit(models, measured, subjects, data, idx, settings, backend, similarity_t, seed,
                                        removed, log=say)
    result.seconds = round(time.time() - t_start, 2)
    return result


def build_subjects(model: DiffusionModel, data: ImageSet, idx: list[int], b: Budget, seed: int, held_out=None,
                   reference_idx: list[int] | None = None, held_out_labels: torch.Tensor | None = None
                   ) -> tuple[Subjects, dict]:
    """A's distinct items and the reference images every model is measured on (of A's classes for a class-
    conditional ``model``), with the reference's description."""
    a_labels = ref_labels = None
    if model.conditional:
        if held_out is not None and held_out_labels is None:
            raise UserError("the model is class-conditional: give the held-out images' labels (held_out_labels, "
                            "the model's class indices) with them")
        reference, ref_info, ref_labels, a_labels = labelled_reference(data, idx, model.classes, b.reference_images,
                                                                       seed, reference_idx, held_out, held_out_labels)
    else:
        reference, ref_info = choose_reference(data, idx, b.reference_images, seed, held_out, reference_idx)
    return Subjects.build(data.images[idx], reference, b, a_labels, ref_labels), ref_info


def check_budget(budget: str | Budget, max_copy_rate: float = MAX_COPY_RATE, samples: int | None = None) -> Budget:
    """The budget, with ``samples`` fresh samples when given; an error when its fresh samples cannot bound the copy
    rate below ``max_copy_rate`` (saying how many would)."""
    import dataclasses

    b = get_budget(budget)
    try:
        rate = float(max_copy_rate)
    except (TypeError, ValueError):
        raise UserError(f"--max-copy-rate must be a number in (0, 1), got {max_copy_rate!r}") from None
    if not 0.0 < rate < 1.0:
        raise UserError(f"--max-copy-rate must lie in (0, 1) (a rate: 0.01 is 1%), got {max_copy_rate}")
    if samples is not None:
        if int(samples) < 1:
            raise UserError(f"--samples must be >= 1, got {samples}")
        b = dataclasses.replace(b, samples=int(samples))
    from ..model.sampling import SEED_STRIDE

    if b.search_seeds + 64 * b.samples > SEED_STRIDE:
        raise UserError(f"--samples {b.samples}: 64 blocks of that many fresh samples after {b.search_seeds} searched "
                        f"seeds exceed the {SEED_STRIDE} sample numbers of one seed: ask for fewer samples")
    if b.fresh_bound() > rate:
        need = samples_for_rate(rate)
        raise UserError(f"the {b.name} budget draws {b.samples} fresh samples, which bound a copy rate only below "
                        f"{100 * b.fresh_bound():.2g}%: --max-copy-rate {rate:g} needs at least {need} (pass --samples "
                        f"{need}" + (" or --budget full)" if b.name == "fast" and BUDGETS["full"].samples >= need
                                     else ")"))
    return b


def _other_images(data: ImageSet, idx: list[int], held_out, n: int, seed: int) -> torch.Tensor:
    """Real images other than A that set its near-copy distance: held-out images and a seeded sample of the kept
    images (at most ``n`` in all), without exact copies of an item of A."""
    forget = set(idx)
    g = torch.Generator().manual_seed(int(seed) + 104729)
    parts = []
    if held_out is not None and len(held_out):
        parts.append(held_out[torch.randperm(len(held_out), generator=g)[:n].sort().values])
    room = n - (len(parts[0]) if parts else 0)
    pool = [i for i in range(len(data)) if i not in forget]
    if room > 0 and pool:
        parts.append(data.images[_sample(pool, room, g)])
    x = torch.cat([torch.as_tensor(p) for p in parts]) if parts else data.images[:0]
    own = {content_hash(data.images[i]) for i in idx}
    keep = [k for k in range(len(x)) if content_hash(x[k]) not in own]
    return x[keep]


def generation_test(models: dict, s: Subjects, others: torch.Tensor, b: Budget, seed: int, max_copy_rate: float,
                    cache=None, log=None, fresh_block: int = 0) -> dict:
    """Near-copies of A: the targeted seeds (searched under the model before, cached) drawn again under the model
    after, and fresh seeds ``b.search_seeds ..`` under the model after (and the retrained model)."""
    from .generation import draw_distances

    say = log or (lambda _msg: None)
    t0 = time.time()
    items = s.forget
    if len(others) == 0:
        raise UserError("no image other than A to set the near-copy distance: keep at least one image or give "
                        "held-out images")
    nearest_other, thresholds = near_copy_thresholds(items, others)
    twins = near_twins(nearest_other, s.reference, others)
    th = {"fraction": NEAR_COPY_FRACTION, "nearest_other": [round(float(x), 4) for x in nearest_other],
          "per_item": [round(float(x), 4) for x in thresholds], "other_images": len(others), **twins,
          "words": f"{NEAR_COPY_FRACTION:g} x the distance from each item of A to its nearest of {len(others)} other "
                   f"real images (L2, pixels in [0, 1]; here {span(thresholds)})"}
    labels_of = s.sample_labels_of
    sampler, steps = b.sampler, b.sample_steps
    srch = None
    seconds = {}
    images: dict = {}
    if "before" in models:
        say(f"verify: targeted search, {b.search_seeds} seeds under the model before ...")
        srch, hits = targeted_seeds(models["before"], s, thresholds, b, seed, cache)
        seconds["search"] = time.time() - t0
        t1 = time.time()
        d_after, x_after = draw_distances(models["after"], items, hits, sampler, steps, seed, labels_of, keep=True)
        still = [h for h, hit in zip(hits, copy_hits(d_after, thresholds)) if hit]
        seconds["targeted"] = time.time() - t1
        show = (still + [h for h in hits if h not in still])[:8]
        if show:
            _, x_before = draw_distances(models["before"], items, show, sampler, steps, seed, labels_of, keep=True)
            pos = {h: k for k, h in enumerate(hits)}
            images["targeted"] = {"seeds": show, "before": [float(srch["distances"][h].min()) for h in show],
                                  "after": [float(d_after[pos[h]].min()) for h in show],
                                  "images_before": x_before, "images_after": x_after[[pos[h] for h in show]]}
        search_info = {"seeds": b.search_seeds, "hits": hits, "cached_seeds": srch["cached"], "key": srch["key"]}
    else:
        still, search_info = None, None
    first = b.search_seeds + fresh_block * b.samples  # block k of fresh seeds: never searched, never used by block j
    fresh_idx = list(range(first, first + b.samples))
    t1 = time.time()
    say(f"verify: {b.samples} fresh samples under the unlearned model ...")
    d_fresh, x_fresh = draw_distances(models["after"], items, fresh_idx, sampler, steps, seed, labels_of, keep=True)
    fresh_hit = copy_hits(d_fresh, thresholds)
    seconds["fresh"] = time.time() - t1
    fresh = {"n": len(fresh_idx), "count": int(fresh_hit.sum()), "first_seed": first,
             "indices": [fresh_idx[i] for i in np.flatnonzero(fresh_hit)],
             "nearest": float(d_fresh.min()) if d_fresh.size else None}
    strip = min(len(items), b.strip_items, b.similarity_items)
    images["nearest_fresh"] = x_fresh[torch.as_tensor(d_fresh[:, :strip]).argmin(0)] if strip else x_fresh[:0]
    images["nearest_fresh_distance"] = [float(x) for x in d_fresh[:, :strip].min(0)] if strip else []
    retrained = None
    if "retrained" in models:
        t1 = time.time()
        say(f"verify: {b.samples} fresh samples under the retrained model ...")
        d_r, _ = draw_distances(models["retrained"], items, fresh_idx, sampler, steps, seed, labels_of)
        retrained = {"n": len(fresh_idx), "count": int(copy_hits(d_r, thresholds).sum()),
                     "nearest": float(d_r.min()) if d_r.size else None}
        seconds["retrained"] = time.time() - t1
    verdict = generation_verdict(search_info, still, fresh, th, max_copy_rate, retrained)
    verdict["sampler"] = f"{sampler}, {steps} steps"
    verdict["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return {"verdict": verdict, "images": images}


def targeted_seeds(before: DiffusionModel, s: Subjects, thresholds, b: Budget, seed: int, cache=None
                   ) -> tuple[dict, list[int]]:
    """The model before's search over ``b.search_seeds`` seeds (cached) and the seeds at which it drew a near-copy."""
    from ..model import state_hash
    from .generation import search

    found = search(before, state_hash(before.unet), s.forget, b.search_seeds, b.sampler, b.sample_steps, seed,
                   s.forget_labels, s.sample_labels_of, cache)
    return found, [int(i) for i in np.flatnonzero(copy_hits(found["distances"], thresholds))]


def near_twins(nearest_other: np.ndarray, reference: torch.Tensor, others: torch.Tensor) -> dict:
    """Items of A whose nearest other real image is closer than the 5th percentile of the reference images' own
    nearest-other distances: A has a near-duplicate that stays, so a model that never saw A may still reproduce it
    (the rank measures then cannot tell removal apart; a retrained reference can)."""
    from ..metrics.rates import pixel_distances

    d = pixel_distances(reference, others)
    d[d < 1e-6] = float("inf")  # a kept reference image is among the others: not its own neighbour
    own = d.min(1).values.numpy()
    own = own[np.isfinite(own)]
    if len(own) < 2:
        return {"twins": [], "reference_nearest_other_p5": None}
    p5 = float(np.percentile(own, 5))
    return {"twins": [int(i) for i in np.flatnonzero(np.asarray(nearest_other) < p5)],
            "reference_nearest_other_p5": round(p5, 4)}


def _assemble(measured: dict[str, Measured], s: Subjects, counts: dict, ref_info: dict, b: Budget, backend: str,
              similarity_t: int, seed: int, data: ImageSet, idx: list[int], models: dict, gen: dict) -> dict:
    held = ref_info["kind"] == "held-out"
    v = {m: x.values for m, x in measured.items()}
    labels = {"similarity": f"noise-and-denoise similarity ({backend}, t = {similarity_t})",
              "loss": f"denoising loss ({b.loss_draws} fixed (t, eps) pairs)",
              "nll": "NLL (bits/dim" + (")" if b.nll_tol <= 1e-5 else f", ODE at tolerance {b.nll_tol:g})")}
    forget, quality = [], []
    empty = np.zeros(0)
    for measure in ("similarity", "loss", "nll"):
        pairs = {m: (v[m][f"{measure}_a"].numpy() if f"{measure}_a" in v[m] else empty,
                     v[m][f"{measure}_ref"].numpy() if f"{measure}_ref" in v[m] else empty) for m in v}
        fv = forget_verdict(measure, pairs, held, labels[measure])
        if measure == "loss":
            fv["membership_auc"] = fv["auc"]
        forget.append(fv)
        quality.append(quality_verdict(measure, {m: p[1] for m, p in pairs.items()}, labels[measure]))
    forget.append(gen["verdict"])
    per_model = {}
    for m, x in measured.items():
        per_model[m] = {k: _rounded(t) for k, t in x.values.items()}
        per_model[m]["seconds"] = {k: round(t, 2) for k, t in x.seconds.items()}
    per_model["after"]["seconds"].update({f"generation_{k}": t for k, t in gen["verdict"]["seconds"].items()})
    strip = counts["strip_items"]
    first = [s.item_of.index(u) for u in range(strip)]  # the first item of A showing each distinct image
    from ..model import state_hash

    gi = gen["images"]
    targeted = gi.get("targeted")
    spaces = measure_spaces(models["after"])
    fresh0 = gen["verdict"]["fresh"]["first_seed"]
    record = {
        "seed": seed,
        "models": {m: {"source": str(mod.source), "sha256": state_hash(mod.unet)} for m, mod in models.items()},
        "forget": {"count": len(idx), "distinct": len(s.forget),
                   "items": [{"index": i, "name": data.names[i], "sha256": content_hash(data.images[i]),
                              "distinct_row": s.item_of[k]} for k, i in enumerate(idx)]},
        "reference": ref_info,
        "measured_counts": counts,
        "definitions": {
            "similarity": f"{backend} similarity of each image to its noise-and-denoise result: noised to step t = "
                          f"{similarity_t} with noise seeded by the image (seed {seed}), denoised by ancestral DDPM on "
                          f"{b.similarity_name} back to 0; in {spaces['similarity']}",
            "loss": f"per-image DDPM loss ||eps - eps_theta(x_t, t)||^2 (summed over "
                    f"{'pixels' if models['after'].codec is None else 'latent dimensions'}) averaged over "
                    f"{b.loss_draws} (t, eps) pairs, t uniform on all timesteps, the same pairs for every image and "
                    "model; membership AUC = the rank of A's loss among the reference images' (lower loss looks "
                    f"like training data); in {spaces['loss']}",
            "nll": (b.nll_name + f"; the Monte Carlo error is the standard error over the probes; in {spaces['nll']}")
            if b.nll_items
            else "not measured at this budget (--budget full measures it)",
            "generation": f"samples by {b.sampler} on {b.sample_steps} steps, sample i seeded by (seed {seed}, i); "
                          f"targeted: seeds 0-{b.search_seeds - 1} searched under the model before, those that drew a "
                          f"near-copy drawn again under the unlearned model; fresh: seeds {fresh0}-"
                          f"{fresh0 + b.samples - 1}; a near-copy lies within "
                          f"{gen['verdict']['threshold']['words']}; in {spaces['generation']}",
        },
        "spaces": spaces,
        "measures": per_model,
        "images": {"forget": _encode(s.forget[:strip]), "forget_names": [data.names[idx[k]] for k in first],
                   "denoised": {m: _encode(x.denoised) for m, x in measured.items() if x.denoised is not None},
                   "nearest_sample": {"after": _encode(gi["nearest_fresh"])},
                   "nearest_distance": {"after": gi["nearest_fresh_distance"]},
                   "targeted": None if not targeted else {
                       "seeds": targeted["seeds"], "distance_before": targeted["before"],
                       "distance_after": targeted["after"], "before": _encode(targeted["images_before"]),
                       "after": _encode(targeted["images_after"])}},
    }
    return Verification(Outcome.OK, overall=Overall.from_dict(overall(forget, quality)),
                        verdicts=[Verdict.from_dict(v) for v in forget],
                        quality=[Verdict.from_dict(q) for q in quality],
                        budget={**b.describe(), "resolves": b.resolves(), "fresh_bound": b.fresh_bound()},
                        record=record)


def failure(status: str, error: str, started: float | None = None) -> Verification:
    """A verification that did not finish (``failed`` or ``interrupted``), timed from ``started``."""
    return Verification.failed(status, error, None if started is None else time.time() - started)


__all__ = ["verify", "failure", "choose_reference", "check_models", "check_budget"]
