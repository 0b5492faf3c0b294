"""The command line: a full unlearn run, presets and dry runs, and bad input that changes nothing on disk."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import snapshot
from diffunlearn.cli import main
from diffunlearn.methods import METHODS, make_method
from diffunlearn.runs.summary import UnlearnSummary


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_unlearn_writes_a_complete_run_directory(capsys, model_dir, data_file, tmp_path):
    """Config, per-step JSONL log (loss terms, ||G_x||, ||G_a||, superfactor, lr, seconds), the model, summary.json;
    the input model directory is byte-for-byte unchanged."""
    before = snapshot(model_dir)
    out = tmp_path / "run"
    rc, _, err = _run(capsys, "unlearn", "--model", model_dir, "--data", data_file, "--forget", "0,1",
                      "--method", "siss", "--lambda", "0.5", "--steps", "3", "--batch-size", "4", "--out", out)
    assert rc == 0, err
    assert snapshot(model_dir) == before
    assert (out / "config.yaml").is_file() and (out / "model" / "model_index.json").is_file()
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for key in ("loss_x", "loss_a", "grad_norm_x", "grad_norm_a", "superfactor", "lr", "seconds"):
        assert key in lines[0], key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "siss" and summary["forget"] == 2
    assert summary["model_in"]["sha256"] != summary["model_out"]["sha256"]
    typed = UnlearnSummary.from_dict(summary)  # summary.json is the typed summary's to_dict, read back whole
    assert {**typed.to_dict(), "wall_seconds": summary["wall_seconds"]} == summary and typed.exit_code == 0


def test_dry_run_prints_the_resolved_config_with_overrides(capsys, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("method: neggrad\ntrainer: {steps: 12, lr: 1.0e-4}\n")
    rc, out, err = _run(capsys, "unlearn", "--config", cfg, "--steps", "5", "--dry-run")
    assert rc == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["method"] == {"name": "neggrad"}
    assert resolved["trainer"]["steps"] == 5 and resolved["trainer"]["lr"] == 1e-4


@pytest.mark.parametrize("name", [m for m in METHODS if m != "retrain"])
def test_the_preset_works_with_every_method(capsys, name):
    """``--method`` naming another method than the preset replaces the preset's method block: that method's own
    defaults apply (unlearn's: a strength that can be measured at the model is ``auto``), and the preset's trainer
    settings stay. The preset's own method keeps the preset's settings (the paper's scaling_norm 5)."""
    rc, out, err = _run(capsys, "unlearn", "--config", "mnist-tshirt", "--method", name, "--dry-run")
    assert rc == 0, err
    resolved = yaml.safe_load(out)
    measured = {"scaling_norm": "auto"} if name == "siss-nois" else {}
    assert resolved["method"] == {"name": name, **make_method(name).hyperparameters(), **measured}
    assert resolved["trainer"]["steps"] == 300 and resolved["trainer"]["lr"] == 5e-5


def test_method_flags_override_the_preset_block_and_foreign_flags_are_named(capsys):
    rc, out, _ = _run(capsys, "unlearn", "--config", "mnist-tshirt", "--lambda", "0.25", "--dry-run")
    assert rc == 0 and yaml.safe_load(out)["method"]["lam"] == 0.25
    assert yaml.safe_load(out)["method"]["scaling_norm"] == 5.0  # the rest of the preset's block stays
    rc, _, err = _run(capsys, "unlearn", "--config", "mnist-tshirt", "--method", "retrack", "--lambda", "0.3",
                      "--dry-run")
    assert rc == 2 and "--lambda does not apply to method retrack (it takes: --knn, --lambda-r)" in err


def test_config_keys_outside_their_block_or_misspelt_are_refused_with_a_hint(capsys, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("steps: 12\n")
    rc, _, err = _run(capsys, "unlearn", "--config", cfg, "--dry-run")
    assert rc == 2 and "it belongs in a block, as trainer: {steps: ...}" in err
    cfg.write_text("trainer: {stpes: 12}\n")
    rc, _, err = _run(capsys, "unlearn", "--config", cfg, "--dry-run")
    assert rc == 2 and "did you mean 'steps'" in err


def test_a_new_method_is_one_class_and_one_registry_line(capsys, model_dir, data_file, tmp_path, monkeypatch):
    """A method defined here, registered with one line, is driven from the command line with a flag generated from
    its field, and its hyperparameter reaches the update: scaling naive deletion's loss by ``gain`` leaves Adam's
    normalised first step unchanged, so the test checks the logged loss term instead."""
    from dataclasses import dataclass, field

    from diffunlearn.methods import Method, Terms
    from diffunlearn.methods.base import ddpm_terms

    @dataclass
    class Scaled(Method):
        gain: float = field(default=1.0, metadata={"help": "multiplies the DDPM loss on X \\ A"})
        name = "scaled"

        def terms(self, unet, batch, ctx):
            return Terms({"x": self.gain * ddpm_terms(unet, batch.x, batch.eps, batch.t, ctx)})

        def loss_coefficients(self):
            return {"x": 1.0}

    monkeypatch.setitem(METHODS, "scaled", Scaled)  # the one registry line
    losses = {}
    for gain in (1.0, 3.0):
        out = tmp_path / f"run{gain}"
        rc, _, err = _run(capsys, "unlearn", "--model", model_dir, "--data", data_file, "--forget", "0",
                          "--method", "scaled", "--gain", str(gain), "--steps", "1", "--batch-size", "4",
                          "--out", out)
        assert rc == 0, err
        losses[gain] = json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss_x"]
        assert yaml.safe_load((out / "config.yaml").read_text())["method"] == {"name": "scaled", "gain": gain}
    assert losses[3.0] == pytest.approx(3 * losses[1.0], rel=1e-6)


def test_unknown_preset_is_named(capsys):
    rc, _, err = _run(capsys, "unlearn", "--config", "no-such-preset", "--dry-run")
    assert rc == 2 and "unknown preset" in err


def test_an_out_directory_inside_or_around_the_input_model_is_refused(capsys, model_dir, data_file, tmp_path):
    """One check (runs.check_outside_model) for unlearn, --requests and the Stable Diffusion commands: the input model
    is never written to, so --out may not be it, lie inside it, or contain it."""
    before = snapshot(model_dir)
    argv = ["unlearn", "--model", model_dir, "--data", data_file, "--forget", "0", "--steps", "1", "--batch-size", "2",
            "--verify", "off"]
    rc, _, err = _run(capsys, *argv, "--out", model_dir / "run")
    assert rc == 2 and "must not contain or be inside the model directory" in err
    for out in (model_dir, model_dir.parent):  # non-empty folders that are no run: refused before this check
        rc, _, err = _run(capsys, *argv, "--out", out, "--overwrite")
        assert rc == 2 and err.startswith("error: "), out
    requests = tmp_path / "r.txt"
    requests.write_text("0\n")
    rc, _, err = _run(capsys, "unlearn", "--model", model_dir, "--data", data_file, "--requests", requests,
                      "--steps", "1", "--batch-size", "2", "--out", model_dir / "run", "--verify", "off")
    assert rc == 2 and "must not contain or be inside the model directory" in err
    assert snapshot(model_dir) == before


def test_scaling_norm_auto_is_the_papers_rule_measured_at_the_input_model(model_dir, data_file, tmp_path, capsys):
    """``--scaling-norm auto`` measures 10% of ||G_x|| at the input model on the run's own data (the paper's rule),
    records the measurement, keeps ``auto`` in config.yaml (so --resume measures it again, identically), and trains
    exactly as the run given that number by hand: the final weights are bitwise equal."""
    from diffunlearn.faults import same_unet

    base = ["unlearn", "--model", str(model_dir), "--data", str(data_file), "--forget", "0,1", "--steps", "2",
            "--batch-size", "4", "--verify", "off"]
    assert main(base + ["--scaling-norm", "auto", "--out", str(tmp_path / "auto")]) == 0
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    calib = summary["scaling_norm_calibration"]
    assert calib["scaling_norm"] == pytest.approx(0.1 * calib["grad_norm_x"]) and calib["grad_norm_x"] > 0
    assert summary["hyperparameters"]["scaling_norm"] == calib["scaling_norm"]
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["method"]["scaling_norm"] == "auto"
    assert main(base + ["--scaling-norm", repr(calib["scaling_norm"]), "--out", str(tmp_path / "hand")]) == 0
    assert same_unet(tmp_path / "auto", tmp_path / "hand")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # only settings measured at the model take 'auto'
        main(base + ["--lambda", "auto", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and "'auto'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
