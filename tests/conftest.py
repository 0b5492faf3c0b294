"""Shared fixtures: tiny random-weight diffusers models and small data sets built in code (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffunlearn.model import DiffusionModel, build_scheduler, build_unet, save_model

torch.set_num_threads(1)  # tiny models gain nothing from threads, and oversubscribed threads stall


def tiny_model(seed: int = 0, size: int = 8, channels: int = 1, timesteps: int = 1000) -> DiffusionModel:
    torch.manual_seed(seed)
    return DiffusionModel(build_unet("tiny", size, channels), build_scheduler(timesteps))


def random_sets(n_kept: int = 24, n_forget: int = 3, size: int = 8, channels: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand((n_kept, channels, size, size), generator=g) * 2 - 1
    forget = torch.rand((n_forget, channels, size, size), generator=g) * 2 - 1
    return kept, forget


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    """Latent and .npz caches go to a temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv("DIFFUNLEARN_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def model() -> DiffusionModel:
    return tiny_model()


@pytest.fixture
def sets():
    return random_sets()


@pytest.fixture
def model_dir(tmp_path):
    return save_model(tiny_model(), tmp_path / "base")


@pytest.fixture
def data_file(tmp_path):
    """30 random 8x8 uint8 images as an .npz with names img-00..img-29."""
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, images=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8),
             names=np.array([f"img-{i:02d}" for i in range(30)]))
    return path


def snapshot(path) -> dict:
    """Every file under ``path`` with its bytes: to show that nothing on disk changed."""
    from pathlib import Path

    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

#: tests that take 2 s or more on these machines (measured with ``pytest --durations=0`` at one thread, summed over a
#: test's parameters), marked ``slow``: ``pytest -m "not slow"`` is the fast tier of a change's inner loop; CI and
#: the README's command run everything. A new test that takes seconds belongs here.
SLOW = {
    "test_faults.py::test_deletion_requests_killed_at_a_random_point_resume_to_the_same_model_and_ledger",
    "test_faults.py::test_an_until_removed_run_killed_at_a_random_point_resumes_to_the_same_model_and_decisions",
    "test_until.py::test_requests_until_removed_runs_one_loop_per_request",
    "test_harness.py::test_no_import_circles_between_files_or_between_folders",
    "test_latent.py::test_sequential_requests_on_a_latent_model_train_on_latents_like_a_single_request",
    "test_classcond.py::test_deletion_requests_on_a_class_conditional_model_condition_every_row_on_its_label",
    "test_api.py::test_readme_api_example",
    "test_bench_instance.py::test_bench_table_strip_reference_and_resume",
    "test_bench_instance.py::test_retrain_row_uses_the_shipped_recipe",
    "test_bench_prompt.py::test_bench_prompt_end_to_end_writes_table_json_and_plot",
    "test_bench_scale.py::test_a_row_runs_in_a_child_process_with_units_flops_and_peak_memory",
    "test_bench_scale.py::test_quick_mode_runs_every_row_end_to_end",
    "test_bench_speed.py::test_bench_speed_times_every_method_against_the_plain_step",
    "test_bench_speed.py::test_flops_per_step_follow_the_passes_each_method_takes",
    "test_classcond.py::test_bench_class_unconditional_smoke_and_resume",
    "test_classcond.py::test_class_conditional_round_trip_through_the_commands",
    "test_classcond.py::test_class_protocol_measures_each_class_on_its_own_samples",
    "test_classcond.py::test_every_method_conditions_on_each_rows_label",
    "test_cli.py::test_a_new_method_is_one_class_and_one_registry_line",
    "test_cli.py::test_scaling_norm_auto_is_the_papers_rule_measured_at_the_input_model",
    "test_cli.py::test_unlearn_writes_a_complete_run_directory",
    "test_distributed.py::test_two_processes_equal_one_at_the_same_global_batch",
    "test_faults.py::test_a_failure_mid_run_keeps_the_last_good_step_and_resume_finishes_bitwise",
    "test_faults.py::test_sigkill_at_random_steps_then_resume_gives_bitwise_the_same_model",
    "test_golden.py::test_nll_reproduces_its_golden_number",
    "test_golden.py::test_the_preset_command_reproduces_its_golden_numbers",
    "test_golden.py::test_unlearning_runs_reproduce_their_golden_numbers",
    "test_instance.py::test_a_request_interrupted_part_way_resumes_from_its_checkpoint_to_the_uninterrupted_weights",
    "test_instance.py::test_a_run_killed_mid_request_leaves_whole_chained_lines",
    "test_instance.py::test_tampered_or_truncated_ledger_fails_verification",
    "test_instance.py::test_three_requests_write_a_chained_ledger_that_ends_at_the_saved_model",
    "test_latent.py::test_load_unlearn_save_reload_sample",
    "test_latent.py::test_verify_takes_latent_measures_in_latent_space_and_compares_decoded_pixels",
    "test_methods.py::test_erasediff_step_equals_the_released_algorithm_written_out",
    "test_methods.py::test_siss_terms_are_unbiased_for_naive_deletion_and_neggrad",
    "test_metrics.py::test_nll_traced_network_and_shared_forward_give_the_eager_numbers",
    "test_mnist_pipeline.py::test_bench_writes_table_plots_and_resumes",
    "test_mnist_pipeline.py::test_curve_track_follows_the_base_models_tshirt_samples_to_the_final_count",
    "test_mnist_pipeline.py::test_demo_runs_leaves_the_shipped_model_untouched_and_reuses_its_stored_evaluation_only_when_exact",
    "test_mnist_pipeline.py::test_eval_writes_metrics_with_intervals",
    "test_mnist_pipeline.py::test_look_rebuilds_a_cell_and_draws_exactly_the_samples_it_counted",
    "test_prompt.py::test_prompt_verification_certifies_only_a_deletion_that_acts",
    "test_prompt.py::test_verify_takes_a_prompt_deletion_of_a_stable_diffusion_model",
    "test_prompt.py::test_whole_path_build_unlearn_save_reload_score_detect",
    "test_report.py::test_report_is_self_contained_and_complete",
    "test_report.py::test_sequential_requests_report_their_ledger_and_a_run_without_verification_still_renders",
    "test_stream.py::test_each_step_decodes_exactly_the_rows_it_drew_and_matches_memory",
    "test_toy.py::test_toy_bench_quick_end_to_end",
    "test_until.py::test_until_removed_end_to_end_exits_3_when_not_removed",
    "test_verify.py::test_each_fresh_block_draws_seeds_no_other_block_or_the_search_drew",
    "test_verify.py::test_relearning_audit_reports_recovered_fractions",
    "test_verify.py::test_unlearn_writes_verification_and_report",
    "test_verify.py::test_verify_command_writes_json_and_report",
    "test_verify.py::test_verify_on_tiny_models_measures_every_model_the_same_way",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{item.path.name}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)
