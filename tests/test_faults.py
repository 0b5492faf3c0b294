"""The fault-injection suite (``diffunlearn faults``) under pytest: each bad input gives one ``error:`` line, exit
status 2 and no change on disk; runs killed with SIGKILL at random steps resume to the uninterrupted weights."""

import pytest

from diffunlearn.faults import FAULTS, check_fault, kill_and_resume_trial


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
