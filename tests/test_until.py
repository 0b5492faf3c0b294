"""``unlearn --until removed``: the run stops at the first check whose verification says removed, with exactly the
weights of a run of that many steps; the quality guard restores the last checked weights whose quality held; the
outcomes are exit statuses; bad settings fail before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import random_sets, snapshot, tiny_model
from diffunlearn import ImageSet, TrainerConfig, make_method, unlearn
from diffunlearn.cli import main
from diffunlearn.model import save_model, state_hash
from diffunlearn.verification import BUDGETS, Outcome, Overall, Status, Verification
from diffunlearn.verification import loop as loop_mod

TEST = BUDGETS["fast"].__class__(**{**BUDGETS["fast"].describe(), "name": "test", "search_seeds": 16,
                                    "samples": 400, "sample_steps": 2})


def _data() -> ImageSet:
    kept, held = random_sets(n_kept=14, n_forget=20, seed=3)
    return ImageSet(kept, [f"img-{i:02d}" for i in range(14)], held_out=held)


def _run(steps: int, callback=None, checkpoint=None):
    kept, forget = random_sets(n_kept=12, n_forget=2, seed=3)
    cfg = TrainerConfig(steps=steps, batch_size=4, lr=1e-3, seed=1, checkpoint_every=2 if checkpoint else 0)
    return unlearn(tiny_model(), kept, forget, make_method("naive"), cfg, callback=callback, checkpoint=checkpoint)


def _verified(status: Status) -> Verification:
    """A finished verification whose overall decision is ``status`` (no measure behind it)."""
    return Verification(Outcome.OK, overall=Overall(status, status, f"{status.value} (replaced)"))


def _loop(monkeypatch, every: int, removed_at: int | None = None, degraded_at: int | None = None):
    """The loop on the tiny model, its verification and quality verdict replaced by ones that change at given steps
    (the decisions under test are the loop's, not the measures')."""
    state = {"step": 0}
    real_q = loop_mod.quality_verdict

    def fake_verify(model, *a, **k):
        return _verified(Status.REMOVED if state["step"] == removed_at else Status.NOT_REMOVED)

    def fake_quality(measure, vals, label=None):
        q = real_q(measure, vals, label)
        return {**q, "status": "degraded"} if state["step"] == degraded_at else {**q, "status": "kept"}

    monkeypatch.setattr("diffunlearn.verification.core.verify", fake_verify)
    monkeypatch.setattr(loop_mod, "quality_verdict", fake_quality)
    data = _data()
    lp = loop_mod.UntilRemoved(tiny_model(), data, [0, 1], budget=TEST, check_every=every, seed=0)
    lp.hits = []  # no targeted seed: every check goes on to the (replaced) verification

    def callback(step, unet):
        state["step"] = step
        return lp(step, unet)

    return lp, callback


def test_a_run_stopped_at_a_check_has_the_weights_of_a_run_of_that_many_steps(monkeypatch):
    lp, callback = _loop(monkeypatch, every=2, removed_at=4)
    stopped = _run(10, callback)
    assert lp.outcome == "removed" and lp.stopped_at == 4 and [c["step"] for c in lp.checks] == [2, 4]
    assert state_hash(stopped.unet) == state_hash(_run(4).unet)
    assert lp.summary()["exit_status"] == 0


@pytest.mark.parametrize("ending", ["removed", "quality guard"])
def test_a_loop_interrupted_and_resumed_decides_and_ends_as_an_uninterrupted_one(monkeypatch, tmp_path, ending):
    """Killed after step 5 (checkpoint at 4, which keeps the loop's state), resumed: the checks at 6 and 8 decide as
    an uninterrupted run's do, the record holds every check, and the run ends with the uninterrupted run's weights:
    stopped at 8 (removed), or by the quality guard at 6 with step 4's weights, the last checked whose quality
    held before the restart (which only the checkpoint's copy of the loop's state can give back)."""
    from diffunlearn.trainer import Checkpointer

    when, stop, weights = ({"removed_at": 8}, 8, 8) if ending == "removed" else ({"degraded_at": 6}, 6, 4)
    ref, ref_callback = _loop(monkeypatch, every=2, **when)
    uninterrupted = _run(20, ref_callback)
    lp, callback = _loop(monkeypatch, every=2, **when)

    def killed(step, unet):
        if step == 5:
            raise KeyboardInterrupt
        return callback(step, unet)

    ckpt = Checkpointer(tmp_path / "checkpoint.pt", extra=lp)
    with pytest.raises(KeyboardInterrupt):
        _run(20, killed, ckpt)
    assert ckpt.last_step() == 4
    lp2, callback2 = _loop(monkeypatch, every=2, **when)
    ckpt.extra = lp2
    resumed = _run(20, callback2, ckpt)
    strip = lambda checks: [{k: v for k, v in c.items() if k != "seconds"} for c in checks]  # noqa: E731
    assert strip(lp2.checks) == strip(ref.checks) and [c["step"] for c in lp2.checks] == list(range(2, stop + 1, 2))
    assert lp2.summary() == {**ref.summary(), "checks": lp2.checks, "search_seconds": lp2.search_seconds}
    assert lp2.stopped_at == stop and lp2.summary()["model_is_step"] == weights
    assert state_hash(resumed.unet) == state_hash(uninterrupted.unet) == state_hash(_run(weights).unet)


def test_the_quality_guard_restores_the_last_checked_weights_whose_quality_held(monkeypatch):
    lp, callback = _loop(monkeypatch, every=2, degraded_at=6)
    guarded = _run(10, callback)
    s = lp.summary()
    assert s["outcome"] == "stopped by the quality guard" and s["stopped_at"] == 6 and s["model_is_step"] == 4
    assert s["exit_status"] == 4 and state_hash(guarded.unet) == state_hash(_run(4).unet)
    assert "step 4, whose quality held" in lp.line()


def test_a_loop_that_never_verifies_runs_every_step_and_says_not_removed(monkeypatch):
    lp, callback = _loop(monkeypatch, every=3)
    done = _run(7, callback)
    assert [c["step"] for c in lp.checks] == [3, 6] and lp.outcome == "not removed"
    assert lp.summary()["exit_status"] == 3 and state_hash(done.unet) == state_hash(_run(7).unet)


def test_until_removed_end_to_end_exits_3_when_not_removed(capsys, tmp_path, monkeypatch):
    """A tiny random model never shows A, so nothing can be shown removed: exit status 3, the outcome in
    summary.json and the model card, the verification written."""
    model = save_model(tiny_model(), tmp_path / "base")
    rng = torch.Generator().manual_seed(0)
    data = tmp_path / "d.npz"
    np.savez(data, images=(torch.rand((30, 8, 8), generator=rng) * 255).to(torch.uint8).numpy())
    out = tmp_path / "run"
    import diffunlearn.commands.verify as command
    import diffunlearn.verification.core as core

    calls, real = [], core.verify
    counted = lambda *a, **k: (calls.append(1), real(*a, **k))[1]  # noqa: E731
    monkeypatch.setattr(core, "verify", counted)  # the loop's confirmation
    monkeypatch.setattr(command, "verify", counted)  # the run's own verification after saving
    rc = main(["unlearn", "--model", str(model), "--data", str(data), "--forget", "0,1", "--method", "naive",
               "--max-steps", "4", "--batch-size", "4", "--until", "removed", "--check-every", "4",
               "--check-seeds", "1", "--threads", "1",
               "--out", str(out)])
    assert rc == 3, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["until"]["outcome"] == "not removed" and [c["step"] for c in s["until"]["checks"]] == [4]
    # the check at the last step verified this very model: its verification is the run's, not made twice
    v = json.loads((out / "verification.json").read_text())
    assert v["overall"]["status"] == s["until"]["checks"][0]["verification"] and len(calls) == 1
    assert (out / "verification.json").is_file() and "not removed" in (out / "model" / "README.md").read_text()
    assert "until removed: not removed within the step budget" in capsys.readouterr().out
    report = (out / "report.html").read_text()  # the report shows the loop: its checks, where and why it ended
    assert "Unlearning until removed" in report and "not removed within the step budget (1 checks)" in report
    assert report.count("<tr><td>4</td>") == 1


@pytest.mark.parametrize("case,args,words", [
    ("verify-off", ["--until", "removed", "--verify", "off"], "drop --verify off"),
    ("interval", ["--until", "removed", "--check-every", "50", "--max-steps", "10"], "larger than --max-steps 10"),
    ("outcome", ["--until", "gone"], "--until must be 'removed'"),
    ("zero", ["--until", "removed", "--check-every", "0"], "--check-every must be >= 1"),
])
def test_bad_until_settings_give_one_line_and_write_nothing(capsys, tmp_path, model_dir, data_file, case, args,
                                                            words):
    before = snapshot(model_dir)
    rc = main(["unlearn", "--model", str(model_dir), "--data", str(data_file), "--forget", "0", "--out",
               str(tmp_path / "u"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err
    assert not (tmp_path / "u").exists() and snapshot(model_dir) == before


def test_requests_until_removed_runs_one_loop_per_request(capsys, tmp_path, monkeypatch):
    """``--requests`` with ``--until removed``: each request runs its own loop against the images still in the data
    (an earlier request's images are neither reference images nor A's neighbours any more) and stops at its first
    confirmed check, with the weights of a fixed run of that many steps; its outcome is in its ledger line, and the
    first request not removed sets the exit status (3)."""
    import numpy as np

    import diffunlearn.commands.verify as command
    import diffunlearn.verification.core as core

    model = save_model(tiny_model(), tmp_path / "base")
    rng = torch.Generator().manual_seed(0)
    data = tmp_path / "d.npz"
    np.savez(data, images=(torch.rand((30, 8, 8), generator=rng) * 255).to(torch.uint8).numpy())
    (tmp_path / "two.txt").write_text("0,1\n2\n")
    (tmp_path / "one.txt").write_text("0,1\n")
    seen = []

    def fake_verify(after, view, idx, **k):  # removed at the first confirmation only (request 1's first check)
        seen.append((len(view), view.images[idx]))
        return _verified(Status.REMOVED if len(seen) == 1 else Status.NOT_REMOVED)

    monkeypatch.setattr(core, "targeted_seeds", lambda *a, **k: ({}, []))  # no search: every check confirms
    monkeypatch.setattr(core, "verify", fake_verify)
    monkeypatch.setattr(loop_mod, "quality_verdict", lambda m, v, label=None: {"status": "kept"})
    monkeypatch.setattr(command, "verify_run", lambda *a, **k: None)
    common = ["unlearn", "--model", str(model), "--data", str(data), "--method", "naive", "--batch-size", "4",
              "--threads", "1"]
    rc = main(common + ["--requests", str(tmp_path / "two.txt"), "--until", "removed", "--max-steps", "4",
                        "--check-every", "2", "--out", str(tmp_path / "loop")])
    assert rc == 3, capsys.readouterr().err
    first, second = [json.loads(line) for line in (tmp_path / "loop" / "ledger.jsonl").read_text().splitlines()]
    assert (first["until"]["outcome"], first["until"]["stopped_at"]) == ("removed", 2)
    assert second["until"]["outcome"] == "not removed" and [c["step"] for c in second["until"]["checks"]] == [2, 4]
    images = torch.as_tensor(np.load(data)["images"]).float() / 127.5 - 1
    assert seen[0][0] == 30 and torch.allclose(seen[0][1][:, 0], images[[0, 1]])
    assert seen[1][0] == 28 and torch.allclose(seen[1][1][:, 0], images[[2]])  # request 1's images are gone
    s = json.loads((tmp_path / "loop" / "summary.json").read_text())
    assert s["exit_status"] == 3 and [r["until"]["outcome"] for r in s["per_request"]] == ["removed", "not removed"]
    assert main(common + ["--requests", str(tmp_path / "one.txt"), "--steps", "2", "--verify", "off",
                          "--out", str(tmp_path / "fixed")]) == 0
    fixed = json.loads((tmp_path / "fixed" / "ledger.jsonl").read_text())
    assert first["model_after"] == fixed["model_after"]


@pytest.mark.parametrize("budget_hits_clean", [False, True])
def test_a_check_redraws_the_budget_search_hits_first_and_the_rest_only_when_those_are_clean(monkeypatch,
                                                                                            budget_hits_clean):
    """The gate: seeds of the budget's own search (below its ``search_seeds``) are drawn again first; the larger
    search's other hits only when none of those draws A, so a check while A is still drawn costs the budget's
    targeted test alone; a confirmation needs every hit clean."""
    import diffunlearn.verification.generation as generation

    lp, callback = _loop(monkeypatch, every=2, removed_at=2)
    lp.hits, lp.first = [3, 9, 600, 700], 2
    drawn = []

    def fake_draw(model, items, indices, *a, **k):
        drawn.append(list(indices))
        copy = not budget_hits_clean and indices[0] < TEST.search_seeds
        return np.full((len(indices), len(items)), 0.0 if copy else np.inf, dtype=np.float32), None

    monkeypatch.setattr(generation, "draw_distances", fake_draw)
    _run(2, callback)
    check = lp.checks[0]
    if budget_hits_clean:
        assert drawn == [[3, 9], [600, 700]] and check["targeted_drawn"] == 4 and lp.outcome == "removed"
    else:
        assert drawn == [[3, 9]] and check["targeted_drawn"] == 2 and check["targeted_still"] == 2
        assert lp.outcome == "not removed" and "verification" not in check


def test_the_loops_fresh_samples_lie_past_every_seed_its_gate_searched(monkeypatch):
    """A clean fresh block bounds the copy rate only if its seeds were never searched: with a gate of G seeds the
    confirmations and the run's final verification draw blocks that start at or past seed G."""
    lp, callback = _loop(monkeypatch, every=2)
    b, blocks = lp.budget, []
    monkeypatch.setattr("diffunlearn.verification.core.verify",
                        lambda *a, **k: (blocks.append(k["fresh_block"]), _verified(Status.NOT_REMOVED))[1])
    lp.gate_seeds, lp.fresh_from = 2048, loop_mod.fresh_blocks_after(b, 2048)
    _run(4, callback)
    assert blocks == [lp.fresh_from + 1, lp.fresh_from + 2]  # each confirmation its own block past the gate
    assert b.search_seeds + lp.fresh_from * b.samples >= 2048
    for gate in (b.search_seeds, b.search_seeds + 1, 2048, 5000):
        first = loop_mod.fresh_blocks_after(b, gate)
        assert b.search_seeds + first * b.samples >= gate  # the first seed of the first block
        assert first == 0 or b.search_seeds + (first - 1) * b.samples < gate  # and no block is skipped needlessly


def test_a_fixed_superfactor_keeps_the_scaling_norm_unmeasured(capsys):
    """unlearn's default measures SISS's scaling norm; a fixed --superfactor replaces norm-fixing, so nothing is
    measured; --max-steps without --until is an error that says what to pass."""
    import yaml

    assert main(["unlearn", "--model", "m", "--data", "d", "--out", "o", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["method"]["scaling_norm"] == "auto"
    assert main(["unlearn", "--model", "m", "--data", "d", "--out", "o", "--superfactor", "0.1", "--dry-run"]) == 0
    method = yaml.safe_load(capsys.readouterr().out)["method"]
    assert method["superfactor"] == 0.1 and method["scaling_norm"] != "auto"
    assert main(["unlearn", "--model", "m", "--data", "d", "--out", "o", "--max-steps", "50"]) == 2
    assert "--max-steps applies with --until removed" in capsys.readouterr().err
