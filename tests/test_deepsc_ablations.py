"""experiments/deepsc_ablations.py (issue 12, DeepSC-COVID Sec. V-E): each variant's config differs from the full
model's in exactly its one field, every config parses and builds, the data are synthetic phantoms only with the same
split everywhere, and a --quick run (tiny network and data, ~20 s on one thread) writes a JSON with all seven
variants scored on the same test cases. Says nothing about the models' quality."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

EXP = Path(__file__).resolve().parents[1] / "experiments"

EXPECTED = {
    "full": {},
    "no_inception": {"model.kwargs.inception": (True, False)},
    "no_cross_stitch": {"model.kwargs.cross_stitch": (True, False)},
    "lambda_ta_0": {"deepsc.lambda_ta": (10.0, 0.0)},
    "lambda_ta_1": {"deepsc.lambda_ta": (10.0, 1.0)},
    "lambda_ta_100": {"deepsc.lambda_ta": (10.0, 100.0)},
    "single_scale_ta": {"deepsc.multi_scale_ta": (True, False)},
}


@pytest.fixture(scope="module")
def mod():
    sys.path.insert(0, str(EXP))
    return importlib.import_module("deepsc_ablations")


@pytest.mark.parametrize("schedule", ["recorded", "quick"])
def test_each_variant_differs_in_exactly_its_field(mod, schedule):
    from pneumoct.models import build_model
    from pneumoct.train.config import parse_config

    sch = dict(mod.SCHEDULE, **(mod.QUICK if schedule == "quick" else {}))
    cfgs = mod.variant_configs(sch)
    assert list(cfgs) == list(EXPECTED)
    full = cfgs["full"]
    # the full model is the paper's best setting
    assert full["model"]["kwargs"]["inception"] is True and full["model"]["kwargs"]["cross_stitch"] is True
    assert full["deepsc"]["lambda_ta"] == 10.0 and full["deepsc"]["multi_scale_ta"] is True
    # synthetic phantoms only, disjoint seeds, shortened schedule
    d = full["deepsc"]
    assert d["real_ctmd"] == []
    assert d["phantoms"]["seed"] != d["val_phantoms"]["seed"] and sch["test_seed"] not in (
        d["phantoms"]["seed"], d["val_phantoms"]["seed"])
    assert full["train"]["threads"] == 1
    for key, raw in cfgs.items():
        diff = mod.config_diff(full, raw)
        assert {k: tuple(v) for k, v in diff.items()} == EXPECTED[key], key
        cfg = parse_config(raw, mod.ROOT)  # what train_from_config gets
        assert cfg.task == "deepsc" and cfg.deepsc["real_ctmd"] == []
        if schedule == "quick":  # cheap to build; the recorded widths are built by tests/test_deepsc.py
            net = build_model(cfg.model.name, **cfg.model.kwargs)
            assert net.cross.enabled is raw["model"]["kwargs"]["cross_stitch"]
            assert (type(net.inc_seg).__name__ == "Inception3d") is raw["model"]["kwargs"]["inception"]


def test_variant_table_matches_the_paper_ablations(mod):
    fields = {f for _, _, f, _ in mod.VARIANTS}
    assert fields == {None, "model.kwargs.inception", "model.kwargs.cross_stitch", "deepsc.lambda_ta",
                      "deepsc.multi_scale_ta"}
    assert sorted(v for _, _, f, v in mod.VARIANTS if f == "deepsc.lambda_ta") == [0.0, 1.0, 100.0]


def test_quick_run_writes_all_seven_variants(mod, tmp_path):
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "abl.json"
        md = mod.ROOT / "experiments" / "RESULTS.md"
        before = md.read_text() if md.exists() else None
        assert mod.main(["--quick", "--work", str(tmp_path / "runs"), "--out", str(out)]) == 0
        assert mod.main(["--from-json", str(out)]) == 0  # re-rendering a report trains nothing
        assert (md.read_text() if md.exists() else None) == before  # a smoke run never touches RESULTS.md
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert list(res["variants"]) == list(EXPECTED)
    assert res["quick"] is True and "SYNTHETIC" in res["data"]["kind"]
    n = len(res["data"]["test"]["case_ids"])
    for key, row in res["variants"].items():
        t = row["test"]
        assert t["n"] == n
        for m in ("accuracy", "macro_auc", "abnormal_auc", "lesion_dice"):
            est = t[m]["estimate"]
            assert est is None or 0.0 <= est <= 1.0, (key, m)
            if key == "full":
                assert "vs_full" not in t[m]
            else:
                assert "p_value" in t[m]["vs_full"]
        assert (tmp_path / "runs" / key / "DONE").is_file()
        assert len(row["per_case"]["probs"]) == n
    assert "deepsc_ablations" in mod.report(res) and "not clinical accuracy" in mod.report(res)
