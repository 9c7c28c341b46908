"""DICOM reader, stage 2: judge every series found by the scan and choose one.

Each series (images of one SeriesInstanceUID *within one StudyInstanceUID*) is judged on modality, localizers,
images with another orientation, axial or not, consistent size/pixel spacing and number of distinct slice
positions (:func:`_judge`). Then one series is chosen (:func:`_select`):

1. **Usable** series only: CT, axial, consistent geometry, at least ``min_slices`` slice positions.
2. **Study**: when the folder holds several studies (a prior and a current one), the most recent study that has
   a usable series is used: StudyDate+StudyTime, then AcquisitionDate+AcquisitionTime (or SeriesDate/Time). When
   a study has no date at all, the study holding the best series by rule 4 is used instead. Warning
   ``multiple_studies``; every series of the other studies is listed with reason "another study (...)". Two
   studies are never mixed, even when they reuse a SeriesInstanceUID.
3. **Primary before derived**: an ORIGINAL/PRIMARY series is preferred; images with ImageType DERIVED or
   SECONDARY, or of a Secondary Capture SOP class (MPR reformats, MIPs, screenshots), are used only when the study
   has no usable primary axial series (warning ``derived_series_used``).
4. **Coverage**: the reference is the series with the most slice positions (then most images, thinnest slices,
   lowest series number). Series whose slice positions and z-extent are both within ``COMPARABLE_COVERAGE``
   (10 %) of the reference are "comparable"; the others lose with reason "fewer slices" / "less coverage".
5. **Among comparable series**: the sharpest lung-suited kernel first (:func:`kernel_kind`: lung, then bone,
   then soft or unknown — pneumoct always analyses the lungs, so this applies whatever BodyPartExamined says),
   then the thinnest slices (SliceThickness), then the most slice positions, then the lowest SeriesNumber.
   Losers get reason "softer kernel than the chosen one" / "thicker slices" / "fewer slices" / "higher series
   number".

Contrast phase is not a criterion (the lung analysis works on any phase); each series' summary records whether
it names a ContrastBolusAgent. Every series that is not chosen is listed in ``other_series`` with a specific
``reason``/``reason_code``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import PneumoctInputError
from ..types import InputWarning
from .dicom_geometry import _normal, _orientation_of
from .dicom_scan import DicomScan, _float, _Frame, _Series, uid_problems
from .dicom_stack import _position_groups


# ---------------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    """A series judged for use: its kept frames, or the reason it cannot be used."""

    series: _Series
    frames: list[_Frame]
    orientation: str | None = None
    n_positions: int = 0
    extent_mm: float = 0.0  # distance between the first and last slice position
    reject: tuple[str, str] | None = None  # (code, reason)
    warnings: list[InputWarning] = field(default_factory=list)

    @property
    def derived(self) -> bool:
        """Most images are not primary acquisitions (DERIVED/SECONDARY or secondary capture)."""
        frames = self.frames or self.series.frames
        return bool(frames) and sum(f.is_derived for f in frames) * 2 > len(frames)

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
            "study_instance_uid": self.series.study_uid,
            "image_type": m.get("image_type"),
            "derived": self.derived,
            "convolution_kernel": m.get("convolution_kernel"),
            "kernel_kind": kernel_kind(m.get("convolution_kernel")),
            "slice_thickness_mm": m.get("slice_thickness_mm"),
            "contrast_agent": bool(m.get("contrast_agent")),
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

#: Two series have comparable coverage when slice positions and z-extent are both within this fraction of the
#: reference series (rule 4 of the module docstring).
COMPARABLE_COVERAGE = 0.10

#: Preference among comparable series (lower first): a lung kernel keeps the fine lung detail (ground-glass
#: edges, septa) that the lesion analysis looks at; a bone kernel is sharp too; soft and unknown are equal.
KERNEL_PREFERENCE = {"lung": 0, "bone": 1, "soft": 2, "unknown": 2}

# Reconstruction-kernel names, from general vendor knowledge of common CT protocols (not an exhaustive list; any
# name not recognised is "unknown", which never wins over a recognised lung kernel and never loses to a soft one):
# - Siemens: letter prefix (B/Br/Bl/Bf/Bv body, I/Ir/Il iterative, Q/Qr quantitative) + sharpness number + suffix
#   ("B30f", "Br40d", "I70f", "Bl57"): ≤ 45 soft, 50–79 sharp (the lung kernels B60f/B70f/Bl57/I70f), ≥ 80 very
#   sharp (bone, inner ear); any "Bl" (lung) kernel is lung. Head (H...) kernels: ≥ 60 bone, ≤ 45 soft.
# - GE: LUNG, BONEPLUS (used for lung reading) → lung; BONE, EDGE → bone; STANDARD, SOFT → soft; DETAIL, CHEST →
#   unknown (intermediate).
# - Philips: L, YA, YB, YC → lung; D, E, YD, YE, YF → bone; A, B, UB → soft; C → unknown.
# - Toshiba/Canon: FC50–FC89 → lung (FC51/FC52/FC53/FC56/FC81/FC83/FC86); FC30–FC39 → bone; FC01–FC29 → soft.
# - Any vendor: a name containing LUNG → lung; containing SOFT, STANDARD or BRAIN → soft; containing BONE → bone.
_SIEMENS = re.compile(r"^(BL|BR|BF|BV|BS|B|IR|IL|IV|I|QR|Q|HR|H)(\d{2})[A-Z]?$")
_TOSHIBA = re.compile(r"^FC(\d{2})$")
_PHILIPS = {"L": "lung", "YA": "lung", "YB": "lung", "YC": "lung", "D": "bone", "E": "bone", "YD": "bone",
            "YE": "bone", "YF": "bone", "A": "soft", "B": "soft", "UB": "soft"}
_GE = {"LUNG": "lung", "BONEPLUS": "lung", "BONE PLUS": "lung", "BONE": "bone", "EDGE": "bone",
       "STANDARD": "soft", "STND": "soft", "SOFT": "soft"}


def kernel_kind(convolution_kernel: Any) -> str:
    """Classify a ConvolutionKernel value as "lung" | "soft" | "bone" | "unknown" (vendor rules above).

    Multi-valued kernels ("Br40d\\3", Siemens' kernel plus its iterative strength) are judged on the first value."""
    if convolution_kernel is None:
        return "unknown"
    name = str(convolution_kernel).split("\\")[0].strip().upper()
    if not name:
        return "unknown"
    if name in _GE:
        return _GE[name]
    if name in _PHILIPS:
        return _PHILIPS[name]
    m = _SIEMENS.match(name)
    if m:
        prefix, number = m.group(1), int(m.group(2))
        if prefix == "BL":
            return "lung"
        if prefix.startswith("H"):
            return "bone" if number >= 60 else "soft" if number <= 45 else "unknown"
        if number <= 45:
            return "soft"
        return "unknown" if number < 50 else "lung" if number < 80 else "bone"
    m = _TOSHIBA.match(name)
    if m:
        number = int(m.group(1))
        if 50 <= number <= 89:
            return "lung"
        return "bone" if 30 <= number <= 39 else "soft" if number < 30 else "unknown"
    if "LUNG" in name:
        return "lung"
    if "BONE" in name:
        return "bone"
    if any(word in name for word in ("SOFT", "STANDARD", "BRAIN")):
        return "soft"
    return "unknown"


def _series_orientation(frames: Sequence[_Frame]) -> str | None:
    labels = Counter(_orientation_of(f.iop) for f in frames if f.iop is not None)
    return labels.most_common(1)[0][0] if labels else None


# ---------------------------------------------------------------------------------------------------------------
# 2. judge series, choose one
# ---------------------------------------------------------------------------------------------------------------


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
    _, proj, groups = _position_groups(frames, _normal(frames[0].iop))
    cand.n_positions = len(groups)
    cand.extent_mm = float(np.max(proj) - np.min(proj)) if len(proj) else 0.0
    if cand.n_positions < min_slices:
        cand.reject = ("too_few_slices", f"only {cand.n_positions} axial slice(s) (minimum {min_slices})")
    return cand


def _thickness(c: _Candidate) -> float:
    return float(_float(c.series.meta.get("slice_thickness_mm"), 1e9))  # type: ignore[arg-type]


def _series_number(c: _Candidate) -> float:
    return float(_float(c.series.meta.get("series_number"), 1e9))  # type: ignore[arg-type]


def _coverage_rank(c: _Candidate) -> tuple:
    """Rule 4's reference order: most slice positions, most images, thinnest, lowest series number."""
    return (-c.n_positions, -len(c.frames), _thickness(c), _series_number(c))


def _kernel_rank(c: _Candidate) -> int:
    return KERNEL_PREFERENCE[kernel_kind(c.series.meta.get("convolution_kernel"))]


def _final_rank(c: _Candidate) -> tuple:
    """Rule 5: among comparable series, kernel, then thinnest, then most positions, then lowest number."""
    return (_kernel_rank(c), _thickness(c), -c.n_positions, -len(c.frames), _series_number(c))


def _comparable(c: _Candidate, ref: _Candidate) -> bool:
    keep = 1.0 - COMPARABLE_COVERAGE
    return c.n_positions >= keep * ref.n_positions and c.extent_mm >= keep * ref.extent_mm - 1e-6


def _study_date(cands: Sequence[_Candidate]) -> tuple[str, str] | None:
    """(study datetime, acquisition datetime) of a study, None when neither is known."""
    study = max((c.series.study_datetime for c in cands if c.series.study_datetime), default=None)
    acq = max((c.series.acquisition_datetime for c in cands if c.series.acquisition_datetime), default=None)
    if study is None and acq is None:
        return None
    return (study or acq or "", acq or "")  # type: ignore[return-value]


def _choose_study(usable: Sequence[_Candidate]) -> tuple[str, bool]:
    """Rule 2: (StudyInstanceUID to use, whether dates alone decided it)."""
    by_study: dict[str, list[_Candidate]] = {}
    for c in usable:
        by_study.setdefault(c.series.study_uid, []).append(c)
    best_series = min(usable, key=lambda c: (c.derived, _coverage_rank(c)))
    if len(by_study) == 1:
        return best_series.series.study_uid, False
    dates = {uid: _study_date(cands) for uid, cands in by_study.items()}
    if any(d is None for d in dates.values()):
        return best_series.series.study_uid, False
    latest = max(dates.values())  # type: ignore[type-var]
    newest = [uid for uid, d in dates.items() if d == latest]
    if len(newest) == 1:
        return newest[0], True
    tied = [c for c in usable if c.series.study_uid in newest]
    return min(tied, key=lambda c: (c.derived, _coverage_rank(c))).series.study_uid, False


def _loser_reason(c: _Candidate, chosen: _Candidate, ref: _Candidate) -> tuple[str, str]:
    """Specific reason why a usable series of the chosen study lost to ``chosen`` (rules 3-5)."""
    if c.derived and not chosen.derived:
        return ("derived_series", "derived/secondary images (reformat or screenshot); a primary axial series exists")
    if not _comparable(c, ref):
        if c.n_positions < (1.0 - COMPARABLE_COVERAGE) * ref.n_positions:
            return ("fewer_slices", f"fewer slices than the chosen series ({c.n_positions} vs {chosen.n_positions})")
        return ("less_coverage", f"less z coverage than the chosen series ({c.extent_mm:.1f} vs {chosen.extent_mm:.1f} mm)")
    if _kernel_rank(c) > _kernel_rank(chosen):
        kc, kk = c.series.meta.get("convolution_kernel"), chosen.series.meta.get("convolution_kernel")
        return (
            "softer_kernel",
            f"softer kernel than the chosen one ({kc} {kernel_kind(kc)} vs {kk} {kernel_kind(kk)}); "
            "comparable coverage",
        )
    if _thickness(c) > _thickness(chosen):
        return ("thicker_slices", f"thicker slices than the chosen series ({_thickness(c):g} vs {_thickness(chosen):g} mm)")
    if c.n_positions < chosen.n_positions:
        return ("fewer_slices", f"fewer slices than the chosen series ({c.n_positions} vs {chosen.n_positions})")
    return (
        "fewer_slices",
        "same number of slices as the chosen series, which has more images or a lower series number",
    )


def _refusal(scan: DicomScan, candidates: Sequence[_Candidate], single_file: bool) -> PneumoctInputError:
    if not candidates:
        return PneumoctInputError("corrupt_files" if scan.n_unreadable else "no_dicom", scan.no_image_message())
    if all(c.reject and c.reject[0] == "not_ct" for c in candidates):
        mods = sorted({str(c.series.meta.get("modality") or "unknown") for c in candidates})
        return PneumoctInputError(
            "not_ct", f"no CT series found (modality {', '.join(mods)}) — pneumoct needs a chest CT"
        )
    ct = [c for c in candidates if c.reject and c.reject[0] != "not_ct"]
    worst = max(ct, key=lambda c: (len(c.frames), len(c.series.frames)))
    code, reason = worst.reject  # type: ignore[misc]
    if code == "too_few_slices":
        reason = reason.replace("axial slice(s)", "axial CT slice(s)")
        if single_file:
            reason += ": a single DICOM image is not a study, give the folder with the whole series"
    return PneumoctInputError(code, reason)


def _uid_warning(frames: Sequence[_Frame]) -> InputWarning | None:
    """One summarised warning for UIDs outside the DICOM form and images without a SOPInstanceUID."""
    bad, no_sop = uid_problems(frames)
    if not bad and not no_sop:
        return None
    parts = []
    if bad:
        parts.append(f"{bad} UID(s) not in DICOM form (e.g. contain '-' or letters)")
    if no_sop:
        parts.append(f"{no_sop} image(s) without SOPInstanceUID (identified by file name and frame instead)")
    return InputWarning("non_standard_uids", "; ".join(parts) + "; read anyway")


def _select(scan: DicomScan, min_slices: int, *, single_file: bool = False) -> _Selection:
    """Choose one series by the numbered rule of the module docstring."""
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
    if not usable:
        return _Selection(None, candidates, warnings, _refusal(scan, candidates, single_file))

    # rule 2: one study
    study_uid, by_date = _choose_study(usable)
    studies = sorted({c.series.study_uid for c in candidates})
    if len(studies) > 1:
        for c in candidates:
            if c.series.study_uid != study_uid:
                why = "older study" if by_date else "the study used holds the best series (dates missing or equal)"
                c.reject = ("another_study", f"another study ({why}; StudyInstanceUID {c.series.study_uid})")
        rule = "the most recent one" if by_date else "the one with the best series (study dates missing or equal)"
        warnings.append(
            InputWarning(
                "multiple_studies",
                f"{len(studies)} studies found; using {rule}, StudyInstanceUID {study_uid}; the other studies' "
                "series are listed in metadata other_series",
            )
        )
    in_study = [c for c in usable if c.series.study_uid == study_uid]

    # rule 3: primary before derived
    primary = [c for c in in_study if not c.derived]
    pool = primary or in_study
    # rules 4-5: comparable coverage, then kernel, thickness, positions, series number
    ref = min(pool, key=_coverage_rank)
    comparable = [c for c in pool if _comparable(c, ref)]
    chosen = min(comparable, key=_final_rank)
    others = [c for c in candidates if c is not chosen]
    for c in in_study:
        if c is not chosen:
            c.reject = _loser_reason(c, chosen, ref)
    warnings.extend(chosen.warnings)
    if chosen.derived:
        warnings.append(
            InputWarning(
                "derived_series_used",
                "no primary (ORIGINAL/PRIMARY) axial series found: using a derived series (reformat or secondary "
                "capture); its values may be resampled or filtered",
            )
        )
    uid_warning = _uid_warning(chosen.frames)
    if uid_warning is not None:
        warnings.append(uid_warning)
    non_ct = [c for c in others if c.reject and c.reject[0] == "not_ct"]
    if non_ct:
        mods = sorted({str(c.series.meta.get("modality") or "unknown") for c in non_ct})
        warnings.append(
            InputWarning(
                "non_ct_series_ignored", f"ignored {len(non_ct)} non-CT series (modality {', '.join(mods)})"
            )
        )
    if len(in_study) > 1:
        m = chosen.series.meta
        warnings.append(
            InputWarning(
                "multiple_series",
                f"{len(in_study)} usable axial CT series found; using series {m.get('series_number', '?')} "
                f"'{m.get('series_description', '')}' ({chosen.n_positions} slices, kernel "
                f"{m.get('convolution_kernel', '?')}); the others are listed in metadata other_series",
            )
        )
    return _Selection(chosen, others, warnings, None)
