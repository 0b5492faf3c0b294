"""Checkpoints and resume: a run killed at any point and resumed ends with the same weights, bit for bit."""

from __future__ import annotations

import pytest
import torch

from conftest import random_sets, tiny_model
from diffunlearn.methods import make_method
from diffunlearn.trainer import Checkpointer, TrainerConfig, unlearn


class Crash(Exception):
    pass


@pytest.mark.parametrize("name", ["siss", "erasediff", "retrack"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, name):
    """The checkpoint holds the weights, the AdamW moments and step counts and the row sampler's generator state:
    everything the remaining steps depend on. Restoring it and running the remaining steps therefore repeats the
    uninterrupted run's arithmetic exactly, so the final weights are bitwise equal."""
    kept, forget = random_sets()
    cfg = TrainerConfig(steps=7, batch_size=4, checkpoint_every=2, seed=3)
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


def test_resume_refuses_other_settings_and_finished_runs(tmp_path, model_dir, data_file, capsys):
    from diffunlearn.cli import main

    base = ["unlearn", "--model", str(model_dir), "--data", str(data_file), "--forget", "0", "--steps", "2",
            "--batch-size", "2", "--out", str(tmp_path / "r"), "--verify", "off"]
    assert main(base) == 0
    assert main(base + ["--resume"]) == 2
    assert "already finished" in capsys.readouterr().err
    (tmp_path / "r" / "summary.json").unlink()
    assert main(base + ["--resume", "--lr", "1e-3"]) == 2
    assert "these differ: --lr" in capsys.readouterr().err
    assert main(["unlearn", "--model", str(model_dir), "--data", str(data_file), "--forget", "0", "--resume",
                 "--out", str(tmp_path / "none")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
