"""The size floor, the study noise floor and the zone floor of ``pneumoct.quantify.quantify`` (its defaults), and the
single in-lung definition of involvement, on hand-built masks with hand-computed volumes.

Geometry (spacing (z, y, x) = (2, 1, 1) mm -> one voxel = 2 mm^3 = 0.002 mL):
  right lung (1): z 0..60, y 0..100, x 10..60  -> 300 000 voxels = 600 mL
  left lung  (2): z 0..60, y 0..100, x 70..120 -> 300 000 voxels = 600 mL     (lung 1200 mL; gap x 60..70)
  zones: 20 slices each (z 0..20 upper, 20..40 middle, 40..60 lower), 100 000 voxels = 200 mL per zone.
Floors (defaults): lesion >= 0.2 mL; study CT-0 below 1 mL or below 0.1 % of 1200 mL = 1.2 mL; a zone scores from
0.1 mL and 0.1 % of its 200 mL = 0.2 mL.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoct.quantify import (
    DEFAULT_MIN_LESION_ML,
    NOISE_FLOOR_ML,
    NOISE_FLOOR_PERCENT,
    ZONE_FLOOR_ML,
    ZONE_FLOOR_PERCENT,
    label_lesions,
    quantify,
)
from pneumoct.types import LESION_CONSOLIDATION, LESION_GGO, LUNG_LEFT, LUNG_RIGHT

SP = (2.0, 1.0, 1.0)
VOX_ML = 0.002


@pytest.fixture(scope="module")
def lung():
    m = np.zeros((64, 104, 128), np.uint8)
    m[0:60, 0:100, 10:60] = LUNG_RIGHT
    m[0:60, 0:100, 70:120] = LUNG_LEFT
    return m


def _clear_lesion(les):
    """8 mL GGO block in the right upper zone: 10 x 20 x 20 = 4000 voxels."""
    les[5:15, 20:40, 20:40] = LESION_GGO
    return 4000


def test_defaults_are_the_documented_floors():
    assert (DEFAULT_MIN_LESION_ML, NOISE_FLOOR_ML, NOISE_FLOOR_PERCENT, ZONE_FLOOR_ML, ZONE_FLOOR_PERCENT) == (
        0.2, 1.0, 0.1, 0.1, 0.1)


def test_clear_lesion_grades_ct1_with_ctss_and_lvr_equals_percent(lung):
    les = np.zeros_like(lung)
    n = _clear_lesion(les)
    q = quantify(les, lung, SP)
    json.dumps(q, allow_nan=False)
    assert q["lung_volume_ml"]["total"] == 1200.0
    assert q["lesion_count"] == 1 and q["lesion_volume_ml"] == pytest.approx(n * VOX_ML)  # 8 mL
    assert q["lesion_volume_ratio"] == pytest.approx(n / 600000, abs=1e-6)  # 0.006667
    assert q["lesion_volume_ratio"] == pytest.approx(q["percent_lung_involved"] / 100, abs=1e-5)
    sev = q["severity"]
    assert sev["percent_lung_involved"] == q["percent_lung_involved"]
    assert sev["below_noise_floor"] is False and sev["mosmed_grade"] == "CT-1"
    assert q["zones_not_lobes"]["right_upper"]["percent_involved"] == pytest.approx(4.0)  # 4000 / 100000
    assert sev["ctss_per_zone"]["right_upper"] == 1 and sev["ctss_zones_total"] == 1
    # the floors used are in the output
    assert (sev["min_lesion_ml"], sev["noise_floor_ml"], sev["noise_floor_percent"]) == (0.2, 1.0, 0.1)
    assert (sev["zone_floor_ml"], sev["zone_floor_percent"]) == (0.1, 0.1)
    assert "0.2 mL" in sev["floor_note"] and q["min_lesion_ml"] == 0.2


def test_speck_below_size_floor_is_not_a_lesion(lung):
    les = np.zeros_like(lung)
    n = _clear_lesion(les)
    les[30, 50:55, 80:85] = LESION_CONSOLIDATION  # 25 voxels = 0.05 mL in the left lung
    q = quantify(les, lung, SP)
    assert q["lesion_count"] == 1 and len(q["lesions"]) == 1 and q["lesions"][0]["side"] == "right"
    assert q["lesion_components_below_min"] == 1
    assert q["lesion_volume_ml"] == pytest.approx(n * VOX_ML)  # the speck is in no volume ...
    assert q["lesion_volume_in_lung_ml"]["left"] == 0.0
    assert q["consolidation_volume_ml"] == 0.0 and q["ggo_fraction"] == 1.0  # ... nor class fraction
    assert q["lesion_volume_raw_ml"] == pytest.approx((n + 25) * VOX_ML)  # only the raw volume keeps it
    assert q["lesion_volume_excluded_ml"]["below_min_lesion"] == pytest.approx(0.05)
    assert q["bilateral_involvement"] is False
    assert q["severity"]["ctss_per_zone"]["left_middle"] == 0
    # a 0.25 mL blob (125 voxels) is over the size floor and counts
    les[30, 50:55, 80:85] = 0
    les[30:35, 50:55, 80:85] = LESION_CONSOLIDATION
    q2 = quantify(les, lung, SP)
    assert q2["lesion_count"] == 2 and q2["lesion_components_below_min"] == 0
    assert q2["lesion_volume_in_lung_ml"]["left"] == pytest.approx(0.25)


def test_healthy_lung_with_specks_only_is_ct0(lung):
    """Thirty scattered false-positive specks of 0.05 mL (1.5 mL in all): no lesion, CT-0, zone score 0."""
    les = np.zeros_like(lung)
    rng = np.random.default_rng(0)
    for k in range(30):
        z, y = int(rng.integers(0, 58)), int(rng.integers(0, 95))
        x = int(rng.integers(10, 55)) if k % 2 else int(rng.integers(70, 115))
        les[z, y:y + 5, x:x + 5] = LESION_GGO
    q = quantify(les, lung, SP)
    assert q["lesion_count"] == 0 and q["lesions"] == [] and q["lesion_components_below_min"] >= 25
    assert q["lesion_volume_ml"] == 0.0 and q["lesion_volume_ratio"] == 0.0
    assert q["lesion_volume_raw_ml"] == pytest.approx(np.count_nonzero(les) * VOX_ML)
    sev = q["severity"]
    assert sev["mosmed_grade"] == "CT-0" and sev["ctss_zones_total"] == 0 and sev["below_noise_floor"] is True
    assert all(z["ctss"] == 0 for z in q["zones_not_lobes"].values())
    assert q["bilateral_involvement"] is False
    # without the floors the same mask was CT-1 with zone scores and dozens of "lesions"
    old = quantify(les, lung, SP, min_lesion_ml=0, noise_floor_ml=0, noise_floor_percent=0, zone_floor_ml=0,
                   zone_floor_percent=0)
    assert old["severity"]["mosmed_grade"] == "CT-1" and old["severity"]["ctss_zones_total"] >= 4
    assert old["lesion_count"] >= 25


def test_empty_lesion_mask_is_ct0(lung):
    q = quantify(np.zeros_like(lung), lung, SP)
    sev = q["severity"]
    assert sev["mosmed_grade"] == "CT-0" and sev["ctss_zones_total"] == 0 and sev["below_noise_floor"] is True
    assert q["lesion_count"] == 0 and q["lesion_volume_raw_ml"] == 0.0 and q["lesion_fraction_in_lung"] is None


def test_study_noise_floor_ml_and_percent(lung):
    # 0.5 mL (250 voxels): a lesion (listed, counted), but under the 1 mL floor -> CT-0, CTSS 0
    les = np.zeros_like(lung)
    les[10:15, 40:50, 30:35] = LESION_GGO  # 5 * 10 * 5 = 250 voxels
    q = quantify(les, lung, SP)
    assert q["lesion_count"] == 1 and q["lesions"][0]["volume_ml"] == 0.5
    assert q["percent_lung_involved"] == pytest.approx(100 * 250 / 600000, abs=1e-3)  # still reported
    sev = q["severity"]
    assert sev["below_noise_floor"] is True and sev["mosmed_grade"] == "CT-0" and sev["mosmed_level"] == 0
    assert sev["ctss_zones_total"] == 0 and q["zones_not_lobes"]["right_upper"]["ctss"] == 0
    assert "below the noise floor" in sev["floor_note"] and "1 mL" in sev["floor_note"]
    assert any("noise floor" in n for n in q["notes"])
    # 1.1 mL (550 voxels): over 1 mL but under 0.1 % of the 1200 mL lung (1.2 mL) -> still CT-0
    les[:] = 0
    les[10:21, 40:50, 30:35] = LESION_GGO  # 11 * 10 * 5 = 550 voxels
    q = quantify(les, lung, SP)
    assert q["lesion_volume_ml"] == pytest.approx(1.1) and q["severity"]["below_noise_floor"] is True
    assert q["severity"]["mosmed_grade"] == "CT-0"
    # each floor is a parameter: with the percent floor off, 1.1 mL grades CT-1 and scores its zone
    q = quantify(les, lung, SP, noise_floor_percent=0.0)
    assert q["severity"]["below_noise_floor"] is False and q["severity"]["mosmed_grade"] == "CT-1"
    assert q["severity"]["ctss_per_zone"]["right_upper"] == 1
    # 1.3 mL (650 voxels) clears both default floors
    les[10:23, 40:50, 30:35] = LESION_GGO
    q = quantify(les, lung, SP)
    assert q["severity"]["below_noise_floor"] is False and q["severity"]["mosmed_grade"] == "CT-1"
    assert q["severity"]["ctss_zones_total"] >= 1


def test_bilateral_needs_the_noise_floor(lung):
    les = np.zeros_like(lung)
    les[10:15, 40:50, 30:35] = LESION_GGO  # 0.5 mL right
    les[10:15, 40:50, 90:95] = LESION_GGO  # 0.5 mL left: 1 mL in all, under 0.1 % of the lung
    q = quantify(les, lung, SP)
    assert q["severity"]["below_noise_floor"] is True and q["bilateral_involvement"] is False
    q = quantify(les, lung, SP, noise_floor_ml=0, noise_floor_percent=0)
    assert q["bilateral_involvement"] is True


def test_zone_with_tiny_share_scores_zero(lung):
    """One lesion whose 0.05 mL tail crosses into the next third: that zone has 0.025 % involved and scores 0."""
    les = np.zeros_like(lung)
    n = _clear_lesion(les)  # z 5..15: right upper
    les[15:20, 30, 30] = LESION_GGO  # a thin strand down to the zone border (5 voxels)
    les[20, 30:35, 30:35] = LESION_GGO  # 25 voxels = 0.05 mL in slice 20 = right middle
    q = quantify(les, lung, SP)
    z = q["zones_not_lobes"]
    assert q["lesion_count"] == 1
    assert z["right_middle"]["lesion_ml"] == pytest.approx(0.05)
    assert z["right_middle"]["percent_involved"] == pytest.approx(0.025)
    assert z["right_middle"]["below_zone_floor"] is True and z["right_middle"]["ctss"] == 0
    assert z["right_upper"]["below_zone_floor"] is False and z["right_upper"]["ctss"] == 1
    assert q["severity"]["ctss_zones_total"] == 1
    # without the zone floor the tail scored its zone (the old behaviour)
    q0 = quantify(les, lung, SP, zone_floor_ml=0, zone_floor_percent=0)
    assert q0["zones_not_lobes"]["right_middle"]["ctss"] == 1 and q0["severity"]["ctss_zones_total"] == 2
    assert q0["lesion_volume_ml"] == q["lesion_volume_ml"] == pytest.approx((n + 30) * VOX_ML)


def test_zone_floor_fallback_keeps_ctss_consistent_with_grade(lung):
    """If involvement is over the study floor but no zone reaches the zone floor, the most involved zone scores 1:
    a study graded CT-1 or more never has CTSS 0."""
    les = np.zeros_like(lung)
    _clear_lesion(les)
    q = quantify(les, lung, SP, zone_floor_ml=10.0)  # the 8 mL zone is under a 10 mL zone floor
    sev = q["severity"]
    assert sev["mosmed_grade"] == "CT-1" and sev["ctss_zones_total"] == 1
    assert sev["zone_floor_fallback"] == "right_upper" and sev["ctss_per_zone"]["right_upper"] == 1
    assert q["zones_not_lobes"]["right_upper"]["below_zone_floor"] is True


def test_lesion_outside_the_lung_is_not_listed_nor_measured(lung):
    les = np.zeros_like(lung)
    n = _clear_lesion(les)
    les[30:40, 40:50, 61:69] = LESION_CONSOLIDATION  # 800 voxels = 1.6 mL in the gap between the lungs
    les[45:50, 80:90, 5:15] = LESION_GGO  # 500 voxels, 250 of them (x 10..15) in the right lung
    q = quantify(les, lung, SP)
    assert q["lesion_count"] == 2  # the clear lesion and the in-lung half of the straddling one
    assert all(L["side"] in ("right", "left", "bilateral") for L in q["lesions"])
    assert sorted(L["voxels"] for L in q["lesions"]) == [250, n]
    assert q["consolidation_volume_ml"] == 0.0  # the consolidation lies wholly outside
    assert q["lesion_volume_ml"] == pytest.approx((n + 250) * VOX_ML)
    assert q["lesion_volume_raw_ml"] == pytest.approx((n + 800 + 500) * VOX_ML)
    assert q["lesion_volume_excluded_ml"]["outside_lung"] == pytest.approx((800 + 250) * VOX_ML)
    assert q["lesion_fraction_in_lung"] == pytest.approx((n + 250) / (n + 1300), abs=1e-4)
    # one involvement number: LVR = in-lung lesion / lung = percent involved / 100, and the grade uses it
    assert q["lesion_volume_ratio"] == pytest.approx((n + 250) / 600000, abs=1e-6)
    assert q["lesion_volume_ratio"] == pytest.approx(q["percent_lung_involved"] / 100, abs=1e-5)
    assert q["lesion_volume_in_lung_ml"]["total"] == q["lesion_volume_ml"]
    assert any("outside the lung" in n_ for n_ in q["notes"])
    # a lesion entirely outside the lung alone: nothing listed, CT-0
    only_out = np.zeros_like(lung)
    only_out[30:40, 40:50, 61:69] = LESION_CONSOLIDATION
    q = quantify(only_out, lung, SP, min_lesion_ml=0)
    assert q["lesion_count"] == 0 and q["lesions"] == [] and q["lesion_components_below_min"] == 0
    assert q["severity"]["mosmed_grade"] == "CT-0" and q["lesion_volume_ratio"] == 0.0
    assert q["peripheral_lesion_ratio"] is None and q["lesion_fraction_in_lung"] == 0.0


def test_label_lesions_matches_quantify_ids(lung):
    les = np.zeros_like(lung)
    _clear_lesion(les)
    les[30:35, 50:55, 80:85] = LESION_CONSOLIDATION  # 0.25 mL
    les[40, 50:55, 80:85] = LESION_GGO  # 0.05 mL speck
    les[30:40, 40:50, 61:69] = LESION_GGO  # outside the lung
    q = quantify(les, lung, SP)
    labels, n = label_lesions(les, SP, lung_mask=lung, min_lesion_ml=DEFAULT_MIN_LESION_ML)
    assert n == q["lesion_count"] == 2
    for L in q["lesions"]:
        assert int((labels == L["id"]).sum()) == L["voxels"]


@pytest.mark.parametrize("key", ["min_lesion_ml", "noise_floor_ml", "noise_floor_percent", "zone_floor_ml",
                                 "zone_floor_percent"])
def test_negative_or_nan_floor_raises(lung, key):
    les = np.zeros_like(lung)
    with pytest.raises(ValueError, match=key):
        quantify(les, lung, SP, **{key: -1.0})
    with pytest.raises(ValueError, match=key):
        quantify(les, lung, SP, **{key: float("nan")})
