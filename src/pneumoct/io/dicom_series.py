"""DICOM reader, stage 2: judge every series found by the scan and choose one.

Each series is judged on modality, localizers, images with another orientation, axial or not, consistent
size/pixel spacing and number of distinct slice positions. The usable axial CT series with the most slices is
chosen; every other series is listed with the reason it was not chosen.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import PneumoctInputError
from ..types import InputWarning
from .dicom_geometry import _normal, _orientation_of
from .dicom_scan import DicomScan, _float, _Frame, _Series
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
