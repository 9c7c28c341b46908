"""Building :class:`~pneumoct.train.table.SliceTable` s from phantoms, manifests and the bundled public datasets.

Every crop goes through :func:`pneumoct.preprocess.slice_input.crop_slice` / ``crop_volume_slices`` — the
same path ``diagnose`` uses — so a model sees at training time exactly what it sees at inference time.

Rows carry ``class_label`` = the patient's class for every slice; the M3Lung-Sys slice rule (drop lesion-free
slices of diseased patients) is applied later and separately (:func:`pneumoct.train.sampling.m3lung_slice_rule`).

``patient_id`` values are anonymised keys ``"<source>/<case>"``, never a DICOM PatientID.
See ``docs/training_data.md``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import PneumoctInputError
from ..preprocess.slice_input import crop_slice, crop_volume_slices, grey_to_unit
from ..types import LUNG_LEFT, LUNG_RIGHT, StudyVolume
from .ctmd import _CTMD_STUDIES, _ctmd_label_rows  # noqa: F401 - also used by experiments via this module
from .table import SliceTable, _table, class_index  # noqa: F401 - class_index is part of this module's API

logger = logging.getLogger("pneumoct.train")

__all__ = [
    "TABLE_VERSION",
    "DEFAULT_SIZE",
    "class_index",
    "table_from_volume",
    "table_from_phantoms",
    "table_from_phantom_cohort",
    "table_from_covid_ct_md",
    "table_from_covid19_ct_seg_png",
    "table_from_medseg",
    "table_from_2d_image",
    "read_manifest",
    "table_from_manifest",
    "build_table",
    "build_tables",
    "table_cache_key",
]

#: Bump when the way rows are built changes, so cached tables are rebuilt.
TABLE_VERSION = "slice-table-2"  # 2: 2D lung finder handles body-cropped exports (MedSeg crops changed)
DEFAULT_SIZE = 128
SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
COVID_CT_MD_ROOT = SHARED_DATA / "covid-ct-md"
COVID19_CT_SEG_PNG_ROOT = SHARED_DATA / "covid19-ct-seg-png"
MEDSEG_ROOT = SHARED_DATA / "medseg-semiseg" / "train-multiclass"
#: covid19-ct-seg-png lost its slice→patient mapping; consecutive file numbers are grouped in blocks of this
#: many slices as a best-effort stand-in for patients (splits on this set remain optimistic).
CTSEG_BLOCK = 80
_IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# -- helpers ---------------------------------------------------------------------------------------------------------


def _read_grey(path: Path) -> np.ndarray:
    """A 2D image file → (H, W) uint8 grey (palette images keep their *index* values, for label masks)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":
            return np.asarray(im, dtype=np.uint8).copy()
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def _read_label_volume(path: Path) -> np.ndarray:
    """A label volume (NIfTI/NRRD/MHA) → (Z, Y, X) uint8 in the canonical orientation ``read_study`` uses
    (SimpleITK ``DICOMOrient(..., "LPI")``, as :func:`pneumoct.io.volume_files.read_volume_file`)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise PneumoctInputError("unreadable_file", f"could not read the mask volume {path.name}") from None
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    oriented = sitk.DICOMOrient(image, "LPI")
    return np.ascontiguousarray(sitk.GetArrayFromImage(oriented)).astype(np.uint8)


# -- generic builders ------------------------------------------------------------------------------------------------


def table_from_volume(study: StudyVolume | np.ndarray, lung_labels: np.ndarray, size: int = DEFAULT_SIZE, *,
                      patient_label: int | str, slice_lesion_labels: Sequence[int] | np.ndarray | None = None,
                      lesion_mask: np.ndarray | None = None, patient_id: str, source: str) -> SliceTable:
    """One HU volume → rows for every slice with enough lung (``crop_volume_slices``).

    ``slice_lesion_labels`` (Z,) 0/1 per canonical slice (longer arrays are cut to Z: padding); without it the
    lesion label is "any lesion voxel on the slice" when ``lesion_mask`` is given, 0 for healthy patients and
    -1 (unknown) otherwise. ``class_label`` = ``patient_label`` on every row.
    """
    hu = study.hu if isinstance(study, StudyVolume) else np.asarray(study)
    lung = np.asarray(lung_labels)
    if lung.shape != hu.shape:
        raise ValueError(f"lung mask shape {lung.shape} differs from the volume {hu.shape}")
    if lesion_mask is not None:
        lesion_mask = np.asarray(lesion_mask).astype(np.uint8)
        if lesion_mask.shape != hu.shape:
            raise ValueError(f"lesion mask shape {lesion_mask.shape} differs from the volume {hu.shape}")
    plab = class_index(patient_label)
    nz = hu.shape[0]
    if slice_lesion_labels is not None:
        sl = np.asarray(slice_lesion_labels).astype(np.int64).ravel()
        if len(sl) < nz:
            raise ValueError(f"{len(sl)} slice labels for a volume of {nz} slices")
        sl = sl[:nz]
    elif lesion_mask is not None:
        sl = (lesion_mask.reshape(nz, -1) > 0).any(axis=1).astype(np.int64)
    else:
        sl = np.full(nz, 0 if plab == 0 else -1, np.int64)
    z, crops = crop_volume_slices(hu, lung, size, masks=lesion_mask)
    images, masks = [], []
    for k in z:
        c = crops[int(k)]
        images.append(c.image)
        masks.append(c.mask)
    n = len(z)
    return _table(images, is_hu=True, class_label=[plab] * n, lesion_label=sl[z], masks=masks,
                  patient_id=[patient_id] * n, patient_label=[plab] * n, slice_index=z, source=[source] * n,
                  size=size)


def table_from_2d_image(image: np.ndarray, lung: np.ndarray | None, size: int = DEFAULT_SIZE, *,
                        patient_label: int | str, lesion_label: int = -1, lesion_mask: np.ndarray | None = None,
                        patient_id: str, source: str, is_hu: bool = False) -> SliceTable:
    """One 2D slice (8-bit grey unless ``is_hu``) → 0 or 1 row. Without ``lung`` the lungs are found with
    :func:`segment_lungs_2d`. Grey rows are stored in [0, 1] (``grey_to_unit`` after the crop)."""
    from ..preprocess.lung_mask import segment_lungs_2d

    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., :3].astype(np.float32).mean(axis=-1)
    if lung is None:
        lung = segment_lungs_2d(image, is_hu=is_hu)
    crop = crop_slice(image, np.asarray(lung) > 0, size, mask=lesion_mask)
    if crop is None:
        return SliceTable.empty(size)
    img = crop.image if is_hu else grey_to_unit(crop.image)
    plab = class_index(patient_label)
    if lesion_mask is not None and lesion_label == -1:
        lesion_label = int((np.asarray(lesion_mask) > 0).any())
    elif lesion_label == -1 and plab == 0:
        lesion_label = 0  # healthy patients have no lesions (as in table_from_volume)
    return _table([img], is_hu=is_hu, class_label=[plab], lesion_label=[lesion_label], masks=[crop.mask],
                  patient_id=[patient_id], patient_label=[plab], slice_index=[-1], source=[source], size=size)


# -- phantoms --------------------------------------------------------------------------------------------------------


def table_from_phantoms(phantoms: Iterable[Any], size: int = DEFAULT_SIZE, *,
                        ids: Sequence[str] | None = None) -> SliceTable:
    """In-memory phantoms (:class:`pneumoct.synth.phantom.Phantom`) → one table, HU crops with lesion masks."""
    tables = []
    for i, ph in enumerate(phantoms):
        pid = f"phantom/{ids[i]}" if ids is not None else f"phantom/mem-{i:04d}-seed{int(ph.config.seed)}"
        tables.append(table_from_volume(ph.study, ph.lung_mask, size, patient_label=ph.label,
                                        slice_lesion_labels=np.asarray(ph.slice_lesion_labels, np.int64),
                                        lesion_mask=ph.lesion_mask, patient_id=pid, source="phantom"))
    tables = [t for t in tables if len(t)]
    return SliceTable.concat(tables) if tables else SliceTable.empty(size)


def table_from_phantom_cohort(cohort_dir: str | os.PathLike[str], size: int = DEFAULT_SIZE, *,
                              limit: int | None = None) -> SliceTable:
    """A cohort written by :func:`pneumoct.synth.writer.synthesize_cohort` (``manifest.json``) → table."""
    from ..io import read_study

    cohort_dir = Path(cohort_dir)
    manifest = cohort_dir / "manifest.json"
    if not manifest.is_file():
        raise PneumoctInputError("missing_manifest", f"no manifest.json in {cohort_dir}")
    rows = json.loads(manifest.read_text(encoding="utf-8"))
    if limit is not None:
        rows = rows[: int(limit)]
    tables = []
    for row in rows:
        case = str(row["case_id"])
        img = row.get("image") or row.get("dicom_dir")
        study = read_study(cohort_dir / img)
        lung = _read_label_volume(cohort_dir / row["lung_mask"])
        lesion = _read_label_volume(cohort_dir / row["lesion_mask"])
        truth = json.loads((cohort_dir / row["truth"]).read_text(encoding="utf-8"))
        label = truth.get("label", row.get("label"))
        sl = truth.get("slice_lesion_labels")
        tables.append(table_from_volume(study, lung, size, patient_label=label,
                                        slice_lesion_labels=None if sl is None else np.asarray(sl, np.int64),
                                        lesion_mask=lesion, patient_id=f"phantom/{case}", source="phantom"))
    tables = [t for t in tables if len(t)]
    return SliceTable.concat(tables) if tables else SliceTable.empty(size)


# -- real public datasets --------------------------------------------------------------------------------------------

def table_from_covid_ct_md(root: str | os.PathLike[str] = COVID_CT_MD_ROOT, size: int = DEFAULT_SIZE, *,
                           limit: int | None = None, studies: Sequence[str] = ("covid", "cap", "normal"),
                           per_lung: bool = False) -> SliceTable:
    """The three COVID-CT-MD DICOM studies → HU rows; lung mask by :func:`segment_lungs`; lesion labels from
    the radiologists' ``Slice-level-labels-updated-1.npy`` (column i = canonical slice i, superior first —
    established on this data); the normal study has no labels (all 0). No lesion masks (``has_mask`` False).
    ``limit`` caps the number of studies (in the order of ``studies``)."""
    from ..io import read_study
    from ..preprocess.lung_mask import segment_lungs

    root = Path(root)
    labels = np.load(root / "Slice-level-labels-updated-1.npy")
    rows = _ctmd_label_rows(root)
    tables = []
    for key in list(studies)[: None if limit is None else int(limit)]:
        folder, cls, folder_id = _CTMD_STUDIES[key]
        study = read_study(root / "dicom" / folder)
        lung = segment_lungs(study).labels
        nz = study.shape[0]
        sl = np.zeros(nz, np.int64) if folder_id is None else labels[rows[folder_id], :nz].astype(np.int64)
        tables.append(table_from_volume(study, lung, size, patient_label=cls, slice_lesion_labels=sl,
                                        patient_id=f"covid-ct-md/{key}", source="covid-ct-md"))
        if per_lung:
            lobes = None if folder_id is None else np.load(root / "Lobe-level-labels-updated-1.npy")[rows[folder_id], :nz]
            for side_label, lobe_idx in ((LUNG_RIGHT, (2, 3, 4)), (LUNG_LEFT, (0, 1))):
                # lobe columns: 0 LLL, 1 LUL, 2 RLL, 3 RML, 4 RUL (data README)
                side_sl = np.zeros(nz, np.int64) if lobes is None else (lobes[:, lobe_idx] > 0).any(1).astype(np.int64)
                tables.append(table_from_volume(study, (lung == side_label).astype(np.uint8), size,
                                                patient_label=cls, slice_lesion_labels=side_sl,
                                                patient_id=f"covid-ct-md/{key}", source=PER_LUNG_PREFIX + "covid-ct-md"))
    tables = [t for t in tables if len(t)]
    return SliceTable.concat(tables) if tables else SliceTable.empty(size)


def table_from_covid19_ct_seg_png(root: str | os.PathLike[str] = COVID19_CT_SEG_PNG_ROOT, size: int = DEFAULT_SIZE,
                                  *, limit: int | None = None, block: int = CTSEG_BLOCK,
                                  per_lung: bool = False) -> SliceTable:
    """covid19-ct-seg-png: 8-bit CLAHE slices, the dataset's lung masks (``lungs/``) and infection masks
    (``covid/`` > 0 → 1). Every slice shows infection (lesion_label 1, class covid19).

    The slice→patient mapping was lost upstream: ``patient_id`` = ``covid19-ct-seg-png/unknown-<k>`` with k =
    file number // ``block`` — a best effort; slices of one patient can still straddle a split, so scores on
    this set are optimistic."""
    root = Path(root)
    files = sorted((root / "ct").glob("*.png"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    if limit is not None:
        files = files[: int(limit)]
    tables = []
    for k, f in enumerate(files):
        num = int(f.stem) if f.stem.isdigit() else k
        img = _read_grey(f)
        lung = _read_grey(root / "lungs" / f.name) > 0
        les = (_read_grey(root / "covid" / f.name) > 0).astype(np.uint8)
        t = table_from_2d_image(img, lung, size, patient_label="covid19", lesion_label=1, lesion_mask=les,
                                patient_id=f"covid19-ct-seg-png/unknown-{num // int(block)}",
                                source="covid19-ct-seg-png")
        if len(t):
            t.slice_index[:] = num  # the file number: the only order information left
            tables.append(t)
        if per_lung:
            for side in split_lungs_2d(lung):
                side_les = (les * side).astype(np.uint8)
                lab = int(side_les.sum() >= PER_LUNG_MIN_LESION_PX)
                ts = table_from_2d_image(img, side, size, patient_label="covid19", lesion_label=lab,
                                         lesion_mask=side_les, patient_id=f"covid19-ct-seg-png/unknown-{num // int(block)}",
                                         source=PER_LUNG_PREFIX + "covid19-ct-seg-png")
                if len(ts):
                    ts.lesion_label[:] = lab
                    ts.slice_index[:] = num
                    tables.append(ts)
    return SliceTable.concat(tables) if tables else SliceTable.empty(size)


PER_LUNG_PREFIX = "lung-crop:"  # source prefix of rows cropped to one lung (training only; diagnose crops both)
PER_LUNG_MIN_LESION_PX = 20  # a lung counts as involved from this many lesion pixels (256² slices)


def split_lungs_2d(lung: np.ndarray, min_fraction: float = 0.15) -> list[np.ndarray]:
    """The two largest connected lung components of a 2D mask (each at least ``min_fraction`` of the lung area);
    an empty list when the lungs do not separate into two."""
    from scipy import ndimage

    lab, n = ndimage.label(np.asarray(lung) > 0)
    if n < 2:
        return []
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(-sizes)[:2]
    if sizes[order[1]] < min_fraction * sizes.sum():
        return []
    # each side is grown by a few pixels so lesions on the lung edge (often outside the lung mask) stay inside
    return [ndimage.binary_dilation(lab == (i + 1), iterations=3) for i in order]


def table_from_medseg(root: str | os.PathLike[str] = MEDSEG_ROOT, size: int = DEFAULT_SIZE, *,
                      limit: int | None = None) -> SliceTable:
    """MedSeg (COVID-SemiSeg train-multiclass): 8-bit slices, GT palette kept (1 GGO, 2 consolidation), lungs by
    :func:`segment_lungs_2d` (the set has no lung masks); one unknown patient per image."""
    root = Path(root)
    if (root / "train-multiclass").is_dir():
        root = root / "train-multiclass"
    files = sorted((root / "Imgs").glob("*.jpg"))
    if limit is not None:
        files = files[: int(limit)]
    tables = []
    for i, f in enumerate(files):
        gt_path = root / "GT" / (f.stem + ".png")
        img = _read_grey(f)
        gt = _read_grey(gt_path) if gt_path.is_file() else None
        if gt is not None and gt.shape != img.shape:
            raise ValueError(f"{gt_path.name}: mask shape {gt.shape} differs from image {img.shape}")
        t = table_from_2d_image(img, None, size, patient_label="covid19",
                                lesion_label=-1 if gt is None else int((gt > 0).any()), lesion_mask=gt,
                                patient_id=f"medseg/unknown-{f.stem}", source="medseg")
        if len(t):
            tables.append(t)
    return SliceTable.concat(tables) if tables else SliceTable.empty(size)


# -- manifests -------------------------------------------------------------------------------------------------------

_MANIFEST_COLUMNS = ("path", "label", "patient_id", "lesion_mask", "lung_mask", "slice_labels")


def _bad_row(n: int, manifest: Path, why: str) -> PneumoctInputError:
    return PneumoctInputError("bad_manifest_row", f"{manifest.name} row {n}: {why}")


def read_manifest(path: str | os.PathLike[str]) -> list[dict]:
    """A CSV (header row) or JSON manifest → list of normalised rows with absolute paths.

    Columns: ``path`` (study or 2D image), ``label`` (class name or index), optional ``patient_id`` (default:
    the path's stem), ``lesion_mask``, ``lung_mask``, ``slice_labels`` (.npy/.txt/.csv of per-slice 0/1 in
    canonical order). JSON: a list of objects, ``{"cases": [...]}``, or the phantom-cohort ``manifest.json``
    (``image``/``dicom_dir``, ``case_id``, ``truth``). Relative paths are relative to the manifest's folder.
    Row numbers in errors count data rows from 1. Raises :class:`PneumoctInputError` naming the bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise PneumoctInputError("missing_manifest", f"manifest {path} not found")
    base = path.parent
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise PneumoctInputError(
                "bad_manifest", f"{path.name} is not valid JSON ({e.msg}, line {e.lineno})") from None
        if isinstance(raw, dict):
            raw = raw.get("cases", raw.get("rows"))
        if not isinstance(raw, list):
            raise PneumoctInputError("bad_manifest", f"{path.name}: expected a list of rows")
    else:
        raw = list(csv.DictReader(text.splitlines()))
    out = []
    for n, row in enumerate(raw, start=1):
        if not isinstance(row, dict):
            raise _bad_row(n, path, "not an object")
        row = {str(k).strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None}
        p = row.get("path") or row.get("image") or row.get("dicom_dir")
        if not p:
            raise _bad_row(n, path, "no 'path'")
        study_path = (base / str(p)).resolve()
        if not study_path.exists():
            raise _bad_row(n, path, f"path {p!r} does not exist")
        label = row.get("label")
        if label is None or label == "":
            raise _bad_row(n, path, "no 'label'")
        try:
            lab = class_index(label)
        except ValueError as e:
            raise _bad_row(n, path, str(e)) from None
        rec: dict[str, Any] = {"row": n, "path": study_path, "label": lab,
                               "patient_id": str(row.get("patient_id") or row.get("case_id") or _stem(study_path))}
        for col in ("lesion_mask", "lung_mask", "slice_labels", "truth"):
            v = row.get(col)
            if v:
                q = (base / str(v)).resolve()
                if not q.exists():
                    raise _bad_row(n, path, f"{col} {v!r} does not exist")
                rec[col] = q
            else:
                rec[col] = None
        out.append(rec)
    return out


def _stem(p: Path) -> str:
    name = p.name
    for suf in (".nii.gz", ".zip", ".nii", ".nrrd", ".mha", ".mhd") + _IMAGE_2D_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _read_slice_labels(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        arr = np.array([float(t) for t in re.split(r"[\s,;]+", path.read_text(encoding="utf-8")) if t])
    return (np.asarray(arr).ravel() > 0).astype(np.int64)


def _safe_id(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:48]


def table_from_manifest(path: str | os.PathLike[str], size: int = DEFAULT_SIZE, *,
                        limit: int | None = None) -> SliceTable:
    """Every manifest row → rows (volumes: lungs from ``lung_mask`` or :func:`segment_lungs`; 2D images: from
    ``lung_mask`` or :func:`segment_lungs_2d`). ``source`` = ``manifest:<manifest stem>``."""
    from ..io import read_study
    from ..preprocess.lung_mask import segment_lungs

    path = Path(path)
    rows = read_manifest(path)
    if limit is not None:
        rows = rows[: int(limit)]
    source = f"manifest:{_safe_id(path.stem)}"[:32]
    tables = []
    for r in rows:
        pid = f"{_safe_id(path.stem)}/{_safe_id(r['patient_id'])}"
        p: Path = r["path"]
        try:
            if p.is_file() and p.suffix.lower() in _IMAGE_2D_SUFFIXES:
                img = _read_grey(p)
                lung = _read_grey(r["lung_mask"]) > 0 if r["lung_mask"] else None
                les = _read_grey(r["lesion_mask"]) if r["lesion_mask"] else None
                lesion_label = -1
                if r["slice_labels"] is not None:
                    lesion_label = int(_read_slice_labels(r["slice_labels"])[:1].max(initial=0))
                tables.append(table_from_2d_image(img, lung, size, patient_label=r["label"],
                                                  lesion_label=lesion_label, lesion_mask=les, patient_id=pid,
                                                  source=source))
                continue
            study = read_study(p)
            lung = _read_label_volume(r["lung_mask"]) if r["lung_mask"] else segment_lungs(study).labels
            les = _read_label_volume(r["lesion_mask"]) if r["lesion_mask"] else None
            if r["slice_labels"] is not None:
                sl = _read_slice_labels(r["slice_labels"])
            elif r["truth"] is not None:
                sl = json.loads(Path(r["truth"]).read_text(encoding="utf-8")).get("slice_lesion_labels")
            else:
                sl = None
            for what, arr in (("lung_mask", lung), ("lesion_mask", les)):
                if arr is not None and arr.shape != study.shape:
                    raise _bad_row(r["row"], path, f"{what} shape {arr.shape} differs from the study {study.shape}")
            if sl is not None and len(sl) < study.shape[0]:
                raise _bad_row(r["row"], path, f"{len(sl)} slice labels for {study.shape[0]} slices")
            tables.append(table_from_volume(study, lung, size, patient_label=r["label"],
                                            slice_lesion_labels=sl, lesion_mask=les, patient_id=pid,
                                            source=source))
        except PneumoctInputError as e:
            if e.code == "bad_manifest_row":
                raise
            raise PneumoctInputError(e.code, f"{path.name} row {r['row']}: {e}") from None
    tables = [t for t in tables if len(t)]
    return SliceTable.concat(tables) if tables else SliceTable.empty(size)


# -- dispatch and cache ----------------------------------------------------------------------------------------------

_KINDS = ("phantom_cohort", "manifest", "covid_ct_md", "covid19_ct_seg_png", "medseg", "covid_ct_md_hybrid",
          "covid_ct_md_pseudo")


def build_table(spec: dict, size: int = DEFAULT_SIZE) -> SliceTable:
    """``spec = {"kind": one of phantom_cohort|manifest|covid_ct_md|covid19_ct_seg_png|medseg, "path": ...,
    "limit": optional}``. ``path`` may be omitted for the three public datasets (default: ../shared/data)."""
    kind = spec.get("kind")
    limit = spec.get("limit")
    path = spec.get("path")
    if kind == "phantom_cohort":
        return table_from_phantom_cohort(path, size, limit=limit)
    if kind == "manifest":
        return table_from_manifest(path, size, limit=limit)
    per_lung = bool(spec.get("per_lung", False))
    if kind == "covid_ct_md":
        return table_from_covid_ct_md(path or COVID_CT_MD_ROOT, size, limit=limit, per_lung=per_lung)
    if kind == "covid19_ct_seg_png":
        return table_from_covid19_ct_seg_png(path or COVID19_CT_SEG_PNG_ROOT, size, limit=limit, per_lung=per_lung)
    if kind == "medseg":
        return table_from_medseg(path or MEDSEG_ROOT, size, limit=limit)
    if kind == "covid_ct_md_hybrid":
        from .hybrid import table_from_ctmd_hybrid

        return table_from_ctmd_hybrid(path or COVID_CT_MD_ROOT, size,
                                      studies=spec.get("studies") or ("covid", "cap", "normal"),
                                      seed=int(spec.get("seed", 0)), copies=int(spec.get("copies", 1)))
    if kind == "covid_ct_md_pseudo":
        from .pseudo import table_from_ctmd_pseudo

        return table_from_ctmd_pseudo(path or COVID_CT_MD_ROOT, size, studies=spec.get("studies") or ("covid", "cap"),
                                      agree_with=spec.get("agree_with"), min_pixels=int(spec.get("min_pixels", 20)))
    raise ValueError(f"unknown table kind {kind!r}; choose from {', '.join(_KINDS)}")


def table_cache_key(spec: dict, size: int) -> str:
    """Hash of the spec (paths resolved), the crop size and :data:`TABLE_VERSION`."""
    norm = {k: (str(Path(v).resolve()) if k == "path" and v else v) for k, v in sorted(spec.items())}
    blob = json.dumps({"spec": norm, "size": int(size), "version": TABLE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def build_tables(specs: Sequence[dict], size: int = DEFAULT_SIZE,
                 cache_dir: str | os.PathLike[str] | None = None) -> SliceTable:
    """Build each spec (reusing ``cache_dir/<kind>-<key>.npz`` when present) and concatenate."""
    tables = []
    for spec in specs:
        cached = None
        if cache_dir is not None:
            cached = Path(cache_dir) / f"{spec.get('kind')}-{table_cache_key(spec, size)}.npz"
            if cached.is_file():
                logger.info("slice table from cache %s", cached)
                tables.append(SliceTable.load(cached))
                continue
        t = build_table(spec, size)
        if cached is not None:
            t.save(cached)
        tables.append(t)
    tables = [t for t in tables if len(t)]
    return SliceTable.concat(tables) if tables else SliceTable.empty(size)
