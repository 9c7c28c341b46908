"""Tests for pneumoct.quantify.rsna: the RSNA consensus category suggestion on hand-built geometry.

Masks are tiny label arrays run through the real ``pneumoct.quantify.quantify()``; a few tests use a hand-written
quantify-like dict so that every feature value can be checked against what was put in.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pneumoct.quantify import quantify
from pneumoct.quantify import rsna
from pneumoct.quantify.rsna import rsna_category
from pneumoct.types import LESION_CONSOLIDATION, LESION_GGO, LUNG_LEFT, LUNG_RIGHT

# spacing (z, y, x) = (2.5, 1.5, 1.5) mm -> voxel 5.625 mm^3; 1 mL = 177.8 voxels
SP = (2.5, 1.5, 1.5)
SHAPE = (40, 64, 100)
# right lung z 2..38, y 4..60, x 4..46; left lung x 54..96. Zones (thirds of 36 slices): upper 2..14, middle 14..26,
# lower 26..38. The peripheral band (sigma 10 mm) is 6.7 pixels deep in-plane.


def lungs() -> np.ndarray:
    lung = np.zeros(SHAPE, np.uint8)
    lung[2:38, 4:60, 4:46] = LUNG_RIGHT
    lung[2:38, 4:60, 54:96] = LUNG_LEFT
    return lung


def hu_for(les: np.ndarray) -> np.ndarray:
    hu = np.full(SHAPE, -850, np.int16)
    hu[les == LESION_GGO] = -600
    hu[les == LESION_CONSOLIDATION] = 20
    return hu


def sphere(centre_vox, radius_mm) -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return (((z - centre_vox[0]) * SP[0]) ** 2 + ((y - centre_vox[1]) * SP[1]) ** 2
            + ((x - centre_vox[2]) * SP[2]) ** 2) <= radius_mm**2


def feat(out: dict, name: str) -> dict:
    return next(f for f in out["features"] if f["name"] == name)


def check_contract(out: dict) -> None:
    json.dumps(out, allow_nan=False)
    assert out["category"] in rsna.CATEGORIES
    assert out["label"] == rsna.LABELS[out["category"]]
    assert out["suggested_class"] == rsna.SUGGESTED_CLASS[out["category"]]
    assert out["co_rads_equivalent"]["approximate"] is True
    assert out["co_rads_equivalent"]["co_rads"] == rsna.CO_RADS_EQUIVALENT[out["category"]]
    assert "not a classifier" in out["note"] and "set by hand" in out["note"]
    assert "Simpson" in out["reference"]["rsna"] and "e200152" in out["reference"]["rsna"]
    assert out["decision_path"][-1].startswith("=> " + out["label"])
    assert f"rule {out['rule']}" in out["decision_path"][-1]
    assert any(line.startswith(f"{out['rule']} {out['category']}:") and line.endswith("FIRED")
               for line in out["decision_path"])
    assert sum(line.endswith("FIRED") for line in out["decision_path"]) == 1
    for f in out["features"]:
        assert set(f) >= {"name", "value", "rule", "met", "used_for", "rules"}
        assert f["met"] in (True, False, None)
        assert f["used_for"] and all(c in rsna.CATEGORIES or c == "supporting" for c in f["used_for"])


# ------------------------------------------------------------------------------------------------ cases
def typical_case():
    """Bilateral, peripheral, multifocal GGO: two subpleural GGO boxes per lung (2.0 mL each)."""
    les = np.zeros(SHAPE, np.uint8)
    les[28:34, 30:40, 4:10] = LESION_GGO  # right lateral, lower zone
    les[16:22, 50:60, 20:30] = LESION_GGO  # right posterior, middle zone
    les[28:34, 30:40, 90:96] = LESION_GGO  # left lateral, lower zone
    les[16:22, 50:60, 70:80] = LESION_GGO  # left posterior, middle zone
    return les


def lobar_case():
    """One right lower-zone consolidation (50 mL) with a thin partial-volume GGO rim, nothing else."""
    les = np.zeros(SHAPE, np.uint8)
    les[27:37, 20:50, 10:40] = LESION_CONSOLIDATION
    les[27:37, 20:50, 10] = LESION_GGO
    les[27:37, 20:50, 39] = LESION_GGO
    return les


def central_unilateral_ggo_case():
    """Two elongated central GGO lesions in the right lung (2.7 mL, 30 x 9 x 10 mm each): not rounded or peripheral."""
    les = np.zeros(SHAPE, np.uint8)
    les[14:18, 29:35, 15:35] = LESION_GGO
    les[28:32, 29:35, 15:35] = LESION_GGO
    return les


def rounded_central_ggo_case():
    """Two central GGO spheres (r = 9 mm, ~3 mL) in the right lung: unilateral, not peripheral, but rounded."""
    les = np.zeros(SHAPE, np.uint8)
    les[sphere((12, 32, 25), 9.0)] = LESION_GGO
    les[sphere((28, 32, 25), 9.0)] = LESION_GGO
    return les


def run(les, *, arrays=False, abnormal=True, hu=None):
    lung = lungs()
    hu = hu_for(les) if hu is None else hu
    q = quantify(les, lung, SP, hu, peripheral_thickness_mm=10.0, bilateral_min_ml=1.0)
    if arrays:
        return q, rsna_category(q, les, lung, SP, hu, abnormal=abnormal)
    return q, rsna_category(q, abnormal=abnormal)


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("arrays", [False, True])
@pytest.mark.parametrize("abnormal", [True, None])
def test_bilateral_peripheral_multifocal_ggo_is_typical(arrays, abnormal):
    q, out = run(typical_case(), arrays=arrays, abnormal=abnormal)
    check_contract(out)
    assert out["category"] == "typical" and out["rule"] == "T1"
    assert out["label"] == "Typical appearance"
    assert out["suggested_class"] == "covid19" and out["co_rads_equivalent"]["co_rads"] == "4-5"
    assert feat(out, "bilateral")["met"] and feat(out, "peripheral")["met"] and feat(out, "ground_glass")["met"]
    assert feat(out, "multifocal")["value"] == 4 and feat(out, "multifocal")["met"]
    # every lesion is counted (>= 1 mL), so the pattern values are the quantification's own
    assert feat(out, "peripheral")["value"] == pytest.approx(q["peripheral_lesion_ratio"], abs=1e-3)
    assert feat(out, "peripheral")["value"] == pytest.approx(0.75)  # posterior boxes: 6 of 10 rows in the band
    assert feat(out, "ground_glass")["value"] == pytest.approx(q["ggo_fraction"], abs=1e-4) == 1.0
    assert feat(out, "bilateral")["value"] == pytest.approx(q["lesion_volume_in_lung_ml"]["left"], abs=1e-3)
    right_ml = q["lesion_volume_in_lung_ml"]["right"]
    assert feat(out, "bilateral")["detail"]["right_ml"] == pytest.approx(right_ml, abs=1e-3)
    # lower-zone boxes 2.025 mL, middle-zone boxes 3.375 mL in each lung: 2.025 / 5.4
    assert feat(out, "lower_zone_predominance")["value"] == pytest.approx(0.375)
    assert feat(out, "lower_zone_predominance")["met"] is False
    assert any("T1 typical: peripheral, bilateral GGO" in line and "FIRED" in line for line in out["decision_path"])


@pytest.mark.parametrize("arrays", [False, True])
def test_single_unilateral_lobar_consolidation_is_atypical(arrays):
    q, out = run(lobar_case(), arrays=arrays)
    check_contract(out)
    assert out["category"] == "atypical" and out["rule"] == "A1"
    assert out["label"] == "Atypical appearance"
    assert out["suggested_class"] == "cap" and out["co_rads_equivalent"]["co_rads"] == "2"
    les = q["lesions"][0]
    assert q["lesion_count"] == 1 and les["zone"] == "right_lower" and les["side"] == "right"
    assert feat(out, "dominant_lesion")["value"] == 1.0
    assert feat(out, "dominant_lesion_consolidation")["value"] == pytest.approx(les["consolidation_fraction"])
    assert feat(out, "dominant_lesion_consolidation")["value"] == pytest.approx(28 / 30, abs=1e-4)
    assert feat(out, "dominant_lesion_in_one_zone")["value"] == 1.0
    assert feat(out, "ground_glass")["value"] == pytest.approx(q["ggo_fraction"]) == pytest.approx(2 / 30, abs=1e-4)
    assert feat(out, "ground_glass")["met"] is False
    assert feat(out, "unilateral")["met"] is True and feat(out, "unilateral")["value"] == 1.0
    assert feat(out, "lobar_consolidation")["met"] is True
    assert any(line.startswith("A1 atypical: isolated lobar/segmental consolidation") and line.endswith("FIRED")
               for line in out["decision_path"])
    # the typical and indeterminate rules were tried first, in order
    order = [line.split()[0] for line in out["decision_path"][1:-1]]
    assert order == ["N", "T1", "T2", "T3", "I1", "I2", "A1"]
    if arrays:
        assert feat(out, "cavity")["value"] == 0 and feat(out, "cavity")["met"] is False


def test_lobar_consolidation_crossing_zones_is_not_lobar():
    les = np.zeros(SHAPE, np.uint8)
    les[10:34, 20:50, 10:40] = LESION_CONSOLIDATION  # spans upper, middle and lower zones
    _, out = run(les)
    assert feat(out, "dominant_lesion_in_one_zone")["met"] is False
    assert feat(out, "lobar_consolidation")["met"] is False
    assert out["category"] == "indeterminate" and out["rule"] == "I0"


@pytest.mark.parametrize("arrays", [False, True])
def test_unilateral_central_ggo_is_indeterminate(arrays):
    q, out = run(central_unilateral_ggo_case(), arrays=arrays)
    check_contract(out)
    assert out["category"] == "indeterminate" and out["rule"] == "I1"
    assert out["label"] == "Indeterminate appearance"
    assert out["suggested_class"] is None and out["co_rads_equivalent"]["co_rads"] == "3"
    assert feat(out, "bilateral")["met"] is False and feat(out, "unilateral")["met"] is True
    assert feat(out, "peripheral")["value"] == pytest.approx(q["peripheral_lesion_ratio"]) == 0.0
    assert feat(out, "peripheral")["met"] is False
    fired = next(line for line in out["decision_path"] if line.endswith("FIRED"))
    assert fired.startswith("I1 indeterminate") and "unilateral" in fired and "not peripheral" in fired
    rg = feat(out, "rounded_ground_glass")
    if arrays:
        assert rg["value"] == 0 and rg["met"] is False
        for s in rg["detail"]["lesions"]:
            assert s["rounded"] is False and s["axis_ratio"] < rsna.ROUNDED_AXIS_RATIO_MIN
    else:
        assert rg["value"] is None and rg["met"] is None
        assert "rounded_ground_glass" in {n["name"] for n in out["not_measured"]}


def test_rounded_ggo_needs_the_mask_and_then_is_typical():
    q, out_q = run(rounded_central_ggo_case())
    assert out_q["category"] == "indeterminate" and out_q["rule"] == "I1"  # roundness not measured from q alone
    _, out = run(rounded_central_ggo_case(), arrays=True)
    check_contract(out)
    assert out["category"] == "typical" and out["rule"] == "T2"
    rg = feat(out, "rounded_ground_glass")
    assert rg["value"] == 2 and rg["met"] is True
    for s in rg["detail"]["lesions"]:
        assert s["axis_ratio"] > 0.8 and s["ellipsoid_fill"] > 0.9 and s["rounded"] is True
    assert feat(out, "bilateral")["met"] is False and feat(out, "peripheral")["met"] is False
    assert "rounded_ground_glass" not in {n["name"] for n in out["not_measured"]}


def test_empty_mask_is_negative():
    les = np.zeros(SHAPE, np.uint8)
    q, out = run(les, abnormal=None)
    check_contract(out)
    assert out["category"] == "negative" and out["rule"] == "N"
    assert out["label"] == "Negative for pneumonia"
    assert out["suggested_class"] == "healthy" and out["co_rads_equivalent"]["co_rads"] == "1"
    assert feat(out, "lesion_burden")["value"] == 0 and feat(out, "lesion_burden")["met"] is False
    assert feat(out, "peripheral")["value"] is None and feat(out, "ground_glass")["value"] is None
    _, out_arr = run(les, abnormal=None, arrays=True)
    assert out_arr["category"] == "negative"
    assert feat(out_arr, "rounded_ground_glass")["value"] == 0 and feat(out_arr, "rounded_ground_glass")["met"] is False


def test_abnormal_false_is_negative_even_with_a_typical_pattern():
    q, out = run(typical_case(), abnormal=False)
    check_contract(out)
    assert out["category"] == "negative" and out["suggested_class"] == "healthy"
    assert any("abnormal=False" in line and line.endswith("FIRED") for line in out["decision_path"])
    # the features are still measured and shown
    assert feat(out, "bilateral")["met"] is True and feat(out, "peripheral")["met"] is True


def test_abnormal_true_with_empty_mask_is_indeterminate_with_a_caveat():
    _, out = run(np.zeros(SHAPE, np.uint8), abnormal=True)
    check_contract(out)
    assert out["category"] == "indeterminate" and out["rule"] == "I0"
    assert any("no lesion" in c for c in out["caveats"])


def small_nodules(n: int, label: int = LESION_CONSOLIDATION) -> np.ndarray:
    """n separate nodules, 3 slices x 4 x 4 pixels (7.5 x 6 x 6 mm, 0.27 mL), solid (consolidation) by default.

    Above quantify()'s size floor (0.2 mL by default), which hides anything smaller from the lesion list.
    """
    les = np.zeros(SHAPE, np.uint8)
    spots = [(6, 15, 15), (12, 40, 25), (20, 25, 35), (30, 45, 15), (8, 15, 65), (16, 40, 75), (24, 25, 85),
             (32, 45, 70)]
    for z, y, x in spots[:n]:
        les[z : z + 3, y : y + 4, x : x + 4] = label
    return les


def test_many_small_solid_nodules_are_atypical():
    for abnormal in (True, None):
        q, out = run(small_nodules(6), abnormal=abnormal)
        check_contract(out)
        assert q["lesion_count"] == 6
        assert feat(out, "small_nodules")["value"] == 6 and feat(out, "small_nodules")["met"] is True
        assert feat(out, "small_ggo_foci")["value"] == 0
        assert feat(out, "multifocal")["value"] == 0  # all below the 1 mL floor
        assert out["category"] == "atypical" and out["rule"] == "A2"


def test_small_ggo_foci_are_indeterminate_not_atypical():
    for n in (3, 6):
        _, out = run(small_nodules(n, LESION_GGO), abnormal=True)
        check_contract(out)
        assert feat(out, "small_ggo_foci")["value"] == n and feat(out, "small_nodules")["value"] == 0
        assert out["category"] == "indeterminate" and out["rule"] == "I2"


def test_few_small_components():
    _, out = run(small_nodules(3, LESION_GGO), abnormal=None)  # below the burden floor without a model decision
    assert out["category"] == "negative" and out["rule"] == "N"
    _, out = run(small_nodules(3), abnormal=True)  # three solid nodules: no rule matches
    assert out["category"] == "indeterminate" and out["rule"] == "I0"
    assert feat(out, "small_nodules")["met"] is False


def cavity_case():
    """A consolidation in each lung (11.5 mL); the right one holds an enclosed air pocket (HU -1000, 0.81 mL)."""
    les = np.zeros(SHAPE, np.uint8)
    les[10:18, 20:36, 15:31] = LESION_CONSOLIDATION
    les[10:18, 20:36, 65:81] = LESION_CONSOLIDATION
    les[12:16, 25:31, 20:26] = 0
    hu = hu_for(les)
    hu[12:16, 25:31, 20:26] = -1000
    return les, hu


def test_cavity_needs_mask_and_hu_and_is_atypical():
    les, hu = cavity_case()
    q, out = run(les, arrays=True, hu=hu)
    check_contract(out)
    assert out["category"] == "atypical" and out["rule"] == "A3"
    cav = feat(out, "cavity")
    assert cav["value"] == 1 and cav["met"] is True
    assert cav["detail"]["lesions"][0]["air_ml"] == pytest.approx(4 * 6 * 6 * 5.625 / 1000, abs=1e-3)
    # without the arrays the cavity is not measured and no rule matches: indeterminate, not specific
    _, out_q = run(les, hu=hu)
    assert feat(out_q, "cavity")["met"] is None and out_q["rule"] == "I0"
    # an air bronchogram (a tube of air through the consolidation, open at both ends) is not a cavity
    les2 = les.copy()
    les2[12:16, 25:31, 20:26] = LESION_CONSOLIDATION
    hu2 = hu_for(les2)
    hu2[13:15, 27:29, 15:31] = -1000
    les2[13:15, 27:29, 15:31] = 0
    _, out2 = run(les2, arrays=True, hu=hu2)
    assert feat(out2, "cavity")["value"] == 0


def test_feature_values_equal_the_input_dict():
    """A hand-written quantify-like dict: each feature value is the one computed from what was put in."""
    zones = {
        "right_upper": {"slices": [0, 10], "lesion_ml": 1.0},
        "right_middle": {"slices": [10, 20], "lesion_ml": 2.0},
        "right_lower": {"slices": [20, 30], "lesion_ml": 8.0},
        "left_upper": {"slices": [0, 10], "lesion_ml": 0.0},
        "left_middle": {"slices": [10, 20], "lesion_ml": 1.0},
        "left_lower": {"slices": [20, 30], "lesion_ml": 4.5},
    }

    def lesion(i, vol, side, rf, lf, pf, g, c, zone, z0, z1, size=(20.0, 20.0, 20.0)):
        return {"id": i, "voxels": int(vol * 1000), "volume_ml": vol, "side": side, "right_fraction": rf,
                "left_fraction": lf, "peripheral_fraction": pf, "ggo_fraction": g, "consolidation_fraction": c,
                "zone": zone, "bbox_start_zyx": [z0, 0, 0], "bbox_stop_zyx": [z1, 10, 10],
                "bbox_size_mm": {"height_z": size[0], "length_y": size[1], "width_x": size[2]}}

    q = {
        "spacing_mm_zyx": [1.0, 1.0, 1.0],
        "peripheral_thickness_mm": 10.0,
        "lesion_count": 4,
        "peripheral_lesion_ratio": 0.66,
        "ggo_fraction": 0.79,
        "zones_not_lobes": zones,
        "lesions": [
            lesion(1, 10.0, "right", 1.0, 0.0, 0.8, 0.9, 0.1, "right_lower", 20, 30),
            lesion(2, 5.0, "left", 0.0, 1.0, 0.5, 0.6, 0.4, "left_lower", 18, 30),
            lesion(3, 0.5, "left", 0.0, 1.0, 0.0, 0.0, 1.0, "left_middle", 12, 14, (4.0, 6.0, 6.0)),
            lesion(4, 0.005, "right", 1.0, 0.0, 0.0, 1.0, 0.0, "right_middle", 12, 13, (1.0, 1.0, 1.0)),
        ],
    }
    out = rsna_category(q, abnormal=True)
    check_contract(out)
    assert feat(out, "lesion_burden")["value"] == 2
    assert feat(out, "lesion_burden")["detail"]["counted_volume_ml"] == 15.0
    assert feat(out, "bilateral")["value"] == 5.0
    assert feat(out, "bilateral")["detail"] == {"right_ml": 10.0, "left_ml": 5.0,
                                               "bilateral_involvement_quantify": None}
    assert feat(out, "unilateral")["value"] == pytest.approx(10 / 15, abs=1e-4)
    assert feat(out, "peripheral")["value"] == pytest.approx((10 * 0.8 + 5 * 0.5) / 15, abs=1e-4)
    assert feat(out, "peripheral")["detail"]["peripheral_lesion_ratio_all_lesions"] == 0.66
    assert feat(out, "ground_glass")["value"] == pytest.approx((10 * 0.9 + 5 * 0.6) / 15, abs=1e-4)
    assert feat(out, "ground_glass")["detail"]["ggo_fraction_all_lesions"] == 0.79
    assert feat(out, "multifocal")["value"] == 2
    assert feat(out, "lower_zone_predominance")["value"] == pytest.approx(12.5 / 16.5, abs=1e-4)
    assert feat(out, "lower_zone_predominance")["met"] is True
    assert feat(out, "dominant_lesion")["value"] == pytest.approx(10 / 15, abs=1e-4)
    assert feat(out, "dominant_lesion_consolidation")["value"] == 0.1
    assert feat(out, "dominant_lesion_in_one_zone")["value"] == 1.0
    assert feat(out, "small_nodules")["value"] == 1  # lesion 3; lesion 4 is below NODULE_MIN_ML
    assert feat(out, "small_nodules")["detail"]["ids"] == [3]
    assert out["category"] == "typical" and out["rule"] == "T1"
    # thresholds are the module constants, shown with the output
    assert out["thresholds"]["peripheral_plr_min"] == rsna.PERIPHERAL_PLR_MIN
    assert str(rsna.PERIPHERAL_PLR_MIN) in feat(out, "peripheral")["rule"]
    # a lesion half outside its zone is not confined
    q["lesions"][0]["bbox_start_zyx"] = [10, 0, 0]
    assert feat(rsna_category(q, abnormal=True), "dominant_lesion_in_one_zone")["value"] == 0.5


def test_untyped_mask_leaves_ggo_rules_undecided():
    les = typical_case() > 0  # boolean mask: lesion of unknown type
    lung = lungs()
    q = quantify(les, lung, SP)
    out = rsna_category(q, abnormal=True)
    check_contract(out)
    assert feat(out, "ground_glass")["value"] is None and feat(out, "ground_glass")["met"] is None
    assert out["category"] == "indeterminate" and out["rule"] == "I0"
    assert any("lesion type" in c for c in out["caveats"])


def test_not_measured_features_are_listed():
    _, out = run(typical_case())
    names = {n["name"] for n in out["not_measured"]}
    assert {"rounded_ground_glass", "cavity", "pleural_fluid", "septal_thickening", "crazy_paving",
            "reverse_halo_organising_pneumonia"} <= names
    for n in ("pleural_fluid", "septal_thickening"):
        f = feat(out, n)
        assert f["value"] is None and f["met"] is None


def test_bad_arrays_raise():
    les = typical_case()
    q, _ = run(les)
    with pytest.raises(ValueError):
        rsna_category(q, les[0], abnormal=True)
    with pytest.raises(ValueError):
        rsna_category(q, les, hu=np.zeros((2, 2, 2)), abnormal=True)


def test_mask_not_matching_q_is_reported_not_crashed():
    les = typical_case()
    q, _ = run(les)
    other = np.zeros_like(les)
    out = rsna_category(q, other, spacing=SP, abnormal=True)
    assert out["category"] == "typical"  # T1 needs q only
    assert any("not found in the lesion mask" in c for c in out["caveats"])


def test_runs_well_under_a_second_on_a_512x512x150_study():
    shape = (150, 512, 512)
    sp = (2.0, 0.7, 0.7)
    lung = np.zeros(shape, np.uint8)
    lung[10:140, 100:420, 40:245] = LUNG_RIGHT
    lung[10:140, 100:420, 267:472] = LUNG_LEFT
    les = np.zeros(shape, np.uint8)
    hu = np.full(shape, -850, np.int16)
    les[90:135, 180:400, 60:220] = LESION_CONSOLIDATION  # large consolidation (~ 1100 mL)
    rng = np.random.default_rng(0)
    for k in range(24):  # GGO foci of 1-10 mL in both lungs
        z, y, x = int(rng.integers(15, 80)), int(rng.integers(110, 400)), int(rng.choice([80, 150, 320, 400]))
        r = int(rng.integers(8, 16))
        les[z : z + r // 2, y : y + r, x : x + r] = LESION_GGO
    hu[les == LESION_GGO] = -600
    hu[les == LESION_CONSOLIDATION] = 30
    q = quantify(les, lung, sp, hu, bilateral_min_ml=1.0)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        out = rsna_category(q, les, lung, sp, hu, abnormal=True)
        best = min(best, time.perf_counter() - t)
    check_contract(out)
    assert feat(out, "cavity")["met"] is False
    assert best < 1.0, f"rsna_category took {best:.2f} s"
