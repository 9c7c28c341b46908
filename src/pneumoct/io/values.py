"""Helpers shared by the reading modules: file suffixes, the Hounsfield plausibility check, int16 conversion."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PneumoctInputError
from ..types import InputWarning

#: Hounsfield plausibility: a chest CT always holds air/lung (about -1000 … -500 HU), outside the body and inside.
_AIR_BAND_HU = (-1200.0, -500.0)
_MIN_AIR_FRACTION = 0.001


def suffix_of(path: Path) -> str:
    """Lower-case suffix, with ``.nii.gz`` kept whole."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def check_hounsfield(values: np.ndarray, *, what: str = "the image") -> None:
    """Refuse values that cannot be Hounsfield units (8-bit grey levels, raw stored values, MR...).

    A chest CT always contains air (outside the body, in the trachea and lungs) at about -1000 HU, so at least
    0.1 % of the voxels must lie in -1200 … -500 HU.
    """
    sample = values[:: max(1, values.shape[0] // 64)] if values.ndim == 3 else values
    if sample.ndim == 3 and sample.shape[1] > 128:
        sample = sample[:, ::2, ::2]
    if sample.size == 0:
        raise PneumoctInputError("not_hu", f"values do not look like Hounsfield units: {what} is empty")
    lo, hi = _AIR_BAND_HU
    air_fraction = float(np.count_nonzero((sample >= lo) & (sample <= hi))) / float(sample.size)
    if air_fraction < _MIN_AIR_FRACTION:
        vmin, vmax = float(np.min(values)), float(np.max(values))
        hint = ""
        if vmin >= 0 and vmax <= 255:
            hint = " (looks like 8-bit grey levels)"
        elif vmin >= 0:
            hint = " (looks like raw stored values without the rescale intercept)"
        raise PneumoctInputError(
            "not_hu",
            f"values do not look like Hounsfield units{hint}: range {vmin:g}..{vmax:g}, no air near -1000 HU "
            f"(nothing between {lo:g} and {hi:g})",
        )


def to_int16(values: np.ndarray, warnings_out: list[InputWarning]) -> np.ndarray:
    """Round and clip to int16, warning if anything had to be clipped."""
    if values.dtype == np.int16:
        return values
    if np.issubdtype(values.dtype, np.floating):
        values = np.rint(values)
    info = np.iinfo(np.int16)
    vmin, vmax = values.min(), values.max()
    if vmin < info.min or vmax > info.max:
        n = int(np.count_nonzero((values < info.min) | (values > info.max)))
        warnings_out.append(
            InputWarning("values_clipped", f"{n} voxel values outside the int16 range were clipped")
        )
        values = np.clip(values, info.min, info.max)
    return values.astype(np.int16)
