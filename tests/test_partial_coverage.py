"""Partial lung coverage (issue 11): a slab, or a study that stops above the bases, is analysed with a warning, its
measures marked partial and no whole-lung grade (pneumoct.quantify.coverage)."""
from __future__ import annotations

import numpy as np
import pytest

from pneumoct.quantify import quantify
from pneumoct.quantify.coverage import END_FRACTION, WITHHELD_REASON, coverage_warning, lung_coverage, mark_partial

SPACING = (2.0, 1.0, 1.0)


def _lungs(n_slices: int = 80, top: int = 10, bottom: int = 70, size: int = 64) -> np.ndarray:
    """Two ellipsoid lungs (1 right at image left, 2 left) from slice ``top`` to ``bottom``: they taper to a point
    at the apex and the base, as real lungs narrow above the clavicles and over the diaphragm domes."""
    lab = np.zeros((n_slices, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    centre, half = (top + bottom) / 2, (bottom - top) / 2
    for z in range(top, bottom + 1):
        r = 14 * np.sqrt(max(0.0, 1 - ((z - centre) / half) ** 2))
        for label, cx in ((1, 18), (2, 46)):
            lab[z][(yy - 32) ** 2 + (xx - cx) ** 2 <= r * r] = label
    return lab


def test_full_lungs_with_tapering_apex_and_base_are_complete():
    cov = lung_coverage(_lungs(), SPACING)
    assert cov["complete"] and not cov["cut_superior"] and not cov["cut_inferior"]
    assert cov["scan_extent_mm"] == 160.0 and cov["lung_extent_mm"] == 2.0 * 61  # slices 10-70
    assert cov["sides"]["right"]["superior_end_fraction"] == 0.0
    assert coverage_warning(cov) is None


@pytest.mark.parametrize("cut, sup, inf", [(slice(30, 80), True, False), (slice(0, 45), False, True),
                                           (slice(30, 50), True, True), (slice(35, 45), True, True)])
def test_cut_lungs_are_flagged_at_the_cut_end(cut, sup, inf):
    lab = _lungs()[cut]
    cov = lung_coverage(lab, SPACING)
    assert (cov["cut_superior"], cov["cut_inferior"], cov["complete"]) == (sup, inf, False)
    assert cov["scan_extent_mm"] == 2.0 * lab.shape[0]
    for side in ("right", "left"):
        assert cov["sides"][side]["cut_superior"] == sup and cov["sides"][side]["cut_inferior"] == inf
    w = coverage_warning(cov)
    assert w["code"] == "partial_coverage" and f"{2.0 * lab.shape[0]:g} mm" in w["message"]
    assert ("top" in w["message"]) == sup and ("bottom" in w["message"]) == inf and "\n" not in w["message"]


def test_one_lung_alone_reaching_the_end_is_not_a_cut():
    """Gas under the left diaphragm taken as left lung runs to the last slice of a full study (real cap001): the
    study is cut only when every lung is."""
    lab = _lungs()
    lab[70:, 28:40, 40:52] = 2  # a plateau of "left lung" below the base, to the end of the scan
    cov = lung_coverage(lab, SPACING)
    assert cov["sides"]["left"]["cut_inferior"] and not cov["sides"]["right"]["cut_inferior"]
    assert cov["complete"]


def test_end_fraction_threshold_and_boolean_mask():
    lab = _lungs()
    # a scan starting one slice below the apex: a sliver of lung in slice 0, under the threshold
    sliver = lung_coverage(lab[11:], SPACING)
    assert 0 < sliver["sides"]["right"]["superior_end_fraction"] < END_FRACTION and sliver["complete"]
    cov = lung_coverage(lab[25:] > 0, SPACING)  # a boolean mask is one lung
    assert cov["cut_superior"] and cov["sides"]["left"] is None
    assert cov["sides"]["right"]["superior_end_fraction"] >= END_FRACTION


def _lesion_in(lab: np.ndarray) -> np.ndarray:
    les = np.zeros_like(lab)
    les[(lab == 1) & (np.arange(lab.shape[0])[:, None, None] % 2 == 0)] = 1  # ~half of the right lung
    return les


def test_quantify_of_a_partial_lung_withholds_grades_and_marks_measures():
    lab = _lungs()[30:50]
    cov = lung_coverage(lab, SPACING)
    q = quantify(_lesion_in(lab), lab, SPACING, coverage=cov)
    sev = q["severity"]
    assert sev["mosmed_grade"] is None and sev["mosmed_level"] is None and sev["ctss_zones_total"] is None
    assert sev["withheld_reason"] == WITHHELD_REASON and sev["partial"] is True
    assert sev["percent_lung_involved"] > 10  # still measured: of the scanned lung
    assert q["partial"] is True and "lung_volume_ml" in q["partial_measurements"]
    assert q["lung_volume_ml"]["partial"] and q["lesion_volume_in_lung_ml"]["partial"]
    assert all(z["ctss"] is None and z["partial"] for z in q["zones_not_lobes"].values())
    assert all(v is None for v in sev["ctss_per_zone"].values())
    assert q["lesion_volume_ml"] > 0 and any(WITHHELD_REASON in n for n in q["notes"])


def test_quantify_of_a_complete_lung_is_unchanged():
    lab = _lungs()
    les = _lesion_in(lab)
    plain = quantify(les, lab, SPACING)
    assert quantify(les, lab, SPACING, coverage=lung_coverage(lab, SPACING)) == plain
    assert plain["severity"]["mosmed_grade"] not in (None, "CT-0") and "partial" not in plain


def test_a_lung_inside_the_scan_keeps_its_zone_scores():
    q = quantify(_lesion_in(_lungs()), _lungs(), SPACING)
    cov = {"complete": False, "cut_superior": False, "cut_inferior": True, "scan_extent_mm": 160.0,
           "sides": {"right": {"cut_superior": False, "cut_inferior": False},
                     "left": {"cut_superior": False, "cut_inferior": True}}}
    mark_partial(q, cov)
    assert q["zones_not_lobes"]["right_upper"]["ctss"] is not None
    assert q["zones_not_lobes"]["left_lower"]["ctss"] is None and q["severity"]["ctss_zones_total"] is None


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def phantom_study():
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom

    return generate_phantom(PhantomConfig(label="covid19", seed=7, matrix=128, n_slices=60)).study


def test_full_phantom_is_complete_and_graded(phantom_study):
    import pneumoct

    res = pneumoct.diagnose(phantom_study).result
    assert res["coverage"]["complete"]
    assert res["quantification"]["severity"]["mosmed_grade"] is not None
    assert not any(w["code"] == "partial_coverage" for w in res["input"]["warnings"])
    assert "partial" not in res["quantification"]


def test_middle_slab_of_a_phantom_is_analysed_as_partial(phantom_study, tmp_path):
    import pneumoct

    z = phantom_study.shape[0] // 2
    d = pneumoct.diagnose(phantom_study.hu[z - 10: z + 10], spacing=phantom_study.spacing)
    res = d.result
    assert res["coverage"]["cut_superior"] and res["coverage"]["cut_inferior"]
    assert [w for w in res["input"]["warnings"] if w["code"] == "partial_coverage"]
    sev = res["quantification"]["severity"]
    assert sev["mosmed_grade"] is None and sev["ctss_zones_total"] is None and sev["withheld_reason"]
    assert res["quantification"]["lung_volume_ml"]["partial"]
    assert res["patient"]["label"] in ("healthy", "covid19", "cap", "other_viral")  # a headline is still given
    assert any(c["code"] == "partial_coverage" for c in res["patient"]["consistency"])
    d.save(tmp_path / "out", masks=False)
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "Partial lung coverage:" in html and f"{res['coverage']['scan_extent_mm']:g} mm" in html
    assert WITHHELD_REASON in html and "(of the scanned lung)" in html


def test_ten_slice_slab_file_is_read_and_analysed(phantom_study, tmp_path):
    """The reader's minimum (io.DEFAULT_MIN_SLICES) is 10 slices: a 10-slice slab file is analysed, not refused."""
    from pneumoct.api import as_study
    from pneumoct.io import DEFAULT_MIN_SLICES
    from pneumoct.io.writers import write_volume
    from pneumoct.pipeline import DiagnoseOptions, diagnose

    assert DEFAULT_MIN_SLICES <= 10
    z = phantom_study.shape[0] // 2
    slab = as_study(phantom_study.hu[z - 5: z + 5], spacing=phantom_study.spacing)
    write_volume(tmp_path / "slab.nii.gz", slab.hu, slab)
    res = diagnose(tmp_path / "slab.nii.gz", tmp_path / "out", DiagnoseOptions(write_report=False, write_masks=False))
    assert res["volume"]["shape_zyx"][0] == 10
    assert not res["coverage"]["complete"] and res["quantification"]["severity"]["mosmed_grade"] is None
    assert any(w["code"] == "partial_coverage" for w in res["input"]["warnings"])
