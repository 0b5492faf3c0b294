"""Verification of a deletion: the measures, the verdicts (always against reference images measured in the same
run), the relearning audit, ``diffunlearn verify``, and the hook that ``unlearn`` runs after saving its model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import random_sets, snapshot, tiny_model
from diffunlearn.cli import main
from diffunlearn.data import ImageSet, content_hash
from diffunlearn.metrics.membership import denoising_losses, loss_auc
from diffunlearn.metrics.rates import pixel_distances
from diffunlearn.metrics.similarity import noise_and_denoise, noise_and_denoise_similarity
from diffunlearn.model import save_model
from diffunlearn.verification import BUDGETS, AuditSettings, Verification, verify
from diffunlearn.verification.audit import parse_audit, recovered
from diffunlearn.verification.verdicts import (
    MIN_REFERENCE,
    NEAR_COPY_FRACTION,
    REMOVED,
    Status,
    copy_hits,
    copy_rate_bound,
    decide_generation,
    decide_overall,
    decide_rank,
    forget_verdict,
    generation_verdict,
    near_copy_thresholds,
    overall,
    quality_verdict,
    ranks,
    samples_for_rate,
)

#: the fast budget with an NLL at a loose tolerance and fewer sampler steps: the measures as they run, at test speed
TEST = dataclasses.replace(BUDGETS["fast"], name="test", nll_items=2, nll_tol=0.1, nll_reference=3, search_seeds=32,
                           samples=400, sample_steps=2)


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _data(n: int = 12, held: int = 10, copies: int = 0) -> ImageSet:
    """``n`` random 8x8 images (plus ``copies`` copies of image 0 at the end) and ``held`` held-out ones."""
    kept, more = random_sets(n_kept=n, n_forget=held, seed=3)
    images = torch.cat([kept, kept[:1].expand(copies, -1, -1, -1)]) if copies else kept
    return ImageSet(images, [f"img-{i:02d}" for i in range(len(images))], held_out=more)


# ---------------------------------------------------------------- measures


def test_membership_auc_of_a_set_against_itself_is_one_half_and_ranks_equal_sklearn():
    """By symmetry every pair is counted once each way (ties half), so a set against itself gives 0.5 exactly; against
    another set the mean rank is the ROC AUC of -loss (sklearn)."""
    model = tiny_model()
    kept, forget = random_sets(n_kept=9, n_forget=5)
    lk = denoising_losses(model, kept, n_draws=4, seed=1)
    lf = denoising_losses(model, forget, n_draws=4, seed=1)
    assert ranks(lk, lk, higher_memorised=False).mean() == pytest.approx(0.5, abs=1e-12)
    assert ranks(lf, lk, higher_memorised=False).mean() == pytest.approx(loss_auc(lf, lk), abs=1e-12)
    # higher-is-memorised measures are the mirror image
    assert ranks(-lf, -lk, higher_memorised=True).mean() == pytest.approx(loss_auc(lf, lk), abs=1e-12)


def test_similarity_of_an_image_to_itself_without_noise_is_one_and_strided_steps_cover_the_protocol():
    model = tiny_model()
    _, images = random_sets(n_forget=4)
    sim = noise_and_denoise_similarity(model, images, t=0)
    assert torch.allclose(sim.scores, torch.ones(4), atol=1e-6)
    full = noise_and_denoise(model, images, t=7)  # every step 6 -> 0
    assert torch.equal(noise_and_denoise(model, images, t=7, steps=7), full)
    assert torch.equal(noise_and_denoise(model, images, t=7, steps=50), full)
    strided = noise_and_denoise(model, images, t=7, steps=3)
    assert strided.shape == full.shape and not torch.equal(strided, full)
    with pytest.raises(Exception, match="at least one step"):
        noise_and_denoise(model, images, t=7, steps=0)


def test_near_copy_threshold_is_a_fraction_of_the_nearest_other_image_and_counts_exact_copies():
    """An item's threshold is NEAR_COPY_FRACTION x its distance to the nearest other real image; a sample equal to
    the item is a near-copy, a sample equal to that nearest other image is not."""
    _, forget = random_sets(n_forget=3, seed=5)
    kept, _ = random_sets(n_kept=20, seed=6)
    nearest, th = near_copy_thresholds(forget, kept)
    d = pixel_distances(forget, kept)
    assert np.allclose(nearest, d.min(1).values.numpy()) and np.allclose(th, NEAR_COPY_FRACTION * nearest)
    samples = torch.cat([kept[:9], forget[1:2]])  # one exact copy among 10 samples
    hits = copy_hits(pixel_distances(samples, forget).numpy(), th)
    assert hits.tolist() == [False] * 9 + [True]
    # the real image nearest to item 0 sits at exactly its nearest distance: above the threshold, not a copy
    closest = kept[int(d[0].argmin())][None]
    assert not copy_hits(pixel_distances(closest, forget[:1]).numpy(), th[:1]).any()


def test_an_item_with_a_near_duplicate_among_the_other_images_is_flagged():
    """An item whose nearest other image is closer than 95% of the reference images' own nearest others has a twin
    that stays (a retrained model may reproduce it); an item far from every other image has none."""
    from diffunlearn.verification.core import near_twins

    others, reference = random_sets(n_kept=20, n_forget=8, seed=7)
    twin = others[3:4] + 0.001  # nearly a copy of an image that stays
    items = torch.cat([twin, reference[:1]])
    nearest, _ = near_copy_thresholds(items, others)
    t = near_twins(nearest, reference, others)
    assert t["twins"] == [0] and nearest[0] < t["reference_nearest_other_p5"] <= nearest[1]


def test_samples_for_rate_is_the_smallest_n_whose_clean_bound_reaches_the_rate():
    """A clean run of n samples bounds the rate at 1 - 0.025^(1/n) (the exact interval); the budget's samples are
    the fewest that reach the asked rate: n reaches it, n - 1 does not."""
    for rate in (0.01, 0.005, 0.0015, 0.1):
        n = samples_for_rate(rate)
        assert copy_rate_bound(n) <= rate < copy_rate_bound(n - 1)
        assert copy_rate_bound(n) == pytest.approx(1 - 0.025 ** (1 / n))
    assert samples_for_rate(0.01) == 368 and BUDGETS["fast"].fresh_bound() <= 0.01


def test_pixel_distances_are_half_the_model_space_distance():
    a, b = random_sets(n_kept=3, n_forget=2)
    d = pixel_distances(a, b)
    assert d.shape == (3, 2)
    assert float(d[1, 0]) == pytest.approx(float((a[1] - b[0]).norm() / 2), rel=1e-6)


# ---------------------------------------------------------------- verdicts


def _ref(n: int, mean: float, seed: int = 0) -> np.ndarray:
    return mean + 0.05 * np.random.default_rng(seed).standard_normal(n)


def test_verdict_compares_with_the_reference_measured_in_the_same_run():
    """The same similarity of A after (0.82) is 'removed' beside reference images scoring about 0.85 and 'not
    removed' beside reference images scoring about 0.5: the verdict reads the reference, and its text quotes it and
    its power."""
    a_before, a_after = np.array([0.99]), np.array([0.82])
    near, low = _ref(32, 0.85), _ref(32, 0.5, 1)
    v = forget_verdict("similarity", {"before": (a_before, low), "after": (a_after, near)}, held_out=True)
    assert v["status"] == "removed" and v["reference_images"] == 32 and v["items"] == 1
    assert "fell from 0.990 to 0.820" in v["text"] and f"{near.mean():.3f}" in v["text"]
    assert "against 32 held-out reference images" in v["text"] and "31 of the 32" in v["power"]
    w = forget_verdict("similarity", {"before": (a_before, low), "after": (a_after, low)}, held_out=True)
    assert w["status"] == "not removed" and f"{low.mean():.3f}" in w["text"]
    o = forget_verdict("loss", {"before": (np.array([1.0]), _ref(32, 20)), "after": (np.array([99.0]), _ref(32, 20))},
                       held_out=True)
    assert o["status"] == "removed (below reference)" and o["auc"]["after"] == 0.0 and o["auc"]["before"] == 1.0


@pytest.mark.parametrize("n_ref", [4, 8, 18])
def test_too_few_reference_images_are_not_tested_whatever_the_values(n_ref):
    """Below 19 reference images an item like them beats all with chance above 5%: 'not tested', even for an A that
    dropped far below them (which with 32 images is 'removed')."""
    ref = _ref(n_ref, 0.5)
    v = forget_verdict("similarity", {"before": (np.array([0.99]), ref), "after": (np.array([0.01]), ref)},
                       held_out=True)
    assert v["status"] == "not tested" and "not tested at this budget" in v["text"]
    assert decide_rank(1, MIN_REFERENCE, True, {"before": 1, "after": 0}, {"before": 0, "after": 0}) == Status.REMOVED
    assert decide_rank(1, MIN_REFERENCE - 1, True, {"before": 1, "after": 0},
                       {"before": 0, "after": 0}) == Status.NOT_TESTED


# (reference kind, stands out before, after, falls below before, after, with model before) -> status, for 2 items
RANK_CASES = [
    ("held-out", 2, 0, 0, 0, True, Status.REMOVED),
    ("held-out", 2, 0, 0, 2, True, Status.REMOVED_BELOW),
    ("held-out", 2, 1, 0, 0, True, Status.PARTLY_REMOVED),
    ("held-out", 2, 2, 0, 0, True, Status.NOT_REMOVED),
    ("held-out", 0, 0, 0, 2, True, Status.NO_SIGNAL),  # never stood out: a change is not removal
    ("held-out", 0, 2, 0, 0, True, Status.NOT_REMOVED),  # stands out now, though not before
    ("held-out", None, 0, None, 0, False, Status.REMOVED),
    ("held-out", None, 2, None, 0, False, Status.NOT_REMOVED),
    ("kept", 2, 2, 0, 0, True, Status.NOT_REMOVED),  # still above the kept images: not removed (was 'not shown')
    ("kept", 2, 1, 0, 1, True, Status.PARTLY_REMOVED),
    ("kept", 2, 0, 0, 2, True, Status.REMOVED),
    ("kept", 2, 0, 0, 1, True, Status.INCONCLUSIVE),  # only some fell below the kept images
    ("kept", 2, 0, 0, 0, True, Status.INCONCLUSIVE),  # sank into the kept band: a kept reference cannot tell
    ("kept", 0, 0, 0, 2, True, Status.NO_SIGNAL),  # never stood out: falling below is not counted as removal
    ("kept", 0, 0, 0, 0, True, Status.NO_SIGNAL),
    ("kept", 0, 2, 0, 0, True, Status.NOT_REMOVED),
    ("kept", None, 2, None, 0, False, Status.NOT_REMOVED),
    ("kept", None, 0, None, 2, False, Status.REMOVED),
    ("kept", None, 0, None, 0, False, Status.NOT_SHOWN),
]


@pytest.mark.parametrize("kind,so_b,so_a,fb_b,fb_a,has_before,expected", RANK_CASES)
def test_rank_rules_case_by_case(kind, so_b, so_a, fb_b, fb_a, has_before, expected):
    """Every rule of a rank measure on constructed counts, with both kinds of reference."""
    so, fb = {"after": so_a}, {"after": fb_a}
    if has_before:
        so["before"], fb["before"] = so_b, fb_b
    assert decide_rank(2, 32, kind == "held-out", so, fb) == expected


def test_a_signal_before_must_exceed_chance_and_a_whole_a_still_ranking_high_is_not_removed():
    """Of 16 items like the reference, up to 2 stand out by chance (95% quantile of Binomial(16, 5%)): 'no signal';
    3 are a signal. 16 items at rank 0.93 each (none above the tail) still rank far above one half: not removed."""
    from scipy.stats import binom

    from diffunlearn.verification.verdicts import chance_tail

    assert chance_tail(1) == 0 and chance_tail(16) == int(binom.ppf(0.95, 16, 0.05)) == 2
    none = {"after": 0, "before": 0}
    assert decide_rank(16, 32, True, {"after": 0, "before": 2}, none, 0.5) == Status.NO_SIGNAL
    assert decide_rank(16, 32, True, {"after": 0, "before": 3}, none, 0.5) == Status.REMOVED
    assert decide_rank(16, 32, True, {"after": 0, "before": 3}, none, 0.93) == Status.NOT_REMOVED
    # one item: its rank alone decides (two standard errors of one uniform rank exceed one half)
    assert decide_rank(1, 32, True, {"after": 0, "before": 1}, {"after": 0, "before": 0}, 0.94) == Status.REMOVED


def test_rank_rules_from_values_match_the_counts_with_a_kept_reference():
    """Values, not counts: an item that still stands out above the kept images is 'not removed'; one that never
    stood out is 'no signal' even when it then falls below them; one that stood out and falls below is 'removed'."""
    kept = _ref(32, 0.9)
    above, below = np.array([0.99]), np.array([0.5])
    assert forget_verdict("similarity", {"before": (above, kept), "after": (above, kept)},
                          held_out=False)["status"] == "not removed"
    v = forget_verdict("similarity", {"before": (np.array([0.9]), kept), "after": (below, kept)}, held_out=False)
    assert v["status"] == "no signal" and "not counted as removal" in v["text"]
    assert forget_verdict("similarity", {"before": (above, kept), "after": (below, kept)},
                          held_out=False)["status"] == "removed"


@pytest.mark.parametrize("before,after,fresh,n,expected", [
    (35, 0, 0, 400, Status.REMOVED),
    (35, 1, 0, 400, Status.NOT_REMOVED),  # one targeted seed still draws A
    (35, 0, 2, 400, Status.NOT_REMOVED),
    (0, 0, 0, 400, Status.NO_SIGNAL),  # the model before never drew A: nothing to remove
    (0, 0, 1, 400, Status.NOT_REMOVED),
    (35, 0, 0, 32, Status.NOT_TESTED),  # 32 clean samples bound the rate only below 10.9%
    (None, None, 0, 400, Status.REMOVED),
    (None, None, 0, 300, Status.NOT_TESTED),
    (None, None, 3, 400, Status.NOT_REMOVED),
])
def test_generation_rules_case_by_case(before, after, fresh, n, expected):
    assert decide_generation(before, after, fresh, n, 0.01) == expected


def test_generation_verdict_states_its_counts_and_bound():
    th = {"words": "0.85 x ...", "per_item": [10.0]}
    v = generation_verdict({"seeds": 512, "hits": [3, 9]}, [], {"n": 400, "count": 0, "indices": []}, th, 0.01)
    assert v["status"] == "removed" and v["samples"] == 402
    assert "0 of 400 fresh samples" in v["text"] and "at 2 of 512 searched seeds" in v["text"]
    assert "below 0.92%" in v["power"] and v["fresh"]["ci95"] == [0.0, pytest.approx(copy_rate_bound(400))]
    w = generation_verdict({"seeds": 512, "hits": [3, 9]}, [9], {"n": 400, "count": 0, "indices": []}, th, 0.01)
    assert w["status"] == "not removed" and "the unlearned model draws 1" in w["text"]


@pytest.mark.parametrize("statuses,expected", [
    ({"similarity": "removed", "loss": "removed", "nll": "not tested", "generation": "no signal"}, "inconclusive"),
    ({"similarity": "removed", "loss": "removed", "nll": "not measured", "generation": "removed"}, "removed"),
    ({"similarity": "removed", "loss": "removed (below reference)", "generation": "removed"}, "removed"),
    ({"similarity": "removed", "loss": "no signal", "generation": "removed"}, "removed"),
    ({"similarity": "removed", "loss": "removed", "generation": "not removed"}, "not removed"),
    ({"similarity": "not removed", "generation": "not removed"}, "not removed"),
    ({"similarity": "no signal", "loss": "no signal", "generation": "no signal"}, "inconclusive"),
    ({"similarity": "removed", "loss": "inconclusive"}, "inconclusive"),
    ({"similarity": "partly removed", "loss": "removed"}, "partly removed"),
    ({"similarity": "not shown", "loss": "not shown"}, "inconclusive"),
])
def test_overall_is_removed_only_when_every_measure_that_showed_a_is_resolved(statuses, expected):
    assert decide_overall(statuses).value == expected


def test_a_model_that_did_nothing_never_passes():
    """The model before verified as its own unlearned model: every measure that showed A still shows it."""
    ref, a = _ref(32, 0.5), np.array([0.99])
    for held in (True, False):
        v = forget_verdict("similarity", {"before": (a, ref), "after": (a, ref)}, held_out=held)
        g = generation_verdict({"seeds": 512, "hits": [1, 2]}, [1, 2], {"n": 400, "count": 3, "indices": []},
                               {"words": "", "per_item": [1.0]}, 0.01)
        assert overall([v, g], [])["deletion"] == "not removed"


def test_a_damaged_model_cannot_pass():
    """Reference images far worse under the unlearned model than under the model before: quality degraded, and the
    overall verdict is 'degraded' even though A no longer stands out."""
    rng = np.random.default_rng(1)
    ref_before = 20 + rng.standard_normal(32)
    ref_after = 200 + rng.standard_normal(32)
    fv = forget_verdict("loss", {"before": (np.array([1.0]), ref_before), "after": (np.array([200.0]), ref_after)},
                        held_out=True)
    qv = quality_verdict("loss", {"before": ref_before, "after": ref_after})
    assert fv["status"] == "removed" and qv["status"] == "degraded"
    assert overall([fv], [qv])["status"] == "degraded"
    assert quality_verdict("loss", {"before": ref_before, "after": ref_before + 0.01})["status"] == "kept"


def test_quality_is_kept_only_when_its_interval_stays_within_the_limit():
    """Kept needs the worsening plus two paired standard errors within 0.5 x the spread; noisy paired differences
    on few images are 'not resolved', not 'kept'."""
    before = np.array([20.0, 21.0, 19.0, 20.5, 19.5, 20.0])  # spread 0.707: limit 0.354
    d = np.array([0.6, -0.5, 0.5, -0.4, 0.4, 0.0])  # mean 0.1, paired standard error 0.185
    q = quality_verdict("loss", {"before": before, "after": before + d})
    assert q["limit"] == pytest.approx(0.5 * before.std(ddof=1))
    assert q["stderr"] == pytest.approx(d.std(ddof=1) / np.sqrt(6)) and q["worse_by"] == pytest.approx(0.1)
    assert q["worse_by"] < q["limit"] < q["worse_by"] + 2 * q["stderr"] and q["status"] == "not resolved"
    assert quality_verdict("loss", {"before": before, "after": before + d / 10})["status"] == "kept"
    assert quality_verdict("loss", {"before": before, "after": before + d + 0.4})["status"] == "degraded"


def test_recovered_fraction_and_audit_spec():
    assert recovered(before=1.0, start=0.5, attacked=0.75) == pytest.approx(0.5)
    assert recovered(before=1.0, start=0.5, attacked=0.5) == 0.0
    assert recovered(before=0.3, start=0.3, attacked=0.9) is None
    assert parse_audit("relearn") == 50 and parse_audit("relearn:7") == 7 and parse_audit("") is None
    for bad in ("relearn:0", "relearn:x", "retrain:5"):
        with pytest.raises(Exception):
            parse_audit(bad)


# ---------------------------------------------------------------- the generation test


def test_search_is_cached_resumed_and_equal_to_drawing_the_same_seeds(tmp_path, monkeypatch):
    """The model before's search is what drawing those seeds gives; a second search reuses the cache, a longer one
    draws only the seeds it lacks, and an interrupted one keeps its finished batches and resumes from them."""
    from diffunlearn.verification import generation

    model, (_, items) = tiny_model(seed=0), random_sets(n_forget=2, seed=4)
    h = "h" * 64
    first = generation.search(model, h, items, 20, "dpm++sde", 2, 0, cache=tmp_path)
    direct, _ = generation.draw_distances(model, items, list(range(20)), "dpm++sde", 2, 0)
    assert first["cached"] == 0 and np.array_equal(first["distances"], direct)
    again = generation.search(model, h, items, 20, "dpm++sde", 2, 0, cache=tmp_path)
    assert again["cached"] == 20 and np.array_equal(again["distances"], direct)
    drawn = []
    real = generation.draw_distances
    monkeypatch.setattr(generation, "draw_distances", lambda *a, **k: (drawn.append(a[2]), real(*a, **k))[1])
    longer = generation.search(model, h, items, 90, "dpm++sde", 2, 0, cache=tmp_path)
    assert drawn == [list(range(20, 84)), list(range(84, 90))] and np.array_equal(longer["distances"][:20], direct)
    # another model or another A is another search
    assert generation.search_key(h, items, None, "dpm++sde", 2, 0) != generation.search_key("g" * 64, items, None,
                                                                                            "dpm++sde", 2, 0)
    assert generation.search_key(h, items, None, "dpm++sde", 2, 0) != generation.search_key(h, items[:1], None,
                                                                                            "dpm++sde", 2, 0)

    def interrupted(*a, **k):
        if a[2][0] >= 64:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(generation, "draw_distances", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generation.search(model, "k" * 64, items, 100, "dpm++sde", 2, 0, cache=tmp_path)
    fp = generation.model_fingerprint(model)
    assert generation.searched_so_far("k" * 64, items, None, "dpm++sde", 2, 0, cache=tmp_path, schedule=fp) == 64
    assert generation.searched_so_far("k" * 64, items, None, "dpm++sde", 2, 0, cache=tmp_path) == 0  # another key
    monkeypatch.setattr(generation, "draw_distances", real)
    resumed = generation.search(model, "k" * 64, items, 100, "dpm++sde", 2, 0, cache=tmp_path)
    assert resumed["cached"] == 64 and np.array_equal(resumed["distances"][:20], direct)


def test_a_model_that_still_draws_a_is_not_removed_and_its_targeted_seeds_are_shown():
    """A is made of the model's own samples at seeds 3 and 5 (so it draws them exactly): the unchanged model
    redraws both targeted seeds and is 'not removed' on generation; the report shows those seeds."""
    from diffunlearn.model.sampling import ddpm_sample

    model = tiny_model(seed=0)
    drawn = ddpm_sample(model, 0, TEST.sample_steps, 0, sampler=TEST.sampler, indices=[3, 5])
    kept, held = random_sets(n_kept=12, n_forget=10, seed=3)
    data = ImageSet(torch.cat([kept, drawn]), [f"img-{i:02d}" for i in range(12)] + ["drawn-3", "drawn-5"],
                    held_out=held)
    r = verify(model, data, [12, 13], before=model, budget=TEST, seed=0).to_dict()
    g = r["verdicts"][3]
    assert {3, 5} <= set(g["targeted"]["hits_before"]) and {3, 5} <= set(g["targeted"]["still_after"])
    assert g["status"] == "not removed" and r["overall"]["deletion"] == "not removed"
    assert r["images"]["targeted"]["seeds"][:2] == sorted(r["images"]["targeted"]["seeds"][:2])
    assert all(d < 1e-5 for d in r["images"]["targeted"]["distance_after"][:2])


# ---------------------------------------------------------------- verify()


def test_verify_on_tiny_models_measures_every_model_the_same_way():
    """Identical copies of an image in A are measured once; a model compared with itself gives equal before and
    after values; the result is JSON-ready and names its reference images."""
    data = _data(copies=2)
    forget = [0, 12, 13, 4]  # image 0 and its two copies, and image 4: two distinct images
    model = tiny_model(seed=0)
    typed = verify(tiny_model(seed=1), data, forget, before=model, budget=TEST, seed=0)
    r = json.loads(json.dumps(typed.to_dict()))
    assert Verification.from_dict(r) == typed  # to_dict is the one serialiser, from_dict reads it back
    assert typed.verdict("loss").status is Status(r["verdicts"][1]["status"]) and typed.line().startswith(
        f"verification: {typed.overall.status.value}. ")
    assert r["status"] == "ok" and r["forget"]["count"] == 4 and r["forget"]["distinct"] == 2
    assert [i["distinct_row"] for i in r["forget"]["items"]] == [0, 0, 0, 1]
    assert r["forget"]["items"][1]["sha256"] == content_hash(data.images[0])
    assert r["reference"]["kind"] == "held-out" and r["reference"]["count"] == 10
    assert {v["measure"] for v in r["verdicts"]} == {"similarity", "loss", "nll", "generation"}
    assert len(r["measures"]["after"]["loss_a"]) == 2 and len(r["measures"]["after"]["loss_ref"]) == 10
    same = verify(model, data, forget, before=model, budget=TEST, seed=0).to_dict()
    for v in same["verdicts"][:3]:
        assert v["forget_mean"]["before"] == v["forget_mean"]["after"], v["measure"]
    g = same["verdicts"][3]  # the same model at the targeted seeds draws what it drew there
    assert g["measure"] == "generation" and g["targeted"]["still_after"] == g["targeted"]["hits_before"]
    assert same["overall"]["deletion"] in ("not removed", "inconclusive")
    assert all(q["status"] == "kept" for q in same["quality"])
    # no held-out images: a seeded sample of kept images, named so
    kept_ref = verify(model, ImageSet(data.images, data.names), [4], budget=TEST).to_dict()
    assert kept_ref["reference"]["kind"] == "kept" and 4 not in kept_ref["reference"]["indices"]


def test_relearning_audit_reports_recovered_fractions():
    data = _data()
    before, after = tiny_model(seed=0), tiny_model(seed=1)
    r = verify(after, data, [2], before=before, retrained=tiny_model(seed=2), budget=TEST,
               audit=AuditSettings(steps=2, batch_size=4, lr=1e-3, knn=3)).to_dict()
    a = r["audit"]
    assert [(x["model"], x["attack"]) for x in a["rows"]] == [("after", "kept"), ("after", "neighbours"),
                                                              ("retrained", "kept"), ("retrained", "neighbours")]
    assert a["rows"][1]["images"] == 3
    status = {v["measure"]: v["status"] for v in r["verdicts"]}
    for row in a["rows"]:
        for k, frac in row["recovered"].items():
            b, s, x = a["before"][k], row["start"][k], row["attacked"][k]
            gone = status["similarity" if k == "similarity" else "loss"] in REMOVED
            if b == s or (row["model"] == "after" and not gone):  # nothing removed: nothing to recover
                assert frac is None, k
            else:
                assert frac == pytest.approx((x - s) / (b - s)), k
    assert "recovers" in a["text"]


# ---------------------------------------------------------------- command line


@pytest.fixture
def models(tmp_path):
    return {"base": save_model(tiny_model(seed=0), tmp_path / "m-base"),
            "after": save_model(tiny_model(seed=1), tmp_path / "m-after"),
            "big": save_model(tiny_model(seed=0, size=16), tmp_path / "m-big")}


def test_verify_command_writes_json_and_report(capsys, models, data_file, tmp_path):
    out = tmp_path / "v"
    before = snapshot(models["after"])
    rc, stdout, err = _run(capsys, "verify", "--model", models["after"], "--before", models["base"], "--reference",
                           models["base"], "--data", data_file, "--forget", "0,img-03", "--out", out, "--threads", "1")
    assert rc == 0, err
    assert snapshot(models["after"]) == before
    v = json.loads((out / "verification.json").read_text())
    assert v["status"] == "ok" and set(v["models"]) == {"before", "after", "retrained"}
    assert v["reference"]["kind"] == "kept" and "verification:" in stdout
    html = (out / "report.html").read_text()
    assert "img-03" in html and v["forget"]["items"][1]["sha256"] in html


@pytest.mark.parametrize("case", ["shape", "forget", "reference-shape", "rate-zero", "rate-one", "rate-unreachable",
                                  "samples-too-few"])
def test_bad_input_gives_one_line_and_writes_nothing(capsys, models, data_file, tmp_path, case):
    ok = ["--model", models["after"], "--forget", "0"]
    args = {"shape": ["--model", models["big"], "--before", models["base"], "--forget", "0"],
            "forget": ["--model", models["after"], "--forget", "99"],
            "reference-shape": ["--model", models["after"], "--reference", models["big"], "--forget", "0"],
            "rate-zero": ok + ["--max-copy-rate", "0"], "rate-one": ok + ["--max-copy-rate", "1"],
            "rate-unreachable": ok + ["--max-copy-rate", "0.001"],
            "samples-too-few": ok + ["--samples", "100"]}[case]
    rc, _, err = _run(capsys, "verify", "--data", data_file, "--out", tmp_path / "v", *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert {"shape": "shape", "forget": "outside the data set", "reference-shape": "retrained",
            "rate-zero": "must lie in (0, 1)", "rate-one": "must lie in (0, 1)",
            "rate-unreachable": "needs at least 3688 (pass --samples 3688)",
            "samples-too-few": "bound a copy rate only below 3.6%"}[case] in err
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------- the unlearn hook


def test_unlearn_writes_verification_and_report(capsys, model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = _run(capsys, "unlearn", "--model", model_dir, "--data", data_file, "--forget", "0,1", "--steps",
                           "2", "--batch-size", "4", "--out", out)
    assert rc == 0, err
    v = json.loads((out / "verification.json").read_text())
    assert v["status"] == "ok" and v["forget"]["count"] == 2 and "verification:" in stdout
    assert (out / "report.html").is_file()
    card = (out / "model" / "README.md").read_text()  # the model card carries the verdicts it was verified with
    assert "## Verification" in card and v["overall"]["text"] in card and v["verdicts"][0]["text"] in card
    rc, _, _ = _run(capsys, "unlearn", "--model", model_dir, "--data", data_file, "--forget", "0", "--steps", "1",
                    "--batch-size", "2", "--verify", "off", "--out", tmp_path / "quiet")
    assert rc == 0 and not (tmp_path / "quiet" / "verification.json").exists()


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_verification_keeps_the_model_and_records_the_error(capsys, monkeypatch, model_dir, data_file,
                                                                    tmp_path, error):
    import diffunlearn.verification.core as core
    from diffunlearn.model import load_model

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(core, "measure_model", fail)
    out = tmp_path / "run"
    rc, stdout, err = _run(capsys, "unlearn", "--model", model_dir, "--data", data_file, "--forget", "0", "--steps",
                           "2", "--batch-size", "2", "--out", out)
    interrupted = isinstance(error, KeyboardInterrupt)
    assert rc == (130 if interrupted else 0), err
    load_model(out / "model")  # the unlearned model is saved and loads
    assert (out / "summary.json").is_file()
    v = json.loads((out / "verification.json").read_text())
    assert v["status"] == ("interrupted" if interrupted else "failed")
    assert ("Ctrl-C" if interrupted else "boom") in v["error"]
    assert "is saved" in stdout and "did not finish" in (out / "report.html").read_text()


def test_non_finite_outputs_are_recorded_not_raised(capsys, data_file, tmp_path):
    model = tiny_model(seed=0)
    with torch.no_grad():
        next(model.unet.parameters()).fill_(float("nan"))
    run = tmp_path / "run"
    run.mkdir()
    from diffunlearn.commands.verify import verify_run
    from diffunlearn.data import load_data

    head = verify_run(run, tiny_model(seed=0), model, load_data(str(data_file)), [0], "fast", log=lambda m: None)
    assert head["status"] == "failed" and "NaN" in head["error"]
    assert json.loads((run / "verification.json").read_text())["status"] == "failed"


def test_save_grid_upscales_and_labels(tmp_path):
    from PIL import Image

    from diffunlearn.model.sampling import save_grid

    _, images = random_sets(n_forget=4)
    save_grid(images, tmp_path / "a.png")
    save_grid(images, tmp_path / "b.png", labels=["one", "two", "three", "four"], title="four samples")
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.width >= 512 and b.width >= 512
    assert b.height > a.height  # room for the title and labels, which are drawn


def test_verify_help_states_what_each_budget_resolves(capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "below 0.92%" in out and "below 0.18%" in out and "--max-copy-rate" in out


def test_a_search_shipped_beside_a_model_is_used_for_its_own_key_only(tmp_path, monkeypatch):
    """A shipped model may carry its search (``pretrained/<name>/verify-search/<key>.npy``): a search with that key
    (the same weights, A, sampler, steps and seed) reads it instead of drawing, a longer one draws only the seeds
    past it, and any other key draws everything."""
    import diffunlearn.pretrained as pretrained
    from diffunlearn.verification import generation

    model, (_, items) = tiny_model(seed=0), random_sets(n_forget=2, seed=4)
    h = "h" * 64
    direct, _ = generation.draw_distances(model, items, list(range(12)), "dpm++sde", 2, 0)
    key = generation.search_key(h, items, None, "dpm++sde", 2, 0, generation.model_fingerprint(model))
    (tmp_path / "shipped" / "m" / "verify-search").mkdir(parents=True)
    np.save(tmp_path / "shipped" / "m" / "verify-search" / f"{key}.npy", direct[:10])
    monkeypatch.setattr(pretrained, "pretrained_root", lambda: tmp_path / "shipped")
    drawn = []
    real = generation.draw_distances
    monkeypatch.setattr(generation, "draw_distances", lambda *a, **k: (drawn.append(a[2]), real(*a, **k))[1])
    found = generation.search(model, h, items, 12, "dpm++sde", 2, 0, cache=tmp_path / "cache")
    assert found["cached"] == 10 and drawn == [[10, 11]] and np.array_equal(found["distances"][:10], direct[:10])
    assert np.allclose(found["distances"][10:], direct[10:], rtol=1e-5)  # drawn in another batch: the last bits
    other = generation.search(model, "g" * 64, items, 12, "dpm++sde", 2, 0, cache=tmp_path / "cache")
    assert other["cached"] == 0 and drawn[1:] == [list(range(12))]


def test_each_fresh_block_draws_seeds_no_other_block_or_the_search_drew():
    data = _data()
    model = tiny_model(seed=0)
    firsts = [verify(model, data, [2], before=model, budget=TEST, fresh_block=k).verdict("generation")
              .figures["fresh"]["first_seed"] for k in (0, 2)]
    assert firsts == [TEST.search_seeds, TEST.search_seeds + 2 * TEST.samples]
