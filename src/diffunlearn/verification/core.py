"""``verify``: measure the forget set A and reference images on the models before, after and retrained, and judge
the deletion in words (see :mod:`.measures` for the measures, :mod:`.verdicts` for the rules)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import torch

from ..data import ImageSet, content_hash
from ..errors import UserError
from ..metrics.similarity import SIMILARITY_T
from ..models import DiffusionModel
from .measures import Budget, Measured, Subjects, get_budget, measure_model
from .verdicts import REMOVED, forget_verdict, near_copies, near_copy_text, overall, quality_verdict

ROLES = ("before", "after", "retrained")


def check_models(models: dict[str, DiffusionModel], shape: tuple[int, ...]) -> None:
    """Every model takes images of ``shape`` in pixel space and uses the same noise schedule."""
    words = {"before": "the model before (--before)", "after": "the model (--model)",
             "retrained": "the retrained reference (--reference)"}
    for role, m in models.items():
        if m.codec is not None:
            raise UserError(f"{words[role]} is a latent model (vqvae/ or vae/): verification measures pixel-space "
                            "models only")
        if tuple(m.sample_shape) != tuple(shape):
            raise UserError(f"{words[role]} takes images of shape {tuple(m.sample_shape)} (C, H, W) but the data "
                            f"are {tuple(shape)}: every model must take the data's images")
    after = models["after"]
    for role, m in models.items():
        if m.conditional != after.conditional or (m.conditional and m.classes != after.classes):
            raise UserError(f"{words[role]} and {words['after']} do not have the same classes: one is class-"
                            "conditional and the other not, or their class names differ")
        if m.num_train_timesteps != after.num_train_timesteps or not torch.allclose(
                m.alphas_cumprod(), after.alphas_cumprod()):
            raise UserError(f"{words[role]} uses another noise schedule than {words['after']}: the measures would "
                            "not be comparable")


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
    from ..labels import labels_for_model

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
    from ..images import encode_image

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
           held_out_labels: torch.Tensor | None = None) -> dict:
    """Measure whether the items ``forget_idx`` of ``data`` (the forget set A) are gone from ``after``.

    For every item of A and for reference images (``held_out``, else the data set's own held-out images, else the
    kept images ``reference_idx``, else a seeded sample of X \\ A; the result names which), on each model given
    (``before``, ``after``, ``retrained``): noise-and-denoise similarity at ``similarity_t`` (pixel cosine, or SSCD
    from the local TorchScript file ``sscd``), the per-image denoising loss over fixed (t, eps) pairs and the
    membership AUC of A against the reference images, the NLL in bits/dim, and generation (each image's distance to
    its nearest sample, near-copies of A with an exact 95% interval). Each measure gets a verdict in words against
    the reference images measured in the same run; the same measures on the reference images judge the quality kept.

    Budgets (:data:`diffunlearn.verification.measures.BUDGETS`):

    - ``fast``: similarity on 25 evenly spaced ancestral steps back from t, up to 16 distinct items of A and 8
      reference images; loss over 8 (t, eps) pairs on every item and 32 reference images; NLL by the ODE at a loose
      tolerance (rtol = atol = 1e-2, 2 probes) of up to 2 items and 4 reference images; 32 samples of 20 steps. One
      28x28 image on the shipped 1.1 M-parameter model: about 11 s per model on one thread (README: measured).
    - ``full``: similarity on all t steps (the protocol), up to 64 items and 32 reference images; loss over 32
      pairs and 128 reference images; the ODE NLL at rtol = atol = 1e-5 with 4 probes (the protocol) of up to 8 items
      and 8 reference images; 256 samples of 100 steps. Minutes per model for 28x28 images.

    A class-conditional model is measured with each image under its own class, against reference images of A's
    classes (``held_out_labels``: the labels of ``held_out`` as the model's class indices).

    ``audit``: ``None``, or :class:`diffunlearn.verification.audit.AuditSettings` (or a step count) to also run the
    relearning audit. Returns a JSON-ready dict (what ``verification.json`` holds). No model is modified.
    """
    from ..metrics.similarity import load_similarity

    t_start = time.time()
    say = log or (lambda _msg: None)
    data = _as_imageset(data)
    b = get_budget(budget)
    idx = _check_forget(data, forget_idx)
    models = {k: m for k, m in (("before", before), ("after", after), ("retrained", retrained)) if m is not None}
    check_models(models, data.shape)
    if held_out is not None:
        after.check_data(tuple(held_out.shape[1:]), "held-out")
    if not 0 <= int(similarity_t) <= after.num_train_timesteps:
        raise UserError(f"the similarity step must lie in [0, {after.num_train_timesteps}], got {similarity_t}")
    if len(idx) >= len(data) and held_out is None and data.held_out is None:
        raise UserError("the forget set is the whole data set and no held-out images are given: nothing to compare "
                        "A with")
    a_labels = ref_labels = None
    if after.conditional:
        if held_out is not None and held_out_labels is None:
            raise UserError("the model is class-conditional: give the held-out images' labels (held_out_labels, "
                            "the model's class indices) with them")
        reference, ref_info, ref_labels, a_labels = labelled_reference(data, idx, after.classes, b.reference_images,
                                                                       seed, reference_idx, held_out, held_out_labels)
    else:
        reference, ref_info = choose_reference(data, idx, b.reference_images, seed, held_out, reference_idx)
    backend = load_similarity(sscd)  # a bad SSCD file fails before anything is measured
    subjects = Subjects.build(data.images[idx], reference, b, a_labels, ref_labels)
    counts = subjects.counts()
    measured: dict[str, Measured] = {}
    for role, m in models.items():
        say(f"verify: measuring {role} ({b.name} budget) ...")
        measured[role] = measure_model(m, subjects, backend, similarity_t, seed, log=say)
        measured[role].check_finite({"before": "before", "after": "unlearned", "retrained": "retrained"}[role])
    result = _assemble(measured, subjects, counts, ref_info, b, backend.name, similarity_t, seed, data, idx, models)
    if audit is not None:
        from .audit import AuditSettings, relearn_audit

        settings = audit if isinstance(audit, AuditSettings) else AuditSettings(steps=int(audit))
        status = {v["measure"]: v["status"] for v in result["verdicts"]}
        removed = {"similarity": status["similarity"] in REMOVED, "loss": status["loss"] in REMOVED,
                   "membership_auc": status["loss"] in REMOVED}
        result["audit"] = relearn_audit(models, measured, subjects, data, idx, settings, backend, similarity_t, seed,
                                        removed, log=say)
    result["seconds"] = round(time.time() - t_start, 2)
    return result


def _assemble(measured: dict[str, Measured], s: Subjects, counts: dict, ref_info: dict, b: Budget, backend: str,
              similarity_t: int, seed: int, data: ImageSet, idx: list[int], models: dict) -> dict:
    held = ref_info["kind"] == "held-out"
    v = {m: x.values for m, x in measured.items()}
    labels = {"similarity": f"noise-and-denoise similarity ({backend}, t = {similarity_t})",
              "loss": f"denoising loss ({b.loss_draws} fixed (t, eps) pairs)",
              "nll": "NLL (bits/dim" + (")" if b.nll_tol <= 1e-5 else f", ODE at tolerance {b.nll_tol:g})"),
              "nearest": f"distance to the nearest of {b.samples} samples"}
    keys = {"similarity": "similarity", "loss": "loss", "nll": "nll", "nearest": "nearest"}
    forget, quality = [], []
    for measure, key in keys.items():
        pairs = {m: (v[m][f"{key}_a"].numpy(), v[m][f"{key}_ref"].numpy()) for m in v}
        fv = forget_verdict(measure, pairs, held, labels[measure])
        if measure == "loss":
            fv["membership_auc"] = fv["auc"]
        if measure == "nearest":
            copies = {m: near_copies(measured[m].sample_to_forget, v[m]["nearest_ref"]) for m in v}
            fv["near_copies"] = copies
            fv["text"] += " " + near_copy_text(copies)
        forget.append(fv)
        quality.append(quality_verdict(measure, {m: p[1] for m, p in pairs.items()}, labels[measure]))
    per_model = {}
    for m, x in measured.items():
        per_model[m] = {k: _rounded(t) for k, t in x.values.items()}
        per_model[m]["seconds"] = {k: round(t, 2) for k, t in x.seconds.items()}
    strip = counts["strip_items"]
    first = [s.item_of.index(u) for u in range(strip)]  # the first item of A showing each distinct image
    from ..models import state_hash

    return {
        "format": "diffunlearn-verification/1",
        "status": "ok",
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "budget": b.describe(),
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
                          f"{b.similarity_name} back to 0",
            "loss": f"per-image DDPM loss ||eps - eps_theta(x_t, t)||^2 (summed over pixels) averaged over "
                    f"{b.loss_draws} (t, eps) pairs, t uniform on all timesteps, the same pairs for every image and "
                    "model; membership AUC = the rank of A's loss among the reference images' (lower loss looks "
                    "like training data)",
            "nll": b.nll_name + "; the Monte Carlo error is the standard error over the probes",
            "nearest": f"{b.samples} samples by ancestral DDPM on {b.sample_steps} steps, sample i seeded by "
                       f"(seed {seed}, i); each image's L2 distance (pixels in [0, 1]) to its nearest sample",
        },
        "measures": per_model,
        "verdicts": forget,
        "quality": quality,
        "overall": overall(forget, quality),
        "images": {"forget": _encode(s.forget[:strip]), "forget_names": [data.names[idx[k]] for k in first],
                   "denoised": {m: _encode(x.denoised) for m, x in measured.items() if x.denoised is not None},
                   "nearest_sample": {m: _encode(x.nearest_samples) for m, x in measured.items()
                                      if x.nearest_samples is not None}},
        "audit": None,
    }


def failure(status: str, error: str, started: float | None = None) -> dict:
    """What ``verification.json`` holds when verification did not finish."""
    out = {"format": "diffunlearn-verification/1", "status": status, "error": error,
           "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if started is not None:
        out["seconds"] = round(time.time() - started, 2)
    return out


def summary_line(result: dict) -> str:
    if result.get("status") != "ok":
        return f"verification {result.get('status')}: {result.get('error')}"
    return f"verification: {result['overall']['status']}. {result['overall']['text']}"


__all__ = ["verify", "failure", "summary_line", "choose_reference", "check_models"]
