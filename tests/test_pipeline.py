import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from pneumoct import cli
from pneumoct.io.writers import write_volume
from pneumoct.pipeline import DiagnoseOptions, diagnose
from pneumoct.rules import classify_by_rule
from pneumoct.types import CLASS_NAMES

from conftest import REAL_STUDIES, SHARED_DATA, require_real_data
from toy import toy_chest


@pytest.fixture(scope="module")
def toy_nifti(tmp_path_factory):
    study, cons, _ = toy_chest()
    path = tmp_path_factory.mktemp("toy") / "toy.nii.gz"
    write_volume(path, study.hu, study)
    return path, study, cons


@pytest.fixture(scope="module")
def toy_result(toy_nifti, tmp_path_factory):
    path, study, cons = toy_nifti
    out = tmp_path_factory.mktemp("out")
    # the threshold baseline: these tests check its measurements against the toy's known lesions; the learned
    # default is tested in test_learned.py / test_e2e_phantoms.py
    result = diagnose(path, out, DiagnoseOptions(lesions="threshold"))
    return out, result, study, cons


def test_diagnose_writes_all_outputs(toy_result):
    out, result, study, _ = toy_result
    for name in ("result.json", "report.html", "lung_mask.nii.gz", "lesion_mask.nii.gz"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["schema_version"] == "1.0"
    assert len(on_disk["slices"]) == study.shape[0]
    assert [s["index"] for s in on_disk["slices"]] == list(range(study.shape[0]))
    # positions follow the geometry: superior first, so z decreases
    pos = [s["position_mm"] for s in on_disk["slices"]]
    assert all(a > b for a, b in zip(pos, pos[1:]))
    assert on_disk["patient"]["label"] in CLASS_NAMES
    assert abs(sum(on_disk["patient"]["probabilities"].values()) - 1.0) < 1e-3
    patient_model = on_disk["patient"]["model"]
    if "learned" in on_disk["models"]:  # bundled models: the calibrated lesion burden decides (issue 9), the rule
        # and the phantom-trained M3Lung-Sys network are kept beside it
        assert on_disk["patient"]["headline_source"] == "burden"
        assert patient_model["name"] == "lesion_burden" and patient_model["calibrated"] is True
        assert "REAL" in patient_model["trained_on"]
        assert on_disk["patient"]["rule_result"]["model"]["kind"] == "rule"
        assert on_disk["patient"]["research_panel"]["m3lung_patient"]["model"]["name"] == "m3lung_patient"
        assert on_disk["patient"]["headline"] and isinstance(on_disk["patient"]["consistency"], list)
    else:
        assert patient_model["kind"] == "rule"
    assert on_disk["models"]["lesions"] == "threshold-baseline"
    assert set(on_disk["timing_s"]) >= {"read", "lungs", "lesions", "quantify", "total"}
    assert all(0.0 <= s["lesion_probability"] <= 1.0 for s in on_disk["slices"])


def test_masks_keep_the_study_geometry_and_content(toy_result):
    out, result, study, cons = toy_result
    img = sitk.DICOMOrient(sitk.ReadImage(str(out / "lung_mask.nii.gz")), "LPI")
    lung = sitk.GetArrayFromImage(img)
    assert lung.shape == study.shape
    np.testing.assert_allclose(img.GetSpacing()[::-1], study.spacing, rtol=1e-5)
    assert set(np.unique(lung)) == {0, 1, 2}
    lesion = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(out / "lesion_mask.nii.gz")), "LPI"))
    # the toy's consolidation is found, as consolidation, and lies inside the lung mask
    assert (lesion[cons] == 2).mean() > 0.7
    assert (lung[lesion > 0] > 0).all()
    # per-slice lesion area matches the mask
    areas = np.array([s["lesion_area_mm2"] for s in result["slices"]])
    expected = (lesion > 0).sum(axis=(1, 2)) * study.spacing[1] * study.spacing[2]
    np.testing.assert_allclose(areas, expected, atol=0.05)


def test_report_shows_method_overlays_and_curve(toy_result):
    out, result, _, _ = toy_result
    html = (out / "report.html").read_text()
    assert "Research use only" in html and "threshold-baseline" in html and "rule:quantification-v1" in html
    assert html.count("data:image/png;base64,") >= 4
    assert "<svg" in html and "<polyline" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_failed_run_leaves_no_result_json(toy_nifti, tmp_path, monkeypatch):
    path, _, _ = toy_nifti
    (tmp_path / "result.json").write_text("{}")  # a stale result from an earlier run
    import pneumoct.pipeline as pl

    def boom(*a, **k):
        raise RuntimeError("report failed")
    monkeypatch.setattr(pl, "build_report", boom)
    with pytest.raises(RuntimeError):
        diagnose(path, tmp_path)
    assert not (tmp_path / "result.json").exists()
    assert not list(tmp_path.glob(".*part*"))


def test_rerun_with_fewer_outputs_leaves_no_stale_file_of_ours(toy_nifti, tmp_path):
    """Issue 11 (reruns): a second run into the same folder with --no-report / --no-masks removes the first run's
    report and masks (they would describe another run), keeps result.json last, and never touches a user's file."""
    path, _, _ = toy_nifti
    (tmp_path / "notes.txt").write_text("mine")
    diagnose(path, tmp_path, DiagnoseOptions(use_learned_models=False))
    assert {p.name for p in tmp_path.iterdir()} >= {"report.html", "lung_mask.nii.gz", "lesion_mask.nii.gz",
                                                     "result.json"}
    res = diagnose(path, tmp_path, DiagnoseOptions(use_learned_models=False, write_report=False, write_masks=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "result.json"]
    assert res["outputs"] == ["result.json"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_refuses_bad_input_with_exit_2(tmp_path, capsys):
    assert cli.main(["diagnose", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png)
    assert cli.main(["diagnose", str(png), "--out", str(tmp_path / "o2")]) == 2
    assert "2D" in capsys.readouterr().err


def test_cli_batch_goes_on_after_a_failure(toy_nifti, tmp_path):
    path, _, _ = toy_nifti
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    code = cli.main(["diagnose", str(bad), str(path), "--out", str(tmp_path / "batch"), "--no-report"])
    assert code == 2
    records = json.loads((tmp_path / "batch" / "batch.json").read_text())["studies"]
    assert [r["status"] for r in records][1] == "ok" and records[0]["status"] != "ok"
    assert (tmp_path / "batch" / records[1]["output"] / "result.json").is_file()
    assert not (tmp_path / "batch" / records[0]["output"] / "result.json").exists()


def test_batch_resumes_skips_finished_and_redoes_changed_or_half_finished(toy_nifti, tmp_path, capsys):
    """Issue 11 (batches): batch.json is written after every study; a rerun skips a study whose folder holds a
    complete result of the same input and options, redoes one whose input changed or whose result is missing
    (half-finished), and --redo runs everything again. Progress with an ETA goes to stderr."""
    import shutil

    from pneumoct.pipeline import diagnose_batch

    path, _, _ = toy_nifti
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    shutil.copy(path, a)
    shutil.copy(path, b)
    out = tmp_path / "batch"
    seen = []

    def on_study(rec, result, pos, total, per):
        seen.append((rec["status"], pos, total, json.loads((out / "batch.json").read_text())["done"]))

    opts = DiagnoseOptions(use_learned_models=False, write_report=False)
    recs = diagnose_batch([a, b], out, opts, on_study=on_study)
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert seen == [("ok", 1, 2, 1), ("ok", 2, 2, 2)]  # batch.json already holds each study when it is reported
    assert json.loads((out / "batch.json").read_text())["complete"] is True
    t_a = (out / "a" / "result.json").stat().st_mtime_ns
    # rerun: both finished -> skipped; then b changes and a's result is removed (half-finished) -> both redone
    assert [r["status"] for r in diagnose_batch([a, b], out, opts)] == ["done_before", "done_before"]
    assert (out / "a" / "result.json").stat().st_mtime_ns == t_a
    shutil.copy(path, b)  # a new copy: new modification time, new fingerprint
    (out / "a" / "result.json").unlink()
    assert [r["status"] for r in diagnose_batch([a, b], out, opts)] == ["ok", "ok"]
    # other options: not the same run
    assert diagnose_batch([a], out, DiagnoseOptions(use_learned_models=False, write_report=False,
                                                     peripheral_thickness_mm=12.0))[0]["status"] == "ok"
    # the CLI: --redo runs again; stderr shows [k/n] progress
    capsys.readouterr()
    assert cli.main(["diagnose", str(a), str(b), "--out", str(out), "--no-report", "--no-models"]) == 0
    cap = capsys.readouterr()
    assert "[1/2]" in cap.err and "[2/2]" in cap.err
    assert cli.main(["diagnose", str(a), str(b), "--out", str(out), "--no-report", "--no-models"]) == 0
    assert "finished before" in capsys.readouterr().out
    assert cli.main(["diagnose", str(a), str(b), "--out", str(out), "--no-report", "--no-models", "--redo"]) == 0
    statuses = [r["status"] for r in json.loads((out / "batch.json").read_text())["studies"]]
    assert statuses == ["ok", "ok"]


def test_cli_entry_point_runs_as_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pneumoct", "diagnose", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _q(**kw):
    base = {"lesion_volume_ratio": 0.0, "lesion_count": 0, "peripheral_lesion_ratio": None, "ggo_fraction": None,
            "consolidation_fraction": None, "bilateral_involvement": False, "lesions": []}
    base.update(kw)
    return base


def test_rule_labels_follow_the_papers_findings():
    assert classify_by_rule(_q())["label"] == "healthy"
    assert classify_by_rule(_q(lesion_volume_ratio=0.004, lesion_count=2))["label"] == "healthy"
    covid = _q(lesion_volume_ratio=0.12, lesion_count=6, peripheral_lesion_ratio=0.7, ggo_fraction=0.85,
               consolidation_fraction=0.15, bilateral_involvement=True,
               lesion_volume_in_lung_ml={"total": 120.0, "right": 60.0, "left": 60.0},
               lesions=[{"volume_ml": 20.0}] * 6)
    assert classify_by_rule(covid)["label"] == "covid19"
    cap = _q(lesion_volume_ratio=0.05, lesion_count=1, peripheral_lesion_ratio=0.2, ggo_fraction=0.2,
             consolidation_fraction=0.8, lesions=[{"volume_ml": 120.0}])
    assert classify_by_rule(cap)["label"] == "cap"
    h1n1 = _q(lesion_volume_ratio=0.03, lesion_count=12, peripheral_lesion_ratio=0.3, ggo_fraction=0.7,
              consolidation_fraction=0.3, bilateral_involvement=True,
              lesion_volume_in_lung_ml={"total": 48.6, "right": 20.0, "left": 28.6},
              lesions=[{"volume_ml": 0.4}] * 9 + [{"volume_ml": 15.0}] * 3)
    assert classify_by_rule(h1n1)["label"] == "other_viral"
    # the same CAP picture split evenly over both lungs is no longer "unilateral"
    cap_unilateral = classify_by_rule(dict(cap, lesion_volume_in_lung_ml={"total": 120.0, "right": 120.0, "left": 0.0}))
    assert any(r.startswith("unilateral") for r in cap_unilateral["rule_evidence"]["cap"])
    r = classify_by_rule(covid)
    assert "bilateral" in r["rule_evidence"]["covid19"]
    assert r["abnormal_probability"] > 0.99 and r["model"]["calibrated"] is False


@pytest.mark.realdata
def test_real_studies_end_to_end(tmp_path):
    require_real_data()
    from pneumoct.io import read_study
    from pneumoct.pipeline import analyse_study

    slice_labels = np.load(SHARED_DATA / "covid-ct-md" / "Slice-level-labels-updated-1.npy")
    label_rows = {"covid19": 0, "cap": 55}  # Index.csv: row 0 = P001, row 55 = cap001
    lesion_ml, lung_ml = {}, {}
    for label, folder in REAL_STUDIES.items():
        # the learned segmenter (the threshold baseline runs beside it)
        out = analyse_study(read_study(folder), DiagnoseOptions(lesions="learned"))
        assert out.result["segmentation"]["ran"] is True
        if label in label_rows:
            # docs/data_notes.md: label column i is canonical slice i (superior first, SliceLocation descending);
            # checked with the threshold baseline's per-slice area (reported beside the learned mask)
            area = np.array([s["threshold_lesion_area_mm2"] for s in out.result["slices"]])
            radiologist = slice_labels[label_rows[label], : len(area)].astype(float)
            same = np.corrcoef(radiologist, area)[0, 1]
            reversed_ = np.corrcoef(radiologist[::-1], area)[0, 1]
            assert same > 0.45 and same > reversed_ + 0.2, (label, same, reversed_)
            # the learned segmenter's area follows the radiologists too, more weakly on the COVID-19 study
            # (measured r = 0.31 there; docs/models.md)
            learned_area = np.array([s["lesion_area_mm2"] for s in out.result["slices"]])
            assert np.corrcoef(radiologist, learned_area)[0, 1] > 0.2, label
        q = out.result["quantification"]
        lung_ml[label] = q["lung_volume_ml"]["total"]
        lesion_ml[label] = q["lesion_volume_ml"]
        assert 2000 <= lung_ml[label] <= 8000, (label, lung_ml[label])
        right_share = q["lung_volume_ml"]["right"] / q["lung_volume_ml"]["total"]
        assert 0.35 < right_share < 0.65, (label, right_share)  # the right/left split is at the midline
        assert all("sop_instance_uid" in s for s in out.result["slices"])
        text = json.dumps(out.result)
        import pydicom
        first = next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm")
        patient_id = str(pydicom.dcmread(first, stop_before_pixels=True).PatientID)
        assert patient_id and patient_id not in text  # no patient identifier in the result
    assert lesion_ml["covid19"] > 5 * max(lesion_ml["healthy"], 1.0)
    assert lesion_ml["cap"] > 5 * max(lesion_ml["healthy"], 1.0)
    assert lesion_ml["healthy"] < 10.0  # few false positives in the normal study


def test_crop_command_on_study_and_on_2d_image(toy_nifti, tmp_path):
    path, study, _ = toy_nifti
    assert cli.main(["crop", str(path), "--out", str(tmp_path / "s"), "--size", "96"]) == 0
    res = json.loads((tmp_path / "s" / "crops.json").read_text())
    assert res["input"]["hounsfield"] is True and len(res["slices"]) == study.shape[0]
    r0, r1, c0, c1 = res["study_bbox_r0_r1_c0_c1"]
    # the box holds both toy lungs (columns ~0.06n..0.94n of the lung ellipses) but not the table rows
    n = study.shape[1]
    assert c0 <= 0.30 * n and c1 >= 0.70 * n and r1 <= 0.82 * n
    img = np.asarray(Image.open(tmp_path / "s" / res["slices"][20]["file"]))
    assert img.shape == (96, 96)
    # a 2D image: accepted and flagged as having no HU
    sl = study.hu[20].astype(np.float32)
    png = tmp_path / "slice.png"
    Image.fromarray(np.clip((sl + 1000) / 1400 * 255, 0, 255).astype(np.uint8)).save(png)
    assert cli.main(["crop", str(png), "--out", str(tmp_path / "p")]) == 0
    res2 = json.loads((tmp_path / "p" / "crops.json").read_text())
    assert res2["input"]["hounsfield"] is False and res2["input"]["input_is_2d_image"] is True
    assert any(w["code"] == "2d_image_no_hu" for w in res2["input"]["warnings"])
    assert res2["slices"][0]["lung_found"]


def test_cli_synth_writes_cases_and_refuses_unknown_class(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "s"), "--cases", "1", "--labels", "flu"]) == 2
    assert "unknown class" in capsys.readouterr().err
    assert cli.main(["synth", "--out", str(tmp_path / "s"), "--cases", "2", "--labels", "cap,healthy",
                     "--matrix", "128", "--slices", "30", "--formats", "nifti", "--seed", "3"]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [row["label"] for row in manifest] == ["cap", "healthy"]
    truth = json.loads((tmp_path / "s" / manifest[0]["case_id"] / "truth.json").read_text())
    assert truth["label"] == "cap" and len(truth["slice_lesion_labels"]) == 30
    assert truth["lesion_volume_ratio"] > 0
    assert "synthetic" in truth["data_source"]


def test_report_images_rendered_beside_the_quantification_equal_the_report_built_at_once(toy_nifti):
    """diagnose renders the report's images (gallery, map panels) in a second thread while the quantification
    runs (issue 10); the report built from them must be the one built from scratch."""
    from pneumoct.pipeline import analyse_study
    from pneumoct.report.html import build_report

    _, study, _ = toy_nifti
    out = analyse_study(study, DiagnoseOptions(), {})
    assert out.figures is not None
    a = build_report(out.result | {"timing_s": {}}, study, out.lung_labels, out.lesion_mask, learned=out.learned,
                     figures=out.figures.result())
    b = build_report(out.result | {"timing_s": {}}, study, out.lung_labels, out.lesion_mask, learned=out.learned)
    assert a == b and "data:image/png;base64," in a
    assert analyse_study(study, DiagnoseOptions(write_report=False), {}).figures is None
