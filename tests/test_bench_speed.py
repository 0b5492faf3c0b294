"""``diffunlearn bench speed`` on a tiny random-weight UNet: every method is timed, ratios are to the plain step,
and the SISS row statistic behind the exact-form bound is a fraction that the bound turns into a cost. FLOPs per
step follow from each method's passes (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from diffunlearn.bench.speed import VARIANTS, SpeedConfig, exact_split_bound, run_speed_bench
from diffunlearn.errors import UserError


def test_exact_split_bound():
    """(forward + plain backward + extra backward over a fraction f of the rows) / (forward + backward), with a
    backward costing two forwards: f = 0 is a plain step, f = 1 two full backward passes (5/3)."""
    assert exact_split_bound(0.0) == 1.0
    assert exact_split_bound(1.0) == pytest.approx(5 / 3)
    assert exact_split_bound(0.8) == pytest.approx(1 + 1.6 / 3)


def test_bench_speed_times_every_method_against_the_plain_step(tmp_path):
    out = tmp_path / "speed"
    rows = run_speed_bench(SpeedConfig(out=str(out), model="arch:tiny", batch_size=4, steps=3, rounds=2,
                                       memory=False, threads=1, matmul_size=128))
    assert set(rows) == set(VARIANTS)
    assert rows["plain (naive)"]["relative"] == pytest.approx(1.0)
    saved = json.loads((out / "speed.json").read_text())
    for r in rows.values():
        assert r["n"] == 4 and r["seconds_per_step"] > 0 and r["iqr"][0] <= r["seconds_per_step"] <= r["iqr"][1]
        # 4 sorted times x0..x3: mean >= (x0 + 3 x1) / 4, the lower quartile (linear interpolation), up to rounding
        assert r["iqr"][0] <= r["mean"] * (1 + 1e-9) and r["mean"] <= r["slowest"]
        assert r["seconds_per_step"] <= r["slowest"]
        assert r["gflops"] == pytest.approx(r["gflop_per_step"] / r["seconds_per_step"])
        assert r["share_of_attainable"] == pytest.approx(r["gflops"] / saved["attainable_gflops"])
        assert r["peak_mb"] is None
    assert saved["attainable_gflops"] == max(saved["matmul_gflops_before_after"]) > 0
    assert 0.0 <= saved["siss_rows_w_a_positive"] <= 1.0
    assert saved["exact_split_bound"] == pytest.approx(exact_split_bound(saved["siss_rows_w_a_positive"]))
    table = (out / "speed.md").read_text()
    assert "| siss |" in table and "| mean | slowest |" in table and "GFLOP/s | of attainable |" in table


def test_flops_per_step_follow_the_passes_each_method_takes():
    """Every pass has the same shapes, so a step's FLOPs are a sum of whole passes: F (forward) and B (backward) over
    the batch. Plain fine-tuning, NegGrad, SISS with a fixed superfactor and a norm-refresh step that reuses the
    last norm take F + B; exact norm-fixed SISS F + 2B (G_a, then the combined loss); SISS (No IS) 2F + 3B (two
    forwards; G_a through one graph, the combined loss through both) = plain + SISS; EraseDiff two inner steps and
    an outer step over two graphs, 4 (F + B); EraseDiff-light (two separate gradients) and ReTrack (one pass over
    twice the rows) 2 (F + B). And B > F, so an exact SISS step costs more than 1.5 plain steps."""
    from conftest import random_sets, tiny_model
    from diffunlearn.bench.speed import step_flops

    model, (kept, forget) = tiny_model(), random_sets()
    cfg = SpeedConfig(batch_size=4, steps=2)
    f = {label: step_flops(model, kept, forget, label, cfg) for label in VARIANTS}
    plain = f["plain (naive)"]
    assert plain > 0
    assert f["neggrad"] == f["siss superfactor (1 backward, exact)"] == f["siss norm-refresh 10 (approx.)"] == plain
    assert 1.5 * plain < f["siss"] < 2 * plain
    assert f["siss-nois"] == plain + f["siss"]
    assert f["erasediff"] == 4 * plain
    assert f["erasediff-light"] == f["retrack"] == 2 * plain


def test_bench_speed_refuses_a_run_without_timed_steps(tmp_path):
    with pytest.raises(UserError, match="warm-up"):
        run_speed_bench(SpeedConfig(out=str(tmp_path / "s"), model="arch:tiny", steps=1))
