"""A corpus of malformed and awkward DICOM exports, generated from a phantom (and, when ../shared is there, from a
real study), for the reliability tests (issue 11) and `benchmarks/soak.py`.

Each case is a folder (or a file) plus what a correct reader must do with it:

* ``expect="same"``: read, and equal to the unmodified study — the same slice positions (z, mm), and a lung volume
  within ``LUNG_VOLUME_TOLERANCE`` of the unmodified study's;
* ``expect="refuse"``: refused with one line and exit code 2 (``PneumoctInputError``), nothing written.

The builders change one thing each, the way PACS exports really differ: a missing slice, a gantry tilt, a prior
study in the same folder, a scout and reformats beside the axial series, padding values, MONOCHROME1, duplicated
instances, mixed slice spacing, a single slice, a DICOMDIR tree, a zip, non-standard UIDs.
"""
from __future__ import annotations

import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydicom.uid import generate_uid

import dicom_factory as F

#: lung volume of a case read "the same" may differ from the unmodified study's by this share (interpolated slices,
#: tilt resampling)
LUNG_VOLUME_TOLERANCE = 0.02


@dataclass
class Case:
    name: str
    path: Path
    expect: str  # "same" | "refuse"
    what: str  # one line: what was changed
    source: str  # "synthetic phantom" | "real covid-ct-md"


@dataclass
class Base:
    """The unmodified study the cases are made from: canonical HU and the geometry the factory writes."""

    hu: np.ndarray  # (Z, Y, X) int16, canonical
    pixel_spacing: float
    slice_spacing: float
    top_z: float = 100.0

    @property
    def z_positions(self) -> list[float]:
        return [self.top_z - k * self.slice_spacing for k in range(self.hu.shape[0])]


def phantom_base(seed: int = 5, matrix: int = 128, n_slices: int = 64) -> Base:
    """A synthetic healthy chest (generator `pneumoct.synth`), small enough for many reads."""
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom

    ph = generate_phantom(PhantomConfig(label="healthy", seed=seed, matrix=matrix, n_slices=n_slices, pad_hu=-1024))
    z, y, _ = ph.study.spacing
    return Base(hu=ph.study.hu.astype(np.int16), pixel_spacing=float(y), slice_spacing=float(z))


def write_base(base: Base, folder: Path, **kw) -> F.SeriesInfo:
    args = dict(pixel_spacing=base.pixel_spacing, slice_spacing=base.slice_spacing, top_z=base.top_z, seed=3)
    args.update(kw)
    return F.write_series(folder, base.hu, **args)


# ---------------------------------------------------------------------------------------------------------------
# one builder per awkward export; each writes under `root` and returns its Case
# ---------------------------------------------------------------------------------------------------------------


def _clean(base: Base, root: Path) -> Case:
    write_base(base, root / "clean")
    return Case("clean", root / "clean", "same", "the unmodified series", "")


def _gap(base: Base, root: Path, n: int = 1) -> Case:
    folder = root / f"gap{n}"
    info = write_base(base, folder)
    mid = base.hu.shape[0] // 2
    for k in range(mid, mid + n):
        info.paths[k].unlink()
    return Case(f"gap{n}", folder, "same", f"{n} slice(s) missing in the middle", "")


def _large_gap(base: Base, root: Path) -> Case:
    folder = root / "large_gap"
    info = write_base(base, folder)
    mid = base.hu.shape[0] // 2
    for k in range(mid - 6, mid + 6):
        info.paths[k].unlink()
    return Case("large_gap", folder, "refuse", "12 consecutive slices missing", "")


def _tilt(base: Base, root: Path, degrees: float = 12.0) -> Case:
    """A gantry-tilted acquisition as GE/Siemens store it (axial orientation, positions sheared along y, content
    shifted; ``dicom_factory.write_tilted_series``)."""
    F.write_tilted_series(root / "tilt", base.hu, degrees, pixel_spacing=base.pixel_spacing,
                          slice_spacing=base.slice_spacing, top_z=base.top_z, seed=3)
    return Case("tilt", root / "tilt", "same", f"gantry tilt {degrees:g} degrees, sheared stack", "")


def _two_studies(base: Base, root: Path) -> Case:
    """The current study and an older prior with more (thinner) slices in one folder: the current one is read."""
    folder = root / "two_studies"

    def dated(date: str) -> Callable:
        def edit(ds, k):
            ds.StudyDate, ds.StudyTime, ds.SeriesDate = date, "101500", date
        return edit

    write_base(base, folder / "current", edit=dated("20210611"), series_number=2)
    prior = np.repeat(base.hu, 2, axis=0)[::-1].copy()  # another anatomy order: a wrong pick is visible
    F.write_series(folder / "prior", prior, pixel_spacing=base.pixel_spacing, slice_spacing=base.slice_spacing / 2,
                   top_z=base.top_z + 40, seed=4, edit=dated("20190102"), series_number=2)
    return Case("two_studies", folder, "same", "a prior study (more slices) beside the current one", "")


def _scout_and_reformats(base: Base, root: Path) -> Case:
    """Primary axial + a scout + a coronal MPR + a derived thin axial MPR (more slices) in one study."""
    folder = root / "scout_mpr"
    info = write_base(base, folder / "axial", series_number=2)
    study_uid = info.study_uid

    def same_study(ds, k):
        ds.StudyInstanceUID = study_uid

    # scout: one coronal projection image, ImageType LOCALIZER, its own series
    scout = base.hu.max(axis=1).astype(np.int16)
    F.write_series(folder / "scout", scout[None], pixel_spacing=base.pixel_spacing, slice_spacing=1.0,
                   row_dir=(1, 0, 0), col_dir=(0, 0, -1), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                   series_number=1, series_description="Topogram", seed=5, edit=same_study)
    # coronal MPR: every 4th row of the volume as a coronal image
    cor = np.ascontiguousarray(base.hu[:, ::4, :].transpose(1, 0, 2))
    F.write_series(folder / "coronal", cor, pixel_spacing=base.pixel_spacing, slice_spacing=4 * base.pixel_spacing,
                   row_dir=(1, 0, 0), col_dir=(0, 0, -1), image_type=("DERIVED", "SECONDARY", "MPR"),
                   series_number=601, series_description="COR MPR", seed=6, edit=same_study)
    # derived axial MPR with twice the slices (interpolated): more slices, but not an acquisition
    thin = np.repeat(base.hu, 2, axis=0)
    F.write_series(folder / "axial_mpr", thin, pixel_spacing=base.pixel_spacing, slice_spacing=base.slice_spacing / 2,
                   top_z=base.top_z, image_type=("DERIVED", "SECONDARY", "AXIAL", "MPR"), series_number=602,
                   series_description="AX MPR thin", seed=7, edit=same_study)
    return Case("scout_mpr", folder, "same", "scout + coronal MPR + derived thin axial MPR beside the axial", "")


def _padding(base: Base, root: Path) -> Case:
    """Outside the reconstruction circle: PixelPaddingValue -2000 (stored), and -3024 in the corners."""
    folder = root / "padding"
    hu = base.hu.copy()
    _, h, w = hu.shape
    yy, xx = np.mgrid[:h, :w]
    outside = (yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2 > (0.49 * h) ** 2
    corner = (yy < h // 10) & (xx < w // 10)
    hu[:, outside] = -2000
    hu[:, corner] = -3024

    def edit(ds, k):
        ds.PixelPaddingValue = -2000 + 3072  # stored value (intercept -3072 below)

    F.write_series(folder, hu, pixel_spacing=base.pixel_spacing, slice_spacing=base.slice_spacing,
                   top_z=base.top_z, seed=3, intercept=-3072.0, signed=False, edit=edit)
    return Case("padding", folder, "same", "padding -2000 (PixelPaddingValue) and -3024 outside the field", "")


def _monochrome1(base: Base, root: Path) -> Case:
    def edit(ds, k):
        ds.PhotometricInterpretation = "MONOCHROME1"

    write_base(base, root / "monochrome1", edit=edit)
    return Case("monochrome1", root / "monochrome1", "same", "PhotometricInterpretation MONOCHROME1", "")


def _duplicates(base: Base, root: Path) -> Case:
    folder = root / "duplicates"
    info = write_base(base, folder / "a")
    (folder / "b").mkdir()
    for p in info.paths[::3]:
        shutil.copy(p, folder / "b" / p.name)
    return Case("duplicates", folder, "same", "every third instance exported twice", "")


def _mixed_spacing(base: Base, root: Path) -> Case:
    """Upper half every slice, lower half every other slice (a 'thick' reconstruction glued on): a third of the
    lower positions missing in regular steps. Either resampled correctly or refused; never stacked wrong."""
    folder = root / "mixed_spacing"
    info = write_base(base, folder)
    mid = base.hu.shape[0] // 2
    for k in range(mid + 1, base.hu.shape[0] - 1, 2):
        info.paths[k].unlink()
    return Case("mixed_spacing", folder, "refuse_or_same", "lower half at twice the spacing", "")


def _one_slice(base: Base, root: Path) -> Case:
    info = write_base(base, root / "one_slice_src")
    (root / "one_slice").mkdir()
    dest = root / "one_slice" / "slice.dcm"
    shutil.copy(info.paths[base.hu.shape[0] // 2], dest)
    shutil.rmtree(root / "one_slice_src")
    return Case("one_slice", dest, "refuse", "a single axial image", "")


def _dicomdir(base: Base, root: Path) -> Case:
    folder = root / "dicomdir"
    write_base(base, folder / "DICOM" / "PA000001" / "ST000001" / "SE000001", names="ordered", extension="")
    ddir = F._base_dataset("1.2.840.10008.1.3.10")
    ddir.DirectoryRecordSequence = pydicom.sequence.Sequence([])
    ddir.save_as(folder / "DICOMDIR", enforce_file_format=True)
    return Case("dicomdir", folder, "same", "DICOMDIR + nested PACS folders, files without extension", "")


def _zip_nested(base: Base, root: Path) -> Case:
    src = root / "zip_src"
    write_base(base, src / "export" / "series1")
    dest = root / "study.zip"
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, Path("patient") / p.relative_to(src))
    shutil.rmtree(src)
    return Case("zip_nested", dest, "same", "a zip holding nested folders", "")


def _nonstandard_uids(base: Base, root: Path) -> Case:
    def edit(ds, k):
        ds.SeriesInstanceUID = "1.2.3-4.5-6"
        ds.StudyInstanceUID = "1.2.3-4.5"
        ds.SOPInstanceUID = "" if k % 5 == 0 else f"1.2.3-4.5-6.{k}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID or "1.2.3"

    with warnings.catch_warnings():  # pydicom warns on every such UID while we write them
        warnings.simplefilter("ignore")
        write_base(base, root / "uids", edit=edit)
    return Case("uids", root / "uids", "same", "UIDs with dashes, some empty SOPInstanceUIDs", "")


BUILDERS: tuple[Callable[[Base, Path], Case], ...] = (
    _clean, _gap, lambda b, r: _gap(b, r, 2), _large_gap, _tilt, _two_studies, _scout_and_reformats, _padding,
    _monochrome1, _duplicates, _mixed_spacing, _one_slice, _dicomdir, _zip_nested, _nonstandard_uids,
)


def build_phantom_corpus(root: Path, base: Base | None = None) -> tuple[Base, list[Case]]:
    base = base or phantom_base()
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for build in BUILDERS:
        case = build(base, root)
        case.source = "synthetic phantom"
        cases.append(case)
    return base, cases


# ---------------------------------------------------------------------------------------------------------------
# real-study variants: header edits and file removal only (the JPEG-Lossless pixel data is kept as exported)
# ---------------------------------------------------------------------------------------------------------------


def _copy_edited(src: Path, dest: Path, edit: Callable[[pydicom.Dataset], None] | None = None) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(src.iterdir()):
        if not p.is_file():
            continue
        if edit is None:
            shutil.copy(p, dest / p.name)
        else:
            ds = pydicom.dcmread(p)
            edit(ds)
            ds.save_as(dest / p.name)
        out.append(dest / p.name)
    return out


def build_real_corpus(root: Path, current: Path, other: Path) -> list[Case]:
    """Variants of the real study ``current``: a missing middle slice, a prior study (``other``, dated earlier)
    in the same folder, and a zip with nested folders."""
    cases = []
    folder = root / "real_gap"
    paths = _copy_edited(current, folder)
    by_z = sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    by_z[len(by_z) // 2].unlink()
    cases.append(Case("real_gap", folder, "same", "one middle slice removed", "real covid-ct-md"))

    folder = root / "real_two_studies"
    _copy_edited(current, folder / "current")
    uid = generate_uid()

    def prior(ds):
        ds.StudyDate, ds.StudyTime = "20190102", "080000"
        ds.StudyInstanceUID = uid

    _copy_edited(other, folder / "prior", prior)
    cases.append(Case("real_two_studies", folder, "same", "an older study of another patient in the same folder",
                      "real covid-ct-md"))

    dest = root / "real.zip"
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(current.iterdir()):
            if p.is_file():
                zf.write(p, Path("export") / "DICOM" / "S1" / p.name)
    cases.append(Case("real_zip", dest, "same", "the study as a zip with nested folders", "real covid-ct-md"))
    return cases
