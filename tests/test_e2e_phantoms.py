"""End to end on synthetic phantoms written as DICOM series: diagnose against the generator's ground truth."""
import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pneumoct.pipeline import DiagnoseOptions, diagnose
from pneumoct.synth import synthesize_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    rows = synthesize_cohort(root, 2, seed=21, labels=["healthy", "covid19"], matrix=160, n_slices=48,
                             formats=("dicom",))
    results = {}
    for row in rows:
        case = root / row["case_id"]
        out = root / "out" / row["case_id"]
        results[row["label"]] = (case, out, diagnose(case / "dicom", out))
        # the threshold baseline on the same study (--lesions threshold)
        out_t = root / "out_threshold" / row["case_id"]
        results[row["label"] + "/threshold"] = (case, out_t, diagnose(case / "dicom", out_t,
                                                                       DiagnoseOptions(lesions="threshold")))
    return results


def _read(path):
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPI"))


def test_lungs_match_phantom_truth(cohort):
    for label, (case, out, result) in cohort.items():
        pred = _read(out / "lung_mask.nii.gz")
        truth = _read(case / "lung_mask.nii.gz")
        assert pred.shape == truth.shape
        for lab in (1, 2):  # right and left, each
            p, t = pred == lab, truth == lab
            dice = 2 * (p & t).sum() / (p.sum() + t.sum())
            assert dice > 0.9, (label, lab, dice)


# measured (seed 21, 160 px): learned 378 vs 130 mL, 41 % of the true lesion volume found; threshold 0.86 Dice class
@pytest.mark.parametrize("path,ratio,coverage", [("", 2.0, 0.3), ("/threshold", 3.0, 0.5)])
def test_covid_phantom_has_more_lesion_than_healthy_and_lesions_where_truth_is(cohort, path, ratio, coverage):
    """Default (learned segmenter) and threshold baseline. The learned segmenter is trained on real 2D slices plus
    phantoms and marks some perihilar vessel/bronchus structure of healthy phantoms as lesion (docs/models.md),
    and finds less of the phantoms' lesions than the HU baseline built for them: hence the looser bounds for it."""
    q = {k: v[2]["quantification"] for k, v in cohort.items()}
    assert q["covid19" + path]["lesion_volume_ml"] > ratio * max(q["healthy" + path]["lesion_volume_ml"], 1.0)
    case, out, result = cohort["covid19" + path]
    # the default mask is the one the shipped headline calibration was fitted on (docs/headline.md)
    from pneumoct.burden import load_calibration

    learned_default = (load_calibration() or {}).get("mask_method", "learned") == "learned"
    assert result["models"]["lesions"].startswith(
        "learned:lesion_seg" if (not path and learned_default) else "threshold")
    assert result["segmentation"]["ran"] is (not path and learned_default)
    truth = json.loads((case / "truth.json").read_text())
    truth_slices = np.array(truth["slice_lesion_labels"], bool)
    prob = np.array([s["lesion_probability"] for s in result["slices"]])
    assert prob[truth_slices].mean() > prob[~truth_slices].mean() + 0.2
    pred = _read(out / "lesion_mask.nii.gz") > 0
    gt = _read(case / "lesion_mask.nii.gz") > 0
    assert (pred & gt).sum() / gt.sum() > coverage  # most of the true lesion volume is found


def test_slices_trace_back_to_the_dicom_files(cohort):
    case, _, result = cohort["healthy"]
    by_uid = {}
    for f in (case / "dicom").iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_uid[ds.SOPInstanceUID] = float(ds.ImagePositionPatient[2])
    assert len(result["slices"]) == len(by_uid)
    for s in result["slices"]:
        assert abs(by_uid[s["sop_instance_uid"]] - s["position_mm"]) < 1e-3



def test_healthy_phantoms_at_demo_settings_are_ct0_and_healthy(tmp_path):
    """Issue 9: without a size floor a healthy phantom got CT-1, zone score 5 and 23 "lesions". The demo's phantoms
    (256 px, 80 slices, seed 7) must be CT-0 with zone score 0 and a healthy headline. A regression test, not a
    held-out figure: seed 7 was used to design the hilar rule. Held-out figures on fresh seeds:
    docs/healthy_phantoms.md."""
    rows = synthesize_cohort(tmp_path / "c", 2, seed=7, labels=["healthy"], matrix=256, n_slices=80,
                             formats=("nifti",))
    for row in rows:
        result = diagnose(tmp_path / "c" / row["case_id"] / "image.nii.gz", tmp_path / "o" / row["case_id"],
                          DiagnoseOptions(write_report=False, write_masks=False))
        sev = result["quantification"]["severity"]
        assert sev["mosmed_grade"] == "CT-0" and sev["ctss_zones_total"] == 0, (row["case_id"], sev)
        assert result["patient"]["label"] == "healthy", result["patient"]["headline"]
        assert result["quantification"]["lesion_count"] == 0


def _assert_healthy_phantom_is_ct0(tmp_path, seed: int, matrix: int) -> None:
    """Healthy phantom (case 1 of ``seed``, 80 slices) through the diagnose path: CT-0, zone score 0, healthy."""
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom
    from pneumoct.synth.writer import case_seed, write_case

    ph = generate_phantom(PhantomConfig(label="healthy", seed=case_seed(seed, 1), matrix=matrix, n_slices=80))
    write_case(ph, tmp_path, "c", formats=("nifti",))
    del ph
    result = diagnose(tmp_path / "c" / "image.nii.gz", tmp_path / "o",
                      DiagnoseOptions(write_report=False, write_masks=False))
    sev = result["quantification"]["severity"]
    assert sev["mosmed_grade"] == "CT-0" and sev["ctss_zones_total"] == 0, sev
    assert result["patient"]["label"] == "healthy", result["patient"]["headline"]


def test_healthy_phantom_512_with_lateral_hilum_is_ct0(tmp_path):
    """A 512 px healthy phantom (seed 211, case 1) whose right hilar bronchus and artery reach more than 30 mm out of
    the mediastinum was CT-1 with 8 mL of "consolidation" and a CAP headline when the hilar rule looked 30 mm deep;
    it must be CT-0 with a healthy headline through the diagnose path. (The case that set the depth to 40 mm: a
    regression test, not a held-out figure.)"""
    _assert_healthy_phantom_is_ct0(tmp_path, seed=211, matrix=512)


def test_healthy_phantom_256_with_svc_beside_a_narrow_mediastinum_is_ct0(tmp_path):
    """Generator 1.0 drew this 256 px healthy phantom (seed 101, case 1) with its SVC in an island of lung (a thin
    mediastinal strip) and a 1.5 mm Gaussian "kernel" (blur set in pixels); the lung mask rightly filled the island
    and the threshold baseline kept 48 mL of "consolidation": CT-1, headline CAP. Generator 1.1 attaches mediastinal
    tubes to the mediastinum and blurs in mm; the case must be CT-0 with a healthy headline through the diagnose
    path. (A regression test on a seed used to design the fix, not a held-out figure.)"""
    _assert_healthy_phantom_is_ct0(tmp_path, seed=101, matrix=256)


def test_study_outside_the_headline_calibration_data_is_flagged(cohort):
    """The headline calibration was fitted on 3 real DICOM studies (0.6-0.75 mm pixels, 2 mm slices, kernel D40s):
    a coarse 160 px phantom with thick slices and a synthetic kernel falls outside that fingerprint."""
    _, _, result = cohort["healthy"]
    msgs = [w["message"] for w in result["input"]["warnings"] if w["code"] == "outside_training_fingerprint"]
    assert any(m.startswith("headline calibration:") for m in msgs), result["input"]["warnings"]
