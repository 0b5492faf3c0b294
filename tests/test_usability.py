"""What a diffusers user expects: help that teaches, model cards, trackers, kind recovery, loading that explains."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import tiny_model
from diffunlearn.cli import main
from diffunlearn.errors import UserError
from diffunlearn.model import load_model, save_model, state_hash


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _unlearn(model_dir, data_file, out, *extra):
    return ["unlearn", "--model", model_dir, "--data", data_file, "--forget", "0,1", "--steps", "2",
            "--batch-size", "4", "--out", out, "--verify", "off", *extra]  # verification has tests of its own


def test_version_help_with_defaults_and_examples_and_did_you_mean(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("diffunlearn ")
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    text = capsys.readouterr().out
    assert "(default: 300)" in text and "(default: 5e-05)" in text  # trainer defaults shown
    for group in ("method (YAML block method:)", "trainer (YAML block trainer:)", "example:"):
        assert group in text, group
    rc, _, err = _run(capsys, "unlearn", "--lamda", "0.5")
    assert rc == 2 and "did you mean --lambda?" in err


def test_the_model_directory_carries_a_model_card(capsys, model_dir, data_file, tmp_path):
    """Base model and hash, what was removed (names and content hashes, never pixels), method and settings."""
    from diffunlearn.data import content_hash, load_data

    out = tmp_path / "run"
    rc, _, err = _run(capsys, *_unlearn(model_dir, data_file, out))
    assert rc == 0, err
    card = (out / "model" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    summary = json.loads((out / "summary.json").read_text())
    assert front["library_name"] == "diffusers" and front["base_model_sha256"] == summary["model_in"]["sha256"]
    data = load_data(str(data_file))
    removed = front["unlearning"]["removed"]
    assert [r["name"] for r in removed] == ["img-00", "img-01"]
    assert [r["sha256"] for r in removed] == [content_hash(data.images[i]) for i in (0, 1)]
    assert front["unlearning"]["method"] == "siss" and front["unlearning"]["trainer"]["steps"] == 2
    assert oct(os.stat(out / "model").st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_interrupted_runs_point_to_resume(capsys, model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("command: unlearn\n")
    (out / "checkpoint.pt").write_bytes(b"x")
    rc, _, err = _run(capsys, *_unlearn(model_dir, data_file, out))
    assert rc == 2 and "pass --resume" in err and "--overwrite would discard it" in err
    fresh = tmp_path / "fresh"
    rc, _, err = _run(capsys, *_unlearn(model_dir, data_file, fresh, "--checkpoint-every", "0"))
    assert rc == 0, err
    (fresh / "summary.json").unlink()
    rc, printed, err = _run(capsys, *_unlearn(model_dir, data_file, fresh, "--checkpoint-every", "0", "--resume"))
    assert rc == 0, err
    assert "no checkpoint in" in printed and "starts again from step 1" in printed


def test_load_model_takes_shipped_names_run_directories_and_variants(tmp_path, capsys, model_dir, data_file):
    assert load_model("instance-base").sample_shape == (1, 8, 8)
    out = tmp_path / "run"
    assert main([str(a) for a in _unlearn(model_dir, data_file, out)]) == 0
    assert state_hash(load_model(out).unet) == json.loads((out / "summary.json").read_text())["model_out"]["sha256"]
    m = tiny_model()
    m.unet.save_pretrained(tmp_path / "v" / "unet", variant="fp16")
    m.scheduler.save_pretrained(tmp_path / "v" / "scheduler")
    with pytest.raises(UserError, match="pass --variant fp16"):
        load_model(tmp_path / "v")
    assert state_hash(load_model(tmp_path / "v", variant="fp16").unet) == state_hash(m.unet)
    assert "M parameters" in repr(m) and len(repr(m)) < 200  # no tensors printed
    from diffunlearn import load_data

    data = load_data("instance-digits")
    assert repr(data).startswith("ImageSet(64 images of (1, 8, 8)") and len(repr(data)) < 200


def test_a_config_that_does_not_match_its_weights_gets_no_advice_to_load_random_weights(tmp_path):
    d = save_model(tiny_model(), tmp_path / "m")
    path = d / "unet" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["block_out_channels"] = [2 * c for c in cfg["block_out_channels"]]
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        load_model(d)
    assert "do not match its config.json" in str(e.value) and "ignore_mismatched_sizes" not in str(e.value)


def test_report_to_tensorboard_logs_every_term_and_samples(capsys, model_dir, data_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rc, _, err = _run(capsys, *_unlearn(model_dir, data_file, out, "--report-to", "tensorboard"))
    assert rc == 0, err
    runs = [p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")]
    tags = {"scalars": set(), "images": set()}
    for r in runs:
        acc = EventAccumulator(str(r)).Reload()
        tags["scalars"] |= set(acc.Tags()["scalars"])
        tags["images"] |= set(acc.Tags()["images"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    numeric = {k for k, v in log[0].items() if k != "step" and isinstance(v, (int, float))}
    assert numeric <= tags["scalars"], numeric - tags["scalars"]
    assert "samples" in tags["images"]


def test_an_option_of_another_command_is_named_as_such(capsys):
    """A flag that exists, but for another command, is not suggested as its own correction: the line says which
    command takes it; a misspelt flag still gets the nearest option of the command used."""
    from diffunlearn.cli import main

    assert main(["unlearn", "--samples", "40"]) == 2
    err = capsys.readouterr().err.strip()
    assert "it is an option of diffunlearn" in err and "verify" in err and "did you mean --samples" not in err
    assert main(["unlearn", "--stpes", "4"]) == 2
    assert "did you mean --steps?" in capsys.readouterr().err
