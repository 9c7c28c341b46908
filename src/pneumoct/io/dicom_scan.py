"""DICOM reader, stage 1: scan every candidate file's header (``stop_before_pixels``) into per-image records.

Non-DICOM files (text, thumbnails...) and DICOM objects without pixels (DICOMDIR, reports) are counted and skipped;
a DICOM file whose header cannot be parsed is counted as unreadable. Every image — a single-frame file or one frame
of a multi-frame file — becomes a :class:`_Frame` with its own position, orientation, rescale and pixel padding
(per-frame functional groups for Enhanced CT), grouped by (StudyInstanceUID, SeriesInstanceUID) into a
:class:`DicomScan`: a SeriesInstanceUID reused in two studies (it happens with anonymisers and some exports) never
merges their images.

pydicom warns (Python warnings) about values that break the standard, e.g. UIDs with dashes or letters; the scan
silences them and counts what matters instead (:func:`uid_problems`), so one summarised warning reaches the user.

Also the small header-value helpers the later stages share (:func:`_float`, :func:`_syntax_name`...).
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings as py_warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pydicom
from pydicom.uid import UID

from .dicom_geometry import _normal

logger = logging.getLogger("pneumoct.io")

_UNCOMPRESSED_SYNTAXES = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
}
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Secondary Capture image storage SOP classes (screenshots, burned-in reformats): never primary acquisitions.
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
#: A UID in DICOM form (PS3.5 9.1): digits and dots, no leading zero in a component, at most 64 characters.
_UID_FORM = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

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
    study_uid: str = "(no study UID)"
    sop_class: str = ""
    #: PixelPaddingValue [, PixelPaddingRangeLimit] as stored values (lowest, highest), or None
    padding: tuple[int, int] | None = None
    photometric: str = "MONOCHROME2"

    @property
    def is_localizer(self) -> bool:
        return any("LOCALIZER" in str(v).upper() for v in self.image_type)

    @property
    def is_derived(self) -> bool:
        """Not a primary acquisition: ImageType DERIVED (value 1) or SECONDARY (value 2) — MPR reformats, MIPs,
        screenshots — or a Secondary Capture SOP class."""
        first = str(self.image_type[0]).upper() if self.image_type else ""
        second = str(self.image_type[1]).upper() if len(self.image_type) > 1 else ""
        return first == "DERIVED" or second == "SECONDARY" or self.sop_class.startswith(_SECONDARY_CAPTURE_PREFIX)

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
    study_uid: str = "(no study UID)"
    #: StudyDate+StudyTime and AcquisitionDate+AcquisitionTime as sortable "YYYYMMDDHHMMSS.ffffff" strings.
    #: Kept out of ``meta`` on purpose: dates are only used to order studies, never reported.
    study_datetime: str | None = None
    acquisition_datetime: str | None = None


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


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging API
        return False


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom while it reads exported files: it both warns (Python warnings) and logs (logger
    "pydicom", one line per value) about every non-standard value, e.g. each UID with a dash. The reader
    reports what matters itself, once (``non_standard_uids``), so nothing of pydicom's reaches stderr."""
    log = logging.getLogger("pydicom")
    drop = _DropAll()
    log.addFilter(drop)
    try:
        with py_warnings.catch_warnings():
            py_warnings.simplefilter("ignore")
            yield
    finally:
        log.removeFilter(drop)


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
        with quiet_pydicom():
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
    ("photometric_interpretation", "PhotometricInterpretation"),
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
    # contrast phase is not a selection criterion; only its presence is recorded (the agent's name is free text)
    meta["contrast_agent"] = bool(str(ds.get("ContrastBolusAgent", "") or "").strip()) or (
        "ContrastBolusAgentSequence" in ds
    )
    return {k: v for k, v in meta.items() if v is not None}


def _datetime(date: Any, time_: Any) -> str | None:
    """'YYYYMMDD' + 'HHMMSS.ffffff' → one sortable string; None without a date."""
    d = str(date or "").strip()
    if not re.fullmatch(r"\d{8}", d):
        return None
    t = re.sub(r"[^0-9.]", "", str(time_ or ""))
    digits, _, frac = t.partition(".")
    return d + digits[:6].ljust(6, "0") + "." + frac[:6].ljust(6, "0")


def _series_dates(ds: pydicom.Dataset) -> tuple[str | None, str | None]:
    study = _datetime(ds.get("StudyDate"), ds.get("StudyTime"))
    acq = _datetime(ds.get("AcquisitionDate") or ds.get("SeriesDate"), ds.get("AcquisitionTime") or ds.get("SeriesTime"))
    if acq is None and ds.get("AcquisitionDateTime"):
        value = str(ds.get("AcquisitionDateTime"))
        acq = _datetime(value[:8], value[8:])
    return study, acq


def _padding(ds: pydicom.Dataset) -> tuple[int, int] | None:
    """(lowest, highest) stored padding value from PixelPaddingValue [+ PixelPaddingRangeLimit], or None.

    Both are US or SS by PixelRepresentation; an implicit-VR file may hand a signed value back as unsigned."""
    values = []
    for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        v = ds.get(keyword)
        if v is None or v == "":
            continue
        try:
            v = int(v[0] if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else v)
        except (TypeError, ValueError, IndexError):
            continue
        if int(ds.get("PixelRepresentation", 0) or 0) == 1 and v >= 32768:
            v -= 65536
        values.append(v)
    return (min(values), max(values)) if values else None


def uid_problems(frames: Sequence[_Frame]) -> tuple[int, int]:
    """(number of distinct study/series/SOP instance UIDs not in DICOM form, number of images without a
    SOPInstanceUID) among ``frames``."""
    uids = set()
    for f in frames:
        uids.update(u for u in (f.study_uid, f.series_uid, f.sop_uid) if u and not u.startswith("(no "))
    bad = sum(1 for u in uids if len(u) > 64 or not _UID_FORM.match(u))
    no_sop = len({(f.path, f.frame) for f in frames if not f.sop_uid})
    return bad, no_sop


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
        series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip() or "(no series UID)",
        study_uid=str(ds.get("StudyInstanceUID", "") or "").strip() or "(no study UID)",
        sop_uid=str(ds.get("SOPInstanceUID", "") or "").strip() or None,
        sop_class=str(ds.get("SOPClassUID", "") or ""),
        padding=_padding(ds),
        photometric=str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").strip().upper(),
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


def series_key(study_uid: str, series_uid: str) -> str:
    """Key of :attr:`DicomScan.series`: the series within its study."""
    return f"{study_uid}|{series_uid}"


def scan_dicom_files(paths: Sequence[Path], *, extra_skipped: int = 0) -> DicomScan:
    """Read the headers of ``paths`` and group the images by series. ``extra_skipped`` counts files that were
    set aside before (2D images, volume files found in a DICOM folder)."""
    scan = DicomScan(series={}, n_files=len(paths) + extra_skipped, n_non_dicom=extra_skipped)
    t0 = time.perf_counter()
    with quiet_pydicom():
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
            if not frames:
                continue
            uid, study_uid = frames[0].series_uid, frames[0].study_uid
            # key on the study too: a SeriesInstanceUID reused in another study must not merge the two
            key = series_key(study_uid, uid)
            series = scan.series.get(key)
            if series is None:
                study_dt, acq_dt = _series_dates(ds)
                series = scan.series[key] = _Series(
                    uid=uid,
                    frames=[],
                    meta=_series_meta(ds),
                    study_uid=study_uid,
                    study_datetime=study_dt,
                    acquisition_datetime=acq_dt,
                )
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
