"""The MNIST T-Shirt commands (eval, demo, bench) end to end, on tiny random-weight stand-ins for the shipped
diffusion models (the shipped classifier and the real data are used), with minimal sample counts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import tiny_model
from diffunlearn.model import save_model


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    import diffunlearn.pretrained as pre

    real = pre.pretrained_dir("mnist-classifier")
    root = tmp_path / "pretrained"
    shutil.copytree(real, root / "mnist-classifier")
    save_model(tiny_model(seed=1, size=28), root / "mnist-tshirt-base" / "model")
    save_model(tiny_model(seed=2, size=28), root / "mnist-tshirt-retrain" / "model")
    monkeypatch.setattr(pre, "pretrained_root", lambda: root)
    return root


def test_eval_writes_metrics_with_intervals(shipped, tmp_path, capsys):
    from diffunlearn.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--model", "mnist-tshirt-base", "--out", str(out), "--n-samples", "20", "--sample-steps", "2",
                 "--nll-probes", "2", "--nll-tol", "1e-3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    r = m["tshirt_rate"]
    assert r["n"] == 20 and r["ci95"][0] <= r["rate"] <= r["ci95"][1]
    assert m["tshirt_nll"]["probes"] == 2 and m["tshirt_nll"]["bpd"] > 0
    assert 1.0 <= m["classifier_is"]["mean"] <= 11.0
    assert (out / "samples.png").is_file()


def test_demo_runs_leaves_the_shipped_model_untouched_and_reuses_its_stored_evaluation_only_when_exact(
        shipped, tmp_path):
    """The demo writes its picture, table and model and never modifies the shipped model.

    The base model's evaluation is a deterministic function of its weights and the evaluation settings (samples
    seeded per image, NLL probes by a fixed seed), so the demo may store it beside the shipped model and reuse it. The
    stored numbers must equal a fresh evaluation, --recompute-before must evaluate again (and get the same numbers),
    and a different setting or different weights must not find the stored evaluation."""
    from diffunlearn.commands.demo import BEFORE_FILE, DemoConfig, before_key, load_before, run_demo
    from diffunlearn.commands.evaluate import EvalConfig
    from diffunlearn.model import load_model, state_hash

    base_dir = shipped / "mnist-tshirt-base"
    weights = state_hash(load_model(base_dir / "model").unet)
    kw = dict(until="", steps=2, verify="off", n_samples=20, sample_steps=2, nll_probes=1, nll_tol=1e-3)
    res = run_demo(DemoConfig(out=str(tmp_path / "a"), **kw))
    assert state_hash(load_model(base_dir / "model").unet) == weights
    for side in ("before", "after"):
        assert res[side]["tshirt_rate"]["n"] == 20
    assert (tmp_path / "a" / "before_after.png").is_file()
    assert (tmp_path / "a" / "model" / "model_index.json").is_file()
    assert "| after SISS" in (tmp_path / "a" / "results.md").read_text()
    fresh = res["before"]
    assert not fresh["reused_stored_evaluation"]

    shutil.copy(tmp_path / "a" / BEFORE_FILE, base_dir / BEFORE_FILE)
    reused = run_demo(DemoConfig(out=str(tmp_path / "b"), **kw))["before"]
    assert reused["reused_stored_evaluation"]

    def numbers(m):  # everything but timings; JSON text so that a NaN standard error (1 probe) compares equal
        strip = lambda d: {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()  # noqa: E731
                           if k not in ("seconds", "reused_stored_evaluation")}
        return json.dumps(strip(m), sort_keys=True)

    assert numbers(reused) == numbers(fresh)
    again = run_demo(DemoConfig(out=str(tmp_path / "c"), **kw, recompute_before=True))["before"]
    assert not again["reused_stored_evaluation"] and numbers(again) == numbers(fresh)

    base = load_model(base_dir / "model")
    ecfg = EvalConfig(n_samples=20, sample_steps=2, nll_probes=1, nll_tol=1e-3, seed=0)
    assert load_before(base_dir, before_key(base, ecfg)) is not None  # the key the demo stored
    assert before_key(base, ecfg)["nll_solver"] == reused["tshirt_nll"]["solver"]  # another NLL layout: not reused
    for change in (dict(n_samples=12), dict(sample_steps=3), dict(nll_probes=2), dict(nll_tol=1e-4), dict(seed=1)):
        assert load_before(base_dir, before_key(base, EvalConfig(**{**ecfg.__dict__, **change}))) is None, change
    with torch.no_grad():
        next(base.unet.parameters()).add_(1e-3)
    assert load_before(base_dir, before_key(base, ecfg)) is None  # other weights
    (base_dir / BEFORE_FILE).unlink()


def test_bench_writes_table_plots_and_resumes(shipped, tmp_path):
    from diffunlearn.bench.mnist_tshirt import MnistBenchConfig, run_mnist_bench

    cfg = MnistBenchConfig(out=str(tmp_path / "b"), seeds=1, rows="pretrained,retrain,naive,siss-lambda0.5",
                           steps_scale=0.01, n_samples=20, sample_steps=2, nll_probes=1, nll_tol=1e-3,
                           curve_every=1, curve_samples=10, curve_nll_tol=1e-2)
    rows = run_mnist_bench(cfg)
    assert set(rows) == {"pretrained", "retrain", "naive", "siss-lambda0.5"}
    assert rows["siss-lambda0.5"]["steps"] == 3 and rows["naive"]["relative_step_time"] == pytest.approx(1.0)
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    siss = next(c for c in res["cells"] if c["label"] == "siss-lambda0.5")
    assert [p["step"] for p in siss["curve"]] == [1, 2, 3]
    for f in ("results.md", "pareto.png", "curves.png"):
        assert (tmp_path / "b" / f).is_file()
    table = (tmp_path / "b" / "results.md").read_text()
    assert "{" not in table and "rtol=atol=0.001" in table  # every setting filled in
    stamp = (tmp_path / "b" / "cells" / "naive-seed0" / "result.json").stat().st_mtime_ns
    run_mnist_bench(cfg)  # a re-run finds every cell done
    assert (tmp_path / "b" / "cells" / "naive-seed0" / "result.json").stat().st_mtime_ns == stamp
    from dataclasses import replace

    from diffunlearn.errors import UserError

    config = (tmp_path / "b" / "config.json").read_text()
    with pytest.raises(UserError, match="other settings"):  # a setting the cells depend on
        run_mnist_bench(replace(cfg, n_samples=30))
    assert (tmp_path / "b" / "config.json").read_text() == config
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no benchmark"):
        run_mnist_bench(replace(cfg, out=str(tmp_path / "other")))
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_demo_picture_shows_every_seed_that_reproduced_the_forgotten_image():
    """The picture's tiles are chosen by index: the base model's hits (up to half the tiles) and then the first other
    indices, sorted. Samples are seeded per index, so before and after show the same seeds."""
    from diffunlearn.commands.demo import shown_indices

    hits = [3, 40, 41, 200]
    is_target = [i in hits for i in range(256)]
    idx = shown_indices(is_target)
    assert idx == sorted(idx) and len(idx) == len(set(idx)) == 32
    assert set(hits) <= set(idx) and set(idx) - set(hits) == set(range(29)) - {3}
    many = shown_indices([True] * 40 + [False] * 216)
    assert many == list(range(16)) + list(range(40, 56))  # hits fill at most half the tiles
    assert shown_indices([False] * 20) == list(range(20))  # fewer samples than tiles


@pytest.fixture
def tshirt_is_sample5(shipped, monkeypatch):
    """The protocol's T-shirt replaced by the stand-in base model's sample 5 (2 DDPM steps), so the base model draws
    at least one T-shirt."""
    from diffunlearn.model import load_model
    from diffunlearn.model.sampling import ddpm_sample
    from diffunlearn.protocols.mnist_tshirt import MnistTshirtProtocol

    base = load_model(shipped / "mnist-tshirt-base" / "model")
    real = MnistTshirtProtocol.load()
    fake = MnistTshirtProtocol(ddpm_sample(base, 0, 2, seed=0, indices=[5])[0], real.reference, real.classifier)
    monkeypatch.setattr(MnistTshirtProtocol, "load", classmethod(lambda cls: fake))
    return fake


def test_look_rebuilds_a_cell_and_draws_exactly_the_samples_it_counted(tshirt_is_sample5, tmp_path):
    """``--look`` reruns a cell's unlearning (the same per-step losses as the cell recorded) and draws only the
    samples the cell counted, at the distances it recorded, into look.* beside the cell's own files; a record that
    the rebuilt model does not match is reported, not trusted; a cell that recorded no numbers is looked at through
    the base model's T-shirt seeds, and says how many of its count were found there. The T-shirt here is the
    stand-in base model's own sample 5, so the base model counts at least that one."""
    from dataclasses import replace

    from diffunlearn.bench.mnist_tshirt import MnistBenchConfig, run_mnist_bench
    from diffunlearn.errors import UserError

    cfg = MnistBenchConfig(out=str(tmp_path / "b"), seeds=1, rows="pretrained,naive", steps_scale=0.01, n_samples=24,
                           sample_steps=2, nll_probes=1, nll_tol=1e-2, curve_every=0)
    run_mnist_bench(cfg)
    cells = tmp_path / "b" / "cells"
    stored = {c: json.loads((cells / c / "result.json").read_text()) for c in ("pretrained-seed0", "naive-seed0")}
    assert 5 in stored["pretrained-seed0"]["metrics"]["tshirt_rate"]["indices"]
    own = {c: (cells / c / "counted.npy").read_bytes() for c in stored}

    looks = run_mnist_bench(MnistBenchConfig(out=cfg.out, look="pretrained,naive:0,naive:0"))  # the dir's settings
    assert [x["cell"] for x in looks] == list(stored)
    for look, c in zip(looks, stored):
        rate = stored[c]["metrics"]["tshirt_rate"]
        assert look["counted"] == rate["indices"] and look["samples_drawn"] == rate["count"] == look["found"]
        assert look["all_found"] and look["distances_reproduced"]
        assert (cells / c / "look.npy").read_bytes() == own[c]  # the same pixels; the cell's own file untouched
        assert json.loads((cells / c / "look.json").read_text()) == look
    assert looks[0]["training_log"] is None and looks[1]["training_log"] == {"identical": True, "steps": [3, 3]}

    tampered = json.loads(json.dumps(stored["naive-seed0"]))  # a record the rebuilt model does not repeat
    tampered["metrics"]["tshirt_rate"]["distances"][0] += 0.5
    tampered["log"][1]["loss_x"] *= 1.01
    (cells / "naive-seed0" / "result.json").write_text(json.dumps(tampered))
    look = run_mnist_bench(replace(cfg, look="naive:0"))[0]
    assert look["distances_reproduced"] is False and look["training_log"]["first_step_that_differs"] == 2
    assert look["training_log"]["max_relative_difference"] == pytest.approx(0.01 / 1.01, rel=1e-3)

    old = json.loads(json.dumps(stored["naive-seed0"]))  # a cell computed before cells recorded their numbers
    for k in ("indices", "distances"):
        del old["metrics"]["tshirt_rate"][k]
    (cells / "naive-seed0" / "result.json").write_text(json.dumps(old))
    look = run_mnist_bench(replace(cfg, look="naive:0"))[0]
    assert "base model" in look["looked_through"]
    assert look["samples_drawn"] == stored["pretrained-seed0"]["metrics"]["tshirt_rate"]["count"]
    assert set(look["counted"]) == set(stored["naive-seed0"]["metrics"]["tshirt_rate"]["indices"]) & \
        set(stored["pretrained-seed0"]["metrics"]["tshirt_rate"]["indices"])
    assert look["distances_reproduced"] is None and look["counted"]

    empty = json.loads(json.dumps(stored["pretrained-seed0"]))
    empty["metrics"]["tshirt_rate"].update(count=0, indices=[], distances=[])
    (cells / "pretrained-seed0" / "result.json").write_text(json.dumps(empty))
    before = sorted(str(p) for p in (tmp_path / "b").rglob("*"))
    for spec, message in (("nope:0", "unknown row"), ("naive:x", "must be an integer"), ("naive", "name the "
                          "unlearning seed"), ("pretrained:1", "reference model"), ("siss-lambda0.5:0",
                          "no finished cell"), (",", "names no cell"), ("pretrained", "counted no T-shirt")):
        with pytest.raises(UserError, match=message):
            run_mnist_bench(replace(cfg, look=spec))
    with pytest.raises(UserError, match="holds no benchmark"):
        run_mnist_bench(replace(cfg, out=str(tmp_path / "none"), look="naive:0"))
    assert sorted(str(p) for p in (tmp_path / "b").rglob("*")) == before
    (cells / "pretrained-seed0" / "result.json").write_text(json.dumps(stored["pretrained-seed0"]))
    run_mnist_bench(cfg)  # the table, and one picture of every counted sample of the method cells
    assert (tmp_path / "b" / "counted.png").is_file()


def test_decay_curve_draws_with_the_benchmark_sampler(shipped):
    """A decay-curve point counts the samples the evaluation's sampler draws (seeds 10,000 + i): with the T-shirt set
    to DPM-Solver++ SDE sample 0, that sampler's curve point finds it at distance 0, as the full count does."""
    from diffunlearn.metrics.rates import target_rate
    from diffunlearn.model import load_model
    from diffunlearn.model.sampling import ddpm_sample
    from diffunlearn.protocols.mnist_tshirt import MnistTshirtProtocol

    base = load_model(shipped / "mnist-tshirt-base" / "model")
    real = MnistTshirtProtocol.load()
    sde = ddpm_sample(base, 6, 3, seed=10_000, sampler="dpm++sde")
    protocol = MnistTshirtProtocol(sde[0], real.reference, real.classifier)
    point = protocol.curve_point(base, 7, 6, 3, 1e-2, sampler="dpm++sde")
    assert point["tshirt_count"] == target_rate(sde, sde[0]).count >= 1 and point["step"] == 7
    assert point["ci95"][0] <= point["rate"] <= point["ci95"][1]


def test_log_agreement_ignores_timings_and_measures_the_largest_difference():
    from diffunlearn.bench.tshirt_look import log_agreement

    a = [{"step": 1, "loss": 2.0, "seconds": 1.0}, {"step": 2, "loss": 4.0, "grad_norm": 10.0, "seconds": 1.0}]
    b = [{"step": 1, "loss": 2.0, "seconds": 9.0}, {"step": 2, "loss": 4.0, "grad_norm": 10.0, "seconds": 3.0}]
    assert log_agreement(a, b) == {"identical": True, "steps": [2, 2]}
    b[1]["grad_norm"] = 10.001
    out = log_agreement(a, b)
    assert not out["identical"] and out["first_step_that_differs"] == 2 and out["same_keys"]
    assert out["max_relative_difference"] == pytest.approx(0.001 / 10.001)
    assert out["max_relative_difference_by_name"] == {"grad_norm": pytest.approx(0.001 / 10.001), "loss": 0.0,
                                                      "step": 0.0}
    assert log_agreement(a, b[:1]) == {"identical": False, "steps": [2, 1]}


def test_a_complete_look_supplies_the_numbers_a_cell_did_not_record(tmp_path):
    """A cell without recorded sample numbers takes them from its look only when the look found its whole count."""
    from diffunlearn.bench.harness import CellResult
    from diffunlearn.bench.tshirt_look import with_looked_numbers

    def cell(label, count, **rate):
        return CellResult(label, 0, {"tshirt_rate": {"count": count, **rate}})

    same = {"identical": True, "steps": [3, 3]}
    drift = {"identical": False, "steps": [3, 3], "same_keys": True, "first_step_that_differs": 2}
    looks = {"a": dict(found=2, training_log=same), "b": dict(found=1, training_log=same),
             "c": dict(found=1, training_log=same), "d": dict(found=2, training_log_reproduced=False),
             "e": dict(found=2, training_log={**drift, "max_relative_difference_by_name": {"loss_x": 1e-3}}),
             "f": dict(found=2, training_log={**drift, "max_relative_difference_by_name": {
                 "loss_x": 1e-6, "grad_norm": 0.0, "rows_w_a_positive": 0.2}})}
    results = [cell(x, 2) for x in "abdef"] + [cell("c", 1, indices=[5], distances=[0.5])]
    for label, look in looks.items():
        (tmp_path / "cells" / f"{label}-seed0").mkdir(parents=True)
        (tmp_path / "cells" / f"{label}-seed0" / "look.json").write_text(json.dumps(
            {"all_found": look["found"] == 2, "counted": [3, 9][:look["found"]], "distances": [1.0, 2.0][:look[
                "found"]], **look}))
    out = {r.label: r.metrics["tshirt_rate"] for r in with_looked_numbers(tmp_path, results)}
    assert out["a"]["indices"] == [3, 9] and "numbers_from" in out["a"]
    assert "indices" not in out["b"]  # the look found 1 of 2: not the cell's numbers
    assert "indices" not in out["d"] and "indices" not in out["e"]  # the rebuilt run was not the cell's run
    assert out["f"]["indices"] == [3, 9]  # ... or repeated its losses and gradients (a diagnostic may differ)
    assert out["c"] == results[-1].metrics["tshirt_rate"]  # a cell's own record is never replaced
    assert "indices" not in results[0].metrics["tshirt_rate"]  # the input is not modified


def test_curve_track_follows_the_base_models_tshirt_samples_to_the_final_count(tshirt_is_sample5, tmp_path):
    """With ``--curve-track`` (the pretrained cell's result) every curve point draws exactly the base model's T-shirt
    samples; the last point is the final model at the evaluation's seeds, so the samples it still finds to be
    T-shirts are exactly the final count's among them. A file that is not such a cell is a one-line error."""
    from dataclasses import replace

    from diffunlearn.bench.mnist_tshirt import MnistBenchConfig, run_mnist_bench
    from diffunlearn.errors import UserError

    cfg = MnistBenchConfig(out=str(tmp_path / "b"), seeds=1, rows="pretrained", steps_scale=0.01, n_samples=24,
                           sample_steps=2, nll_probes=1, nll_tol=1e-2, curve_every=1, curve_nll_tol=1e-2)
    run_mnist_bench(cfg)
    base_cell = tmp_path / "b" / "cells" / "pretrained-seed0" / "result.json"
    tracked = json.loads(base_cell.read_text())["metrics"]["tshirt_rate"]["indices"]
    run_mnist_bench(replace(cfg, rows="naive", curve_track=str(base_cell)))
    cell = json.loads((tmp_path / "b" / "cells" / "naive-seed0" / "result.json").read_text())
    assert [p["step"] for p in cell["curve"]] == [1, 2, 3] and cell["curve_settings"]["tracked"] == tracked
    assert all(p["n"] == len(tracked) and set(p["tracked_still_tshirts"]) <= set(tracked) for p in cell["curve"])
    final = set(cell["metrics"]["tshirt_rate"]["indices"]) & set(tracked)
    assert final  # sample 5 is still the T-shirt after 3 small steps
    assert set(cell["curve"][-1]["tracked_still_tshirts"]) == final
    assert cell["curve"][-1]["tshirt_count"] == len(final)
    for change, message in ((dict(curve_track=str(tmp_path / "missing.json")), "not a finished"),
                            (dict(curve_track=str(tmp_path / "b" / "config.json")), "not a finished"),
                            (dict(curve_track=str(base_cell), curve_every=0), "needs a decay curve")):
        with pytest.raises(UserError, match=message):
            run_mnist_bench(replace(cfg, rows="siss-lambda0.5", **change))
    other = json.loads(base_cell.read_text())
    other["metrics"]["sampling"]["sampler"] = "dpm++sde"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="track a cell drawn like this benchmark"):
        run_mnist_bench(replace(cfg, rows="siss-lambda0.5", curve_track=str(tmp_path / "other.json")))
    assert not (tmp_path / "b" / "cells" / "siss-lambda0.5-seed0").exists()


def test_counted_distance_pools_the_cells_that_recorded_distances():
    from diffunlearn.bench.harness import CellResult
    from diffunlearn.bench.mnist_tshirt import counted_distance

    def cell(**rate):
        return CellResult("row", 0, {"tshirt_rate": {"count": len(rate.get("distances", [])), **rate}})

    out = counted_distance([cell(distances=[1.0, 3.0]), cell(distances=[2.0]), cell(), cell(distances=[])])
    assert out == {"min": 1.0, "median": 2.0, "max": 3.0, "samples": 3, "cells": 3}
    assert counted_distance([cell(), cell(distances=[])]) is None
