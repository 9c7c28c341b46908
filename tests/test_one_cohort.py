"""experiments/one_cohort.py (issue 12: every 2D / 3D system on one held-out synthetic cohort): the scoring and table
functions on small fabricated per-case outputs (which system takes part in which task, AUC / accuracy with ordered
bootstrap bounds, paired tests against the reference only), the test-seed disjointness check, the DS weights
folder and the report. Fast (no training, no phantoms); says nothing about any model's quality."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"
CLASSES = ("healthy", "covid19", "other_viral", "cap")


@pytest.fixture(scope="module")
def mod():
    sys.path.insert(0, str(EXP))
    return importlib.import_module("one_cohort")


def _rows(per_class: int = 4, seed: int = 0) -> list[dict]:
    """Fabricated rows shaped as ``volumetric_compare.case_row`` writes them."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(per_class):
        for c in CLASSES:
            noisy = rng.dirichlet(np.ones(4))
            perfect = {k: (0.7 if k == c else 0.1) for k in CLASSES}
            p_cov = 0.9 if c == "covid19" else 0.2
            rows.append({
                "case": f"{c}_{i}", "label": c,
                "headline": {"abnormal": 0.1 if c == "healthy" else 0.8},          # perfect abnormal ranking
                "m3lung": dict(zip(CLASSES, noisy.tolist())),                      # 4-class, noisy (reference)
                "oracle": perfect,                                                 # 4-class, perfect
                "flat": {k: 0.25 for k in CLASSES},                                # 4-class, constant
                "dual/att_us": {"covid19": p_cov, "cap": 1 - p_cov},               # no healthy class
                "dual-sampling": "not installed (FileNotFoundError: x)",           # did not run
            })
    return rows


SYSTEMS = ["headline", "m3lung", "oracle", "flat", "dual/att_us", "dual-sampling"]


def test_score_rows_every_task_and_system(mod):
    res = mod.score_rows(_rows(), SYSTEMS, n_boot=200)
    assert set(res) == {"abnormal_vs_healthy", "covid19_vs_other_pneumonia", "covid19_vs_cap",
                        "four_class_accuracy"}
    # who takes part where: the headline has only an abnormal score, the dual network no healthy class,
    # a system that did not run nowhere, 4-class accuracy only for systems with all four classes
    assert set(res["abnormal_vs_healthy"]) == {"headline", "m3lung", "oracle", "flat"}
    assert set(res["covid19_vs_other_pneumonia"]) == {"m3lung", "oracle", "flat", "dual/att_us"}
    assert set(res["covid19_vs_cap"]) == {"m3lung", "oracle", "flat", "dual/att_us"}
    assert set(res["four_class_accuracy"]) == {"m3lung", "oracle", "flat"}
    # case counts of each task (4 per class)
    assert res["abnormal_vs_healthy"]["oracle"]["n"] == 16
    assert res["covid19_vs_other_pneumonia"]["oracle"]["n"] == 12
    assert res["covid19_vs_cap"]["oracle"]["n"] == 8 and res["covid19_vs_cap"]["oracle"]["n_pos"] == 4
    for task, per in res.items():
        for s, e in per.items():
            assert e["low"] <= e["estimate"] <= e["high"], (task, s, e)
            if s == "m3lung":
                assert "paired_vs_ref" not in e
            else:
                pv = e["paired_vs_ref"]
                assert 0.0 <= pv["p_value"] <= 1.0
                assert pv["difference"] == pytest.approx(e["estimate"] - per["m3lung"]["estimate"])
    assert res["abnormal_vs_healthy"]["headline"]["estimate"] == 1.0
    assert res["covid19_vs_cap"]["dual/att_us"]["estimate"] == 1.0
    assert res["covid19_vs_cap"]["flat"]["estimate"] == 0.5          # constant scores: ties count one half
    assert res["four_class_accuracy"]["oracle"]["estimate"] == 1.0
    assert res["four_class_accuracy"]["flat"]["estimate"] == 0.25     # argmax of a tie: always the first class


def test_seed_check(mod):
    from pneumoct.synth.writer import case_seed

    train = mod.training_seeds()
    test = {case_seed(7301, k) for k in range(40)}  # the held-out cohort up to 10 per class
    rep = mod.check_disjoint(test, train)
    assert all(v["overlap"] == 0 and v["n"] > 0 for v in rep.values())
    # every trained variant and the bundled models are checked
    assert {k.split(" ")[0] for k in rep} >= {*(f"deepsc/{k}" for k, *_ in mod.dsa.VARIANTS),
                                              "dual/rn34_us", "dual/att_us", "dual/att_ss", "bundled"}
    assert rep["deepsc/full train (seed 1000)"]["n"] == 24 and rep["deepsc/full validation (seed 2000)"]["n"] == 8
    assert rep["dual/att_ss train + validation (seed 7000)"]["n"] == 160  # 4 chunks, 80 per class in all
    leaked = {next(iter(train["deepsc/no_inception validation (seed 2000)"]))}
    with pytest.raises(RuntimeError, match="overlap"):
        mod.check_disjoint(test | leaked, train)


def test_ds_folder_links_the_trained_networks(mod, tmp_path):
    from pneumoct.models.dual_sampling_system import resolve_weights

    for run in ("att_us", "att_ss"):
        (tmp_path / "dual" / run / "best").mkdir(parents=True)
        (tmp_path / "dual" / run / "best" / "model.json").write_text("{}")
    d = mod.ds_folder(tmp_path)
    assert resolve_weights(d) == d  # what run_system("dual-sampling", weights_dir=d) finds
    assert (d / "us").resolve() == (tmp_path / "dual" / "att_us" / "best").resolve()
    assert (d / "ss").resolve() == (tmp_path / "dual" / "att_ss" / "best").resolve()
    mod.ds_folder(tmp_path)  # idempotent


def test_report_has_every_system_and_the_caveats(mod):
    keys = list(mod.systems())
    rows = _rows(2)
    for r in rows:  # every system present in the rows, with the reference
        for k in keys:
            r.setdefault(k, r["oracle"])
    tasks = mod.score_rows(rows, keys, n_boot=50)
    res = {"data": {"test": {"seed": 7301, "per_class": 2, "n": 8, "matrix": 256, "n_slices": 48,
                             "difficulty": 0.3},
                    "seed_check": {"x": {"n": 3, "overlap": 0}}},
           "systems": mod.systems(), "reference": "m3lung", "tasks": tasks, "n_boot": 50,
           "training": {"deepsc/full": {"seconds": 60, "epochs": [8, 4], "best_epoch": 8, "best_stage": 2,
                                        "best_val_auc": 0.7}},
           "schedules": {"deepsc": {"pretrain_lr": 0.005, "finetune_lr": 0.001, "batch_size": 1},
                         "dual": {"epochs": 10}},
           "date": "2026-12-03", "machine": "test", "score_seconds": 1.0, "quick": True}
    text = mod.report(res)
    assert "SYNTHETIC" in text and "not clinical accuracy" in text
    assert "no correction for multiple comparisons" in text
    for k in keys:
        assert f"(`{k}`)" in text
    assert "**10 epochs**" in text  # from the record, not the default
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and "(`" in ln]
    assert len(table) == len(keys)
