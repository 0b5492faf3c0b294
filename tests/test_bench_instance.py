"""``diffunlearn bench instance`` (forgetting one training image: the paper's CelebA-HQ protocol at CPU scale) end to
end, on a tiny random-weight stand-in for the shipped ``instance-base`` model and the real ``instance-digits`` data."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import tiny_model
from diffunlearn.errors import UserError
from diffunlearn.model import save_model

ROWS = "pretrained,siss-lambda0.5,naive"
FAST = dict(targets=2, rows=ROWS, steps=2, batch_size=4, similarity_t=6, nll_probes=1, nll_tol=1e-2,
            quality_images=3, kept_images=2, membership_draws=2, strip_targets=1, strip_every=1, workers=1)


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    import diffunlearn.pretrained as pre

    root = tmp_path / "pretrained"
    save_model(tiny_model(seed=3, size=8), root / "instance-base" / "model")
    # the recipe the `retrain` row reads: a run directory's config.yaml beside model/
    (root / "instance-base" / "config.yaml").write_text(yaml.safe_dump(
        {"command": "train", "data": "instance-digits", "arch": "tiny", "steps": 3, "batch_size": 4, "lr": 1e-3,
         "warmup": 1, "seed": 0, "timesteps": 1000}))
    monkeypatch.setattr(pre, "pretrained_root", lambda: root)
    return root


def _cfg(tmp_path, **kw):
    from diffunlearn.bench.instance import InstanceBenchConfig

    return InstanceBenchConfig(out=str(tmp_path / "b"), **{**FAST, **kw})


def test_bench_table_strip_reference_and_resume(shipped, tmp_path, monkeypatch):
    import importlib

    from diffunlearn.bench.instance import run_instance_bench
    from diffunlearn.data import load_data
    from diffunlearn.metrics.membership import denoising_losses, loss_auc
    from diffunlearn.metrics.similarity import noise_and_denoise_similarity
    from diffunlearn.model import load_model
    from diffunlearn.protocols.instance import choose_targets

    cfg = _cfg(tmp_path)
    res = run_instance_bench(cfg)
    out = tmp_path / "b"
    data = load_data("instance-digits")
    targets = choose_targets(len(data), 2, 0)
    assert [t["index"] for t in res["targets"]] == targets and len(set(targets)) == 2
    # one row per method, each over both targets, in the Markdown table and the JSON
    md = (out / "results.md").read_text()
    for label in ROWS.split(","):
        assert f"| {label} |" in md
        assert res["rows"][label]["targets"] == targets
    assert "| held-out reference (never trained on) |" in md
    assert f"Command: `diffunlearn bench instance --out {out} --targets 2 --rows {ROWS} --steps 2" in md
    assert json.loads((out / "results.json").read_text())["rows"].keys() == res["rows"].keys()
    # the similarity of the target before unlearning is the one measured directly on the shipped model
    base = load_model(shipped / "instance-base" / "model")
    cells = {(c["label"], c["target"]): c for c in res["cells"]}
    for t in targets:
        direct = noise_and_denoise_similarity(base, data.images[t:t + 1], t=6, seed=0)
        assert cells[("pretrained", t)]["metrics"]["similarity"] == pytest.approx(float(direct.scores[0]), abs=1e-6)
        lt = denoising_losses(base, data.images[t:t + 1], 2, seed=0)
        lh = denoising_losses(base, data.held_out, 2, seed=0)
        assert cells[("pretrained", t)]["metrics"]["membership_auc"] == pytest.approx(loss_auc(lt, lh))
    before = [cells[("pretrained", t)]["metrics"]["similarity"] for t in targets]
    assert res["rows"]["siss-lambda0.5"]["similarity_before"]["mean"] == pytest.approx(sum(before) / 2)
    # unlearning changed the model: the target's noise-and-denoise image differs from the shipped model's
    t0 = targets[0]
    assert cells[("naive", t0)]["metrics"]["denoised"] != cells[("pretrained", t0)]["metrics"]["denoised"]
    # the strip (Figure 3): the first target only, every step, starting from the shipped model's reconstruction
    siss = cells[("siss-lambda0.5", t0)]
    assert [p["step"] for p in siss["strip"]] == [0, 1, 2]
    assert siss["strip"][0]["similarity"] == pytest.approx(before[0], abs=1e-6)
    assert siss["strip"][-1]["denoised"] == pytest.approx(siss["metrics"]["denoised"], abs=1e-4)
    assert cells[("siss-lambda0.5", targets[1])]["strip"] == []
    assert (out / "strip.png").stat().st_size > 1000
    # SISS scaling_norm by the paper's rule, recorded per cell
    cal = siss["scaling_norm_calibration"]
    assert siss["hyperparameters"]["scaling_norm"] == pytest.approx(0.1 * cal["grad_norm_x"])
    # held-out reference: leave-one-out AUCs and NLLs of the quality images
    ref = res["held_out_reference"]
    assert ref["n"] == 3 and 0.0 <= ref["membership_auc"]["mean"] <= 1.0

    # a re-run loads every cell and trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    assert len(stamps) == 6

    def refuse(*a, **k):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(importlib.import_module("diffunlearn.trainer"), "unlearn", refuse)
    again = run_instance_bench(cfg)
    assert again["timings"]["cells_run"] == 0 and again["timings"]["cells_cached"] == 6
    assert again["rows"]["siss-lambda0.5"]["similarity"] == res["rows"]["siss-lambda0.5"]["similarity"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")} == stamps
    # a third target extends the draw and runs only the new target's cells (pretrained only here)
    three = run_instance_bench(_cfg(tmp_path, targets=3, rows="pretrained"))
    assert [t["index"] for t in three["targets"]][:2] == targets
    assert three["timings"]["cells_run"] == 1 and list(three["rows"]) == ["pretrained"]
    # other settings in the same directory are refused
    with pytest.raises(UserError, match="other settings"):
        run_instance_bench(_cfg(tmp_path, steps=3))


def test_retrain_row_uses_the_shipped_recipe(shipped, tmp_path):
    from diffunlearn.bench.instance import run_instance_bench

    res = run_instance_bench(_cfg(tmp_path, targets=1, rows="pretrained,retrain", strip_targets=0))
    cell = next(c for c in res["cells"] if c["label"] == "retrain")
    assert cell["retrain"]["recipe"]["forget"] == str(cell["target"])
    assert cell["retrain"]["recipe"]["arch"] == "tiny" and cell["steps"] == 3
    assert "| retrain |" in (tmp_path / "b" / "results.md").read_text()


@pytest.mark.parametrize("kw, message", [
    (dict(rows="pretrained,bogus"), "unknown benchmark row 'bogus'"),
    (dict(targets=500), "--targets must lie in"),
    (dict(steps=0), "at least 1"),
    (dict(similarity_t=5000), "--similarity-t"),
    (dict(model="no-such-model"), "no-such-model"),
    (dict(quality_images=1000), "--quality-images"),
])
def test_bad_input_is_one_line_and_writes_nothing(shipped, tmp_path, capsys, kw, message):
    from diffunlearn.bench.instance import run_instance_bench
    from diffunlearn.cli import main

    with pytest.raises(UserError, match=message):
        run_instance_bench(_cfg(tmp_path, **kw))
    assert not (tmp_path / "b").exists()
    flags = [x for k, v in kw.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert main(["bench", "instance", "--out", str(tmp_path / "c"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_instance_digits_are_distinct_and_disjoint_from_held_out():
    from diffunlearn.data import load_data

    d = load_data("instance-digits")
    assert d.images.shape == (64, 1, 8, 8) and d.held_out.shape == (128, 1, 8, 8)
    flat = torch.cat([d.images.load(), d.held_out]).flatten(1)
    assert len(torch.unique(flat, dim=0)) == 192  # no image repeats, inside X or across X and held-out
    assert not set(d.meta["sklearn_index"]) & set(d.meta["held_out_sklearn_index"])
    with pytest.raises(UserError, match="instance-digits needs"):
        load_data("instance-digits:n=1")


def test_shipped_instance_base_memorises_its_training_digits():
    """The real shipped model (README.md: 0.997 on all 64 training digits, 0.860 on 128 held-out ones at t = 100)."""
    from diffunlearn.data import load_data
    from diffunlearn.metrics.similarity import noise_and_denoise_similarity
    from diffunlearn.model import load_model
    from diffunlearn.pretrained import pretrained_dir

    root = pretrained_dir("instance-base")
    recipe = yaml.safe_load((root / "config.yaml").read_text())
    assert (recipe["data"], recipe["arch"], recipe["steps"], recipe["seed"]) == \
        ("instance-digits", "toy-small", 2500, 0)
    assert "--steps 2500" in (root / "README.md").read_text()
    model = load_model(root / "model")
    data = load_data("instance-digits")
    train = noise_and_denoise_similarity(model, data.images[:8], t=100).scores
    held = noise_and_denoise_similarity(model, data.held_out[:8], t=100).scores
    assert float(train.mean()) > 0.98 and float(held.mean()) < float(train.mean()) - 0.05
