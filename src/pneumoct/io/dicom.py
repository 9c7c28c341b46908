"""DICOM input: folders of single-frame images, Enhanced/legacy multi-frame files, any transfer syntax.

Pipeline
--------
1. **Scan** every candidate file's header (``stop_before_pixels``): non-DICOM files (text, thumbnails...) and
   DICOM objects without pixels (DICOMDIR, reports) are counted and skipped; a DICOM file whose header cannot be
   parsed is counted as unreadable. Every image — a single-frame file or one frame of a multi-frame file — becomes
   a :class:`_Frame` with its own position, orientation and rescale (per-frame functional groups for Enhanced CT).
2. **Group** frames by SeriesInstanceUID and judge each series: modality, localizers, images with another
   orientation, axial or not, consistent size/pixel spacing, number of distinct slice positions. The usable axial
   CT series with the most slices is chosen; every other series is listed with the reason it was not chosen.
3. **Decode** the chosen frames (thread pool; compressed single-frame files go through SimpleITK/GDCM, which
   releases the GIL, cross-checked against pydicom + pylibjpeg on the first file; pydicom otherwise, each one the
   fallback of the other), apply RescaleSlope/Intercept per file/frame.
4. **Resolve** duplicated positions (identical pixels → drop; different pixels → keep the acquisition with the
   most slices if a header field tells them apart, else refuse), skip undecodable slices only at the ends of the
   stack, check gaps, spacing regularity and gantry tilt, check Hounsfield plausibility.
5. **Canonicalise**: sort by ImagePositionPatient projected on the slice normal (never by file name or
   InstanceNumber), then transpose/flip rows, columns and slices into the canonical orientation of
   :mod:`pneumoct.types`.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
import warnings as py_warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.uid import UID

from ..errors import PneumoctInputError
from ..types import InputWarning, SliceInfo, StudyVolume
from .values import check_hounsfield

logger = logging.getLogger("pneumoct.io")

_UNCOMPRESSED_SYNTAXES = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: Positions closer than this (mm, along the slice normal) are the same slice position.
POSITION_TOLERANCE_MM = 0.01
#: A gap larger than this many median spacings means slices are missing.
GAP_FACTOR = 1.5
#: Spacing is uneven when the regular (non-gap) spacings spread by more than max(0.05 mm, 5 % of the median).
UNEVEN_ABS_MM, UNEVEN_REL = 0.05, 0.05
#: Gantry tilt / oblique thresholds (degrees).
TILT_MIN_DEG, OBLIQUE_MIN_DEG = 0.5, 1.0

#: Header fields that may tell two acquisitions mixed in one series apart (tried in this order).
_SPLIT_KEYS = (
    ("acquisition_number", "AcquisitionNumber"),
    ("image_type", "ImageType"),
    ("convolution_kernel", "ConvolutionKernel"),
    ("slice_thickness", "SliceThickness"),
    ("acquisition_time", "AcquisitionTime"),
)


# ---------------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Frame:
    """One 2D image: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # 0-based frame index in a multi-frame file; None for a single-frame file
    n_frames: int
    series_uid: str
    sop_uid: str | None
    modality: str
    ipp: np.ndarray | None
    iop: np.ndarray | None
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    image_type: tuple[str, ...]
    samples: int
    transfer_syntax: str
    split_values: dict[str, Any] = field(default_factory=dict)
    positions_assumed: bool = False

    @property
    def is_localizer(self) -> bool:
        return any("LOCALIZER" in str(v).upper() for v in self.image_type)

    @property
    def has_geometry(self) -> bool:
        return self.ipp is not None and self.iop is not None and self.pixel_spacing is not None

    @property
    def compressed(self) -> bool:
        return self.transfer_syntax not in _UNCOMPRESSED_SYNTAXES


@dataclass
class _Series:
    uid: str
    frames: list[_Frame]
    meta: dict[str, Any]


@dataclass
class DicomScan:
    """Result of reading every candidate file's header."""

    series: dict[str, _Series]
    n_files: int
    n_non_dicom: int = 0  # not DICOM at all (text, thumbnails, ...)
    n_non_image: int = 0  # DICOM without pixels (DICOMDIR, structured reports, ...)
    n_unreadable: int = 0  # DICOM files whose header could not be parsed

    @property
    def n_images(self) -> int:
        return sum(len(s.frames) for s in self.series.values())

    def no_image_message(self) -> str:
        if self.n_unreadable:
            return f"no readable DICOM image found ({self.n_unreadable} DICOM file(s) could not be read)"
        if self.n_non_image:
            return f"no DICOM image found (only {self.n_non_image} DICOM object(s) without pixels, e.g. DICOMDIR)"
        return f"no DICOM files found ({self.n_files} file(s), none is DICOM)"


@dataclass
class _Candidate:
    """A series judged for use: its kept frames, or the reason it cannot be used."""

    series: _Series
    frames: list[_Frame]
    orientation: str | None = None
    n_positions: int = 0
    reject: tuple[str, str] | None = None  # (code, reason)
    warnings: list[InputWarning] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        m = self.series.meta
        frames = self.frames or self.series.frames
        out = {
            "series_instance_uid": self.series.uid,
            "series_description": m.get("series_description"),
            "series_number": m.get("series_number"),
            "modality": m.get("modality"),
            "n_images": len(self.series.frames),
            "n_slice_positions": self.n_positions or None,
            "orientation": self.orientation or _series_orientation(self.series.frames),
            "multiframe": any(f.n_frames > 1 for f in frames),
        }
        if self.reject is not None:
            out["reason"] = self.reject[1]
            out["reason_code"] = self.reject[0]
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class _Selection:
    chosen: _Candidate | None
    others: list[_Candidate]
    warnings: list[InputWarning]
    refusal: PneumoctInputError | None


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        seq = list(value) if not isinstance(value, (str, bytes)) else [value]
        arr = np.array([float(v) for v in seq], dtype=float)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _float(value: Any, default: float | None = None) -> float | None:
    if value is None or value == "":
        return default
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = list(value)[0]
        out = float(value)
    except (TypeError, ValueError, IndexError):
        return default
    return out if np.isfinite(out) else default


def _jsonable(value: Any) -> Any:
    """DICOM values → plain JSON types (multi-valued → string joined with backslashes)."""
    if value is None or value == "":
        return None
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value) or None
    if isinstance(value, (pydicom.valuerep.DSfloat, float)):
        return float(value)
    if isinstance(value, (pydicom.valuerep.IS, int)):
        return int(value)
    return str(value).strip() or None


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _normal(iop: np.ndarray) -> np.ndarray:
    return _unit(np.cross(_unit(iop[:3]), _unit(iop[3:])))


def _orientation_of(iop: np.ndarray | None) -> str | None:
    if iop is None:
        return None
    n = _normal(iop)
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(n)))]


def _series_orientation(frames: Sequence[_Frame]) -> str | None:
    labels = Counter(_orientation_of(f.iop) for f in frames if f.iop is not None)
    return labels.most_common(1)[0][0] if labels else None


def _n_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _syntax_name(uid: str) -> str:
    try:
        name = UID(uid).name
    except Exception:  # pragma: no cover - defensive
        name = uid
    return name or uid


def looks_like_raw_dicom(path: Path) -> bool:
    """A DICOM dataset without the 128-byte preamble (old files): starts with a group 0002/0008 tag."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    try:
        with py_warnings.catch_warnings():
            py_warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return False
    return "SOPClassUID" in ds or "Modality" in ds or "Rows" in ds


# ---------------------------------------------------------------------------------------------------------------
# 1. scan headers
# ---------------------------------------------------------------------------------------------------------------

_META_FIELDS = (
    ("study_instance_uid", "StudyInstanceUID"),
    ("series_instance_uid", "SeriesInstanceUID"),
    ("series_description", "SeriesDescription"),
    ("series_number", "SeriesNumber"),
    ("modality", "Modality"),
    ("manufacturer", "Manufacturer"),
    ("manufacturer_model_name", "ManufacturerModelName"),
    ("convolution_kernel", "ConvolutionKernel"),
    ("slice_thickness_mm", "SliceThickness"),
    ("kvp", "KVP"),
    ("body_part_examined", "BodyPartExamined"),
    ("patient_position", "PatientPosition"),
    ("gantry_detector_tilt_deg", "GantryDetectorTilt"),
    ("image_type", "ImageType"),
)


def _series_meta(ds: pydicom.Dataset) -> dict[str, Any]:
    """Non-identifying header fields only (no names, IDs, dates, accession or institution)."""
    meta: dict[str, Any] = {}
    for key, keyword in _META_FIELDS:
        value = _jsonable(ds.get(keyword))
        if value is not None:
            meta[key] = value
    if "slice_thickness_mm" not in meta:  # Enhanced CT keeps it in the functional groups
        thick = _functional(ds, None, "PixelMeasuresSequence", "SliceThickness")
        if thick is not None:
            meta["slice_thickness_mm"] = _float(thick)
    meta["sop_class"] = _syntax_name(str(ds.get("SOPClassUID", ""))) or None
    return {k: v for k, v in meta.items() if v is not None}


def _functional(ds: pydicom.Dataset, per_frame: Any, seq_name: str, keyword: str) -> Any:
    """Look a value up in a frame's functional groups, then the shared groups, then the top level."""
    for groups in (per_frame, _first(ds.get("SharedFunctionalGroupsSequence"))):
        if groups is None:
            continue
        seq = groups.get(seq_name)
        item = _first(seq)
        if item is not None and keyword in item:
            return item.get(keyword)
    return ds.get(keyword)


def _first(seq: Any) -> Any:
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _frames_from_dataset(ds: pydicom.Dataset, path: Path) -> list[_Frame]:
    n_frames = int(_float(ds.get("NumberOfFrames"), 1) or 1)
    common = dict(
        path=path,
        n_frames=n_frames,
        series_uid=str(ds.get("SeriesInstanceUID", "") or "(no series UID)"),
        sop_uid=str(ds.get("SOPInstanceUID")) if ds.get("SOPInstanceUID") else None,
        modality=str(ds.get("Modality", "") or "").upper(),
        rows=int(ds.get("Rows", 0) or 0),
        cols=int(ds.get("Columns", 0) or 0),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        transfer_syntax=str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2")),
    )
    top_image_type = tuple(str(v) for v in (ds.get("ImageType") or ()))
    split_top = {key: _jsonable(ds.get(kw)) for key, kw in _SPLIT_KEYS}

    def pixel_spacing(value: Any) -> tuple[float, float] | None:
        arr = _floats(value, 2)
        return (float(arr[0]), float(arr[1])) if arr is not None and np.all(arr > 0) else None

    if n_frames <= 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [
            _Frame(
                frame=None,
                ipp=_floats(ds.get("ImagePositionPatient"), 3),
                iop=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=pixel_spacing(ds.get("PixelSpacing")),
                slope=_float(ds.get("RescaleSlope"), 1.0) or 1.0,
                intercept=_float(ds.get("RescaleIntercept"), 0.0) or 0.0,
                image_type=top_image_type,
                split_values=split_top,
                **common,
            )
        ]

    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n_frames:
        per_frame = None
    frames: list[_Frame] = []
    for k in range(n_frames):
        item = per_frame[k] if per_frame is not None else None
        frame_type = _functional(ds, item, "CTImageFrameTypeSequence", "FrameType")
        image_type = tuple(str(v) for v in frame_type) if frame_type else top_image_type
        split = dict(split_top)
        split["image_type"] = _jsonable(frame_type) if frame_type else split_top["image_type"]
        frames.append(
            _Frame(
                frame=k,
                ipp=_floats(_functional(ds, item, "PlanePositionSequence", "ImagePositionPatient"), 3),
                iop=_floats(_functional(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                pixel_spacing=pixel_spacing(_functional(ds, item, "PixelMeasuresSequence", "PixelSpacing")),
                slope=_float(_functional(ds, item, "PixelValueTransformationSequence", "RescaleSlope"), 1.0) or 1.0,
                intercept=_float(
                    _functional(ds, item, "PixelValueTransformationSequence", "RescaleIntercept"), 0.0
                )
                or 0.0,
                image_type=image_type,
                split_values=split,
                **common,
            )
        )
    _fill_legacy_positions(ds, frames)
    return frames


def _fill_legacy_positions(ds: pydicom.Dataset, frames: list[_Frame]) -> None:
    """Legacy multi-frame: one ImagePositionPatient for frame 1 → frames evenly spaced along the normal."""
    if not frames or frames[0].iop is None:
        return
    positions = [f.ipp for f in frames]
    distinct = {tuple(np.round(p, 4)) for p in positions if p is not None}
    if all(p is not None for p in positions) and len(distinct) == len(frames):
        return  # real per-frame positions
    first = _floats(ds.get("ImagePositionPatient"), 3)
    if first is None:
        first = positions[0]
    if first is None:
        return
    normal = _normal(frames[0].iop)
    offsets = _floats(ds.get("GridFrameOffsetVector"), len(frames)) if len(frames) > 1 else None
    if offsets is None:
        step = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness"))
        if not step:
            for f in frames:
                f.ipp = None  # no way to place the frames: no geometry
            return
        offsets = np.arange(len(frames), dtype=float) * abs(step)
    for f, off in zip(frames, offsets):
        f.ipp = first + float(off) * normal
        f.positions_assumed = True


def _read_header(path: Path) -> tuple[str, pydicom.Dataset | None]:
    """('image' | 'non_dicom' | 'non_image' | 'unreadable', dataset)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return "unreadable", None
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    if not has_preamble and not (len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00")):
        return "non_dicom", None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
    except Exception as exc:  # pydicom raises many kinds on broken files
        logger.debug("unreadable DICOM header (%s)", type(exc).__name__)
        return ("unreadable" if has_preamble else "non_dicom"), None
    media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not has_preamble and not (sop_class or "Modality" in ds or "Rows" in ds):
        return "non_dicom", None
    if _DICOMDIR_SOP_CLASS in (sop_class, media_class) or "DirectoryRecordSequence" in ds:
        return "non_image", None
    if "Rows" not in ds or "Columns" not in ds:
        # An intact object without pixels (report, private non-image storage) names the same valid SOP class in
        # its file meta and its dataset; anything else (an image class, a cut-off UID, none) is a damaged file.
        intact = bool(sop_class) and sop_class == media_class and UID(sop_class).is_valid
        if intact and "Image Storage" not in _syntax_name(sop_class):
            return "non_image", None
        if not has_preamble and not intact:
            return "non_dicom", None
        return "unreadable", None
    return "image", ds


def scan_dicom_files(paths: Sequence[Path], *, extra_skipped: int = 0) -> DicomScan:
    """Read the headers of ``paths`` and group the images by series. ``extra_skipped`` counts files that were
    set aside before (2D images, volume files found in a DICOM folder)."""
    scan = DicomScan(series={}, n_files=len(paths) + extra_skipped, n_non_dicom=extra_skipped)
    t0 = time.perf_counter()
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        for path in paths:
            status, ds = _read_header(Path(path))
            if status == "non_dicom":
                scan.n_non_dicom += 1
                continue
            if status == "non_image":
                scan.n_non_image += 1
                continue
            if status == "unreadable" or ds is None:
                scan.n_unreadable += 1
                continue
            try:
                frames = _frames_from_dataset(ds, Path(path))
            except Exception as exc:  # malformed values in an otherwise parsable header
                logger.debug("could not interpret DICOM header (%s)", type(exc).__name__)
                scan.n_unreadable += 1
                continue
            uid = frames[0].series_uid if frames else "(no series UID)"
            series = scan.series.get(uid)
            if series is None:
                series = scan.series[uid] = _Series(uid=uid, frames=[], meta=_series_meta(ds))
            series.frames.extend(frames)
    logger.debug(
        "scanned %d files in %.2f s: %d images in %d series, %d non-DICOM, %d non-image, %d unreadable",
        scan.n_files,
        time.perf_counter() - t0,
        scan.n_images,
        len(scan.series),
        scan.n_non_dicom,
        scan.n_non_image,
        scan.n_unreadable,
    )
    return scan


# ---------------------------------------------------------------------------------------------------------------
# 2. judge series, choose one
# ---------------------------------------------------------------------------------------------------------------


def _position_groups(frames: Sequence[_Frame], normal: np.ndarray) -> tuple[list[_Frame], np.ndarray, list[list[int]]]:
    """Sort frames along the normal; return (sorted frames, projections, groups of indices at one position)."""
    proj = np.array([float(np.dot(f.ipp, normal)) for f in frames])
    order = np.argsort(proj, kind="stable")
    frames_sorted = [frames[i] for i in order]
    proj = proj[order]
    groups: list[list[int]] = []
    for i, p in enumerate(proj):
        if groups and p - proj[groups[-1][0]] < POSITION_TOLERANCE_MM:
            groups[-1].append(i)
        else:
            groups.append([i])
    return frames_sorted, proj, groups


def _orientation_clusters(frames: Sequence[_Frame], tolerance: float = 0.01) -> list[int]:
    """Cluster label per frame: frames whose ImageOrientationPatient differ by < ``tolerance`` share a label."""
    reps: list[np.ndarray] = []
    labels = []
    for f in frames:
        for label, rep in enumerate(reps):
            if float(np.max(np.abs(f.iop - rep))) < tolerance:  # type: ignore[operator]
                labels.append(label)
                break
        else:
            reps.append(f.iop)  # type: ignore[arg-type]
            labels.append(len(reps) - 1)
    return labels


def _judge(series: _Series, min_slices: int) -> _Candidate:
    cand = _Candidate(series=series, frames=[])
    modality = series.meta.get("modality") or (series.frames[0].modality if series.frames else "")
    if str(modality).upper() != "CT":
        cand.reject = ("not_ct", f"modality {modality or 'unknown'}, not CT")
        return cand
    frames = list(series.frames)
    localizers = [f for f in frames if f.is_localizer]
    frames = [f for f in frames if not f.is_localizer]
    if not frames:
        cand.reject = ("localizer", "localizer (scout) images only")
        return cand
    if localizers:
        cand.warnings.append(
            InputWarning(
                "localizer_excluded",
                f"excluded {len(localizers)} localizer (scout) image(s) from the series (ImageType LOCALIZER)",
            )
        )
    no_geo = [f for f in frames if not f.has_geometry]
    frames = [f for f in frames if f.has_geometry]
    if not frames:
        cand.reject = ("no_geometry", "no image position/orientation/pixel spacing (not a slice stack)")
        return cand
    if no_geo:
        cand.warnings.append(
            InputWarning(
                "images_without_geometry_excluded",
                f"excluded {len(no_geo)} image(s) without position/orientation/pixel spacing from the series",
            )
        )
    colour = [f for f in frames if f.samples != 1]
    frames = [f for f in frames if f.samples == 1]
    if not frames:
        cand.reject = ("not_grayscale", "colour images (screenshots or secondary captures), not CT slices")
        return cand
    if colour:
        cand.warnings.append(
            InputWarning("colour_images_excluded", f"excluded {len(colour)} colour image(s) from the series")
        )
    # orientation: keep the most common one; a stray image with another orientation is a localizer/scout
    keys = _orientation_clusters(frames)
    counts = Counter(keys)
    main = max(counts, key=lambda k: (counts[k], _orientation_of(frames[keys.index(k)].iop) == "axial", -k))
    outliers = len(frames) - counts[main]
    frames = [f for f, k in zip(frames, keys) if k == main]
    if outliers:
        cand.warnings.append(
            InputWarning(
                "localizer_excluded",
                f"excluded {outliers} image(s) whose orientation differs from the rest of the series "
                "(localizer/scout or reformat)",
            )
        )
    cand.orientation = _orientation_of(frames[0].iop)
    cand.frames = frames
    if cand.orientation != "axial":
        cand.reject = ("non_axial", f"non-axial series ({cand.orientation}) — pneumoct needs axial slices")
        return cand
    sizes = sorted({(f.rows, f.cols) for f in frames})
    spacings = sorted({tuple(round(v, 4) for v in f.pixel_spacing) for f in frames})  # type: ignore[union-attr]
    if len(sizes) > 1 or len(spacings) > 1:
        parts = []
        if len(sizes) > 1:
            parts.append("sizes " + ", ".join(f"{r}x{c}" for r, c in sizes[:4]))
        if len(spacings) > 1:
            parts.append("pixel spacings " + ", ".join(f"{a:g}x{b:g}" for a, b in spacings[:4]))
        cand.reject = (
            "inconsistent_geometry",
            "inconsistent image size or pixel spacing within the series (" + "; ".join(parts) + ")",
        )
        return cand
    _, _, groups = _position_groups(frames, _normal(frames[0].iop))
    cand.n_positions = len(groups)
    if cand.n_positions < min_slices:
        cand.reject = ("too_few_slices", f"only {cand.n_positions} axial slice(s) (minimum {min_slices})")
    return cand


def _select(scan: DicomScan, min_slices: int, *, single_file: bool = False) -> _Selection:
    warnings: list[InputWarning] = []
    if scan.n_non_dicom or scan.n_non_image:
        parts = []
        if scan.n_non_dicom:
            parts.append(f"{scan.n_non_dicom} non-DICOM file(s)")
        if scan.n_non_image:
            parts.append(f"{scan.n_non_image} DICOM object(s) without pixels (DICOMDIR, reports)")
        warnings.append(InputWarning("non_dicom_files_skipped", "skipped " + " and ".join(parts)))
    candidates = [_judge(s, min_slices) for s in scan.series.values()]
    usable = [c for c in candidates if c.reject is None]

    def rank(c: _Candidate) -> tuple:
        thick = _float(c.series.meta.get("slice_thickness_mm"), 1e9)
        number = _float(c.series.meta.get("series_number"), 1e9)
        return (-c.n_positions, -len(c.frames), thick, number)

    if not usable:
        if not candidates:
            refusal = PneumoctInputError("corrupt_files" if scan.n_unreadable else "no_dicom", scan.no_image_message())
        elif all(c.reject and c.reject[0] == "not_ct" for c in candidates):
            mods = sorted({str(c.series.meta.get("modality") or "unknown") for c in candidates})
            refusal = PneumoctInputError(
                "not_ct", f"no CT series found (modality {', '.join(mods)}) — pneumoct needs a chest CT"
            )
        else:
            ct = [c for c in candidates if c.reject and c.reject[0] != "not_ct"]
            worst = max(ct, key=lambda c: (len(c.frames), len(c.series.frames)))
            code, reason = worst.reject  # type: ignore[misc]
            if code == "too_few_slices":
                reason = reason.replace("axial slice(s)", "axial CT slice(s)")
                if single_file:
                    reason += ": a single DICOM image is not a study, give the folder with the whole series"
            refusal = PneumoctInputError(code, reason)
        return _Selection(None, candidates, warnings, refusal)

    usable.sort(key=rank)
    chosen = usable[0]
    others = [c for c in candidates if c is not chosen]
    for c in others:
        if c.reject is None:
            c.reject = (
                "fewer_slices",
                f"fewer slices than the chosen series ({c.n_positions} vs {chosen.n_positions})"
                if c.n_positions < chosen.n_positions
                else "same number of slices as the chosen series, which has thinner slices or a lower series number",
            )
    warnings.extend(chosen.warnings)
    non_ct = [c for c in others if c.reject and c.reject[0] == "not_ct"]
    if non_ct:
        mods = sorted({str(c.series.meta.get("modality") or "unknown") for c in non_ct})
        warnings.append(
            InputWarning(
                "non_ct_series_ignored", f"ignored {len(non_ct)} non-CT series (modality {', '.join(mods)})"
            )
        )
    if len(usable) > 1:
        m = chosen.series.meta
        warnings.append(
            InputWarning(
                "multiple_series",
                f"{len(usable)} usable axial CT series found; using series {m.get('series_number', '?')} "
                f"'{m.get('series_description', '')}' ({chosen.n_positions} slices); the others are listed in "
                "metadata other_series",
            )
        )
    return _Selection(chosen, others, warnings, None)


# ---------------------------------------------------------------------------------------------------------------
# 3. decode pixels
# ---------------------------------------------------------------------------------------------------------------


def _rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    if slope == 1.0 and float(intercept).is_integer():
        return stored.astype(np.int32) + int(intercept)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _decode_pydicom(path: Path, frames: Sequence[_Frame]) -> list[np.ndarray]:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (frames[0].rows, frames[0].cols):
        raise ValueError(f"unexpected pixel array shape {arr.shape}")
    return [_rescale(arr[f.frame or 0], f.slope, f.intercept) for f in frames]


def _decode_sitk(path: Path, frames: Sequence[_Frame]) -> list[np.ndarray]:
    """SimpleITK/GDCM: returns rescaled values (GDCM applies RescaleSlope/Intercept itself)."""
    import SimpleITK as sitk

    if frames[0].n_frames > 1 and len({(f.slope, f.intercept) for f in frames}) > 1:
        raise ValueError("per-frame rescale differs: GDCM applies one rescale to all frames")
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (frames[0].rows, frames[0].cols) or arr.shape[0] < frames[0].n_frames:
        raise ValueError(f"unexpected pixel array shape {arr.shape}")
    return [arr[f.frame or 0] for f in frames]


def _decoder_order(decoder: str, frame: _Frame, sitk_trusted: bool) -> tuple[str, ...]:
    if decoder == "pydicom":
        return ("pydicom", "simpleitk")
    if decoder == "simpleitk":
        return ("simpleitk", "pydicom")
    if sitk_trusted and frame.compressed and frame.n_frames == 1:
        return ("simpleitk", "pydicom")
    return ("pydicom", "simpleitk")


def _decode_frames(frames: Sequence[_Frame], decoder: str) -> tuple[np.ndarray, list[int], dict[str, Any]]:
    """Decode ``frames`` (rescaled to HU) into one int16 array. Returns (array, failed indices, info)."""
    t0 = time.perf_counter()
    rows, cols = frames[0].rows, frames[0].cols
    out = np.zeros((len(frames), rows, cols), dtype=np.int16)
    by_file: dict[Path, list[int]] = {}
    for i, f in enumerate(frames):
        by_file.setdefault(f.path, []).append(i)

    decoders = {"pydicom": _decode_pydicom, "simpleitk": _decode_sitk}
    sitk_trusted = decoder != "pydicom"
    if decoder == "auto":
        # cross-check GDCM against pydicom + pylibjpeg on one compressed single-frame file before trusting it
        probe = next((f for f in frames if f.compressed and f.n_frames == 1), None)
        if probe is not None:
            try:
                a = _decode_pydicom(probe.path, [probe])[0]
            except Exception:
                a = None  # pydicom cannot decode this syntax here: GDCM is the only way
            if a is not None:
                try:
                    b = _decode_sitk(probe.path, [probe])[0]
                    sitk_trusted = bool(np.array_equal(np.rint(a), np.rint(b)))
                except Exception:
                    sitk_trusted = False
                if not sitk_trusted:
                    logger.info("SimpleITK/GDCM decoding disagrees with pydicom or fails: using pydicom")

    used: Counter[str] = Counter()
    clipped = 0

    def work(item: tuple[Path, list[int]]) -> tuple[list[int], str | None, int]:
        path, idx = item
        group = [frames[i] for i in idx]
        for name in _decoder_order(decoder, group[0], sitk_trusted):
            try:
                arrays = decoders[name](path, group)
            except Exception as exc:
                logger.debug("%s could not decode a file (%s: %s)", name, type(exc).__name__, str(exc)[:120])
                continue
            n_clip = 0
            for i, a in zip(idx, arrays):
                if np.issubdtype(a.dtype, np.floating):
                    a = np.rint(a)
                lo, hi = a.min(), a.max()
                if lo < -32768 or hi > 32767:
                    n_clip += int(np.count_nonzero((a < -32768) | (a > 32767)))
                    a = np.clip(a, -32768, 32767)
                out[i] = a
            return idx, name, n_clip
        return idx, None, 0

    items = list(by_file.items())
    failed: list[int] = []
    with py_warnings.catch_warnings():
        py_warnings.simplefilter("ignore")
        if len(items) > 4 and _n_workers() > 1:
            with ThreadPoolExecutor(max_workers=_n_workers()) as pool:
                results = list(pool.map(work, items))
        else:
            results = [work(it) for it in items]
    for idx, name, n_clip in results:
        if name is None:
            failed.extend(idx)
        else:
            used[name] += len(idx)
            clipped += n_clip
    info = {
        "decode_seconds": round(time.perf_counter() - t0, 3),
        "decoders_used": dict(used),
        "n_clipped_values": clipped,
    }
    logger.info(
        "decoded %d image(s) from %d file(s) in %.2f s (%s)",
        len(frames) - len(failed),
        len(items),
        info["decode_seconds"],
        ", ".join(f"{k}: {v}" for k, v in used.items()) or "nothing",
    )
    return out, sorted(failed), info


# ---------------------------------------------------------------------------------------------------------------
# 4. stack checks
# ---------------------------------------------------------------------------------------------------------------


def _fmt_z(values: Sequence[float], limit: int = 6) -> str:
    shown = ", ".join(f"{v:.1f}" for v in list(values)[:limit])
    return shown + (", ..." if len(values) > limit else "")


def _spacing_checks(
    frames: Sequence[_Frame], proj: np.ndarray, normal: np.ndarray, meta: dict[str, Any]
) -> tuple[float, list[InputWarning], dict[str, Any]]:
    """Median spacing along the normal, and warnings for gaps, uneven spacing, gantry tilt, oblique slices."""
    warnings: list[InputWarning] = []
    details: dict[str, Any] = {}
    diffs = np.diff(proj)
    if diffs.size == 0:
        thick = _float(meta.get("slice_thickness_mm"), 1.0) or 1.0
        return float(thick), warnings, details
    median = float(np.median(diffs))
    gap_mask = diffs > GAP_FACTOR * median
    if np.any(gap_mask):
        gaps = []
        total = 0
        for i in np.flatnonzero(gap_mask):
            n_missing = max(1, int(round(diffs[i] / median)) - 1)
            total += n_missing
            z0, z1 = float(frames[i].ipp[2]), float(frames[i + 1].ipp[2])  # type: ignore[index]
            upper, lower = max(z0, z1), min(z0, z1)
            step = (upper - lower) / (n_missing + 1)
            gaps.append(
                {
                    "upper_z_mm": round(upper, 3),
                    "lower_z_mm": round(lower, 3),
                    "n_missing": n_missing,
                    "missing_z_mm": [round(upper - (j + 1) * step, 3) for j in range(n_missing)],
                }
            )
        gaps.sort(key=lambda g: -g["upper_z_mm"])  # superior first, as the canonical slices run
        details["missing_slice_gaps"] = gaps
        where = "; ".join(
            f"between z={g['upper_z_mm']:.1f} and z={g['lower_z_mm']:.1f} mm ({g['n_missing']} missing, near "
            f"z={_fmt_z(g['missing_z_mm'], 4)})"
            for g in gaps[:5]
        )
        more = f"; and {len(gaps) - 5} more gap(s)" if len(gaps) > 5 else ""
        warnings.append(
            InputWarning(
                "missing_slices",
                f"about {total} slice(s) missing in {len(gaps)} gap(s) larger than {GAP_FACTOR}x the median "
                f"spacing {median:.2f} mm: {where}{more}; not interpolated",
            )
        )
    regular = diffs[~gap_mask]
    if regular.size and float(regular.max() - regular.min()) > max(UNEVEN_ABS_MM, UNEVEN_REL * median):
        details["spacing_min_max_mm"] = [round(float(regular.min()), 4), round(float(regular.max()), 4)]
        warnings.append(
            InputWarning(
                "uneven_spacing",
                f"uneven slice spacing: {regular.min():.3f} to {regular.max():.3f} mm; using the median "
                f"{median:.3f} mm",
            )
        )
    tag = _float(meta.get("gantry_detector_tilt_deg"), 0.0) or 0.0
    disp = frames[-1].ipp - frames[0].ipp  # type: ignore[operator]
    geom = 0.0
    if float(np.linalg.norm(disp)) > 0:
        cosang = abs(float(np.dot(disp, normal))) / float(np.linalg.norm(disp))
        geom = float(np.degrees(np.arccos(min(1.0, cosang))))
    oblique = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if abs(tag) > 0.01 or geom > TILT_MIN_DEG:
        angle = tag if abs(tag) > 0.01 else geom
        how = "GantryDetectorTilt tag" if abs(tag) > 0.01 else "slice positions not along the slice normal"
        details["gantry_tilt_deg"] = round(float(angle), 2)
        warnings.append(
            InputWarning(
                "gantry_tilt",
                f"gantry tilt of {angle:.1f} degrees ({how}); slices kept as acquired (not resampled), "
                "the geometry treats them as an orthogonal stack",
            )
        )
    elif oblique > OBLIQUE_MIN_DEG:
        details["oblique_deg"] = round(oblique, 2)
        warnings.append(
            InputWarning("oblique_slices", f"slices are oblique, {oblique:.1f} degrees from true axial")
        )
    return median, warnings, details


def _resolve_duplicates(
    frames: list[_Frame], groups: list[list[int]], pixels: np.ndarray | None
) -> tuple[list[int], list[InputWarning]]:
    """Indices to keep so that each position holds one image. ``pixels`` None → header-only (inspect)."""
    dup_groups = [g for g in groups if len(g) > 1]
    if not dup_groups:
        return [g[0] for g in groups], []
    n_extra = sum(len(g) - 1 for g in dup_groups)
    if pixels is None:
        return [g[0] for g in groups], [
            InputWarning(
                "duplicate_positions",
                f"{len(dup_groups)} slice position(s) hold more than one image ({n_extra} extra); resolved when "
                "the pixels are read (identical → dropped, different acquisitions → the largest is kept)",
            )
        ]
    identical = all(np.array_equal(pixels[g[0]], pixels[j]) for g in dup_groups for j in g[1:])
    if identical:
        return [g[0] for g in groups], [
            InputWarning(
                "duplicate_slices_dropped",
                f"dropped {n_extra} duplicate image(s) with identical pixel data at {len(dup_groups)} position(s)",
            )
        ]
    # different images at one position: two acquisitions/reconstructions mixed in one series?
    position_of = {i: gi for gi, g in enumerate(groups) for i in g}
    for key, keyword in _SPLIT_KEYS:
        values = [str(f.split_values.get(key)) for f in frames]
        if len(set(values)) < 2:
            continue
        subsets: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            subsets.setdefault(v, []).append(i)
        if any(len({position_of[i] for i in idx}) != len(idx) for idx in subsets.values()):
            continue  # this field does not separate the duplicates
        best_value, best = max(subsets.items(), key=lambda kv: (len(kv[1]), -min(kv[1])))
        dropped = len(frames) - len(best)
        return best, [
            InputWarning(
                "mixed_acquisitions",
                f"the series mixes {len(subsets)} acquisitions at the same positions (different {keyword}); kept "
                f"{keyword} {best_value} with {len(best)} slices, dropped {dropped} image(s)",
            )
        ]
    raise PneumoctInputError(
        "conflicting_slices",
        f"{len(dup_groups)} slice position(s) hold different images and no header field tells the acquisitions "
        "apart: export each acquisition as its own series",
    )


# ---------------------------------------------------------------------------------------------------------------
# 5. canonical orientation
# ---------------------------------------------------------------------------------------------------------------

#: canonical array axis → (LPS component, wanted sign): slices toward inferior (-z), rows posterior (+y),
#: columns patient left (+x).
_CANONICAL = ((2, -1.0), (1, 1.0), (0, 1.0))


def canonical_transform(axis_vectors: Sequence[np.ndarray]) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For array axes whose LPS directions are ``axis_vectors`` (one per array axis), the axis permutation and
    flips that give the canonical orientation: ``np.flip(a.transpose(perm), axes where flips)``."""
    best = max(
        itertools.permutations(range(3)),
        key=lambda p: sum(abs(float(axis_vectors[p[t]][_CANONICAL[t][0]])) for t in range(3)),
    )
    flips = tuple(
        bool(np.sign(axis_vectors[best[t]][_CANONICAL[t][0]]) != _CANONICAL[t][1]) for t in range(3)
    )
    return tuple(best), flips  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------------


def read_dicom_files(
    paths: Sequence[Path],
    *,
    min_slices: int = 10,
    scan: DicomScan | None = None,
    single_file: bool = False,
    decoder: str | None = None,
) -> StudyVolume:
    """Read the best axial CT series found among ``paths`` (see module docstring).

    ``decoder``: "auto" (default; also ``PNEUMOCT_DICOM_DECODER``), "pydicom" or "simpleitk" (each falls back to
    the other per file).
    """
    decoder = (decoder or os.environ.get("PNEUMOCT_DICOM_DECODER") or "auto").lower()
    if decoder not in ("auto", "pydicom", "simpleitk"):
        raise ValueError(f"unknown DICOM decoder {decoder!r}")
    if scan is None:
        scan = scan_dicom_files([Path(p) for p in paths])
    sel = _select(scan, min_slices, single_file=single_file)
    if sel.refusal is not None:
        raise sel.refusal
    chosen = sel.chosen
    assert chosen is not None
    warnings = list(sel.warnings)
    meta = chosen.series.meta
    normal = _normal(chosen.frames[0].iop)  # type: ignore[arg-type]

    frames, proj, groups = _position_groups(chosen.frames, normal)
    pixels, failed, decode_info = _decode_frames(frames, decoder)

    # undecodable slices: acceptable only at the ends of the stack or where a duplicate survives
    if failed:
        failed_set = set(failed)
        ok_groups = [[i for i in g if i not in failed_set] for g in groups]
        if not any(ok_groups):
            raise PneumoctInputError(
                "corrupt_files",
                f"no image of the chosen series could be decoded (transfer syntax "
                f"{_syntax_name(frames[0].transfer_syntax)})",
            )
        present = [gi for gi, g in enumerate(ok_groups) if g]
        lost_inside = [
            gi for gi, g in enumerate(ok_groups) if not g and present[0] < gi < present[-1]
        ]
        if lost_inside:
            zs = [float(frames[groups[gi][0]].ipp[2]) for gi in lost_inside]  # type: ignore[index]
            raise PneumoctInputError(
                "corrupt_files",
                f"{len(failed)} image(s) could not be decoded and {len(lost_inside)} slice position(s) inside the "
                f"series would be missing (z={_fmt_z(zs)} mm): the series is incomplete",
            )
        lost_end = [gi for gi, g in enumerate(ok_groups) if not g]
        msg = f"skipped {len(failed)} image(s) whose pixels could not be decoded"
        if lost_end:
            zs = [float(frames[groups[gi][0]].ipp[2]) for gi in lost_end]  # type: ignore[index]
            msg += f"; {len(lost_end)} slice(s) lost at the ends of the stack (z={_fmt_z(zs)} mm)"
        warnings.append(InputWarning("corrupt_slices_skipped", msg))
        keep = [i for i in range(len(frames)) if i not in failed_set]
        frames = [frames[i] for i in keep]
        pixels = pixels[keep]
        frames, proj, groups = _position_groups(frames, normal)  # stable: order unchanged
    if decode_info["n_clipped_values"]:
        warnings.append(
            InputWarning(
                "values_clipped",
                f"{decode_info['n_clipped_values']} voxel value(s) outside the int16 range were clipped",
            )
        )

    keep, dup_warnings = _resolve_duplicates(frames, groups, pixels)
    warnings.extend(dup_warnings)
    frames = [frames[i] for i in keep]
    if keep != list(range(pixels.shape[0])):
        pixels = pixels[keep]
    proj = np.array([float(np.dot(f.ipp, normal)) for f in frames])
    if len(frames) < min_slices:
        raise PneumoctInputError(
            "too_few_slices", f"only {len(frames)} axial CT slice(s) left after cleaning (minimum {min_slices})"
        )

    spacing_z, spacing_warnings, details = _spacing_checks(frames, proj, normal, meta)
    if scan.n_unreadable:
        if "missing_slice_gaps" in details:
            raise PneumoctInputError(
                "corrupt_files",
                f"{scan.n_unreadable} DICOM file(s) could not be read and the series has missing slices: the "
                "series is incomplete",
            )
        warnings.append(
            InputWarning(
                "unreadable_files_skipped",
                f"skipped {scan.n_unreadable} DICOM file(s) whose header could not be read; the chosen series has "
                "no gap",
            )
        )
    warnings.extend(spacing_warnings)
    if any(f.positions_assumed for f in frames):
        warnings.append(
            InputWarning(
                "multiframe_positions_assumed",
                f"multi-frame file without per-frame positions: frames assumed evenly spaced {spacing_z:.3f} mm "
                "apart along the slice normal",
            )
        )

    check_hounsfield(pixels, what="the chosen series")

    # canonical orientation
    iop = frames[0].iop
    row_dir, col_dir = _unit(iop[:3]), _unit(iop[3:])  # type: ignore[index]
    ps_row, ps_col = frames[0].pixel_spacing  # type: ignore[misc]
    vectors = [normal, col_dir, row_dir]  # array axes (slice, row, column)
    spacings = [spacing_z, ps_row, ps_col]
    perm, flips = canonical_transform(vectors)
    if perm[0] != 0:  # cannot happen for an axial series
        raise PneumoctInputError("non_axial", "non-axial series — pneumoct needs axial slices")
    hu = pixels.transpose(perm)
    flip_axes = tuple(t for t in range(3) if flips[t])
    if flip_axes:
        hu = np.flip(hu, axis=flip_axes)
    hu = np.ascontiguousarray(hu)
    new_vectors = [vectors[perm[t]] * (-1.0 if flips[t] else 1.0) for t in range(3)]
    spacing = tuple(float(spacings[perm[t]]) for t in range(3))
    direction = np.column_stack([new_vectors[2], new_vectors[1], new_vectors[0]])
    shape_orig = pixels.shape
    start = [0, 0, 0]  # original index of the new voxel [0, 0, 0]
    for t in range(3):
        if flips[t]:
            start[perm[t]] = shape_orig[perm[t]] - 1
    origin = frames[start[0]].ipp + start[1] * ps_row * col_dir + start[2] * ps_col * row_dir  # type: ignore[operator]
    order = list(range(len(frames)))[::-1] if flips[0] else list(range(len(frames)))
    slices = [
        SliceInfo(
            index=k,
            position_mm=float(frames[i].ipp[2]),  # type: ignore[index]
            sop_instance_uid=frames[i].sop_uid,
            frame_number=(frames[i].frame + 1) if frames[i].frame is not None else None,
            source=frames[i].path.name,
        )
        for k, i in enumerate(order)
    ]
    multiframe = any(f.n_frames > 1 for f in frames)
    metadata = dict(meta)
    metadata.update(
        {
            "source_kind": "multi-frame file" if multiframe else "single-frame files",
            "transfer_syntax": _syntax_name(frames[0].transfer_syntax),
            "n_files_scanned": scan.n_files,
            "n_images_in_series": len(chosen.series.frames),
            "rows": frames[0].rows,
            "columns": frames[0].cols,
            "pixel_spacing_mm": [float(ps_row), float(ps_col)],
            "slice_spacing_mm": float(spacing_z),
            "rescale_slope": frames[0].slope,
            "rescale_intercept": frames[0].intercept,
            "original_orientation": {
                "row_direction": [round(float(v), 5) for v in row_dir],
                "column_direction": [round(float(v), 5) for v in col_dir],
                "rows_flipped": bool(flips[1]),
                "columns_flipped": bool(flips[2]),
                "rows_columns_swapped": perm[1] != 1,
                "slices_reversed_from_acquisition": bool(flips[0]),
            },
            "chosen_series": chosen.summary(),
            "other_series": [c.summary() for c in sel.others],
            "decode": decode_info,
        }
    )
    metadata.update(details)
    study = StudyVolume(
        hu=hu,
        spacing=spacing,  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=direction,
        slices=slices,
        source_format="dicom-multiframe" if multiframe else "dicom",
        warnings=warnings,
        metadata=metadata,
    )
    for w in warnings:
        logger.info("input warning [%s] %s", w.code, w.message)
    return study


def inspect_dicom_files(
    paths: Sequence[Path],
    *,
    min_slices: int = 10,
    scan: DicomScan | None = None,
    input_kind: str = "folder",
) -> dict[str, Any]:
    """What :func:`read_dicom_files` would pick, from headers only (no pixel decoding)."""
    if scan is None:
        scan = scan_dicom_files([Path(p) for p in paths])
    sel = _select(scan, min_slices, single_file=input_kind == "file")
    info: dict[str, Any] = {
        "input_kind": input_kind,
        "format": None,
        "n_files": scan.n_files,
        "n_dicom_images": scan.n_images,
        "n_skipped_files": scan.n_non_dicom + scan.n_non_image + scan.n_unreadable,
        "chosen_series": None,
        "other_series": [c.summary() for c in sel.others],
        "warnings": [],
        "refusal": None,
    }
    warnings = list(sel.warnings)
    if sel.refusal is not None:
        info["refusal"] = {"code": sel.refusal.code, "message": str(sel.refusal)}
        info["warnings"] = [w.to_dict() for w in warnings]
        return info
    chosen = sel.chosen
    assert chosen is not None
    normal = _normal(chosen.frames[0].iop)  # type: ignore[arg-type]
    frames, _, groups = _position_groups(chosen.frames, normal)
    keep, dup_warnings = _resolve_duplicates(frames, groups, None)
    warnings.extend(dup_warnings)
    frames = [frames[i] for i in keep]
    proj = np.array([float(np.dot(f.ipp, normal)) for f in frames])
    spacing_z, spacing_warnings, details = _spacing_checks(frames, proj, normal, chosen.series.meta)
    if scan.n_unreadable:
        warnings.append(
            InputWarning(
                "unreadable_files_skipped",
                f"{scan.n_unreadable} DICOM file(s) whose header could not be read will be skipped"
                + (" (and the series has gaps: reading will refuse)" if "missing_slice_gaps" in details else ""),
            )
        )
    warnings.extend(spacing_warnings)
    multiframe = any(f.n_frames > 1 for f in frames)
    summary = chosen.summary()
    summary.update(
        {
            "study_instance_uid": chosen.series.meta.get("study_instance_uid"),
            "rows": frames[0].rows,
            "columns": frames[0].cols,
            "pixel_spacing_mm": list(frames[0].pixel_spacing),  # type: ignore[arg-type]
            "slice_spacing_mm": round(float(spacing_z), 4),
            "transfer_syntax": _syntax_name(frames[0].transfer_syntax),
            "z_range_mm": sorted(  # superior first, as the canonical slices run
                (round(float(frames[0].ipp[2]), 3), round(float(frames[-1].ipp[2]), 3)), reverse=True  # type: ignore[index]
            ),
        }
    )
    info.update(
        {
            "format": "dicom-multiframe" if multiframe else "dicom",
            "chosen_series": {k: v for k, v in summary.items() if v is not None},
            "warnings": [w.to_dict() for w in warnings],
        }
    )
    info.update(details)
    return info
