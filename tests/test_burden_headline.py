"""The validated headline: lesion-burden calibration (pneumoct.burden) and the patient block (pneumoct.headline)."""
from __future__ import annotations

import numpy as np
import pytest

from pneumoct.burden import apply_calibration, fit_calibration, slab_table, slice_probability
from pneumoct.errors import PneumoctInputError
from pneumoct.headline import patient_block


def _study(rng, n=100, lesion_slices=(), area=400.0, noise=5.0):
    lab = np.zeros(n, np.int64)
    les = np.abs(rng.normal(0, noise, n))
    for z in lesion_slices:
        lab[z] = 1
        les[z] = area * rng.uniform(0.5, 1.5)
    return {"lesion_area_mm2": les, "lung_area_mm2": np.full(n, 20000.0), "slice_mm": 2.0, "slice_labels": lab}


def test_slab_table_cuts_40mm_slabs_and_labels_them():
    area = np.zeros(50)
    area[10:14] = 1000.0  # 4 slices x 1000 mm2 x 2 mm = 8 mL
    lab = np.zeros(50, int)
    lab[10:14] = 1
    slabs = slab_table(area, 2.0, np.ones(50), lab)
    assert [(s["z0"], s["z1"]) for s in slabs] == [(0, 20), (20, 40), (40, 50)]
    assert slabs[0]["lesion_ml"] == pytest.approx(8.0) and slabs[0]["label"] == 1
    assert slabs[1]["label"] == -1 and slabs[1]["lesion_ml"] == 0.0  # beside marked disease: not a negative
    assert slabs[2]["label"] == 0


def test_calibration_separates_a_learnable_burden_and_is_monotone():
    rng = np.random.default_rng(0)
    studies = [_study(rng, lesion_slices=range(30, 60)), _study(rng, lesion_slices=range(70, 80)), _study(rng)]
    cal = fit_calibration(studies, n_boot=50)
    assert cal["slab"]["w_log1p_lesion_ml"] > 0 and cal["slice"]["w_log1p_area_mm2"] > 0
    sick = apply_calibration(cal, _study(rng, lesion_slices=range(40, 55))["lesion_area_mm2"], np.full(100, 2e4), 2.0)
    healthy = apply_calibration(cal, _study(rng)["lesion_area_mm2"], np.full(100, 2e4), 2.0)
    assert sick["abnormal_probability"] > 0.8 > 0.2 > healthy["abnormal_probability"]
    lo, hi = sick["interval_90"]
    assert lo <= sick["abnormal_probability"] <= hi or abs(lo - hi) < 1e-6
    p = slice_probability(cal, np.array([0.0, 10.0, 100.0, 1000.0]))
    assert np.all(np.diff(p) > 0)  # more lesion area, higher probability


def test_no_lung_gives_zero():
    rng = np.random.default_rng(1)
    cal = fit_calibration([_study(rng, lesion_slices=range(30, 60)), _study(rng)], n_boot=5)
    out = apply_calibration(cal, np.zeros(10), np.zeros(10), 2.0)
    assert out["abnormal_probability"] == 0.0 and out["slabs"] == []


def _q(in_lung_ml, level=1):
    return {"lesion_volume_in_lung_ml": {"total": in_lung_ml}, "severity": {"mosmed_level": level}}


def _rule(abn):
    return {"label": "covid19" if abn > 0.5 else "healthy", "abnormal_probability": abn, "model": {"name": "rule"},
            "probabilities": {"healthy": 1 - abn, "covid19": abn * 0.6, "other_viral": abn * 0.1, "cap": abn * 0.3}}


def _burden(p):
    return {"abnormal_probability": p, "interval_90": [max(0, p - 0.1), min(1, p + 0.1)],
            "max_slab": {"z0": 0, "z1": 20, "lesion_ml": 5.0}, "slab_ml_at_half": 3.0, "slabs": [{}]}


def test_headline_from_burden_takes_the_rsna_class_and_flags_contradictions():
    diff = {"category": "atypical", "label": "Atypical appearance", "suggested_class": "cap", "rule": "A1"}
    out = patient_block(mode="auto", q=_q(50.0), rule=_rule(0.9), differential=diff, burden=_burden(0.9),
                        cal={"candidate": "seg_v2"}, m3lung=None)
    assert out["headline_source"] == "burden" and out["label"] == "cap" and out["abnormal_probability"] == 0.9
    assert abs(sum(out["probabilities"].values()) - 1.0) < 1e-3
    assert out["consistency"] == []
    # "healthy" with 25 mL of lesion in the lungs: said in the headline box
    out = patient_block(mode="auto", q=_q(25.0), rule=_rule(0.9), differential={"suggested_class": "healthy"},
                        burden=_burden(0.2), cal={}, m3lung=_rule(0.99))
    codes = {c["code"] for c in out["consistency"]}
    assert out["label"] == "healthy" and "headline_vs_lesion_volume" in codes and "methods_disagree" in codes
    assert "do not all agree" in out["headline"]
    assert out["research_panel"]["m3lung_patient"]["abnormal_probability"] == 0.99


def test_indeterminate_pattern_uses_the_rule_class_and_says_so():
    out = patient_block(mode="burden", q=_q(40.0), rule=_rule(0.9), differential={"suggested_class": None},
                        burden=_burden(0.95), cal={}, m3lung=None)
    assert out["label"] == "covid19" and "rule" in out["label_basis"]


def test_headline_switch_needs_what_it_names():
    with pytest.raises(PneumoctInputError):
        patient_block(mode="burden", q=_q(0), rule=_rule(0.1), differential={}, burden=None, cal=None, m3lung=None)
    with pytest.raises(PneumoctInputError):
        patient_block(mode="m3lung_patient", q=_q(0), rule=_rule(0.1), differential={}, burden=None, cal=None,
                      m3lung=None)
    out = patient_block(mode="auto", q=_q(0, level=0), rule=_rule(0.1), differential={}, burden=None, cal=None,
                        m3lung=None)
    assert out["headline_source"] == "rule"
