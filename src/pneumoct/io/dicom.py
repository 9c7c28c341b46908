"""DICOM input: folders of single-frame images, Enhanced/legacy multi-frame files, any transfer syntax.

Pipeline
--------
1. **Scan** every candidate file's header (``stop_before_pixels``): non-DICOM files (text, thumbnails...) and
   DICOM objects without pixels (DICOMDIR, reports) are counted and skipped; a DICOM file whose header cannot be
   parsed is counted as unreadable. Every image — a single-frame file or one frame of a multi-frame file — becomes
   a :class:`_Frame` with its own position, orientation and rescale (per-frame functional groups for Enhanced CT).
2. **Group** frames by StudyInstanceUID + SeriesInstanceUID and judge each series: modality, localizers, images
   with another orientation, axial or not, consistent size/pixel spacing, number of distinct slice positions.
   One series is chosen by the numbered rule of :mod:`.dicom_series` (latest study, primary before derived,
   coverage, lung kernel, thinnest); every other series is listed with the reason it was not chosen.
3. **Decode** the chosen frames (thread pool; compressed single-frame files go through SimpleITK/GDCM, which
   releases the GIL, cross-checked against pydicom + pylibjpeg on the first file; pydicom otherwise, each one the
   fallback of the other), apply RescaleSlope/Intercept per file/frame, set padding and outside-field values
   to -1024 HU (air).
4. **Resolve** duplicated positions (identical pixels → drop; different pixels → keep the acquisition with the
   most slices if a header field tells them apart, else refuse), skip undecodable slices only at the ends of the
   stack, check gaps, spacing regularity and gantry tilt, check Hounsfield plausibility. Then **resample**: a
   gantry-tilted (sheared) stack is shifted in-plane onto an orthogonal grid along the slice normal; small gaps of
   missing slices are filled by linear interpolation between the real neighbours (inserted slices carry
   ``SliceInfo.interpolated = True`` and no source image); large gaps and tilts are refused (limits in
   :mod:`.dicom_stack`).
5. **Canonicalise**: sort by ImagePositionPatient projected on the slice normal (never by file name or
   InstanceNumber), then transpose/flip rows, columns and slices into the canonical orientation of
   :mod:`pneumoct.types`.

Modules
-------
Stage 1 is :mod:`.dicom_scan` (also the per-image records and header-value helpers), stage 2
:mod:`.dicom_series`, stage 3 :mod:`.dicom_decode`, stage 4 :mod:`.dicom_stack` (checks) and
:mod:`.dicom_resample` (tilt and gap resampling), the direction arithmetic of
stage 5 :mod:`.dicom_geometry`; this module holds the entry points and re-exports the names other code imports
from ``pneumoct.io.dicom``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import PneumoctInputError
from ..types import InputWarning, SliceInfo, StudyVolume
from .dicom_decode import (  # noqa: F401 - re-exported
    _decode_frames,
    _decode_pydicom,
    _decode_sitk,
    _decoder_order,
    _n_workers,
    _rescale,
)
from .dicom_geometry import _CANONICAL, _normal, _orientation_of, _unit, canonical_transform  # noqa: F401
from .dicom_scan import (  # noqa: F401 - re-exported
    _DICOMDIR_SOP_CLASS,
    _META_FIELDS,
    _SPLIT_KEYS,
    _UNCOMPRESSED_SYNTAXES,
    DicomScan,
    _fill_legacy_positions,
    _first,
    _float,
    _floats,
    _Frame,
    _frames_from_dataset,
    _functional,
    _jsonable,
    _read_header,
    _Series,
    _series_meta,
    _syntax_name,
    looks_like_raw_dicom,
    scan_dicom_files,
)
from .dicom_series import (  # noqa: F401 - re-exported
    _Candidate,
    _judge,
    _orientation_clusters,
    _select,
    _Selection,
    _series_orientation,
)
from .dicom_resample import fill_gaps, shift_tilted_slices
from .dicom_stack import (  # noqa: F401 - re-exported
    GAP_FACTOR,
    MAX_GAP_MISSING_MM,
    MAX_GAP_MISSING_SLICES,
    MAX_MISSING_FRACTION,
    MAX_TILT_DEG,
    OBLIQUE_MIN_DEG,
    POSITION_TOLERANCE_MM,
    TILT_FILL_HU,
    TILT_MIN_DEG,
    UNEVEN_ABS_MM,
    UNEVEN_REL,
    _fmt_z,
    _position_groups,
    _resolve_duplicates,
    _spacing_checks,
)
from .values import check_hounsfield

logger = logging.getLogger("pneumoct.io")


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

    if decode_info["n_padding_masked"]:
        warnings.append(
            InputWarning(
                "padding_masked",
                f"{decode_info['n_padding_masked']} voxels of padding/outside the scan field set to -1024 HU (air)",
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

    iop = frames[0].iop
    row_dir, col_dir = _unit(iop[:3]), _unit(iop[3:])  # type: ignore[index]
    ps_row, ps_col = frames[0].pixel_spacing  # type: ignore[misc]
    pixels, positions, source = _resample_stack(pixels, frames, proj, normal, spacing_z, details)

    # canonical orientation
    vectors = [normal, col_dir, row_dir]  # array axes (slice, row, column)
    spacings = [spacing_z, ps_row, ps_col]
    perm, flips = canonical_transform(vectors)
    if perm[0] != 0:  # cannot happen for an axial series
        raise PneumoctInputError("non_axial", "non-axial series — pneumoct needs axial slices")
    flip_axes = tuple(t for t in range(3) if flips[t])
    if tuple(perm) == (0, 1, 2) and flip_axes == (0,) and pixels.flags.c_contiguous:
        # the common case (slices stored inferior first): reverse the slice order in place, slice by slice,
        # instead of copying the whole volume
        buf = np.empty_like(pixels[0])
        n = pixels.shape[0]
        for k in range(n // 2):
            buf[...] = pixels[k]
            pixels[k] = pixels[n - 1 - k]
            pixels[n - 1 - k] = buf
        hu = pixels
    else:
        hu = pixels.transpose(perm)
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
    origin = positions[start[0]] + start[1] * ps_row * col_dir + start[2] * ps_col * row_dir
    order = list(range(len(source)))[::-1] if flips[0] else list(range(len(source)))
    slices = [
        _slice_info(k, positions[i], None if source[i] is None else frames[source[i]]) for k, i in enumerate(order)
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
            "n_padding_voxels_masked": decode_info["n_padding_masked"],
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
    n_inserted = sum(i is None for i in source)
    if n_inserted:
        metadata["n_interpolated_slices"] = n_inserted
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


def _resample_stack(
    pixels: np.ndarray,
    frames: Sequence[_Frame],
    proj: np.ndarray,
    normal: np.ndarray,
    spacing_z: float,
    details: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
    """Undo a gantry tilt's shear, then fill small gaps (both announced by :func:`_spacing_checks`).

    Returns (stack, LPS position of each slice's first pixel, index into ``frames`` of each slice or None where
    the slice was inserted)."""
    positions = np.array([f.ipp for f in frames], dtype=float)
    if details.get("gantry_tilt_resampled"):
        iop = frames[0].iop
        row_dir, col_dir = _unit(iop[:3]), _unit(iop[3:])  # type: ignore[index]
        pixels, positions = shift_tilted_slices(
            pixels, frames, normal, row_dir, col_dir, frames[0].pixel_spacing  # type: ignore[arg-type]
        )
    if "missing_slice_gaps" in details:
        return fill_gaps(pixels, positions, proj, spacing_z)
    return pixels, positions, list(range(pixels.shape[0]))


def _slice_info(index: int, position: np.ndarray, frame: _Frame | None) -> SliceInfo:
    """The SliceInfo of canonical slice ``index``; ``frame`` None for a slice inserted in a gap."""
    if frame is None:
        return SliceInfo(index=index, position_mm=float(position[2]), interpolated=True)
    return SliceInfo(
        index=index,
        position_mm=float(position[2]),
        sop_instance_uid=frame.sop_uid,
        frame_number=(frame.frame + 1) if frame.frame is not None else None,
        source=frame.path.name,
    )


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
    try:
        spacing_z, spacing_warnings, details = _spacing_checks(frames, proj, normal, chosen.series.meta)
    except PneumoctInputError as err:  # large gap / large tilt: reading will refuse
        info["refusal"] = {"code": err.code, "message": str(err)}
        info["warnings"] = [w.to_dict() for w in warnings]
        return info
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
