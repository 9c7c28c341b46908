"""Smoke test of the ablation experiments (experiments/m3lung_ablations.py, experiments/hu_scales.py): each core
function runs end to end on a tiny in-memory phantom cohort (8 phantoms, 2 epochs) and returns a full table of
numbers in [0, 1]. Says nothing about the models' quality."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

EXP = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def tables():
    sys.path.insert(0, str(EXP))
    import common

    torch.set_num_threads(1)
    return common.tiny_tables(n=8, size=32, matrix=64, n_slices=16)


def _check(rows, expected_names):
    assert [r["name"] for r in rows] == expected_names
    for r in rows:
        assert r["metrics"], r["name"]
        for key, stat in r["metrics"].items():
            if stat is None:  # e.g. an AUC undefined on a tiny test set
                continue
            for v in (stat["mean"], stat["min"], stat["max"]):
                assert 0.0 <= v <= 1.0, (r["name"], key, v)
        assert r["metrics"].get("accuracy", r["metrics"].get("slice.accuracy")) is not None


def test_m3lung_ablation_smoke(tables, tmp_path):
    mod = importlib.import_module("m3lung_ablations")
    train, test = tables
    res = mod.run_m3lung_ablation(train, test, {"epochs": 2, "max_batches": 2, "batch_size": 8, "seeds": [0],
                                                "patient_epochs": 2, "out_root": str(tmp_path / "m3")})
    _check(res["table_v"], [v[0] for v in mod.SLICE_VARIANTS])
    _check(res["table_iv"], list(res["per_seed"]["table_iv"]))
    assert len(res["table_iv"]) == 2 + len(mod.PATIENT_HEADS)
    assert "m3lung-ablation" not in mod.markdown(res, None, 1.0)  # markdown renders without the cohort info
    assert "not comparable" in mod.markdown(res, None, 1.0)


def test_hu_scales_smoke(tables, tmp_path):
    mod = importlib.import_module("hu_scales")
    train, test = tables
    res = mod.run_hu_scales(train, test, {"epochs": 2, "max_batches": 2, "batch_size": 8, "seeds": [0],
                                          "model": "multiscale_cam_tiny", "out_root": str(tmp_path / "hu")})
    _check(res["rows"], [v[0] for v in mod.VARIANTS])
    assert "Conv5" in mod.markdown(res, None, 1.0)


@pytest.mark.parametrize("variant", ["hybrid", "pseudo"])
def test_loso_fold_config_leaves_the_study_out_of_every_real_table(variant):
    """A leave-one-study-out fold of the segmenter experiments must not see the held-out study through the hybrid
    table nor through the pseudo-label table (seg_v2 / seg_v3 in docs/validation.md); the config still parses."""
    sys.path.insert(0, str(EXP))
    import lesion_seg_hybrid as L

    from pneumoct.train.config import parse_config

    for fold in ("covid", "cap", "normal"):
        raw = L.fold_config(fold, variant)
        real = [t for t in raw["data"]["tables"] if t["kind"] in ("covid_ct_md_hybrid", "covid_ct_md_pseudo")]
        assert real and all(fold not in t["studies"] and t["studies"] for t in real), (fold, real)
        assert raw["name"] == f"lesion_seg_{variant}_loso_{fold}"
        assert variant != "pseudo" or any(t["kind"] == "covid_ct_md_pseudo" for t in real)
        parse_config(raw, base_dir=EXP.parent)
    assert L.run_dir("full", variant).name == f"lesion_seg_{variant}_cpu"
