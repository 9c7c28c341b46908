"""DICOM reader, stage 3: decode the pixels of the chosen frames into one int16 array of Hounsfield units.

Thread pool over files; compressed single-frame files go through SimpleITK/GDCM (which releases the GIL),
cross-checked against pydicom + pylibjpeg on the first file; pydicom otherwise, each one the fallback of the other.
RescaleSlope/Intercept are applied per file/frame (per frame for Enhanced CT: GDCM applies one rescale to a whole
file, so a multi-frame file whose frames differ goes through pydicom).

Padding and outside-field fill are set to air here, before anything else sees the values
(:func:`_mask_padding`): stored values equal to PixelPaddingValue (or within PixelPaddingRangeLimit) and values
below ``OUTSIDE_FIELD_BELOW_HU`` (scanners fill the corners outside the reconstruction circle with −2000, −3024...)
become ``AIR_HU``.

MONOCHROME1 (PS3.3 C.7.6.3.1.2) only says how to *display* the values (minimum white); the modality LUT still maps
stored values to HU, so nothing is inverted here. pydicom's ``pixel_array`` returns the stored values as they are;
SimpleITK/GDCM (ITK 5.4) inverts MONOCHROME1 images before the rescale (measured: max − stored + intercept), so
MONOCHROME1 files always go through pydicom (checked by the tests).
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom

from .dicom_scan import _Frame, quiet_pydicom

logger = logging.getLogger("pneumoct.io")

#: Value given to padding and outside-field voxels: air.
AIR_HU = -1024
#: Below this, a value is not tissue nor air but fill outside the scan field (−2000, −3000, −3024...).
OUTSIDE_FIELD_BELOW_HU = -1100


def _padding_hu(frame: _Frame) -> tuple[float, float] | None:
    """The frame's padding range in HU, or None. A padding range that lands inside real tissue values
    (above −1024 HU) is not trusted: masking it would erase anatomy if the header is wrong."""
    if frame.padding is None:
        return None
    a, b = (v * frame.slope + frame.intercept for v in frame.padding)
    lo, hi = min(a, b), max(a, b)
    tol = 0.5 * abs(frame.slope)
    if hi <= AIR_HU or lo > 3071:
        return lo - tol, hi + tol
    return None


def _mask_padding(values: np.ndarray, frame: _Frame) -> tuple[np.ndarray, int]:
    """Set padding and outside-field voxels to air; returns (values, number of voxels changed)."""
    mask = values < OUTSIDE_FIELD_BELOW_HU  # never AIR_HU itself (−1024 > −1100)
    pad = _padding_hu(frame)
    if pad is not None:
        mask |= (values >= pad[0]) & (values <= pad[1])
        mask &= values != AIR_HU
    n = int(np.count_nonzero(mask))
    if n:
        values = values.copy()
        values[mask] = AIR_HU
    return values, n


# ---------------------------------------------------------------------------------------------------------------
# 3. decode pixels
# ---------------------------------------------------------------------------------------------------------------


def _n_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


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

    if frames[0].photometric == "MONOCHROME1":
        # GDCM inverts MONOCHROME1 pixels (display semantics) before rescaling: the HU would be wrong
        raise ValueError("MONOCHROME1: GDCM inverts the stored values, decode with pydicom")
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
    padded = 0

    def work(item: tuple[Path, list[int]]) -> tuple[list[int], str | None, int, int]:
        path, idx = item
        group = [frames[i] for i in idx]
        for name in _decoder_order(decoder, group[0], sitk_trusted):
            try:
                arrays = decoders[name](path, group)
            except Exception as exc:
                logger.debug("%s could not decode a file (%s: %s)", name, type(exc).__name__, str(exc)[:120])
                continue
            n_clip = n_pad = 0
            for i, a in zip(idx, arrays):
                if np.issubdtype(a.dtype, np.floating):
                    a = np.rint(a)
                a, n = _mask_padding(a, frames[i])
                n_pad += n
                lo, hi = a.min(), a.max()
                if lo < -32768 or hi > 32767:
                    n_clip += int(np.count_nonzero((a < -32768) | (a > 32767)))
                    a = np.clip(a, -32768, 32767)
                out[i] = a
            return idx, name, n_clip, n_pad
        return idx, None, 0, 0

    items = list(by_file.items())
    failed: list[int] = []
    with quiet_pydicom():
        if len(items) > 4 and _n_workers() > 1:
            with ThreadPoolExecutor(max_workers=_n_workers()) as pool:
                results = list(pool.map(work, items))
        else:
            results = [work(it) for it in items]
    for idx, name, n_clip, n_pad in results:
        if name is None:
            failed.extend(idx)
        else:
            used[name] += len(idx)
            clipped += n_clip
            padded += n_pad
    info = {
        "decode_seconds": round(time.perf_counter() - t0, 3),
        "decoders_used": dict(used),
        "n_clipped_values": clipped,
        "n_padding_masked": padded,
    }
    logger.info(
        "decoded %d image(s) from %d file(s) in %.2f s (%s)",
        len(frames) - len(failed),
        len(items),
        info["decode_seconds"],
        ", ".join(f"{k}: {v}" for k, v in used.items()) or "nothing",
    )
    return out, sorted(failed), info
