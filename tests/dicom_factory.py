"""Small synthetic DICOM studies for the io tests (pydicom only, no real patient data).

Everything starts from a *canonical* phantom volume ``hu[z, y, x]`` (slice 0 superior, row 0 anterior, column 0 =
patient right; see :mod:`pneumoct.types`) and its LPS geometry. The writers store it with any axial orientation
(reversed rows/columns, transposed, feet-first ordering...) so a correct reader must give back exactly ``hu``.

Patient identity fields are filled with :data:`PATIENT_NAME` / :data:`PATIENT_ID` / :data:`BIRTH_DATE` so tests
can check that none of them leaks into metadata, warnings, errors or inspect output.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

PATIENT_NAME = "Testpatient^Zebulon-SECRET"
PATIENT_ID = "PID-SECRET-424242"
BIRTH_DATE = "19010203"
ACCESSION = "ACC-SECRET-777"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

#: StudyInstanceUID of every series the writers made, so an image joined later lands in the same study.
_STUDY_OF_SERIES: dict[str, str] = {}


def phantom(n_slices: int = 16, rows: int = 64, cols: int = 64, seed: int = 0) -> np.ndarray:
    """A fake chest in canonical orientation, int16 HU: air -1000 around a body (~40 HU) with two lungs (-850),
    a spine (700) and asymmetric markers so any flip is visible. Every slice differs (tissue gradient + noise)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(n_slices), np.arange(rows), np.arange(cols), indexing="ij")
    cy, cx = rows / 2.0, cols / 2.0
    hu = np.full((n_slices, rows, cols), -1000.0)
    body = ((y - cy) / (0.40 * rows)) ** 2 + ((x - cx) / (0.45 * cols)) ** 2 <= 1.0
    hu[body] = 40.0 + 2.0 * z[body]
    for side in (-1, 1):
        lung = ((y - cy + 2) / (0.25 * rows)) ** 2 + ((x - cx - side * 0.2 * cols) / (0.13 * cols)) ** 2 <= 1.0
        hu[lung] = -850.0
    spine = ((y - (cy + 0.28 * rows)) ** 2 + (x - cx) ** 2) <= (0.06 * rows) ** 2
    hu[spine] = 700.0
    # markers: patient right-anterior in the top slices, patient left-posterior in the bottom slices
    hu[:3, int(0.15 * rows) : int(0.15 * rows) + 4, int(0.2 * cols) : int(0.2 * cols) + 3] = 1500.0
    hu[-3:, int(0.75 * rows) : int(0.75 * rows) + 3, int(0.7 * cols) : int(0.7 * cols) + 5] = 1200.0
    hu += rng.normal(0.0, 8.0, hu.shape)
    return np.clip(np.rint(hu), -1024, 3000).astype(np.int16)


@dataclass
class SeriesInfo:
    folder: Path
    paths: list[Path]  # in canonical slice order (superior → inferior)
    hu: np.ndarray  # canonical volume the files encode
    spacing: tuple[float, float, float]  # (z, y, x)
    origin: tuple[float, float, float]  # LPS of canonical voxel [0, 0, 0]
    series_uid: str
    study_uid: str
    z_positions: list[float] = field(default_factory=list)  # LPS z of each canonical slice


def _base_dataset(sop_class: str, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.AccessionNumber = ACCESSION
    ds.InstitutionName = "Secret Hospital"
    ds.StudyDate = "20200101"
    ds.Manufacturer = "FactoryCT"
    ds.ManufacturerModelName = "Synthetic 64"
    ds.KVP = 120
    ds.ConvolutionKernel = "B30f"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def _stored(hu_slice: np.ndarray, slope: float, intercept: float, signed: bool) -> np.ndarray:
    stored = np.rint((hu_slice.astype(np.float64) - intercept) / slope)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError("HU do not fit the stored type with this rescale")
    return stored.astype(dtype)


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    if transfer_syntax == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(path, enforce_file_format=True)


def in_plane_layout(row_dir: Sequence[float], col_dir: Sequence[float]) -> tuple[bool, bool, bool]:
    """For an axis-aligned axial orientation: (transpose, flip stored rows, flip stored columns) that turn a
    canonical slice [y, x] into the stored image."""
    r, c = np.asarray(row_dir, float), np.asarray(col_dir, float)
    transpose = abs(r[1]) > abs(r[0])  # columns run along y
    flip_cols = (r[1] if transpose else r[0]) < 0
    flip_rows = (c[0] if transpose else c[1]) < 0
    return transpose, flip_rows, flip_cols


def write_series(
    folder: Path,
    hu: np.ndarray | None = None,
    *,
    n_slices: int = 16,
    rows: int = 64,
    cols: int = 64,
    pixel_spacing: float = 0.7,
    slice_spacing: float = 2.5,
    top_z: float = 100.0,
    xy_origin: tuple[float, float] = (-22.0, -30.0),
    row_dir: Sequence[float] = (1, 0, 0),
    col_dir: Sequence[float] = (0, 1, 0),
    z_positions: Sequence[float] | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool | None = None,
    modality: str = "CT",
    sop_class: str = CTImageStorage,
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int = 3,
    series_description: str = "Chest 2.5mm B30f",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    acquisition_number: int | None = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    names: str = "shuffled",
    extension: str = ".dcm",
    name_prefix: str = "img",
    gantry_tilt: float | None = None,
    seed: int = 0,
    edit: Callable[[Dataset, int], None] | None = None,
) -> SeriesInfo:
    """Write ``hu`` (canonical) as a single-frame DICOM series with the given axial in-plane orientation.

    ``z_positions``: LPS z of each canonical slice (default ``top_z - k * slice_spacing``). ``names``:
    "shuffled" (random file names, random InstanceNumbers) or "ordered". ``edit(ds, k)`` may change a dataset
    before it is saved (k = canonical slice index).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hu is None:
        hu = phantom(n_slices, rows, cols, seed=seed)
    n_slices, rows, cols = hu.shape
    if z_positions is None:
        z_positions = [top_z - k * slice_spacing for k in range(n_slices)]
    z_positions = [float(z) for z in z_positions]
    # a series written in several calls (same series_uid) stays in one study unless told otherwise
    study_uid = study_uid or _STUDY_OF_SERIES.get(series_uid or "") or generate_uid()
    series_uid = series_uid or generate_uid()
    _STUDY_OF_SERIES[series_uid] = study_uid
    frame_uid = generate_uid()
    signed = (intercept >= 0 or hu.min() < intercept) if signed is None else signed
    transpose, flip_rows, flip_cols = in_plane_layout(row_dir, col_dir)
    r, c = np.asarray(row_dir, float), np.asarray(col_dir, float)
    x0, y0 = xy_origin
    rng = random.Random(seed)
    order = list(range(n_slices))
    instance_numbers = list(range(1, n_slices + 1))
    if names == "shuffled":
        rng.shuffle(order)
        rng.shuffle(instance_numbers)
    paths: list[Path] = [Path()] * n_slices
    for file_index, k in enumerate(order):
        img = hu[k]
        if transpose:
            img = img.T
        if flip_rows:
            img = img[::-1]
        if flip_cols:
            img = img[:, ::-1]
        # LPS of stored pixel (0, 0) = canonical voxel at the flipped corner
        y_idx = 0
        x_idx = 0
        if transpose:
            x_idx = hu.shape[2] - 1 if flip_rows else 0
            y_idx = hu.shape[1] - 1 if flip_cols else 0
        else:
            y_idx = hu.shape[1] - 1 if flip_rows else 0
            x_idx = hu.shape[2] - 1 if flip_cols else 0
        ipp = [x0 + x_idx * pixel_spacing, y0 + y_idx * pixel_spacing, z_positions[k]]
        ds = _base_dataset(sop_class, ExplicitVRLittleEndian)
        ds.Modality = modality
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.InstanceNumber = instance_numbers[file_index]
        if acquisition_number is not None:
            ds.AcquisitionNumber = acquisition_number
        ds.ImageType = list(image_type)
        ds.SliceThickness = slice_spacing
        ds.PatientPosition = "HFS" if float(np.cross(r, c)[2]) > 0 else "FFS"
        ds.ImagePositionPatient = [round(v, 6) for v in ipp]
        ds.ImageOrientationPatient = [float(v) for v in (*r, *c)]
        ds.SliceLocation = round(z_positions[k], 6)
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        if gantry_tilt is not None:
            ds.GantryDetectorTilt = gantry_tilt
        ds.Rows, ds.Columns = img.shape
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(_stored(img, slope, intercept, signed)).tobytes()
        if edit is not None:
            edit(ds, k)
        if names == "shuffled":
            name = f"{name_prefix}_{rng.randrange(16**8):08x}{extension}"
        else:
            name = f"{name_prefix}_{k:04d}{extension}"
        path = folder / name
        _save(ds, path, transfer_syntax)
        paths[k] = path
    origin_y = y0
    origin = (x0, origin_y, z_positions[0])
    return SeriesInfo(
        folder=folder,
        paths=paths,
        hu=hu,
        spacing=(abs(slice_spacing), pixel_spacing, pixel_spacing),
        origin=origin,
        series_uid=series_uid,
        study_uid=study_uid,
        z_positions=list(z_positions),
    )


def write_tilted_series(
    folder: Path,
    hu: np.ndarray,
    tilt_deg: float,
    *,
    pixel_spacing: float = 0.7,
    slice_spacing: float = 2.5,
    top_z: float = 100.0,
    xy_origin: tuple[float, float] = (-22.0, -30.0),
    **kwargs,
) -> SeriesInfo:
    """The canonical phantom ``hu`` as a gantry-tilted scanner stores it (GE/Siemens style, as dcm2niix describes):
    axial ImageOrientationPatient, slices at the true z positions, but each slice's field of view slides along y
    by ``dz·tan(tilt)`` per slice, so ImagePositionPatient is sheared and the content of slice k is the anatomy
    shifted up by ``k·dz·tan(tilt)/pixel_spacing`` rows (linear interpolation). Default orientation only.
    A correct reader that undoes the shear gives back ``hu`` up to interpolation blur and the rows that slid out.
    """
    from scipy import ndimage

    step = slice_spacing * float(np.tan(np.radians(tilt_deg)))  # mm of y shift per slice
    tilted = np.stack(
        [
            np.rint(ndimage.shift(hu[k].astype(np.float32), (-k * step / pixel_spacing, 0.0), order=1, mode="nearest"))
            for k in range(hu.shape[0])
        ]
    ).astype(np.int16)

    def shear(ds: Dataset, k: int) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, round(y + k * step, 6), z]
        ds.GantryDetectorTilt = tilt_deg

    info = write_series(
        folder, tilted, pixel_spacing=pixel_spacing, slice_spacing=slice_spacing, top_z=top_z, xy_origin=xy_origin,
        edit=shear, **kwargs,
    )
    info.hu = hu  # the anatomy the files encode
    return info


def write_single_image(
    path: Path,
    image: np.ndarray,
    *,
    ipp: Sequence[float],
    iop: Sequence[float],
    series_uid: str,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "LOCALIZER"),
    modality: str = "CT",
    pixel_spacing: float = 1.0,
    intercept: float = -1024.0,
    study_uid: str | None = None,
) -> Path:
    """One extra image (e.g. a localizer) joined to a series (and, by default, to that series' study)."""
    ds = _base_dataset(CTImageStorage)
    ds.Modality = modality
    ds.StudyInstanceUID = study_uid or _STUDY_OF_SERIES.get(series_uid) or generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.InstanceNumber = 999
    ds.ImageType = list(image_type)
    ds.ImagePositionPatient = list(ipp)
    ds.ImageOrientationPatient = list(iop)
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.Rows, ds.Columns = image.shape
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = intercept
    ds.PixelData = _stored(image, 1.0, intercept, False).tobytes()
    _save(ds, Path(path), ExplicitVRLittleEndian)
    return Path(path)


def write_enhanced_ct(
    path: Path,
    hu: np.ndarray | None = None,
    *,
    pixel_spacing: float = 0.8,
    slice_spacing: float = 2.0,
    top_z: float = 50.0,
    xy_origin: tuple[float, float] = (-25.0, -25.0),
    shuffle_frames: bool = True,
    per_frame_intercepts: Sequence[float] = (-1024.0, -1000.0),
    per_frame_slopes: Sequence[float] = (1.0,),
    orientation_in_shared: bool = True,
    seed: int = 1,
) -> SeriesInfo:
    """An Enhanced CT multi-frame file: positions per frame (PlanePositionSequence), orientation and pixel
    measures in the shared groups (or per frame), rescale per frame (PixelValueTransformationSequence) with
    intercepts cycling through ``per_frame_intercepts`` and slopes through ``per_frame_slopes`` (pick slopes
    such as 0.5 that encode integer HU exactly). Frames are stored in shuffled order."""
    if hu is None:
        hu = phantom(14, 48, 48, seed=seed)
    n, rows, cols = hu.shape
    rng = random.Random(seed)
    order = list(range(n))
    if shuffle_frames:
        rng.shuffle(order)
    ds = _base_dataset(ENHANCED_CT)
    ds.Modality = "CT"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesNumber = 5
    ds.SeriesDescription = "Enhanced chest"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.PixelRepresentation = 1
    iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    def orientation_item() -> Dataset:
        item = Dataset()
        item.ImageOrientationPatient = iop
        return item

    def measures_item() -> Dataset:
        item = Dataset()
        item.PixelSpacing = [pixel_spacing, pixel_spacing]
        item.SliceThickness = slice_spacing
        return item

    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures_item()])
    if orientation_in_shared:
        shared.PlaneOrientationSequence = DicomSequence([orientation_item()])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    frames = []
    for j, k in enumerate(order):
        intercept = float(per_frame_intercepts[j % len(per_frame_intercepts)])
        slope = float(per_frame_slopes[j % len(per_frame_slopes)])
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [xy_origin[0], xy_origin[1], top_z - k * slice_spacing]
        item.PlanePositionSequence = DicomSequence([pos])
        if not orientation_in_shared:
            item.PlaneOrientationSequence = DicomSequence([orientation_item()])
        pvt = Dataset()
        pvt.RescaleIntercept = intercept
        pvt.RescaleSlope = slope
        pvt.RescaleType = "HU"
        item.PixelValueTransformationSequence = DicomSequence([pvt])
        content = Dataset()
        content.FrameAcquisitionNumber = 1
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
        frames.append(_stored(hu[k], slope, intercept, True))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.ascontiguousarray(np.stack(frames)).tobytes()
    _save(ds, Path(path), ExplicitVRLittleEndian)
    return SeriesInfo(
        folder=Path(path).parent,
        paths=[Path(path)],
        hu=hu,
        spacing=(slice_spacing, pixel_spacing, pixel_spacing),
        origin=(xy_origin[0], xy_origin[1], top_z),
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        z_positions=[top_z - k * slice_spacing for k in range(n)],
    )


def write_legacy_multiframe(
    path: Path,
    hu: np.ndarray | None = None,
    *,
    pixel_spacing: float = 0.8,
    slice_spacing: float = 2.0,
    first_z: float = -20.0,
    intercept: float = -1024.0,
    seed: int = 2,
) -> SeriesInfo:
    """A legacy multi-frame CT file: one ImagePositionPatient (frame 1), SpacingBetweenSlices, no functional
    groups. Frames run along +normal (inferior → superior), so the canonical volume is the frames reversed."""
    if hu is None:
        hu = phantom(12, 40, 40, seed=seed)
    n, rows, cols = hu.shape
    ds = _base_dataset(CTImageStorage)
    ds.Modality = "CT"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 7
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.ImagePositionPatient = [-10.0, -10.0, first_z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SliceThickness = slice_spacing
    ds.SpacingBetweenSlices = slice_spacing
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = intercept
    stored = [_stored(hu[n - 1 - j], 1.0, intercept, False) for j in range(n)]  # frame j at first_z + j*dz
    ds.PixelData = np.ascontiguousarray(np.stack(stored)).tobytes()
    _save(ds, Path(path), ExplicitVRLittleEndian)
    top = first_z + (n - 1) * slice_spacing
    return SeriesInfo(
        folder=Path(path).parent,
        paths=[Path(path)],
        hu=hu,
        spacing=(slice_spacing, pixel_spacing, pixel_spacing),
        origin=(-10.0, -10.0, top),
        series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        z_positions=[top - k * slice_spacing for k in range(n)],
    )


def read_back(path: Path) -> Dataset:
    return pydicom.dcmread(path)
