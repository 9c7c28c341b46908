"""Missing slices and gantry tilt (issue 11): small gaps are interpolated and marked, tilted stacks resampled onto an
orthogonal grid, large gaps and tilts refused; the pipeline never puts lesion on an interpolated slice."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dicom_factory as F  # noqa: E402

from pneumoct.errors import PneumoctInputError  # noqa: E402
from pneumoct.io import inspect_input, read_study  # noqa: E402
from pneumoct.io.dicom_stack import MAX_GAP_MISSING_MM, MAX_GAP_MISSING_SLICES, MAX_TILT_DEG  # noqa: E402
from pneumoct.pipeline import drop_lesions_on_interpolated  # noqa: E402
from pneumoct.quantify.threshold_baseline import LesionFinding  # noqa: E402
from pneumoct.types import SliceInfo, StudyVolume, interpolated_slices  # noqa: E402


def warning(study: StudyVolume, code: str) -> str:
    found = [w.message for w in study.warnings if w.code == code]
    assert found, f"no warning {code}; got {[w.code for w in study.warnings]}"
    return found[0]


def refused(code: str, folder: Path) -> PneumoctInputError:
    with pytest.raises(PneumoctInputError) as info:
        read_study(folder)
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value}"
    assert "\n" not in str(info.value)
    assert inspect_input(folder)["refusal"]["code"] == code  # inspect says the same from headers only
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# (a) small gaps: interpolated, marked, real slices untouched
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("removed", [[9], [9, 10]], ids=["one", "two"])
@pytest.mark.parametrize("orientation", ["head_first", "feet_first_flipped"])
def test_small_gap_is_filled_by_interpolation(tmp_path, removed, orientation):
    kwargs = {} if orientation == "head_first" else {"row_dir": (-1, 0, 0), "col_dir": (0, 1, 0)}
    whole = read_study(F.write_series(tmp_path / "whole", n_slices=30, seed=31, **kwargs).folder)
    info = F.write_series(tmp_path / "gap", n_slices=30, seed=31, **kwargs)
    for k in removed:
        info.paths[k].unlink()
    study = read_study(tmp_path / "gap")

    assert study.shape == whole.shape
    assert study.spacing == pytest.approx(whole.spacing)
    assert study.origin == pytest.approx(whole.origin)
    np.testing.assert_allclose([s.position_mm for s in study.slices], [s.position_mm for s in whole.slices])
    assert list(np.flatnonzero(interpolated_slices(study))) == removed
    assert all(study.slices[k].sop_instance_uid is None and study.slices[k].source is None for k in removed)
    real = [k for k in range(30) if k not in removed]
    np.testing.assert_array_equal(study.hu[real], whole.hu[real])
    for k in real:  # real slices keep their identity, and their to_dict() has no "interpolated" key
        assert study.slices[k].sop_instance_uid == F.read_back(info.paths[k]).SOPInstanceUID
        assert set(study.slices[k].to_dict()) == {"index", "position_mm", "sop_instance_uid", "source"}
    # the inserted slices are the linear blend of the two real neighbours
    lo, hi = removed[0] - 1, removed[-1] + 1
    for j, k in enumerate(removed, start=1):
        w = j / (len(removed) + 1)
        expect = np.rint((1 - w) * whole.hu[lo].astype(np.float32) + w * whole.hu[hi].astype(np.float32))
        np.testing.assert_array_equal(study.hu[k], expect.astype(np.int16))
    msg = warning(study, "missing_slices")
    zs = [f"{whole.slices[k].position_mm:.1f}" for k in removed]
    assert f"{len(removed)} slice(s) missing" in msg and "interpolated" in msg
    assert (f"z={zs[0]} mm" if len(zs) == 1 else f"z={zs[0]} to {zs[-1]} mm") in msg
    assert study.metadata["n_interpolated_slices"] == len(removed)


def test_complete_series_has_no_interpolated_slices(tmp_path):
    info = F.write_series(tmp_path / "s", n_slices=20, seed=32)
    study = read_study(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu)
    assert not interpolated_slices(study).any()
    assert all("interpolated" not in s.to_dict() for s in study.slices)
    assert "n_interpolated_slices" not in study.metadata


# ---------------------------------------------------------------------------------------------------------------
# (b) large gaps: refused
# ---------------------------------------------------------------------------------------------------------------


def test_gap_of_too_many_slices_is_refused(tmp_path):
    info = F.write_series(tmp_path / "s", n_slices=60, slice_spacing=1.0, seed=33)
    n = MAX_GAP_MISSING_SLICES + 1  # 5 x 1 mm: within the mm limit, above the slice limit
    for k in range(20, 20 + n):
        info.paths[k].unlink()
    err = refused("large_gap", tmp_path / "s")
    assert f"{n} consecutive slice(s)" in str(err) and "too large to interpolate" in str(err)


def test_gap_of_too_many_mm_is_refused(tmp_path):
    info = F.write_series(tmp_path / "s", n_slices=40, slice_spacing=5.0, seed=34)
    for k in (20, 21, 22):  # 3 x 5 mm = 15 mm > MAX_GAP_MISSING_MM
        info.paths[k].unlink()
    err = refused("large_gap", tmp_path / "s")
    assert "15.0 mm" in str(err) and f"{MAX_GAP_MISSING_MM:.0f} mm" in str(err)


def test_too_many_slices_missing_in_total_is_refused(tmp_path):
    info = F.write_series(tmp_path / "s", n_slices=30, seed=35)
    for k in (4, 10, 16, 22):  # four single-slice gaps: 4 of 30 positions = 13 % > 10 %
        info.paths[k].unlink()
    err = refused("large_gap", tmp_path / "s")
    assert "4 of 30 slice positions missing" in str(err)


# ---------------------------------------------------------------------------------------------------------------
# (c) gantry tilt: resampled onto an orthogonal grid
# ---------------------------------------------------------------------------------------------------------------


def _lungs(hu: np.ndarray) -> np.ndarray:
    """Air inside the body: the phantom's lungs (air connected to the image border is outside air). The threshold
    is half way between lung (-850) and soft tissue (40 HU), so interpolation blur does not bias the area."""
    out = np.zeros(hu.shape, bool)
    for k in range(hu.shape[0]):
        labels, _ = ndimage.label(hu[k] < -405)
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        out[k] = (labels > 0) & ~np.isin(labels, border)
    return out


@pytest.mark.parametrize("tilt", [12.0, -20.0])
def test_tilted_stack_is_resampled_onto_the_untilted_anatomy(tmp_path, tilt):
    hu = F.phantom(20, 96, 96, seed=36)
    info = F.write_tilted_series(tmp_path / "t", hu, tilt)
    study = read_study(tmp_path / "t")
    msg = warning(study, "gantry_tilt")
    assert f"{abs(tilt):.1f} degrees" in msg and "resampled" in msg and "not resampled" not in msg
    assert study.metadata["gantry_tilt_resampled"] is True
    assert study.spacing[0] == pytest.approx(2.5)
    np.testing.assert_allclose([s.position_mm for s in study.slices], info.z_positions)

    truth, got = _lungs(hu), _lungs(study.hu)
    assert abs(int(got.sum()) - int(truth.sum())) <= 0.02 * truth.sum()
    # the resampled grid hangs from the middle slice: in patient coordinates its rows start this many rows lower
    row_offset = (study.origin[1] - info.origin[1]) / 0.7
    assert abs(row_offset) > 2
    for k in range(hu.shape[0]):
        assert abs(int(got[k].sum()) - int(truth[k].sum())) <= 0.02 * truth[k].sum()
        centre = np.array(ndimage.center_of_mass(got[k])) + [row_offset, 0.0]
        np.testing.assert_allclose(centre, ndimage.center_of_mass(truth[k]), atol=1.0)
    # without the resampling the end slices would sit ~tan(tilt)*2.5*10/0.7 rows off
    raw = _lungs(F.read_back(info.paths[0]).pixel_array.astype(np.int16)[None] - 1024)
    assert abs(ndimage.center_of_mass(raw[0])[0] - row_offset - ndimage.center_of_mass(truth[0])[0]) > 5


def test_tilted_image_planes_get_the_spacing_along_their_normal(tmp_path):
    # the other way scanners write a tilt: ImageOrientationPatient tilted, positions along the table (true z)
    t = np.radians(15.0)
    F.write_series(tmp_path / "s", col_dir=(0, np.cos(t), np.sin(t)), seed=39)
    study = read_study(tmp_path / "s")
    assert "15.0 degrees" in warning(study, "gantry_tilt")
    assert study.spacing[0] == pytest.approx(2.5 * np.cos(t))
    # the slice axis is the tilted normal, not the table axis
    np.testing.assert_allclose(np.abs(study.direction[:, 2]), [0, np.sin(t), np.cos(t)], atol=1e-6)


def test_tilt_above_the_limit_is_refused(tmp_path):
    step = 2.5 * np.tan(np.radians(MAX_TILT_DEG + 5))

    def shear(ds, k):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + step * k, z]

    F.write_series(tmp_path / "s", edit=shear, seed=37)
    err = refused("large_tilt", tmp_path / "s")
    assert f"{MAX_TILT_DEG + 5:.1f} degrees" in str(err)


# ---------------------------------------------------------------------------------------------------------------
# (d) no lesion on interpolated slices
# ---------------------------------------------------------------------------------------------------------------


def test_lesion_mask_is_zeroed_on_interpolated_slices_only():
    hu = np.zeros((5, 8, 8), np.int16)
    slices = [SliceInfo(k, -2.0 * k, interpolated=True if k in (1, 2) else None) for k in range(5)]
    study = StudyVolume(hu, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.diag([1.0, 1.0, -1.0]), slices, "dicom")
    finding = LesionFinding(mask=np.ones(hu.shape, np.uint8), probability_map=np.full(hu.shape, 0.9))
    out = drop_lesions_on_interpolated(finding, study)
    assert out is finding
    assert out.mask[[1, 2]].sum() == 0 and (out.mask[[0, 3, 4]] == 1).all()
    assert out.probability_map[[1, 2]].max() == 0 and out.probability_map[0].min() == pytest.approx(0.9)
    assert out.params["interpolated_slices_zeroed"] == 2
    assert drop_lesions_on_interpolated(None, study) is None


def test_diagnose_reports_no_lesion_on_an_interpolated_slice(tmp_path):
    from pneumoct.pipeline import DiagnoseOptions, analyse_study
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom

    ph = generate_phantom(PhantomConfig(label="covid19", seed=7, matrix=128, n_slices=40))
    sz, sy, _ = ph.study.spacing
    info = F.write_series(tmp_path / "s", ph.study.hu, pixel_spacing=sy, slice_spacing=sz, seed=38)
    lesion_area = (ph.lesion_mask > 0).sum(axis=(1, 2))
    candidates = [k for k in range(2, 38) if lesion_area[k] > 0 and lesion_area[k - 1] > 0 and lesion_area[k + 1] > 0]
    assert candidates, "the phantom should have lesions on consecutive slices"
    k = candidates[len(candidates) // 2]
    info.paths[k].unlink()

    out = analyse_study(read_study(tmp_path / "s"),
                        DiagnoseOptions(use_learned_models=False, write_report=False, write_masks=False))
    slices = out.result["slices"]
    assert len(slices) == 40
    assert [s["index"] for s in slices if s.get("interpolated")] == [k]
    assert slices[k]["lesion_area_mm2"] == 0 and slices[k]["lesion_probability"] == 0
    assert "sop_instance_uid" not in slices[k]
    assert out.lesion_mask[k].sum() == 0
    assert out.lung_labels[k].sum() > 0  # the lung mask spans the gap
    assert slices[k - 1]["lesion_area_mm2"] > 0 or slices[k + 1]["lesion_area_mm2"] > 0
    assert "missing_slices" in {w["code"] for w in out.result["input"]["warnings"]}
