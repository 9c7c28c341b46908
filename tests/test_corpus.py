"""Issue 11: every awkward export of `tests/corpus.py` is read correctly (same slice positions as the unmodified
study, lung volume within 2 %) or refused by the command with one line and exit code 2, writing nothing."""
from __future__ import annotations

import numpy as np
import pytest

import corpus as C
from conftest import CTMD, require_real_data
from pneumoct.cli import main as cli_main
from pneumoct.errors import PneumoctInputError
from pneumoct.io import read_study
from pneumoct.preprocess.lung_mask import segment_lungs


def _lung_ml(study) -> float:
    return float(np.count_nonzero(segment_lungs(study).labels)) * study.voxel_volume_ml


def _positions(study) -> np.ndarray:
    return np.array([s.position_mm for s in study.slices])


@pytest.fixture(scope="module")
def phantom_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    base, cases = C.build_phantom_corpus(root / "cases")
    ref = read_study(next(c for c in cases if c.name == "clean").path)
    return {c.name: c for c in cases}, ref, _lung_ml(ref)


def _check_same(case, ref, ref_ml):
    study = read_study(case.path)
    got, want = _positions(study), _positions(ref)
    assert got.shape == want.shape, f"{case.name}: {got.size} slices, want {want.size}"
    np.testing.assert_allclose(got, want, atol=0.01, err_msg=case.name)
    ml = _lung_ml(study)
    assert abs(ml - ref_ml) <= C.LUNG_VOLUME_TOLERANCE * ref_ml, f"{case.name}: lung {ml:.0f} mL vs {ref_ml:.0f} mL"
    return study


def _check_refused_by_command(case, tmp_path, capsys):
    out = tmp_path / f"out_{case.name}"
    code = cli_main(["diagnose", str(case.path), "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, f"{case.name}: exit {code}"
    assert len(err) == 1, f"{case.name}: {err}"
    assert not out.exists() or not any(out.iterdir()), f"{case.name}: wrote {list(out.iterdir())}"


PHANTOM_CASES = ["clean", "gap1", "gap2", "large_gap", "tilt", "two_studies", "scout_mpr", "padding", "monochrome1",
                 "duplicates", "mixed_spacing", "one_slice", "dicomdir", "zip_nested", "uids"]


@pytest.mark.parametrize("name", PHANTOM_CASES)
def test_phantom_corpus_case(phantom_corpus, name, tmp_path, capsys):
    cases, ref, ref_ml = phantom_corpus
    case = cases[name]
    if case.expect == "same":
        study = _check_same(case, ref, ref_ml)
        if name not in ("tilt", "padding"):  # resampled / re-valued voxels are checked by volume only
            interp = np.array([bool(getattr(s, "interpolated", False)) for s in study.slices])
            same = ~interp
            np.testing.assert_array_equal(study.hu[same], ref.hu[same], err_msg=name)
    elif case.expect == "refuse":
        _check_refused_by_command(case, tmp_path, capsys)
    else:  # refuse_or_same: either is right, silently wrong is not
        try:
            read_study(case.path)
        except PneumoctInputError:
            _check_refused_by_command(case, tmp_path, capsys)
        else:
            _check_same(case, ref, ref_ml)


def test_corpus_awkward_inputs_carry_their_warning(phantom_corpus):
    cases, _, _ = phantom_corpus
    codes = {name: {w.code for w in read_study(cases[name].path).warnings}
             for name in ("gap1", "tilt", "two_studies", "padding", "duplicates", "uids")}
    assert "missing_slices" in codes["gap1"]
    assert "gantry_tilt" in codes["tilt"]
    assert "multiple_studies" in codes["two_studies"]
    assert "padding_masked" in codes["padding"]
    assert codes["duplicates"] & {"duplicate_slices_dropped"}
    assert "non_standard_uids" in codes["uids"]
    assert read_study(cases["padding"].path).hu.min() >= -1024


@pytest.mark.realdata
@pytest.mark.slow
def test_real_study_corpus(tmp_path, capsys):
    require_real_data()
    current, other = CTMD / "covid-P001", CTMD / "normal-normal001"
    ref = read_study(current)
    ref_ml = _lung_ml(ref)
    for case in C.build_real_corpus(tmp_path, current, other):
        _check_same(case, ref, ref_ml)
