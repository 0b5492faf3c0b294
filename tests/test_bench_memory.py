"""``diffunlearn bench memory``: its images are deterministic and its peak-memory measure is per run."""

from __future__ import annotations

import sys

import pytest

from diffunlearn.bench.memory import MemoryBenchConfig, measure, write_folders
from diffunlearn.errors import UserError


def test_folders_are_deterministic_and_nested(tmp_path):
    """The smaller folder holds the first files of the larger; writing again gives the same bytes."""
    a = write_folders(tmp_path / "a", [3, 5], 16, seed=0)
    b = write_folders(tmp_path / "b", [3, 5], 16, seed=0)
    assert sorted(p.name for p in a[3].iterdir()) == sorted(p.name for p in a[5].iterdir())[:3]
    for n in (3, 5):
        assert [p.read_bytes() for p in sorted(a[n].iterdir())] == [p.read_bytes() for p in sorted(b[n].iterdir())]
    assert len({p.read_bytes() for p in a[5].iterdir()}) == 5


def test_the_peak_is_measured_per_run_not_carried_over(tmp_path):
    """Each measurement is a fresh wrapper process, so a small run after a large one reports its own, smaller peak
    (``RUSAGE_CHILDREN`` of one process would report the larger one for both)."""
    def allocate(mb):
        return [sys.executable, "-c", f"import numpy as np; a = np.ones({mb} * 2 ** 20 // 8); print(a.sum())"]

    big, small = measure(allocate(300)), measure(allocate(10))
    assert big["peak_rss_mb"] >= 300 and small["peak_rss_mb"] < big["peak_rss_mb"] - 200
    with pytest.raises(UserError, match="exit 3"):
        measure([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_bad_settings_are_refused():
    for kw in ({"sizes": "1000,x"}, {"sizes": "1"}, {"image_size": 20}, {"steps": 0}):
        with pytest.raises(UserError):
            MemoryBenchConfig(**kw).validate()
    assert MemoryBenchConfig(sizes="4000, 1000").size_list() == [1000, 4000]
