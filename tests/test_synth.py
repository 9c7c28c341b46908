"""pneumoct.synth: seeded chest-CT phantoms with ground truth, and their NIfTI/DICOM writers."""
from __future__ import annotations

import csv
import functools
import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from pneumoct.synth import PhantomConfig, generate_phantom, synthesize_cohort, write_case
from pneumoct.synth.phantom import _resolve_geometry
from pneumoct.types import CLASS_NAMES, LESION_CONSOLIDATION, LESION_GGO, LUNG_LEFT, LUNG_RIGHT

SMALL = dict(matrix=112, n_slices=32)


@functools.lru_cache(maxsize=None)
def phantom(label: str, seed: int = 3, difficulty: float = 0.0, **kw) -> object:
    cfg = dict(SMALL)
    cfg.update(kw)
    return generate_phantom(PhantomConfig(label=label, seed=seed, difficulty=difficulty, **cfg))


def peripheral_ratio(ph, thickness_mm: float = 15.0) -> float:
    """DeepSC-COVID's peripheral lesion ratio: lesion voxels within ``thickness_mm`` of the lung border, per slice."""
    ps = ph.study.spacing[1]
    les = ph.lesion_mask > 0
    inner = np.zeros_like(les)
    for i in range(les.shape[0]):
        d = ndi.distance_transform_edt(ph.lung_mask[i] > 0, sampling=(ps, ps))
        inner[i] = d > thickness_mm
    return float((les & ~inner).sum() / max(1, les.sum()))


# ------------------------------------------------------------------------------------------ determinism, geometry
def test_same_config_gives_identical_arrays_and_seed_changes_them():
    a = generate_phantom(PhantomConfig("covid19", seed=21, matrix=96, n_slices=24))
    b = generate_phantom(PhantomConfig("covid19", seed=21, matrix=96, n_slices=24))
    c = generate_phantom(PhantomConfig("covid19", seed=22, matrix=96, n_slices=24))
    assert np.array_equal(a.study.hu, b.study.hu)
    assert np.array_equal(a.lung_mask, b.lung_mask) and np.array_equal(a.lesion_mask, b.lesion_mask)
    assert a.lesions == b.lesions and a.study.origin == b.study.origin
    assert [s.sop_instance_uid for s in a.study.slices] == [s.sop_instance_uid for s in b.study.slices]
    assert not np.array_equal(a.study.hu, c.study.hu)
    # the resolved config (drawn fields filled in) regenerates the same phantom
    d = generate_phantom(a.config)
    assert a.config.slice_spacing_mm is not None and a.config.pixel_spacing_mm is not None
    assert np.array_equal(a.study.hu, d.study.hu)


def test_same_seed_different_label_differs_only_around_lesions():
    h, cv = phantom("healthy"), phantom("covid19")
    assert np.array_equal(h.lung_mask, cv.lung_mask)
    diff = h.study.hu != cv.study.hu
    assert diff.any()
    # distance (mm) to the nearest ground-truth lesion voxel
    dist = ndi.distance_transform_edt(cv.lesion_mask == 0, sampling=cv.study.spacing)
    lung = h.lung_mask > 0
    border = ndi.binary_dilation(lung, iterations=3) & ~ndi.binary_erosion(lung, iterations=2)
    # soft lesion margins (alpha < 0.5, not in the mask) reach a slice beyond the mask on thick slices;
    # elsewhere only faint partial-volume traces of lesions cut by the pleura, at the lung border
    delta = np.abs(h.study.hu.astype(int) - cv.study.hu)
    far = diff & (dist > 2.0 * cv.study.spacing[0] + 6.0)
    assert far.sum() < 0.02 * diff.sum()
    assert not (far & ~border & (delta > 3)).any()
    assert delta[far].max() < 80


def test_canonical_geometry_and_slice_info():
    ph = phantom("healthy")
    st = ph.study
    assert st.hu.dtype == np.int16 and st.shape == (32, 112, 112)
    assert np.allclose(st.direction, np.diag([1.0, 1.0, -1.0]))
    pos = np.array([s.position_mm for s in st.slices])
    assert np.allclose(np.diff(pos), -st.spacing[0]) and pos[0] == pytest.approx(st.origin[2])
    assert len({s.sop_instance_uid for s in st.slices}) == st.shape[0]
    assert ph.config.n_slices == 32 and st.spacing[0] == pytest.approx(ph.config.slice_spacing_mm)
    # the slices cover a chest
    assert 240.0 <= 32 * st.spacing[0] <= 340.0
    assert 320.0 <= st.spacing[1] * 112 <= 420.0


@pytest.mark.parametrize("seed", range(6))
def test_drawn_geometry_is_plausible(seed):
    geom, info = _resolve_geometry(PhantomConfig("healthy", seed=seed, matrix=512))
    assert 24 <= geom.n <= 500
    assert 0.6 <= geom.dz <= 5.0
    assert 230.0 <= geom.n * geom.dz <= 340.0
    assert 320.0 <= geom.fov <= 420.0
    assert geom.pad in (-2048, -3024)


# --------------------------------------------------------------------------------------------------- anatomy/HU
@pytest.mark.parametrize("seed", [3, 8])
def test_lungs_plausible_volume_sides_and_density(seed):
    ph = phantom("healthy", seed=seed)
    lm = ph.lung_mask
    assert set(np.unique(lm)) == {0, LUNG_RIGHT, LUNG_LEFT}
    vox_ml = ph.study.voxel_volume_ml
    right_ml, left_ml = (lm == LUNG_RIGHT).sum() * vox_ml, (lm == LUNG_LEFT).sum() * vox_ml
    assert 2500.0 < right_ml + left_ml < 7500.0
    assert right_ml > left_ml  # the heart sits in the left hemithorax
    cols = np.arange(lm.shape[2])
    right_cols, left_cols = cols[(lm == LUNG_RIGHT).any(axis=(0, 1))], cols[(lm == LUNG_LEFT).any(axis=(0, 1))]
    assert right_cols.mean() < lm.shape[2] / 2 < left_cols.mean()  # patient right on the image left
    # no lung in the first (above the apex) or last (below the recesses) slices; widest in the lower half
    area = (lm > 0).sum(axis=(1, 2))
    assert area[0] == 0 and area[-1] == 0
    assert np.argmax(area) > len(area) * 0.3
    hu = ph.study.hu[lm > 0]
    assert (hu < -700).mean() > 0.7  # the rest: vessels, dependent density, partial volume at the pleura
    interior = np.stack([ndi.binary_erosion(m) for m in lm > 0])
    assert (ph.study.hu[interior] < -700).mean() > 0.9
    assert -900 < np.median(hu) < -780
    assert ph.lesion_volume_ratio == 0.0 and not ph.lesion_mask.any()


@pytest.mark.parametrize("seed", [3, 8])
def test_lung_never_encloses_a_mediastinal_structure(seed):
    """The SVC, great vessels and hilar roots sit in mediastinal/hilar fat: no slice of the true lung mask may have
    a hole (generator 1.0 drew the SVC of a narrow mediastinum in an island of lung, which a lung mask fills and the
    lesion finder then took for consolidation). Intrapulmonary vessels are painted over the lung, not cut from it.
    Slices from the diaphragm domes down are left out: a dome's top cut by a slice is a real island in the lung."""
    ph = phantom("healthy", seed=seed)
    lung = ph.lung_mask > 0
    dome = min(ph.anatomy["slice_of"]["right_dome"], ph.anatomy["slice_of"]["left_dome"])
    assert dome > lung.shape[0] // 2
    for z in range(dome - 1):
        holes = ndi.binary_fill_holes(lung[z]) & ~lung[z]
        assert holes.sum() <= 2, (z, int(holes.sum()))  # a partial-volume pixel at most


@pytest.mark.parametrize("matrix", [112, 256])
def test_kernel_blur_is_set_in_mm_not_pixels(matrix):
    """A reconstruction kernel blurs by a fixed width in mm; generator 1.0 drew it in pixels, so a 256 matrix got a
    1.5 mm Gaussian that turned small bronchovascular bundles into ground-glass-like blobs."""
    ph = phantom("healthy", seed=5, matrix=matrix)
    sigma_mm = ph.anatomy["blur_px"] * ph.study.spacing[1]
    assert 0.39 <= sigma_mm <= 0.73, sigma_mm


def test_hu_ranges_air_padding_body_bone():
    ph = phantom("healthy")
    hu = ph.study.hu
    n = hu.shape[1]
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2)
    outside, inside = r > n / 2, r < n / 2 - 1
    assert np.all(hu[:, outside] == ph.config.pad_hu) and ph.config.pad_hu in (-2048, -3024)
    # air inside the circle but far from the body: top rows, anterior to the patient
    air = hu[:, 4:10, n // 2 - 6:n // 2 + 6]
    assert abs(float(air.mean()) + 1000.0) < 10.0 and air.min() >= -1024
    inside = hu[:, inside]
    assert inside.min() >= -1024 and inside.max() <= 3071
    mid = hu[len(hu) // 2]
    assert (mid > 250).sum() > 20  # spine, ribs, sternum
    assert ((mid > -150) & (mid < -60)).sum() > 50  # subcutaneous/mediastinal fat
    assert ((mid > 20) & (mid < 80)).sum() > 200  # muscle, heart


def test_table_below_the_back_separated_by_air():
    ph = phantom("healthy")
    col = ph.study.hu[len(ph.study.hu) // 2, :, ph.study.shape[2] // 2].astype(int)
    body_rows = np.nonzero(col > -700)[0]
    groups = np.split(body_rows, np.nonzero(np.diff(body_rows) > 1)[0] + 1)
    assert len(groups) >= 2  # body, then the table (one or two shells, depending on the pixel size)
    body, table = groups[0], groups[1]
    assert table[0] > body[-1] + 1
    assert col[body[-1] + 1:table[0]].min() < -900  # an air gap between the back and the table


def test_airway_trachea_above_carina_is_air_and_outside_lungs():
    ph = phantom("healthy", matrix=128, n_slices=40)
    k = (ph.anatomy["slice_of"]["lung_apex"] + ph.anatomy["slice_of"]["carina"]) // 2
    hu, lm = ph.study.hu[k], ph.lung_mask[k]
    body = ndi.binary_fill_holes(hu > -500)
    dark = (hu < -900) & body & (lm == 0)
    lab, n = ndi.label(dark)
    assert n >= 1
    cy, cx = ndi.center_of_mass(dark, lab, int(np.argmax(ndi.sum(dark, lab, range(1, n + 1)))) + 1)
    assert abs(cx - hu.shape[1] / 2) < hu.shape[1] * 0.08  # midline


# --------------------------------------------------------------------------------------------------- lesions
@pytest.mark.parametrize("label", CLASS_NAMES)
@pytest.mark.parametrize("seed", [3, 5])
def test_lesions_inside_lung_and_truth_consistent(label, seed):
    ph = phantom(label, seed=seed)
    les, lm = ph.lesion_mask, ph.lung_mask
    assert les.dtype == np.uint8 and set(np.unique(les)) <= {0, LESION_GGO, LESION_CONSOLIDATION}
    assert not (les[lm == 0] > 0).any()
    assert np.array_equal(ph.slice_lesion_labels, (les > 0).any(axis=(1, 2)))
    assert ph.lesion_volume_ratio == pytest.approx((les > 0).sum() / (lm > 0).sum())
    for rec in ph.lesions:
        assert {"kind", "side", "centre", "radius_mm", "pattern", "n_voxels"} <= rec.keys()
        assert rec["n_voxels"] >= 1 and rec["side"] in ("right", "left") and len(rec["centre"]) == 3
    if label == "healthy":
        assert ph.lesions == [] and not les.any()
    else:
        assert ph.lesions and les.any()


@pytest.mark.parametrize("seed", [3, 5, 9])
def test_covid_multiple_bilateral_peripheral_ggo(seed):
    ph = phantom("covid19", seed=seed)
    les, lm = ph.lesion_mask, ph.lung_mask
    assert len(ph.lesions) >= 3
    assert ((les > 0) & (lm == LUNG_RIGHT)).any() and ((les > 0) & (lm == LUNG_LEFT)).any()
    assert (les == LESION_GGO).sum() > (les == LESION_CONSOLIDATION).sum()
    assert peripheral_ratio(ph) > 0.5
    ggo_hu = ph.study.hu[les == LESION_GGO]
    assert -800 < np.median(ggo_hu) < -350
    # lower-zone predominance: most lesion volume below the carina
    z = np.nonzero(les)[0]
    assert np.mean(z > ph.anatomy["slice_of"]["carina"]) > 0.5


@pytest.mark.parametrize("seed", [3, 5, 9])
def test_cap_few_consolidations_dense_central(seed):
    ph = phantom("cap", seed=seed)
    les = ph.lesion_mask
    assert 1 <= len(ph.lesions) <= 2
    assert all(r["kind"] == "consolidation" for r in ph.lesions)
    assert (les == LESION_CONSOLIDATION).sum() > (les == LESION_GGO).sum()
    cons = les == LESION_CONSOLIDATION
    core = np.stack([ndi.binary_erosion(c) for c in cons])  # away from partial-volume edges (coarse grid)
    assert np.median(ph.study.hu[core]) > -200
    assert peripheral_ratio(ph) < peripheral_ratio(phantom("covid19", seed=seed))


@pytest.mark.parametrize("seed", [3, 5])
def test_other_viral_peribronchovascular_and_nodules(seed):
    ph = phantom("other_viral", seed=seed)
    nodules = [r for r in ph.lesions if r["kind"] == "nodule"]
    pbv = [r for r in ph.lesions if r["pattern"] == "peribronchovascular_consolidation"]
    assert len(nodules) >= 3 and len(pbv) >= 1
    assert all(r["radius_mm"] <= 5.0 for r in nodules)
    les = ph.lesion_mask
    assert (les == LESION_GGO).any() and (les == LESION_CONSOLIDATION).any()  # mixed
    # every nodule leaves voxels in the mask at its centre's neighbourhood
    for r in nodules:
        z, y, x = (int(round(c)) for c in r["centre"])
        win = les[max(0, z - 1):z + 2, max(0, y - 2):y + 3, max(0, x - 2):x + 3]
        assert win.any()


def test_difficulty_makes_lesions_smaller_and_fainter():
    easy, hard = phantom("covid19", seed=5), phantom("covid19", seed=5, difficulty=1.0)
    assert hard.lesion_volume_ratio < 0.7 * easy.lesion_volume_ratio
    e = easy.study.hu[easy.lesion_mask > 0].mean()
    h = hard.study.hu[hard.lesion_mask > 0].mean()
    assert h < e - 50
    assert len(hard.lesions) <= len(easy.lesions) + 1


def test_config_validation():
    with pytest.raises(ValueError):
        PhantomConfig("flu")
    with pytest.raises(ValueError):
        PhantomConfig("cap", difficulty=1.5)
    with pytest.raises(ValueError):
        PhantomConfig("cap", matrix=8)


# --------------------------------------------------------------------------------------------------- writers
def _read_dicom_series(folder):
    dss = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    names = sorted(p.name for p in folder.iterdir())
    return dss, names


@pytest.mark.parametrize("pad", [None, -1024])
def test_dicom_series_round_trip_matches_study_and_nifti(tmp_path, pad):
    ph = generate_phantom(PhantomConfig("cap", seed=4, matrix=96, n_slices=24, pad_hu=pad))
    row = write_case(ph, tmp_path, "case_x")
    folder = tmp_path / "case_x" / "dicom"
    dss, names = _read_dicom_series(folder)
    assert len(dss) == 24
    z_by_name = [float(d.ImagePositionPatient[2]) for d in dss]  # files in name order
    assert z_by_name != sorted(z_by_name) and z_by_name != sorted(z_by_name, reverse=True)
    dss.sort(key=lambda d: -float(d.ImagePositionPatient[2]))  # superior first = canonical order
    st = ph.study
    for i, d in enumerate(dss):
        assert d.Modality == "CT" and d.SOPClassUID == pydicom.uid.CTImageStorage
        assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert np.allclose([float(v) for v in d.ImagePositionPatient],
                           [st.origin[0], st.origin[1], st.origin[2] - i * st.spacing[0]], atol=1e-4)
        assert np.allclose([float(v) for v in d.PixelSpacing], st.spacing[1:])
        assert float(d.SliceThickness) == pytest.approx(st.spacing[0])
        assert float(d.RescaleIntercept) == -1024 and float(d.RescaleSlope) == 1
        assert d.PatientName == "PHANTOM^case_x" and d.PatientID == "case_x"
        assert d.SOPInstanceUID == st.slices[i].sop_instance_uid
        assert int(d.InstanceNumber) == i + 1
        hu = d.pixel_array.astype(np.int32) * int(d.RescaleSlope) + int(d.RescaleIntercept)
        assert np.array_equal(hu, st.hu[i])
    assert d.PixelRepresentation == (0 if pad == -1024 else 1)
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.FrameOfReferenceUID for d in dss}) == 1
    # SimpleITK: the NIfTI and the DICOM series agree in LPI orientation (= canonical)
    nii = sitk.DICOMOrient(sitk.ReadImage(str(tmp_path / row["image"])), "LPI")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    dcm = sitk.DICOMOrient(reader.Execute(), "LPI")
    assert np.array_equal(sitk.GetArrayFromImage(nii), st.hu)
    assert np.array_equal(sitk.GetArrayFromImage(dcm).astype(np.int32), st.hu.astype(np.int32))
    assert np.allclose(nii.GetOrigin(), dcm.GetOrigin(), atol=1e-3)
    assert np.allclose(nii.GetSpacing(), dcm.GetSpacing(), atol=1e-4)


def test_write_case_files_and_truth(tmp_path):
    ph = phantom("covid19")
    row = write_case(ph, tmp_path, "case_0007", formats=("nifti",))
    case = tmp_path / "case_0007"
    for name in ("image.nii.gz", "lung_mask.nii.gz", "lesion_mask.nii.gz", "truth.json"):
        assert (case / name).is_file()
    assert not (case / "dicom").exists() and row["dicom_dir"] == ""
    truth = json.loads((case / "truth.json").read_text())
    for key in ("label", "lesion_volume_ratio", "slice_lesion_labels", "lesions", "config", "data_source",
                "generator_version"):
        assert key in truth
    assert truth["label"] == "covid19" and truth["data_source"] == "synthetic phantom (pneumoct.synth)"
    assert truth["slice_lesion_labels"] == [int(b) for b in ph.slice_lesion_labels]
    assert truth["config"]["n_slices"] == 32 and truth["config"]["seed"] == 3
    assert len(truth["lesions"]) == len(ph.lesions)
    les = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lesion_mask.nii.gz")))
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lung_mask.nii.gz")))
    assert np.array_equal(les, ph.lesion_mask) and np.array_equal(lung, ph.lung_mask)
    assert row["lesion_volume_ratio"] == pytest.approx(ph.lesion_volume_ratio, abs=1e-6)
    with pytest.raises(ValueError):
        write_case(ph, tmp_path, "../escape")
    assert not list(tmp_path.rglob("*.part*"))  # no temporary files left behind


def test_synthesize_cohort_manifest(tmp_path):
    rows = synthesize_cohort(tmp_path, 3, seed=1, labels=["cap", "healthy"], matrix=64, n_slices=24,
                             formats=("nifti", "dicom"))
    assert [r["label"] for r in rows] == ["cap", "healthy", "cap"]
    assert [r["case_id"] for r in rows] == ["case_0000", "case_0001", "case_0002"]
    assert len({r["seed"] for r in rows}) == 3
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == rows
    with open(tmp_path / "manifest.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in csv_rows] == [r["case_id"] for r in rows]
    for r in rows:
        for key in ("image", "dicom_dir", "lung_mask", "lesion_mask", "truth"):
            assert (tmp_path / r[key]).exists()
        assert r["n_slices"] == 24 and len(list((tmp_path / r["dicom_dir"]).iterdir())) == 24
        assert json.loads((tmp_path / r["truth"]).read_text())["label"] == r["label"]
    assert rows[1]["lesion_volume_ratio"] == 0.0 and rows[0]["lesion_volume_ratio"] > 0.0
