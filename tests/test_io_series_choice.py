"""Issue 11: studies as hospitals export them — study/series choice, padding, MONOCHROME1, per-frame rescale and
non-standard UIDs. Every study here is built with tests/dicom_factory.py."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

sys.path.insert(0, str(Path(__file__).parent))
import dicom_factory as F  # noqa: E402

from pneumoct.io import inspect_input, read_study  # noqa: E402
from pneumoct.io.dicom_decode import _mask_padding  # noqa: E402
from pneumoct.io.dicom_scan import scan_dicom_files  # noqa: E402
from pneumoct.io.dicom_series import kernel_kind  # noqa: E402


def codes(study) -> list[str]:
    return [w.code for w in study.warnings]


def warning(study, code: str) -> str:
    found = [w.message for w in study.warnings if w.code == code]
    assert len(found) == 1, f"expected one warning {code}; got {codes(study)}"
    return found[0]


def others_by_number(study) -> dict[int, dict]:
    return {o["series_number"]: o for o in study.metadata["other_series"]}


def dated(date: str, time: str):
    def edit(ds, k):
        ds.StudyDate, ds.StudyTime = date, time
        ds.AcquisitionDate, ds.AcquisitionTime = date, time

    return edit


# ---------------------------------------------------------------------------------------------------------------
# 1. study and series choice
# ---------------------------------------------------------------------------------------------------------------


def test_prior_and_current_study_the_current_one_is_used(tmp_path):
    # the prior has MORE slices: only the date can make the current one win
    prior = F.write_series(tmp_path / "prior", n_slices=20, series_number=2, seed=1, edit=dated("20190314", "101500"))
    current = F.write_series(tmp_path / "current", n_slices=16, series_number=3, seed=2, edit=dated("20210605", "083000"))
    study = read_study(tmp_path)
    np.testing.assert_array_equal(study.hu, current.hu)
    assert study.metadata["study_instance_uid"] == current.study_uid
    msg = warning(study, "multiple_studies")
    assert "2 studies" in msg and current.study_uid in msg and "most recent" in msg
    (other,) = study.metadata["other_series"]
    assert other["series_instance_uid"] == prior.series_uid and other["reason_code"] == "another_study"
    assert other["reason"].startswith("another study (older study")
    # dates order the studies but are never reported
    for date in ("20190314", "20210605"):
        assert date not in repr(study.metadata) and date not in repr(study.warnings)
    info = inspect_input(tmp_path)
    assert info["chosen_series"]["series_instance_uid"] == current.series_uid
    assert [o["reason_code"] for o in info["other_series"]] == ["another_study"]


def test_same_day_studies_are_ordered_by_time_and_undated_ones_by_the_best_series(tmp_path):
    F.write_series(tmp_path / "a" / "morning", n_slices=20, seed=1, edit=dated("20210605", "081500"))
    late = F.write_series(tmp_path / "a" / "evening", n_slices=16, seed=2, edit=dated("20210605", "191500"))
    assert read_study(tmp_path / "a").metadata["study_instance_uid"] == late.study_uid

    def undated(ds, k):
        del ds.StudyDate

    bigger = F.write_series(tmp_path / "b" / "x", n_slices=20, seed=3, edit=undated)
    F.write_series(tmp_path / "b" / "y", n_slices=16, seed=4, edit=undated)
    study = read_study(tmp_path / "b")
    assert study.metadata["study_instance_uid"] == bigger.study_uid
    assert "best series" in warning(study, "multiple_studies")


def test_series_uid_reused_in_two_studies_is_not_mixed(tmp_path):
    uid = generate_uid()
    old = F.write_series(tmp_path / "old", series_uid=uid, study_uid=generate_uid(), top_z=98.75, seed=5,
                         edit=dated("20190101", "090000"))
    new = F.write_series(tmp_path / "new", series_uid=uid, study_uid=generate_uid(), top_z=100.0, seed=6,
                         edit=dated("20220101", "090000"))
    scan = scan_dicom_files(sorted(tmp_path.rglob("*.dcm")))
    assert len(scan.series) == 2 and all(len(s.frames) == 16 for s in scan.series.values())
    study = read_study(tmp_path)
    np.testing.assert_array_equal(study.hu, new.hu)  # interleaved positions of the two would give 32 slices
    assert study.metadata["n_images_in_series"] == 16
    (other,) = study.metadata["other_series"]
    assert other["study_instance_uid"] == old.study_uid and other["reason_code"] == "another_study"


def test_primary_axial_beats_scout_coronal_mpr_and_derived_axial_mpr(tmp_path):
    study_uid = generate_uid()
    primary = F.write_series(tmp_path / "ax", n_slices=16, series_number=3, study_uid=study_uid, seed=7)
    # the derived axial MPR has more slices and thinner ones: only ImageType can make it lose
    F.write_series(tmp_path / "mpr_ax", n_slices=24, slice_spacing=1.5, series_number=4, study_uid=study_uid,
                   image_type=("DERIVED", "SECONDARY", "AXIAL"), series_description="Axial MPR", seed=8)
    F.write_series(tmp_path / "mpr_cor", n_slices=20, series_number=5, study_uid=study_uid,
                   image_type=("DERIVED", "SECONDARY", "REFORMATTED"), series_description="Coronal MPR",
                   row_dir=(1, 0, 0), col_dir=(0, 0, -1),
                   edit=lambda ds, k: setattr(ds, "ImagePositionPatient", [-22.0, -30.0 + 2.0 * k, 100.0]))
    scout_uid = generate_uid()
    scout = np.full((40, 64), -1000, dtype=np.int16)
    for i, iop in enumerate([(1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1)]):
        F.write_single_image(tmp_path / f"scout{i}.dcm", scout, ipp=(-200, 0, 200), iop=iop, series_uid=scout_uid,
                             study_uid=study_uid)
    study = read_study(tmp_path)
    np.testing.assert_array_equal(study.hu, primary.hu)
    assert study.metadata["chosen_series"]["derived"] is False
    others = {o["series_instance_uid"]: o for o in study.metadata["other_series"]}
    by_number = others_by_number(study)
    assert by_number[4]["reason_code"] == "derived_series" and by_number[4]["derived"] is True
    assert by_number[5]["reason_code"] == "non_axial"
    assert others[scout_uid]["reason_code"] == "localizer"
    assert "derived_series_used" not in codes(study)


def test_derived_axial_series_is_used_when_no_original_exists(tmp_path):
    mpr = F.write_series(tmp_path / "mpr", image_type=("DERIVED", "PRIMARY", "AXIAL"), seed=9)
    study = read_study(tmp_path / "mpr")
    np.testing.assert_array_equal(study.hu, mpr.hu)
    assert "primary" in warning(study, "derived_series_used").lower()
    # a secondary capture is not primary even when its ImageType says ORIGINAL/PRIMARY
    study_uid = generate_uid()
    primary = F.write_series(tmp_path / "c" / "ax", study_uid=study_uid, seed=21)
    F.write_series(tmp_path / "c" / "sc", n_slices=20, sop_class=SecondaryCaptureImageStorage, series_number=8,
                   study_uid=study_uid, seed=10)
    study = read_study(tmp_path / "c")
    np.testing.assert_array_equal(study.hu, primary.hu)
    assert study.metadata["other_series"][0]["reason_code"] == "derived_series"


def test_lung_kernel_wins_at_equal_coverage_but_not_over_better_coverage(tmp_path):
    study_uid = generate_uid()
    soft = F.write_series(tmp_path / "a" / "soft", series_number=2, study_uid=study_uid, seed=11,
                          series_description="Chest B30f", edit=lambda ds, k: setattr(ds, "ConvolutionKernel", "B30f"))
    lung = F.write_series(tmp_path / "a" / "lung", series_number=5, study_uid=study_uid, seed=12,
                          series_description="Chest B70f", edit=lambda ds, k: setattr(ds, "ConvolutionKernel", "B70f"))
    study = read_study(tmp_path / "a")
    np.testing.assert_array_equal(study.hu, lung.hu)  # despite the higher series number
    assert study.metadata["chosen_series"]["kernel_kind"] == "lung"
    (other,) = study.metadata["other_series"]
    assert other["series_instance_uid"] == soft.series_uid and other["reason_code"] == "softer_kernel"
    assert "B30f" in other["reason"] and "B70f" in other["reason"]
    # a lung kernel with clearly fewer slices does not win: coverage comes first
    study_uid = generate_uid()
    soft = F.write_series(tmp_path / "b" / "soft", n_slices=16, series_number=2, study_uid=study_uid, seed=13)
    F.write_series(tmp_path / "b" / "lung", n_slices=12, series_number=5, study_uid=study_uid, seed=14,
                   edit=lambda ds, k: setattr(ds, "ConvolutionKernel", "B70f"))
    study = read_study(tmp_path / "b")
    np.testing.assert_array_equal(study.hu, soft.hu)
    assert study.metadata["other_series"][0]["reason_code"] == "fewer_slices"


def test_equal_kernels_thinner_slices_win_and_contrast_is_recorded(tmp_path):
    study_uid = generate_uid()

    def thick(ds, k):
        ds.SliceThickness = 3.0
        ds.ContrastBolusAgent = "IODINE"

    F.write_series(tmp_path / "thick", series_number=2, study_uid=study_uid, seed=15, edit=thick)
    thin = F.write_series(tmp_path / "thin", series_number=6, study_uid=study_uid, seed=16,
                          edit=lambda ds, k: setattr(ds, "SliceThickness", 1.0))
    study = read_study(tmp_path)
    np.testing.assert_array_equal(study.hu, thin.hu)
    assert study.metadata["chosen_series"]["contrast_agent"] is False
    (other,) = study.metadata["other_series"]
    assert other["reason_code"] == "thicker_slices" and other["contrast_agent"] is True


@pytest.mark.parametrize(
    "kernel,kind",
    [("B30f", "soft"), ("Br40d\\3", "soft"), ("B70f", "lung"), ("I70f", "lung"), ("Bl57", "lung"),
     ("B80f", "bone"), ("LUNG", "lung"), ("BONEPLUS", "lung"), ("BONE", "bone"), ("STANDARD", "soft"),
     ("SOFT", "soft"), ("L", "lung"), ("YB", "lung"), ("B", "soft"), ("D", "bone"), ("FC52", "lung"),
     ("FC86", "lung"), ("FC13", "soft"), ("FC30", "bone"), ("DETAIL", "unknown"), ("XYZ", "unknown"),
     ("", "unknown"), (None, "unknown"), ("B46f", "unknown")],
)
def test_kernel_kind(kernel, kind):
    assert kernel_kind(kernel) == kind


# ---------------------------------------------------------------------------------------------------------------
# 2. pixel values
# ---------------------------------------------------------------------------------------------------------------


def test_padding_and_outside_field_values_become_air(tmp_path):
    hu = F.phantom(16, 64, 64, seed=17)
    corner = np.zeros(hu.shape[1:], bool)
    corner[:6, :6] = corner[-6:, -6:] = True
    filled = hu.copy()
    filled[:8, corner] = -2000  # declared padding (PixelPaddingValue) on the first 8 slices
    filled[8:, corner] = -3024  # undeclared outside-field fill on the others

    def pad(ds, k):
        if k < 8:
            ds.PixelPaddingValue = -2000 + 1024  # stored value (intercept -1024)

    F.write_series(tmp_path / "s", hu=filled, edit=pad, seed=17)
    study = read_study(tmp_path / "s")
    expected = hu.copy()
    expected[:, corner] = -1024
    np.testing.assert_array_equal(study.hu, expected)
    lungs = hu == -850
    np.testing.assert_array_equal(study.hu[lungs], hu[lungs])  # lung voxels untouched
    n = 16 * int(corner.sum())
    assert study.metadata["n_padding_voxels_masked"] == n
    assert warning(study, "padding_masked") == f"{n} voxels of padding/outside the scan field set to -1024 HU (air)"


def test_hounsfield_check_sees_the_cleaned_values(tmp_path):
    # no lungs, and all the air outside the body stored as outside-field fill: only the cleaned volume holds air
    hu = F.phantom(16, 64, 64, seed=22)
    hu[(hu > -900) & (hu < -700)] = 40
    hu[hu < -900] = -3024
    F.write_series(tmp_path / "s", hu=hu, seed=22)
    study = read_study(tmp_path / "s")
    assert study.hu.min() == -1024 and np.count_nonzero(study.hu == -1024) == np.count_nonzero(hu == -3024)
    assert "padding_masked" in codes(study)


def test_padding_range_in_air_is_masked_but_a_padding_value_inside_tissue_is_not_trusted(tmp_path):
    info = F.write_series(tmp_path / "s", seed=18)
    frame = next(iter(scan_dicom_files(info.paths).series.values())).frames[0]
    values = np.array([[-1050, -1090, -1024, -1000, -850, 40, -1200]], dtype=np.int32)
    frame.padding = (-1090 + 1024, -1050 + 1024)  # stored range → -1090 … -1050 HU
    out, n = _mask_padding(values, frame)
    assert out.tolist() == [[-1024, -1024, -1024, -1000, -850, 40, -1024]] and n == 3
    frame.padding = (1024 + 40, 1024 + 40)  # a header claiming 40 HU (soft tissue) is padding
    out, n = _mask_padding(values, frame)
    assert out.tolist() == [[-1050, -1090, -1024, -1000, -850, 40, -1024]] and n == 1


@pytest.mark.parametrize("decoder", ["pydicom", "simpleitk"])
def test_monochrome1_gives_the_same_hu(tmp_path, monkeypatch, decoder):
    monkeypatch.setenv("PNEUMOCT_DICOM_DECODER", decoder)
    hu = F.phantom(16, 64, 64, seed=19)
    F.write_series(tmp_path / "m2", hu=hu, seed=19)
    F.write_series(tmp_path / "m1", hu=hu, seed=19,
                   edit=lambda ds, k: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))
    m2, m1 = read_study(tmp_path / "m2"), read_study(tmp_path / "m1")
    np.testing.assert_array_equal(m1.hu, m2.hu)
    np.testing.assert_array_equal(m1.hu, hu)
    assert m1.metadata["photometric_interpretation"] == "MONOCHROME1"
    assert m2.metadata["photometric_interpretation"] == "MONOCHROME2"


@pytest.mark.parametrize("decoder", ["pydicom", "simpleitk"])
def test_enhanced_ct_per_frame_slope_and_intercept(tmp_path, monkeypatch, decoder):
    monkeypatch.setenv("PNEUMOCT_DICOM_DECODER", decoder)
    info = F.write_enhanced_ct(tmp_path / "enh.dcm", per_frame_intercepts=(-1024.0, -1000.0, -512.0),
                               per_frame_slopes=(1.0, 0.5))
    ds = pydicom.dcmread(info.paths[0])
    rescales = {(float(f.PixelValueTransformationSequence[0].RescaleSlope),
                 float(f.PixelValueTransformationSequence[0].RescaleIntercept))
                for f in ds.PerFrameFunctionalGroupsSequence}
    assert len(rescales) == 6
    study = read_study(tmp_path / "enh.dcm")
    np.testing.assert_array_equal(study.hu, info.hu)


# ---------------------------------------------------------------------------------------------------------------
# non-standard UIDs
# ---------------------------------------------------------------------------------------------------------------


def test_dashed_uids_and_empty_sop_uids_are_read_with_one_warning_and_a_clean_stderr(tmp_path, capfd, caplog):
    def edit(ds, k):
        ds.StudyInstanceUID = "1.2.840.99-ABC-study"
        ds.SeriesInstanceUID = "1.2.840.99-XYZ-series"
        # three images without SOPInstanceUID, two sharing one (at different positions), the rest dashed
        ds.SOPInstanceUID = "" if k < 3 else ("1.2.3.4.5-dup" if k in (5, 6) else f"1.2.840.99-{k}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = F.write_series(tmp_path / "s", edit=edit, seed=20)
    capfd.readouterr()
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = read_study(tmp_path / "s")
        inspected = inspect_input(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu)  # nothing merged or dropped
    msg = warning(study, "non_standard_uids")
    assert msg.startswith("14 UID(s) not in DICOM form") and "3 image(s) without SOPInstanceUID" in msg
    assert [w["code"] for w in inspected["warnings"]].count("non_standard_uids") == 1
    no_sop = [s for s in study.slices if s.sop_instance_uid is None]
    assert len(no_sop) == 3 and len({s.source for s in no_sop}) == 3  # identified by file name
    assert sum(s.sop_instance_uid == "1.2.3.4.5-dup" for s in study.slices) == 2
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    assert not [w for w in caught if "pydicom" in str(w.filename)]
