"""The Python API: pneumoct.diagnose / Diagnosis.save / pneumoct.lung_mask, the same code as the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import pneumoct
from pneumoct.errors import PneumoctInputError


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from pneumoct.synth import synthesize_cohort

    root = tmp_path_factory.mktemp("api")
    rows = synthesize_cohort(root, 1, seed=5, labels=["covid19"], matrix=128, n_slices=40, formats=("nifti",))
    return root / rows[0]["case_id"]


def test_diagnose_returns_the_result_without_files_and_saves_like_the_cli(phantom, tmp_path):
    dx = pneumoct.diagnose(phantom / "image.nii.gz", use_learned_models=False)
    assert dx.label in ("healthy", "covid19", "other_viral", "cap") and 0 <= dx.abnormal_probability <= 1
    assert dx.result["patient"]["headline"] == dx.headline and dx.lesion_mask.shape == dx.lung_labels.shape
    assert not list(tmp_path.iterdir())
    saved = dx.save(tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "result.json").read_text())
    assert on_disk["patient"] == json.loads(json.dumps(dx.result["patient"])) and saved["outputs"][-1] == "result.json"
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"result.json", "report.html", "lung_mask.nii.gz",
                                                             "lesion_mask.nii.gz"}
    # the same study through the file path of the command: the same measurements
    from pneumoct.pipeline import DiagnoseOptions, diagnose

    cli = diagnose(phantom / "image.nii.gz", tmp_path / "cli", DiagnoseOptions(use_learned_models=False))
    assert cli["quantification"]["lesion_volume_ml"] == dx.result["quantification"]["lesion_volume_ml"]


def test_diagnose_takes_an_image_and_an_array(phantom):
    img = sitk.ReadImage(str(phantom / "image.nii.gz"))
    a = pneumoct.diagnose(img, use_learned_models=False)
    b = pneumoct.diagnose(a.output.study.hu, spacing=a.output.study.spacing, use_learned_models=False)
    assert a.result["quantification"]["lesion_volume_ml"] == b.result["quantification"]["lesion_volume_ml"]
    with pytest.raises(PneumoctInputError):
        pneumoct.diagnose(a.output.study.hu)  # an array needs its spacing


def test_lung_mask_returns_labels_in_the_input_geometry(phantom):
    img = sitk.ReadImage(str(phantom / "image.nii.gz"))
    flipped = sitk.Flip(img, [True, False, True])  # another orientation: the labels must follow it
    truth = sitk.ReadImage(str(phantom / "lung_mask.nii.gz"))
    for inp, ref in ((img, truth), (flipped, sitk.Flip(truth, [True, False, True]))):
        lab = pneumoct.lung_mask(inp)
        assert lab.GetSize() == inp.GetSize() and lab.GetDirection() == inp.GetDirection()
        p, t = sitk.GetArrayFromImage(lab), sitk.GetArrayFromImage(ref)
        for k in (1, 2):  # right and left, each where the phantom's truth has it
            dice = 2 * ((p == k) & (t == k)).sum() / ((p == k).sum() + (t == k).sum())
            assert dice > 0.85, (k, dice)
    arr = pneumoct.lung_mask(pneumoct.api.as_study(img).hu, spacing=pneumoct.api.as_study(img).spacing)
    assert isinstance(arr, np.ndarray) and set(np.unique(arr)) <= {0, 1, 2}


def test_diagnose_never_imports_training_code(phantom):
    """Issue 10: checkpoint loading lives with the models; a diagnosis (bundled networks included) imports nothing
    from pneumoct.train or pneumoct.evaluate (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, pneumoct\n"
            f"pneumoct.diagnose({str(phantom / 'image.nii.gz')!r})\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('pneumoct.train', 'pneumoct.evaluate')))\n"
            "assert 'pneumoct.models.checkpoint_info' in sys.modules\n"  # the bundled models were loaded
            "print('imported:', bad)\n"
            "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-500:] + proc.stderr[-1500:]


def test_segment_api_matches_the_command_and_keeps_the_geometry(phantom, tmp_path):
    """pneumoct.segment: the same mask as `pneumoct segment` on the study (one code path), in the input's geometry
    for a path, a reoriented SimpleITK image and an array."""
    from pneumoct.segmentation import segment_path

    path = phantom / "image.nii.gz"
    segment_path(path, tmp_path / "cmd")
    cmd = sitk.ReadImage(str(tmp_path / "cmd" / "lesion_mask.nii.gz"))
    api = pneumoct.segment(path)
    assert api.GetSize() == cmd.GetSize() and api.GetSpacing() == pytest.approx(cmd.GetSpacing())
    assert np.array_equal(sitk.GetArrayFromImage(api), sitk.GetArrayFromImage(cmd))
    img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "RAS")
    m = pneumoct.segment(img)
    assert m.GetSize() == img.GetSize() and m.GetDirection() == pytest.approx(img.GetDirection())
    assert int(sitk.GetArrayFromImage(m).astype(bool).sum()) == int(sitk.GetArrayFromImage(cmd).astype(bool).sum())
    from pneumoct.io import read_study

    st = read_study(path)
    arr = pneumoct.segment(st.hu, spacing=st.spacing, binary=True)
    assert isinstance(arr, np.ndarray) and set(np.unique(arr)) <= {0, 1} and arr.sum() > 0
    with pytest.raises(PneumoctInputError):
        pneumoct.segment(path, segmenter=tmp_path / "missing")
