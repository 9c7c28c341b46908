"""Direction-vector helpers for the DICOM reader: slice normals, the orientation of an image plane, and the axis
permutation/flips into the canonical orientation of :mod:`pneumoct.types` (also used by the volume-file reader).

Pure vector arithmetic: nothing here reads files or knows about DICOM records.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np


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
