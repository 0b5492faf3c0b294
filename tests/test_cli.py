"""The command line: a full unlearn run, presets and dry runs, and bad input that changes nothing on disk."""

from __future__ import annotations

import json


from conftest import snapshot
from diffunlearn.cli import main


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


def test_dry_run_prints_the_resolved_config_with_overrides(capsys, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("method: neggrad\nsteps: 12\nlr: 1.0e-4\n")
    rc, out, _ = _run(capsys, "unlearn", "--config", cfg, "--steps", "5", "--dry-run")
    assert rc == 0
    assert "method: neggrad" in out and "steps: 5" in out and "lr: 0.0001" in out


def test_unknown_preset_is_named(capsys):
    rc, _, err = _run(capsys, "unlearn", "--config", "no-such-preset", "--dry-run")
    assert rc == 2 and "unknown preset" in err
