"""Issue 11 soak test, short form: one pass over the awkward-input corpus plus reruns, in one process, through the
code of `pneumoct diagnose`. The 200-run form is `benchmarks/soak.py` (results in benchmarks/results/soak.json)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_soak_short(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    res = soak.soak(18, tmp_path, quiet=True)  # every case once, then three reruns into the same folders
    assert res["stray_temp_files"] == []
    assert res["stray_output_files"] == []
    assert res["consistent_outcomes"], res["outcomes"]
    first, last, most = res["open_fds_first_last_max"]
    assert last <= first + 1 and most <= first + 4  # no file handle leak
    assert res["outcomes"]["one_slice"] == ["refused:too_few_slices"]
    assert res["rss_mb_first_last"][1] - res["rss_mb_first_last"][0] < 400  # models and caches, not a leak
