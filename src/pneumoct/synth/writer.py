"""Writing phantoms to disk: NIfTI image + masks, a DICOM CT series, ``truth.json``, cohort manifests.

Layout of one case (``write_case``)::

    out_dir/case_id/image.nii.gz       int16 HU, the study geometry (LPS direction diag(1, 1, -1))
    out_dir/case_id/dicom/<hex>.dcm     one CT Image Storage file per slice, shuffled, names unrelated to position
    out_dir/case_id/lung_mask.nii.gz    uint8 0/1 right/2 left
    out_dir/case_id/lesion_mask.nii.gz  uint8 0/1 ground-glass/2 consolidation
    out_dir/case_id/truth.json          label, lesion volume ratio, per-slice labels, lesions, config, ...

``truth.json`` is written last, so a case folder with a ``truth.json`` is complete.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from ..io.writers import atomic_path, write_json, write_volume
from ..types import CLASS_NAMES, LESION_CONSOLIDATION, LESION_GGO, LUNG_LEFT, LUNG_RIGHT
from .phantom import DATA_SOURCE, GENERATOR_VERSION, Phantom, PhantomConfig, generate_phantom

FORMATS = ("nifti", "dicom")
MANIFEST_FIELDS = ("case_id", "label", "seed", "difficulty", "matrix", "n_slices", "slice_spacing_mm",
                   "pixel_spacing_mm", "lesion_volume_ratio", "n_lesions", "lung_volume_ml", "image", "dicom_dir",
                   "lung_mask", "lesion_mask", "truth")
RESCALE_INTERCEPT = -1024
_STUDY_DATE = "20200315"


def _ds_num(v: float) -> str:
    """A DICOM DS string (at most 16 characters) for v."""
    s = f"{float(v):.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    if len(s) > 16:
        s = f"{float(v):.10g}"
    return s


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    return obj


def _check_case_id(case_id: str) -> None:
    if not case_id or case_id in (".", "..") or any(c in case_id for c in "/\\\0") or len(case_id) > 64:
        raise ValueError(f"bad case_id {case_id!r}: use a plain file name of at most 64 characters")


def _dicom_file_names(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng([int(seed) % (2**63), 99])
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = rng.bytes(8).hex() + ".dcm"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _write_dicom_series(phantom: Phantom, folder: Path, case_id: str) -> dict[str, Any]:
    """Write one file per slice into ``folder`` (replaced as a whole). Returns a summary for truth.json."""
    study = phantom.study
    hu = study.hu
    nz, ny, nx = hu.shape
    sz, sy, sx = study.spacing
    ox, oy, oz = study.origin
    direction = np.asarray(study.direction, float)
    md = study.metadata
    signed = int(hu.min()) < RESCALE_INTERCEPT
    stored_all = hu.astype(np.int32) - RESCALE_INTERCEPT
    if not signed:
        stored_all = stored_all.astype(np.uint16)
    else:
        stored_all = stored_all.astype(np.int16)
    pad = phantom.config.pad_hu
    names = _dicom_file_names(phantom.config.seed, nz)
    order = np.random.default_rng([int(phantom.config.seed) % (2**63), 98]).permutation(nz)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
    try:
        for i in order:  # shuffled write order; names carry no position
            i = int(i)
            sop_uid = study.slices[i].sop_instance_uid
            pos = np.array([ox, oy, oz]) + direction @ np.array([0.0, 0.0, i * sz])
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.preamble = b"\0" * 128
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = _STUDY_DATE
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
            ds.AccessionNumber = ""
            ds.Modality = "CT"
            ds.Manufacturer = "pneumoct-synth"
            ds.ManufacturerModelName = "synthetic phantom"
            ds.SoftwareVersions = GENERATOR_VERSION
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = "Synthetic chest CT phantom"
            ds.SeriesDescription = "Chest axial (synthetic)"
            ds.PatientName = f"PHANTOM^{case_id}"
            ds.PatientID = case_id
            ds.PatientBirthDate = ""
            ds.PatientSex = "O"
            ds.PatientIdentityRemoved = "YES"
            ds.BodyPartExamined = "CHEST"
            ds.SliceThickness = _ds_num(sz)
            ds.KVP = "120"
            ds.ConvolutionKernel = str(md.get("convolution_kernel", "SYNTH"))
            ds.PatientPosition = "HFS"
            ds.StudyInstanceUID = md["study_instance_uid"]
            ds.SeriesInstanceUID = md["series_instance_uid"]
            ds.StudyID = "1"
            ds.SeriesNumber = 2
            ds.AcquisitionNumber = 1
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [_ds_num(v) for v in pos]
            ds.ImageOrientationPatient = [_ds_num(v) for v in (*direction[:, 0], *direction[:, 1])]
            ds.FrameOfReferenceUID = md["frame_of_reference_uid"]
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = _ds_num(pos[2])
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = ny, nx
            ds.PixelSpacing = [_ds_num(sy), _ds_num(sx)]  # row spacing, column spacing
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if signed else 0
            if signed and pad is not None and int(pad) < RESCALE_INTERCEPT:
                ds.add_new(0x00280120, "SS", int(pad) - RESCALE_INTERCEPT)  # PixelPaddingValue (stored)
            ds.WindowCenter = "-600"
            ds.WindowWidth = "1500"
            ds.RescaleIntercept = str(RESCALE_INTERCEPT)
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.PixelData = np.ascontiguousarray(stored_all[i]).astype("<i2" if signed else "<u2").tobytes()
            target = tmp_dir / names[i]
            with atomic_path(target) as tmp:
                ds.save_as(tmp, enforce_file_format=True)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp_dir, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"n_files": nz, "pixel_representation": "signed" if signed else "unsigned",
            "rescale_intercept": RESCALE_INTERCEPT, "rescale_slope": 1,
            "study_instance_uid": md["study_instance_uid"], "series_instance_uid": md["series_instance_uid"],
            "frame_of_reference_uid": md["frame_of_reference_uid"], "transfer_syntax": str(ExplicitVRLittleEndian)}


def truth_dict(phantom: Phantom, case_id: str | None = None) -> dict[str, Any]:
    """The ground truth of a phantom as plain JSON types (what ``truth.json`` holds, without file paths)."""
    vml = phantom.study.voxel_volume_ml
    les = phantom.lesion_mask
    return _jsonable({
        "case_id": case_id,
        "label": phantom.label,
        "class_index": CLASS_NAMES.index(phantom.label),
        "data_source": DATA_SOURCE,
        "generator_version": GENERATOR_VERSION,
        "lesion_volume_ratio": round(float(phantom.lesion_volume_ratio), 6),
        "lung_volume_ml": round(phantom.lung_volume_ml, 2),
        "lesion_volume_ml": round(float((les > 0).sum()) * vml, 3),
        "ggo_volume_ml": round(float((les == LESION_GGO).sum()) * vml, 3),
        "consolidation_volume_ml": round(float((les == LESION_CONSOLIDATION).sum()) * vml, 3),
        "n_lesions": len(phantom.lesions),
        "slice_lesion_labels": [int(b) for b in phantom.slice_lesion_labels],
        "slice_positions_mm": [s.position_mm for s in phantom.study.slices],
        "lesions": phantom.lesions,
        "config": phantom.config.to_dict(),
        "geometry": phantom.study.geometry_dict(),
        "anatomy": phantom.anatomy,
        "mask_labels": {
            "lung_mask": {"0": "background", str(LUNG_RIGHT): "right lung (image left)",
                          str(LUNG_LEFT): "left lung (image right)"},
            "lesion_mask": {"0": "none", str(LESION_GGO): "ground-glass opacity",
                            str(LESION_CONSOLIDATION): "consolidation"},
        },
        "lesion_centre_convention": "voxel coordinates (slice, row, column), canonical orientation",
    })


def write_case(phantom: Phantom, out_dir: str | os.PathLike[str], case_id: str,
               formats: Sequence[str] = FORMATS) -> dict[str, Any]:
    """Write ``out_dir/case_id/`` (see the module docstring) and return its manifest row (paths relative to
    ``out_dir``)."""
    _check_case_id(case_id)
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    case_dir = out_dir / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    study = phantom.study
    rel = lambda name: f"{case_id}/{name}"  # noqa: E731
    files: dict[str, str] = {}
    dicom_info = None
    if "nifti" in formats:
        write_volume(case_dir / "image.nii.gz", study.hu, study)
        files["image"] = "image.nii.gz"
    if "dicom" in formats:
        dicom_info = _write_dicom_series(phantom, case_dir / "dicom", case_id)
        files["dicom_dir"] = "dicom"
    write_volume(case_dir / "lung_mask.nii.gz", phantom.lung_mask.astype(np.uint8), study)
    write_volume(case_dir / "lesion_mask.nii.gz", phantom.lesion_mask.astype(np.uint8), study)
    files["lung_mask"] = "lung_mask.nii.gz"
    files["lesion_mask"] = "lesion_mask.nii.gz"
    truth = truth_dict(phantom, case_id)
    truth["files"] = files
    truth["dicom"] = dicom_info
    write_json(case_dir / "truth.json", truth)  # last: its presence marks a complete case
    cfg = phantom.config
    return {
        "case_id": case_id,
        "label": phantom.label,
        "seed": int(cfg.seed),
        "difficulty": float(cfg.difficulty),
        "matrix": int(cfg.matrix),
        "n_slices": int(study.shape[0]),
        "slice_spacing_mm": float(study.spacing[0]),
        "pixel_spacing_mm": float(study.spacing[1]),
        "lesion_volume_ratio": round(float(phantom.lesion_volume_ratio), 6),
        "n_lesions": len(phantom.lesions),
        "lung_volume_ml": round(phantom.lung_volume_ml, 2),
        "image": rel("image.nii.gz") if "image" in files else "",
        "dicom_dir": rel("dicom") if "dicom_dir" in files else "",
        "lung_mask": rel("lung_mask.nii.gz"),
        "lesion_mask": rel("lesion_mask.nii.gz"),
        "truth": rel("truth.json"),
    }


def case_seed(cohort_seed: int, index: int) -> int:
    """The phantom seed of case ``index`` in a cohort (distinct per case, reproducible)."""
    return int(np.random.SeedSequence([int(cohort_seed) % (2**63), int(index)]).generate_state(1)[0]) & 0x7FFFFFFF


def synthesize_cohort(out_dir: str | os.PathLike[str], n_cases: int, seed: int = 0,
                      labels: Iterable[str] | None = None, matrix: int = 256, n_slices: int | None = None,
                      difficulty: float = 0.0, formats: Sequence[str] = FORMATS) -> list[dict[str, Any]]:
    """Generate and write ``n_cases`` phantoms as ``out_dir/case_0000`` ... with ``manifest.json`` (a list of
    rows) and ``manifest.csv``. Labels cycle through ``labels`` (default ``CLASS_NAMES``); case ids do not reveal
    the label."""
    labels = list(labels) if labels else list(CLASS_NAMES)
    for lab in labels:
        if lab not in CLASS_NAMES:
            raise ValueError(f"unknown class {lab!r}; choose from {', '.join(CLASS_NAMES)}")
    if int(n_cases) < 1:
        raise ValueError("n_cases must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(int(n_cases)):
        cfg = PhantomConfig(label=labels[i % len(labels)], seed=case_seed(seed, i), matrix=matrix,
                            n_slices=n_slices, difficulty=difficulty)
        phantom = generate_phantom(cfg)
        rows.append(write_case(phantom, out_dir, f"case_{i:04d}", formats))
        del phantom
    write_json(out_dir / "manifest.json", rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(MANIFEST_FIELDS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in MANIFEST_FIELDS})
    with atomic_path(out_dir / "manifest.csv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return rows
