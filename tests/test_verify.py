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
from diffunlearn.metrics.rates import binomial_ci, pixel_distances
from diffunlearn.metrics.similarity import noise_and_denoise, noise_and_denoise_similarity
from diffunlearn.models import save_model
from diffunlearn.verification import BUDGETS, AuditSettings, verify
from diffunlearn.verification.audit import parse_audit, recovered
from diffunlearn.verification.verdicts import REMOVED, forget_verdict, near_copies, overall, quality_verdict, ranks


#: the fast budget with a looser NLL tolerance and fewer samples: the measures as they run, at test speed
TEST = dataclasses.replace(BUDGETS["fast"], name="test", nll_tol=0.1, nll_reference=3, samples=16, sample_steps=5)


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


def test_near_copy_count_finds_a_sample_equal_to_an_item_of_a():
    """A sample set holding an item of A exactly has a sample at distance 0 from A, below any positive threshold."""
    _, forget = random_sets(n_forget=3, seed=5)
    kept, _ = random_sets(n_kept=20, seed=6)
    samples = torch.cat([kept[:9], forget[1:2]])  # one exact copy among 10 samples
    to_a = pixel_distances(samples, forget).min(1).values
    nearest_ref = pixel_distances(samples, kept[10:]).min(0).values  # reference images are not among the samples
    c = near_copies(to_a, nearest_ref)
    assert float(to_a[-1]) == 0.0 and c["threshold"] > 0
    assert c["count"] >= 1 and c["n"] == 10
    assert c["ci95"] == list(binomial_ci(c["count"], 10))
    # without the copy, nothing is closer to A than the reference's 5th percentile here
    c0 = near_copies(pixel_distances(kept[:10], forget).min(1).values, nearest_ref)
    assert c0["count"] < c["count"]


def test_pixel_distances_are_half_the_model_space_distance():
    a, b = random_sets(n_kept=3, n_forget=2)
    d = pixel_distances(a, b)
    assert d.shape == (3, 2)
    assert float(d[1, 0]) == pytest.approx(float((a[1] - b[0]).norm() / 2), rel=1e-6)


# ---------------------------------------------------------------- verdicts


def test_verdict_compares_with_the_reference_measured_in_the_same_run():
    """The same similarity of A after (0.82) is 'removed' beside reference images scoring about 0.85 and 'not
    removed' beside reference images scoring about 0.5: the verdict reads the reference, and its text quotes it."""
    rng = np.random.default_rng(0)
    a_before, a_after = np.array([0.99]), np.array([0.82])
    near = 0.85 + 0.05 * rng.standard_normal(32)
    low = 0.50 + 0.05 * rng.standard_normal(32)
    v = forget_verdict("similarity", {"before": (a_before, low), "after": (a_after, near)}, held_out=True)
    assert v["status"] == "removed"
    assert "fell from 0.990 to 0.820" in v["text"] and f"{near.mean():.3f}" in v["text"]
    w = forget_verdict("similarity", {"before": (a_before, low), "after": (a_after, low)}, held_out=True)
    assert w["status"] == "not removed" and f"{low.mean():.3f}" in w["text"]
    # A that never stood out shows nothing to remove, unless it changed more than the reference images did
    q = forget_verdict("similarity", {"before": (np.array([0.5]), low), "after": (a_after, low)}, held_out=True)
    assert q["status"] == "no signal"
    moved = forget_verdict("similarity", {"before": (np.array([0.5]), low), "after": (np.array([0.1]), low + 0.001)},
                           held_out=True)
    assert moved["status"] == "changed" and moved["changed_more_than_reference"] == 1
    o = forget_verdict("loss", {"before": (np.array([1.0]), 20 + rng.random(32)),
                                "after": (np.array([99.0]), 20 + rng.random(32))}, held_out=True)
    assert o["status"] == "removed (below reference)" and o["auc"]["after"] == 0.0 and o["auc"]["before"] == 1.0


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


def test_recovered_fraction_and_audit_spec():
    assert recovered(before=1.0, start=0.5, attacked=0.75) == pytest.approx(0.5)
    assert recovered(before=1.0, start=0.5, attacked=0.5) == 0.0
    assert recovered(before=0.3, start=0.3, attacked=0.9) is None
    assert parse_audit("relearn") == 50 and parse_audit("relearn:7") == 7 and parse_audit("") is None
    for bad in ("relearn:0", "relearn:x", "retrain:5"):
        with pytest.raises(Exception):
            parse_audit(bad)


# ---------------------------------------------------------------- verify()


def test_verify_on_tiny_models_measures_every_model_the_same_way():
    """Identical copies of an image in A are measured once; a model compared with itself gives equal before and
    after values; the result is JSON-ready and names its reference images."""
    data = _data(copies=2)
    forget = [0, 12, 13, 4]  # image 0 and its two copies, and image 4: two distinct images
    model = tiny_model(seed=0)
    r = verify(tiny_model(seed=1), data, forget, before=model, budget=TEST, seed=0)
    json.dumps(r)
    assert r["status"] == "ok" and r["forget"]["count"] == 4 and r["forget"]["distinct"] == 2
    assert [i["distinct_row"] for i in r["forget"]["items"]] == [0, 0, 0, 1]
    assert r["forget"]["items"][1]["sha256"] == content_hash(data.images[0])
    assert r["reference"]["kind"] == "held-out" and r["reference"]["count"] == 10
    assert {v["measure"] for v in r["verdicts"]} == {"similarity", "loss", "nll", "nearest"}
    assert len(r["measures"]["after"]["loss_a"]) == 2 and len(r["measures"]["after"]["loss_ref"]) == 10
    same = verify(model, data, forget, before=model, budget=TEST, seed=0)
    for v in same["verdicts"]:
        assert v["forget_mean"]["before"] == v["forget_mean"]["after"], v["measure"]
    assert all(q["status"] == "kept" for q in same["quality"])
    # no held-out images: a seeded sample of kept images, named so
    kept_ref = verify(model, ImageSet(data.images, data.names), [4], budget=TEST)
    assert kept_ref["reference"]["kind"] == "kept" and 4 not in kept_ref["reference"]["indices"]


def test_relearning_audit_reports_recovered_fractions():
    data = _data()
    before, after = tiny_model(seed=0), tiny_model(seed=1)
    r = verify(after, data, [2], before=before, retrained=tiny_model(seed=2), budget=TEST,
               audit=AuditSettings(steps=2, batch_size=4, lr=1e-3, knn=3))
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


@pytest.mark.parametrize("case", ["shape", "forget", "reference-shape"])
def test_bad_input_gives_one_line_and_writes_nothing(capsys, models, data_file, tmp_path, case):
    args = {"shape": ["--model", models["big"], "--before", models["base"], "--forget", "0"],
            "forget": ["--model", models["after"], "--forget", "99"],
            "reference-shape": ["--model", models["after"], "--reference", models["big"], "--forget", "0"]}[case]
    rc, _, err = _run(capsys, "verify", "--data", data_file, "--out", tmp_path / "v", *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert {"shape": "shape", "forget": "outside the data set", "reference-shape": "retrained"}[case] in err
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
    from diffunlearn.models import load_model

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
    from diffunlearn.data import load_data
    from diffunlearn.verification import verify_run

    head = verify_run(run, tiny_model(seed=0), model, load_data(str(data_file)), [0], "fast", log=lambda m: None)
    assert head["status"] == "failed" and "NaN" in head["error"]
    assert json.loads((run / "verification.json").read_text())["status"] == "failed"


def test_save_grid_upscales_and_labels(tmp_path):
    from PIL import Image

    from diffunlearn.sampling import save_grid

    _, images = random_sets(n_forget=4)
    save_grid(images, tmp_path / "a.png")
    save_grid(images, tmp_path / "b.png", labels=["one", "two", "three", "four"], title="four samples")
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.width >= 512 and b.width >= 512
    assert b.height > a.height  # room for the title and labels, which are drawn
