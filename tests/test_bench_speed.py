"""``diffunlearn bench speed`` on a tiny random-weight UNet: every method is timed, ratios are to the plain step,
and the SISS row statistic behind the exact-form bound is a fraction that the bound turns into a cost."""

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
    rows = run_speed_bench(SpeedConfig(out=str(out), model="arch:tiny", batch_size=4, steps=2, rounds=2,
                                       memory=False, threads=1))
    assert set(rows) == set(VARIANTS)
    assert rows["plain (naive)"]["relative"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["n"] == 2 and r["seconds_per_step"] > 0 and r["iqr"][0] <= r["seconds_per_step"] <= r["iqr"][1]
        assert r["peak_mb"] is None
    saved = json.loads((out / "speed.json").read_text())
    assert 0.0 <= saved["siss_rows_w_a_positive"] <= 1.0
    assert saved["exact_split_bound"] == pytest.approx(exact_split_bound(saved["siss_rows_w_a_positive"]))
    assert "| siss |" in (out / "speed.md").read_text()


def test_bench_speed_refuses_a_run_without_timed_steps(tmp_path):
    with pytest.raises(UserError, match="warm-up"):
        run_speed_bench(SpeedConfig(out=str(tmp_path / "s"), model="arch:tiny", steps=1))
