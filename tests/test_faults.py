"""The fault-injection suite (``diffunlearn faults``) under pytest: each bad input gives one ``error:`` line, exit
status 2 and no change on disk; runs killed with SIGKILL at random steps resume to the uninterrupted weights."""

import pytest

from diffunlearn.faults import (
    FAULTS,
    MID_RUN,
    check_fault,
    fail_and_resume_trial,
    kill_and_resume_trial,
    requests_kill_and_resume_trial,
)


def test_there_are_at_least_fifteen_cases():
    assert len(FAULTS) >= 15


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_bad_input_is_one_line_nonzero_and_changes_nothing(fault, tmp_path):
    assert check_fault(fault, tmp_path) is None


def test_sigkill_at_random_steps_then_resume_gives_bitwise_the_same_model(tmp_path):
    """The checkpoint is written atomically (temporary file, fsync, rename) and holds weights, AdamW state and the
    sampler's generator, so a run killed at any point resumes to exactly the uninterrupted run's weights."""
    for seed in range(3):
        assert kill_and_resume_trial(tmp_path, seed) is None


@pytest.mark.parametrize("kind", list(MID_RUN))
def test_a_failure_mid_run_keeps_the_last_good_step_and_resume_finishes_bitwise(kind, tmp_path):
    """A bad file, an exception inside the method, or a full disk at a random step after the first: one line naming
    the cause and --resume, a checkpoint of the last good step, no model directory; with the cause undone, --resume
    ends with exactly the weights of a run that never failed."""
    assert fail_and_resume_trial(tmp_path, kind, seed=0) is None


def test_the_reference_lists_every_case_as_the_suite_runs_it(capsys):
    """docs/reference.md holds the table ``diffunlearn faults --markdown`` prints, so the documented cases are the
    ones the suite runs."""
    from pathlib import Path

    from diffunlearn.faults import run_faults

    run_faults(markdown=True)
    table = capsys.readouterr().out.strip()
    assert table in (Path(__file__).parents[1] / "docs" / "reference.md").read_text()


def test_deletion_requests_killed_at_a_random_point_resume_to_the_same_model_and_ledger(tmp_path):
    """``unlearn --requests --resume`` continues after the last finished request: killed inside a request (which
    runs again from its start) or between saving a request's model and appending its ledger line (which the copy
    of the ledger inside the model completes), it ends with the uninterrupted run's weights bit for bit and the
    same chain of removed images and model hashes."""
    assert requests_kill_and_resume_trial(tmp_path, seed=1) is None


def test_an_until_removed_run_killed_at_a_random_point_resumes_to_the_same_model_and_decisions(tmp_path):
    """``unlearn --until removed --resume`` after a SIGKILL (mostly inside a check: the checks are most of the
    run's time) ends with the uninterrupted run's weights bit for bit and the same checks, decisions and outcome."""
    from diffunlearn.faults import until_kill_and_resume_trial

    assert until_kill_and_resume_trial(tmp_path, seed=0) is None
