"""The command line: a full unlearn run, presets and dry runs, and bad input that changes nothing on disk."""

from __future__ import annotations

import json

import pytest

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


BAD = [
    (["--forget", "30"], "outside"),                      # A not a subset of X
    (["--forget", ""], "empty"),                          # A empty
    (["--forget", "0-29"], "whole data set"),             # A equal to X
    (["--forget", "1,1"], "more than once"),              # duplicates in A
    (["--lambda", "1.5"], "lambda must lie in"),          # lambda outside [0, 1]
    (["--lambda", "-0.1"], "lambda must lie in"),
    (["--method", "forgetall"], "unknown method"),
    (["--method", "naive", "--lambda", "0.5"], "does not apply"),
    (["--steps", "-1"], "--steps"),
    (["--lr=-1e-3"], "--lr"),
    (["--batch-size", "abc"], "invalid int value"),
    (["--t-max", "5000"], "timestep range"),
]


@pytest.mark.parametrize("extra,msg", BAD)
def test_bad_input_is_one_line_nonzero_and_changes_nothing(capsys, model_dir, data_file, tmp_path, extra, msg):
    before_model, before_tmp = snapshot(model_dir), sorted(p.name for p in tmp_path.iterdir())
    args = ["unlearn", "--model", model_dir, "--data", data_file, "--forget", "0", "--steps", "1",
            "--out", tmp_path / "out"]
    try:
        rc, _, err = _run(capsys, *args, *extra)
    except SystemExit as e:  # argparse's own errors
        rc, err = e.code, capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert snapshot(model_dir) == before_model
    assert sorted(p.name for p in tmp_path.iterdir()) == before_tmp


def test_wrong_image_size_model_without_weights_and_busy_out_dir(capsys, model_dir, tmp_path):
    import numpy as np

    big = tmp_path / "big.npy"
    np.save(big, np.zeros((10, 16, 16), np.uint8))
    rc, _, err = _run(capsys, "unlearn", "--model", model_dir, "--data", big, "--forget", "0", "--out", tmp_path / "o")
    assert rc == 2 and "(1, 16, 16)" in err and "(1, 8, 8)" in err
    empty = tmp_path / "empty_model"
    (empty / "unet").mkdir(parents=True)
    (empty / "unet" / "config.json").write_text("{}")
    rc, _, err = _run(capsys, "unlearn", "--model", empty, "--data", big, "--forget", "0", "--out", tmp_path / "o")
    assert rc == 2 and "no weights" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    rc, _, err = _run(capsys, "unlearn", "--model", model_dir, "--data", big, "--forget", "0", "--out", busy)
    assert rc == 2 and "not empty" in err and (busy / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "o").exists()


def test_unknown_preset_is_named(capsys):
    rc, _, err = _run(capsys, "unlearn", "--config", "no-such-preset", "--dry-run")
    assert rc == 2 and "unknown preset" in err
