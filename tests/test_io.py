"""Tests for pneumoct.io: synthetic DICOM/volume/2D inputs (tests/dicom_factory.py) and the real covid-ct-md data."""
from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.uid import MRImageStorage, RLELossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dicom_factory as F  # noqa: E402

from pneumoct.errors import PneumoctInputError  # noqa: E402
from pneumoct.io import archive, dicom, inspect_input, read_study  # noqa: E402
from pneumoct.io.writers import write_volume  # noqa: E402
from pneumoct.types import SliceInfo, StudyVolume  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COVID_CT_MD = SHARED_DATA / "covid-ct-md" / "dicom"
SECRETS = (
    F.PATIENT_NAME,
    "Zebulon",
    "Testpatient",
    F.PATIENT_ID,
    F.BIRTH_DATE,
    F.ACCESSION,
    "SECRET",
    "Secret Hospital",
    "20200101",
)


def refused(code: str, fn, *args, **kwargs) -> PneumoctInputError:
    with pytest.raises(PneumoctInputError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value}"
    assert "\n" not in str(info.value)
    return info.value


def codes(study: StudyVolume) -> list[str]:
    return [w.code for w in study.warnings]


def warning(study: StudyVolume, code: str) -> str:
    found = [w.message for w in study.warnings if w.code == code]
    assert found, f"no warning {code}; got {codes(study)}"
    return found[0]


def assert_canonical_geometry(study: StudyVolume, info: F.SeriesInfo) -> None:
    np.testing.assert_array_equal(study.hu, info.hu)
    assert study.hu.dtype == np.int16
    np.testing.assert_allclose(study.spacing, info.spacing, atol=1e-6)
    np.testing.assert_allclose(study.origin, info.origin, atol=1e-6)
    np.testing.assert_allclose(study.direction, np.diag([1.0, 1.0, -1.0]), atol=1e-9)
    np.testing.assert_allclose([s.position_mm for s in study.slices], info.z_positions, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# DICOM series: sorting, rescale, orientation
# ---------------------------------------------------------------------------------------------------------------


def test_geometric_sort_with_shuffled_names_and_instance_numbers(tmp_path):
    info = F.write_series(tmp_path / "s", names="shuffled", seed=4)
    # file-name order and InstanceNumber order are both unrelated to the geometry
    by_name = sorted(info.paths, key=lambda p: p.name)
    assert by_name != info.paths
    study = read_study(tmp_path / "s")
    assert_canonical_geometry(study, info)
    assert study.source_format == "dicom"
    assert study.warnings == []
    # each slice traces back to its file
    for s, path in zip(study.slices, info.paths):
        assert s.source == path.name
        assert s.sop_instance_uid == str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert s.frame_number is None
    z = [s.position_mm for s in study.slices]
    assert all(a > b for a, b in zip(z, z[1:]))  # slice 0 superior


def test_rescale_slope_and_per_file_intercept(tmp_path):
    hu = F.phantom(12, 32, 32, seed=9)

    def edit(ds, k):
        if k % 3 == 0:  # some files store the same HU with another intercept
            ds.RescaleIntercept = -1100
            ds.PixelData = (hu[k].astype(np.int32) + 1100).astype(np.uint16).tobytes()
            ds.RescaleSlope = 1

    info = F.write_series(tmp_path / "a", hu, slope=0.5, intercept=-1024.0, edit=edit)
    raw = pydicom.dcmread(info.paths[1]).pixel_array
    assert raw.min() >= 0  # stored values are not HU
    study = read_study(tmp_path / "a")
    np.testing.assert_array_equal(study.hu, hu)


@pytest.mark.parametrize(
    "row_dir,col_dir",
    [
        ((-1, 0, 0), (0, -1, 0)),  # rows and columns reversed
        ((-1, 0, 0), (0, 1, 0)),  # feet-first supine as scanners write it
        ((1, 0, 0), (0, -1, 0)),
        ((0, 1, 0), (1, 0, 0)),  # transposed
        ((0, -1, 0), (-1, 0, 0)),
    ],
)
def test_flipped_orientations_give_the_canonical_array(tmp_path, row_dir, col_dir):
    info = F.write_series(tmp_path / "s", row_dir=row_dir, col_dir=col_dir, seed=5)
    study = read_study(tmp_path / "s")
    assert_canonical_geometry(study, info)
    meta = study.metadata["original_orientation"]
    assert meta["columns_flipped"] or meta["rows_flipped"] or meta["rows_columns_swapped"]


def test_feet_first_slice_order_and_positions_ascending_in_files(tmp_path):
    # feet-first: first acquired slice is the most inferior; files written in acquisition order
    info = F.write_series(
        tmp_path / "ff", row_dir=(-1, 0, 0), col_dir=(0, 1, 0), names="ordered", seed=6
    )
    study = read_study(tmp_path / "ff")
    assert_canonical_geometry(study, info)
    # the marker placed at patient right-anterior-superior must be at the canonical top-left of slice 0
    assert study.hu[0, 9:13, 12:15].min() > 1400


def test_rle_compressed_decoders_agree(tmp_path):
    info = F.write_series(tmp_path / "rle", transfer_syntax=RLELossless, seed=7)
    assert pydicom.dcmread(info.paths[0]).file_meta.TransferSyntaxUID == RLELossless
    a = dicom.read_dicom_files(info.paths, decoder="pydicom")
    b = dicom.read_dicom_files(info.paths, decoder="simpleitk")
    c = read_study(tmp_path / "rle")
    np.testing.assert_array_equal(a.hu, info.hu)
    np.testing.assert_array_equal(b.hu, info.hu)
    np.testing.assert_array_equal(c.hu, info.hu)
    assert a.metadata["decode"]["decoders_used"] == {"pydicom": 16}
    assert b.metadata["decode"]["decoders_used"] == {"simpleitk": 16}


def test_extensionless_files_in_nested_folders(tmp_path):
    info = F.write_series(tmp_path / "study" / "a" / "b", extension="", seed=8)
    assert all(p.suffix == "" for p in info.paths)
    study = read_study(tmp_path / "study")
    np.testing.assert_array_equal(study.hu, info.hu)


# ---------------------------------------------------------------------------------------------------------------
# several series, non-CT, localizers, non-axial
# ---------------------------------------------------------------------------------------------------------------


def test_multiple_series_pick_the_axial_ct_with_most_slices(tmp_path):
    root = tmp_path / "study"
    study_uid = generate_uid()
    main = F.write_series(root / "s3", n_slices=16, series_number=3, study_uid=study_uid, seed=1)
    thick = F.write_series(
        root / "s2", n_slices=11, slice_spacing=5.0, series_number=2, series_description="Chest 5mm", seed=2,
        study_uid=study_uid,
    )
    F.write_series(root / "mr", n_slices=12, modality="MR", sop_class=MRImageStorage, series_number=9,
                   study_uid=study_uid)
    F.write_series(
        root / "cor",
        n_slices=20,
        series_number=4,
        series_description="Coronal MPR",
        study_uid=study_uid,
        row_dir=(1, 0, 0),
        col_dir=(0, 0, -1),
        edit=lambda ds, k: setattr(ds, "ImagePositionPatient", [-22.0, -30.0 + 2.0 * k, 100.0]),
    )
    F.write_series(root / "few", n_slices=4, series_number=8, series_description="Few", study_uid=study_uid)
    study = read_study(root)
    np.testing.assert_array_equal(study.hu, main.hu)
    chosen = study.metadata["chosen_series"]
    assert chosen["series_instance_uid"] == main.series_uid
    assert chosen["series_number"] == 3
    assert chosen["series_description"] == "Chest 2.5mm B30f"
    assert study.metadata["series_instance_uid"] == main.series_uid
    assert study.metadata["study_instance_uid"] == study_uid
    others = {o["series_number"]: o for o in study.metadata["other_series"]}
    assert set(others) == {2, 9, 4, 8}
    assert others[2]["reason_code"] == "fewer_slices" and others[2]["series_instance_uid"] == thick.series_uid
    assert others[9]["reason_code"] == "not_ct" and "MR" in others[9]["reason"]
    assert others[4]["reason_code"] == "non_axial" and others[4]["orientation"] == "coronal"
    assert others[8]["reason_code"] == "too_few_slices"
    assert {"non_ct_series_ignored", "multiple_series"} <= set(codes(study))
    info = inspect_input(root)
    assert info["chosen_series"]["series_instance_uid"] == main.series_uid
    assert {o["series_number"] for o in info["other_series"]} == {2, 9, 4, 8}


def test_non_ct_only_is_refused(tmp_path):
    F.write_series(tmp_path / "mr", modality="MR", sop_class=MRImageStorage)
    err = refused("not_ct", read_study, tmp_path / "mr")
    assert "MR" in str(err)
    assert inspect_input(tmp_path / "mr")["refusal"]["code"] == "not_ct"


def test_localizers_are_excluded_from_the_series(tmp_path):
    info = F.write_series(tmp_path / "s", seed=11)
    scout = np.full((40, 64), -1000, dtype=np.int16)
    scout[10:30, 10:50] = 0
    # a LOCALIZER image of another size, and a stray coronal image without the LOCALIZER flag
    F.write_single_image(tmp_path / "s" / "scout1.dcm", scout, ipp=(-200, 0, 200), iop=(1, 0, 0, 0, 0, -1),
                         series_uid=info.series_uid)
    F.write_single_image(tmp_path / "s" / "scout2.dcm", info.hu[0], ipp=(-20, 0, 100), iop=(1, 0, 0, 0, 0, -1),
                         series_uid=info.series_uid, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), pixel_spacing=0.7)
    study = read_study(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu)
    msgs = [w.message for w in study.warnings if w.code == "localizer_excluded"]
    assert len(msgs) == 2
    assert any("localizer" in m.lower() and "1" in m for m in msgs)
    assert any("orientation" in m for m in msgs)


def test_only_coronal_series_is_refused(tmp_path):
    F.write_series(
        tmp_path / "cor",
        row_dir=(1, 0, 0),
        col_dir=(0, 0, -1),
        edit=lambda ds, k: setattr(ds, "ImagePositionPatient", [-22.0, -30.0 + 2.0 * k, 100.0]),
    )
    err = refused("non_axial", read_study, tmp_path / "cor")
    assert str(err) == "non-axial series (coronal) — pneumoct needs axial slices"


# ---------------------------------------------------------------------------------------------------------------
# stack problems
# ---------------------------------------------------------------------------------------------------------------


def test_missing_slices_are_interpolated_and_reported(tmp_path):
    info = F.write_series(tmp_path / "s", n_slices=24, seed=12)
    info.paths[6].unlink()
    info.paths[7].unlink()
    study = read_study(tmp_path / "s")
    assert study.shape[0] == 24  # the two missing positions are back (interpolated)
    msg = warning(study, "missing_slices")
    assert "2 slice(s) missing" in msg and "interpolated" in msg
    assert "z=85.0 to 82.5 mm (2 missing between z=87.5 and z=80.0 mm)" in msg
    assert study.spacing[0] == pytest.approx(2.5)
    real = [k for k in range(24) if k not in (6, 7)]
    np.testing.assert_array_equal(study.hu[real], info.hu[real])
    assert [s.interpolated for s in study.slices][5:9] == [None, True, True, None]
    np.testing.assert_allclose([s.position_mm for s in study.slices], info.z_positions)
    assert study.metadata["missing_slice_gaps"] == [
        {"upper_z_mm": 87.5, "lower_z_mm": 80.0, "n_missing": 2, "missing_z_mm": [85.0, 82.5], "missing_mm": 5.0}
    ]


def test_identical_duplicates_are_dropped(tmp_path):
    info = F.write_series(tmp_path / "s", seed=13)
    ds = pydicom.dcmread(info.paths[4])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "s" / "copy_of_4.dcm")
    assert "duplicate_positions" in {w["code"] for w in inspect_input(tmp_path / "s")["warnings"]}
    study = read_study(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu)
    assert "dropped 1 duplicate" in warning(study, "duplicate_slices_dropped")


def test_mixed_acquisitions_keep_the_largest(tmp_path):
    info = F.write_series(tmp_path / "s", n_slices=16, acquisition_number=1, seed=14)
    F.write_series(
        tmp_path / "s",
        hu=F.phantom(6, 64, 64, seed=99) + 30,
        series_uid=info.series_uid,
        acquisition_number=2,
        name_prefix="acq2",
        seed=15,
    )
    study = read_study(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu)
    msg = warning(study, "mixed_acquisitions")
    assert "AcquisitionNumber 1" in msg and "16 slices" in msg and "dropped 6" in msg


def test_conflicting_duplicates_without_a_distinguishing_field_are_refused(tmp_path):
    info = F.write_series(tmp_path / "s", n_slices=16, acquisition_number=1, seed=16)
    F.write_series(
        tmp_path / "s",
        hu=F.phantom(6, 64, 64, seed=98) + 30,
        series_uid=info.series_uid,
        acquisition_number=1,
        name_prefix="other",
        seed=17,
    )
    refused("conflicting_slices", read_study, tmp_path / "s")


def test_uneven_spacing_warns_and_uses_the_median(tmp_path):
    steps = [2.5, 2.5, 2.8, 2.5, 2.2, 2.5, 2.5, 2.9, 2.5, 2.5, 2.5]
    z = [100.0]
    for s in steps:
        z.append(z[-1] - s)
    info = F.write_series(tmp_path / "s", n_slices=len(z), z_positions=z, seed=18)
    study = read_study(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu)
    msg = warning(study, "uneven_spacing")
    assert "2.200" in msg and "2.900" in msg
    assert study.spacing[0] == pytest.approx(2.5)
    assert "missing_slices" not in codes(study)
    np.testing.assert_allclose([s.position_mm for s in study.slices], z)


def test_gantry_tilt_tag_with_corrected_positions_is_not_resampled(tmp_path):
    info = F.write_series(tmp_path / "s", gantry_tilt=15.0, seed=19)
    study = read_study(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu)
    msg = warning(study, "gantry_tilt")
    assert "15.0 degrees" in msg and "not resampled" in msg
    assert study.metadata["gantry_tilt_deg"] == 15.0 and study.metadata["gantry_tilt_resampled"] is False


def test_gantry_tilt_from_sheared_positions_is_resampled(tmp_path):
    # the shear alone (no GantryDetectorTilt tag): 0.5 mm of y per 2.5 mm slice
    def shear(ds, k):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]

    info = F.write_series(tmp_path / "s", edit=shear, seed=20)
    study = read_study(tmp_path / "s")
    expected = np.degrees(np.arctan(0.5 / 2.5))
    msg = warning(study, "gantry_tilt")
    assert f"{expected:.1f} degrees" in msg and "resampled" in msg and "not resampled" not in msg
    assert study.metadata["gantry_tilt_deg"] == pytest.approx(expected, abs=0.01)
    assert study.spacing[0] == pytest.approx(2.5)
    # the grid hangs from the middle slice along the normal (acquisition index 8 = canonical 7): it is not moved,
    # the others are
    np.testing.assert_array_equal(study.hu[7], info.hu[7])
    assert not np.array_equal(study.hu[0], info.hu[0]) and not np.array_equal(study.hu[-1], info.hu[-1])
    np.testing.assert_allclose([s.position_mm for s in study.slices], info.z_positions)
    assert study.origin[1] == pytest.approx(-30.0 + 0.5 * 7)


def test_values_that_are_not_hu_are_refused(tmp_path):
    # stored values read without the intercept: air at +24, not -1000
    F.write_series(tmp_path / "raw", edit=lambda ds, k: setattr(ds, "RescaleIntercept", 0), seed=21)
    err = refused("not_hu", read_study, tmp_path / "raw")
    assert "values do not look like Hounsfield units" in str(err)
    # 8-bit grey levels
    grey = np.clip(F.phantom(12, 32, 32) + 1000, 0, 255).astype(np.int16)
    F.write_series(tmp_path / "grey", grey, intercept=0.0, signed=False)
    err = refused("not_hu", read_study, tmp_path / "grey")
    assert "8-bit" in str(err)


def test_too_few_slices_and_configurable_minimum(tmp_path):
    info = F.write_series(tmp_path / "s", n_slices=8, seed=22)
    err = refused("too_few_slices", read_study, tmp_path / "s")
    assert "only 8" in str(err) and "minimum 10" in str(err)
    study = read_study(tmp_path / "s", min_slices=5)
    np.testing.assert_array_equal(study.hu, info.hu)
    err = refused("too_few_slices", read_study, info.paths[0])
    assert "folder" in str(err)


def test_corrupt_slice_at_the_end_is_skipped_inside_is_refused(tmp_path):
    info = F.write_series(tmp_path / "s", seed=23)
    data = info.paths[-1].read_bytes()
    info.paths[-1].write_bytes(data[:-3000])  # truncated pixel data, last slice
    study = read_study(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu[:-1])
    assert "z=62.5" in warning(study, "corrupt_slices_skipped")
    data = info.paths[5].read_bytes()
    info.paths[5].write_bytes(data[:-3000])  # now an interior slice too
    err = refused("corrupt_files", read_study, tmp_path / "s")
    assert "z=87.5" in str(err)


def test_unreadable_header_skipped_when_series_complete_refused_when_gap(tmp_path):
    info = F.write_series(tmp_path / "s", seed=24)
    (tmp_path / "s" / "broken.dcm").write_bytes(info.paths[3].read_bytes()[:400])  # header cut short
    study = read_study(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu)
    assert "1 DICOM file" in warning(study, "unreadable_files_skipped")
    info.paths[3].unlink()  # the broken file was that slice: the series now has a gap
    refused("corrupt_files", read_study, tmp_path / "s")


def test_inconsistent_size_or_spacing_is_refused(tmp_path):
    def smaller(ds, k):
        if k == 5:
            ds.Rows, ds.Columns = 32, 32
            ds.PixelData = np.full((32, 32), 24, dtype=np.uint16).tobytes()

    F.write_series(tmp_path / "size", edit=smaller)
    err = refused("inconsistent_geometry", read_study, tmp_path / "size")
    assert "32x32" in str(err)

    def spacing(ds, k):
        if k == 3:
            ds.PixelSpacing = [0.9, 0.9]

    F.write_series(tmp_path / "sp", edit=spacing)
    refused("inconsistent_geometry", read_study, tmp_path / "sp")


def test_non_dicom_files_are_skipped_with_a_count(tmp_path):
    info = F.write_series(tmp_path / "s", seed=25)
    (tmp_path / "s" / "README.txt").write_text("exported by a PACS\n")
    (tmp_path / "s" / "Thumbs.db").write_bytes(b"\x00\x01binary junk" * 20)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "s" / "thumb.jpg")
    dicomdir = F._base_dataset("1.2.840.10008.1.3.10")
    dicomdir.DirectoryRecordSequence = pydicom.sequence.Sequence([])
    dicomdir.save_as(tmp_path / "s" / "DICOMDIR", enforce_file_format=True)
    study = read_study(tmp_path / "s")
    np.testing.assert_array_equal(study.hu, info.hu)
    msg = warning(study, "non_dicom_files_skipped")
    assert "3 non-DICOM file(s)" in msg and "1 DICOM object(s) without pixels" in msg


def test_refusals_for_paths(tmp_path):
    refused("not_found", read_study, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    refused("no_dicom", read_study, tmp_path / "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("hello")
    refused("no_dicom", read_study, tmp_path / "txt")
    (tmp_path / "scan.xyz").write_text("not an image")
    refused("unknown_format", read_study, tmp_path / "scan.xyz")
    refused("unknown_format", inspect_input, tmp_path / "scan.xyz")
    (tmp_path / "fake.dcm").write_text("not dicom")
    refused("not_dicom", read_study, tmp_path / "fake.dcm")


# ---------------------------------------------------------------------------------------------------------------
# multi-frame
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation_in_shared", [True, False])
def test_enhanced_ct_multiframe(tmp_path, orientation_in_shared):
    info = F.write_enhanced_ct(tmp_path / "enh.dcm", orientation_in_shared=orientation_in_shared)
    ds = pydicom.dcmread(info.paths[0])
    intercepts = {float(f.PixelValueTransformationSequence[0].RescaleIntercept)
                  for f in ds.PerFrameFunctionalGroupsSequence}
    assert intercepts == {-1024.0, -1000.0}
    study = read_study(tmp_path / "enh.dcm")
    assert study.source_format == "dicom-multiframe"
    assert_canonical_geometry(study, info)
    # frame numbers trace back to the shuffled frame order in the file
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    for s in study.slices:
        assert positions[s.frame_number - 1] == pytest.approx(s.position_mm)
        assert s.source == "enh.dcm"
    assert inspect_input(tmp_path / "enh.dcm")["format"] == "dicom-multiframe"


def test_legacy_multiframe_evenly_spaced(tmp_path):
    info = F.write_legacy_multiframe(tmp_path / "legacy.dcm")
    study = read_study(tmp_path / "legacy.dcm")
    assert_canonical_geometry(study, info)
    assert "2.000 mm" in warning(study, "multiframe_positions_assumed")


# ---------------------------------------------------------------------------------------------------------------
# zip
# ---------------------------------------------------------------------------------------------------------------


def _zip_folder(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, Path("export") / p.relative_to(folder))
    return dest


def test_zip_input_is_read_and_cleaned_up(tmp_path, monkeypatch):
    info = F.write_series(tmp_path / "s", seed=26)
    z = _zip_folder(tmp_path / "s", tmp_path / "study.zip")
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    study = read_study(z)
    np.testing.assert_array_equal(study.hu, info.hu)
    assert study.metadata["container"] == "zip"
    assert inspect_input(z)["input_kind"] == "zip"
    assert list(tmp_root.iterdir()) == []  # temporary extraction removed


@pytest.mark.parametrize("member", ["../evil.dcm", "/abs/evil.dcm", "a/../../evil.dcm", "C:/evil.dcm"])
def test_unsafe_zip_is_refused(tmp_path, member):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/readme.txt", "fine")
        zf.writestr(zipfile.ZipInfo(member), b"payload")
    refused("unsafe_zip", read_study, z)
    assert not (tmp_path.parent / "evil.dcm").exists()


def test_zip_size_cap_and_corrupt_zip(tmp_path, monkeypatch):
    F.write_series(tmp_path / "s", seed=27)
    z = _zip_folder(tmp_path / "s", tmp_path / "study.zip")
    monkeypatch.setattr(archive, "MAX_UNCOMPRESSED_BYTES", 10_000)
    err = refused("zip_too_large", read_study, z)
    assert "limit" in str(err)
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    refused("corrupt_zip", read_study, tmp_path / "broken.zip")


# ---------------------------------------------------------------------------------------------------------------
# volume files
# ---------------------------------------------------------------------------------------------------------------


def _canonical_study(hu: np.ndarray, spacing=(2.0, 0.8, 0.7), origin=(-20.0, -25.0, 60.0)) -> StudyVolume:
    return StudyVolume(
        hu=hu,
        spacing=spacing,
        origin=origin,
        direction=np.diag([1.0, 1.0, -1.0]),
        slices=[SliceInfo(index=k, position_mm=origin[2] - k * spacing[0]) for k in range(hu.shape[0])],
        source_format="test",
    )


def test_nifti_in_ras_is_reoriented(tmp_path):
    hu = F.phantom(12, 40, 48, seed=30)  # canonical (z, y, x)
    sz, sy, sx = 2.0, 0.8, 0.7
    # nibabel voxel (i, j, k) with affine diag: i → patient Right, j → Anterior, k → Superior (RAS)
    data = hu.transpose(2, 1, 0)[::-1, ::-1, ::-1]
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [10.0, 20.0, -30.0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), tmp_path / "ras.nii.gz")
    study = read_study(tmp_path / "ras.nii.gz")
    assert study.source_format == "nifti"
    np.testing.assert_array_equal(study.hu, hu)
    np.testing.assert_allclose(study.spacing, (sz, sy, sx), atol=1e-5)
    np.testing.assert_allclose(study.direction, np.diag([1.0, 1.0, -1.0]), atol=1e-6)
    # voxel [0,0,0] = most right (largest RAS x), most anterior, most superior; LPS = (-x_ras, -y_ras, z)
    nx, ny, nz = data.shape
    ras = [10.0 + (nx - 1) * sx, 20.0 + (ny - 1) * sy, -30.0 + (nz - 1) * sz]
    np.testing.assert_allclose(study.origin, (-ras[0], -ras[1], ras[2]), atol=1e-4)
    z = [s.position_mm for s in study.slices]
    assert z[0] == pytest.approx(ras[2], abs=1e-4) and all(a > b for a, b in zip(z, z[1:]))
    assert study.metadata["original_orientation"] == "RAS"
    info = inspect_input(tmp_path / "ras.nii.gz")
    assert info["geometry"]["canonical_shape_zyx"] == list(hu.shape)


@pytest.mark.parametrize("name", ["vol.nrrd", "vol.mha", "vol.nii"])
def test_volume_round_trip(tmp_path, name):
    hu = F.phantom(12, 40, 48, seed=31)
    ref = _canonical_study(hu)
    write_volume(tmp_path / name, hu, ref)
    study = read_study(tmp_path / name)
    np.testing.assert_array_equal(study.hu, hu)
    np.testing.assert_allclose(study.spacing, ref.spacing, atol=1e-5)
    np.testing.assert_allclose(study.origin, ref.origin, atol=1e-4)
    np.testing.assert_allclose(study.direction, ref.direction, atol=1e-6)
    assert all(s.sop_instance_uid is None for s in study.slices)
    np.testing.assert_allclose([s.position_mm for s in study.slices], [60.0 - 2.0 * k for k in range(12)], atol=1e-4)


def test_mhd_stored_as_coronal_slices_is_reoriented(tmp_path):
    hu = F.phantom(12, 40, 48, seed=32)  # canonical (z, y, x)
    # store with array axes (y, z, x): image axes x → L, y(img) → I (canonical z), z(img) → P
    stored = np.ascontiguousarray(hu.transpose(1, 0, 2))
    img = sitk.GetImageFromArray(stored)
    img.SetSpacing((0.7, 2.0, 0.8))
    img.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))
    img.SetOrigin((-20.0, -25.0, 60.0))
    sitk.WriteImage(img, str(tmp_path / "cor.mhd"))
    study = read_study(tmp_path / "cor.mhd")
    np.testing.assert_array_equal(study.hu, hu)
    np.testing.assert_allclose(study.spacing, (2.0, 0.8, 0.7), atol=1e-6)
    assert "coronal" in warning(study, "reoriented_to_axial")


def test_volume_file_refusals(tmp_path):
    grey = np.clip(F.phantom(12, 32, 32) + 1000, 0, 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "grey.nrrd"))
    refused("not_hu", read_study, tmp_path / "grey.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(F.phantom(4, 32, 32)), str(tmp_path / "thin.mha"))
    refused("too_few_slices", read_study, tmp_path / "thin.mha")
    (tmp_path / "broken.nii").write_bytes(b"\x00" * 100)
    refused("unreadable_file", read_study, tmp_path / "broken.nii")


# ---------------------------------------------------------------------------------------------------------------
# 2D images
# ---------------------------------------------------------------------------------------------------------------


def test_png_refused_unless_allowed(tmp_path):
    arr = (np.arange(30 * 40) % 256).astype(np.uint8).reshape(30, 40)
    Image.fromarray(arr).save(tmp_path / "slice.png")
    err = refused("2d_image", read_study, tmp_path / "slice.png")
    assert str(err) == "2D image without Hounsfield units: use a command that works on slices"
    study = read_study(tmp_path / "slice.png", allow_2d=True)
    assert study.is_2d_image and study.source_format == "image2d"
    assert study.shape == (1, 30, 40)
    np.testing.assert_array_equal(study.hu[0], arr)
    assert study.spacing == (1.0, 1.0, 1.0)
    assert codes(study) == ["2d_image_no_hu"]
    rgb = np.stack([arr] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=100)
    s2 = read_study(tmp_path / "rgb.jpg", allow_2d=True)
    assert s2.shape == (1, 30, 40) and 0 <= s2.hu.min() and s2.hu.max() <= 255


def test_folder_of_pngs(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for k in (1, 2, 10):
        Image.fromarray(np.full((16, 20), k, np.uint8)).save(folder / f"slice_{k}.png")
    refused("2d_image", read_study, folder)
    study = read_study(folder, allow_2d=True)
    assert study.shape == (3, 16, 20)
    assert [int(study.hu[k, 0, 0]) for k in range(3)] == [1, 2, 10]  # natural name order
    assert "2d_stack_order_by_name" in codes(study)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "slice_11.png")
    refused("2d_size_mismatch", read_study, folder, allow_2d=True)


# ---------------------------------------------------------------------------------------------------------------
# patient data and inspect_input
# ---------------------------------------------------------------------------------------------------------------


def _no_secrets(text: str) -> None:
    for s in SECRETS:
        assert s not in text, f"patient identifier {s!r} leaked"


def test_no_patient_identifiers_anywhere(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="pneumoct.io")
    root = tmp_path / "s"
    info = F.write_series(root, seed=40)
    F.write_series(root / "mr", modality="MR", sop_class=MRImageStorage, n_slices=3)
    ds = pydicom.dcmread(info.paths[2])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(root / "dup.dcm")
    study = read_study(root)
    assert str(pydicom.dcmread(info.paths[0]).PatientName) == F.PATIENT_NAME  # the factory did set them
    assert len(study.warnings) >= 2
    _no_secrets(repr(study.metadata))
    _no_secrets(repr(study.warnings))
    _no_secrets(repr(inspect_input(root)))
    _no_secrets(caplog.text)
    F.write_series(tmp_path / "few", n_slices=3)
    err = refused("too_few_slices", read_study, tmp_path / "few")
    _no_secrets(str(err))


def test_inspect_input_decodes_no_pixels(tmp_path, monkeypatch):
    main = F.write_series(tmp_path / "s", seed=41)
    F.write_series(tmp_path / "s" / "thin", n_slices=11, series_number=7, seed=42, study_uid=main.study_uid)

    def boom(*args, **kwargs):
        raise AssertionError("pixels decoded")

    from pneumoct.io import dicom_decode  # where the decoders live (io/dicom.py re-exports them)

    monkeypatch.setattr(dicom_decode, "_decode_pydicom", boom)
    monkeypatch.setattr(dicom_decode, "_decode_sitk", boom)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(boom))
    info = inspect_input(tmp_path / "s")
    assert info["format"] == "dicom" and info["refusal"] is None
    assert info["chosen_series"]["n_slice_positions"] == 16
    assert info["chosen_series"]["z_range_mm"] == [100.0, 62.5]
    assert [o["series_number"] for o in info["other_series"]] == [7]
    assert "fewer slices" in info["other_series"][0]["reason"]


# ---------------------------------------------------------------------------------------------------------------
# real data (../shared/data/covid-ct-md)
# ---------------------------------------------------------------------------------------------------------------

REAL = [("covid-P001", 148, 0.748), ("cap-cap001", 168, 0.590), ("normal-normal001", 154, 0.635)]


@pytest.mark.realdata
@pytest.mark.parametrize("folder,n_slices,pixel_spacing", REAL)
def test_real_covid_ct_md_studies(folder, n_slices, pixel_spacing):
    path = COVID_CT_MD / folder
    if not path.is_dir():
        pytest.skip(f"real data not available ({path} is absent)")
    study = read_study(path)
    assert study.shape == (n_slices, 512, 512)
    assert study.hu.dtype == np.int16
    assert study.spacing[1] == pytest.approx(pixel_spacing, abs=1e-3)
    assert study.spacing[2] == pytest.approx(pixel_spacing, abs=1e-3)
    assert study.spacing[0] == pytest.approx(2.0, abs=1e-3)
    assert study.hu.min() <= -1024 and study.hu.max() > 1000
    z = np.array([s.position_mm for s in study.slices])
    assert np.all(np.diff(z) < 0)
    uids = [s.sop_instance_uid for s in study.slices]
    assert len(set(uids)) == n_slices and None not in uids
    np.testing.assert_allclose(study.direction, np.diag([1.0, 1.0, -1.0]))
    assert study.warnings == []
    assert study.metadata["transfer_syntax"].startswith("JPEG Lossless")
    # lungs (air-filled) are present: a good fraction of the mid slice is below -500 HU inside the body
    mid = study.hu[n_slices // 2]
    assert np.count_nonzero(mid < -500) > 0.2 * mid.size
    # row 0 is anterior: the spine (bone, posterior) lies in the lower half of the central columns
    bone_rows = np.nonzero(mid[:, 236:276] > 300)[0]
    assert bone_rows.size > 100 and np.median(bone_rows) > 256
    # patient identifiers stay out
    patient_id = str(pydicom.dcmread(next(path.iterdir()), stop_before_pixels=True).get("PatientID", ""))
    assert patient_id
    assert patient_id not in repr(study.metadata) and patient_id not in repr(study.warnings)
    assert patient_id not in repr(inspect_input(path))
