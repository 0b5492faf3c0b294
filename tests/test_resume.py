"""Checkpoints and resume: a run killed at any point and resumed ends with the same weights, bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import random_sets, tiny_model
from diffunlearn.methods import make_method
from diffunlearn.unlearn import Checkpointer, UnlearnConfig, unlearn


class Crash(Exception):
    pass


@pytest.mark.parametrize("name", ["siss", "erasediff", "retrack"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, name):
    """The checkpoint holds the weights, the AdamW moments and step counts and the row sampler's generator state:
    everything the remaining steps depend on. Restoring it and running the remaining steps therefore repeats the
    uninterrupted run's arithmetic exactly, so the final weights are bitwise equal."""
    kept, forget = random_sets()
    cfg = UnlearnConfig(steps=7, batch_size=4, checkpoint_every=2, seed=3)
    ref = unlearn(tiny_model(), kept, forget, make_method(name), cfg)
    ck = Checkpointer(tmp_path / "checkpoint.pt")

    def crash_at_5(step, _):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        unlearn(tiny_model(), kept, forget, make_method(name), cfg, callback=crash_at_5, checkpoint=ck)
    assert ck.last_step() == 4
    resumed = unlearn(tiny_model(), kept, forget, make_method(name), cfg, checkpoint=ck)
    for (k, a), b in zip(ref.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b), k


def _cli(*args):
    return [sys.executable, "-m", "diffunlearn.cli", *map(str, args)]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


def test_sigkill_at_random_steps_then_resume_gives_bitwise_the_same_model(tmp_path, model_dir, data_file):
    """Real crashes: the CLI is killed with SIGKILL once its log shows a randomly chosen step (so the kill can land
    during a step, a checkpoint write, or between them), then ``--resume`` finishes the run. In every trial the model
    equals the uninterrupted run's bit for bit, and no model directory exists before the run completes."""
    args = ["unlearn", "--model", model_dir, "--data", data_file, "--forget", "0,1", "--method", "siss",
            "--steps", "10", "--batch-size", "4", "--checkpoint-every", "1", "--seed", "5", "--threads", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cli(*args, "--out", ref), check=True, capture_output=True, env=env, timeout=300)
    want = _weights(ref)
    rng = random.Random(0)
    for trial in range(3):
        out = tmp_path / f"killed{trial}"
        kill_after = rng.randint(1, 8)
        proc = subprocess.Popen(_cli(*args, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            log = out / "log.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= kill_after:
                time.sleep(rng.random() * 0.05)
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "model").exists() or (out / "summary.json").exists()
        done = subprocess.run(_cli(*args, "--out", out, "--resume"), capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        got = _weights(out)
        assert all(torch.equal(want[k], got[k]) for k in want), f"trial {trial} (killed after step {kill_after})"
        assert not (out / "checkpoint.pt").exists()
        steps = [line for line in (out / "log.jsonl").read_text().splitlines()]
        assert len(steps) == 10


def test_resume_refuses_other_settings_and_finished_runs(tmp_path, model_dir, data_file, capsys):
    from diffunlearn.cli import main

    base = ["unlearn", "--model", str(model_dir), "--data", str(data_file), "--forget", "0", "--steps", "2",
            "--batch-size", "2", "--out", str(tmp_path / "r")]
    assert main(base) == 0
    assert main(base + ["--resume"]) == 2
    assert "already finished" in capsys.readouterr().err
    (tmp_path / "r" / "summary.json").unlink()
    assert main(base + ["--resume", "--lr", "1e-3"]) == 2
    assert "these differ: lr" in capsys.readouterr().err
    assert main(["unlearn", "--model", str(model_dir), "--data", str(data_file), "--forget", "0", "--resume",
                 "--out", str(tmp_path / "none")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
