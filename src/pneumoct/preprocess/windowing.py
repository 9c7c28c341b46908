"""Intensity windowing of CT values (Hounsfield units) to ``[0, 1]``.

* :func:`apply_window` — classic window centre / width, clipped.
* :data:`WINDOW_PRESETS` — named windows (``lung``, ``mediastinum``, ``m3lung``).
* :func:`sample_m3lung_window` / :func:`m3lung_inference_windows` — the multi-value window-levelling of
  M3Lung-Sys (Qian et al.), random centre for training, three fixed centres at inference.
* :func:`sliding_window_normalise` — the fixed-size sliding-window normalisation ``W_{Q,S}`` of Hu et al.
  (weakly-supervised multiscale learning): the window of width ``Q`` that covers the most values.

Every function accepts an array of any shape and returns ``float32``. Randomness only comes from a
``numpy.random.Generator`` passed in by the caller.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "WINDOW_PRESETS",
    "M3LUNG_TRAIN_CENTER_RANGE",
    "M3LUNG_INFERENCE_CENTERS",
    "M3LUNG_WIDTH",
    "apply_window",
    "apply_preset",
    "resolve_window",
    "sample_m3lung_window",
    "m3lung_inference_windows",
    "sliding_window_normalise",
    "DEFAULT_SWN_Q",
    "DEFAULT_SWN_S",
]

#: Named windows as (centre, width) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    # M3Lung-Sys Sec. III-A-2: width 1200, centre in [-700, -500]; -600 is the middle of that range.
    "m3lung": (-600.0, 1200.0),
}

# M3Lung-Sys Sec. III-A-2 (training: centre uniform in [-700, -500], constant width 1200) and
# Sec. IV-A implementation details (inference: centres [-700, -600, -500], predictions averaged).
M3LUNG_TRAIN_CENTER_RANGE: tuple[float, float] = (-700.0, -500.0)
M3LUNG_INFERENCE_CENTERS: tuple[float, float, float] = (-700.0, -600.0, -500.0)
M3LUNG_WIDTH: float = 1200.0

#: Default window size Q (HU) of the sliding-window normalisation. The paper gives no value. 1500 HU is the
#: width of the standard lung window (C -600 / W 1500): wide enough to hold air (-1000 HU) and soft tissue
#: (about +100 HU) together with margin for contrast-enhanced vessels, narrow enough to exclude dense bone,
#: metal and the -2048/-3024 HU padding some scanners write outside the reconstruction circle.
DEFAULT_SWN_Q: float = 1500.0
#: Default step S (HU). The paper gives no value. 10 HU is below the noise of a clinical CT (10-20 HU SD), so a
#: finer step cannot change the result meaningfully, and the search stays cheap (a few hundred positions).
DEFAULT_SWN_S: float = 10.0


def apply_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map ``[center - width/2, center + width/2]`` linearly onto ``[0, 1]`` and clip outside it.

    Works on any shape and dtype; returns ``float32``. NaN stays NaN.
    """
    width = float(width)
    if not np.isfinite(width) or width <= 0:
        raise ValueError(f"window width must be a positive number, got {width}")
    low = float(center) - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def resolve_window(window: str | Sequence[float]) -> tuple[float, float]:
    """Return ``(center, width)`` for a preset name or a ``(center, width)`` pair."""
    if isinstance(window, str):
        try:
            return WINDOW_PRESETS[window]
        except KeyError:
            raise ValueError(f"unknown window preset {window!r}; known: {sorted(WINDOW_PRESETS)}") from None
    center, width = window
    return float(center), float(width)


def apply_preset(hu: np.ndarray, name: str) -> np.ndarray:
    """Apply the named window of :data:`WINDOW_PRESETS`."""
    return apply_window(hu, *resolve_window(name))


def sample_m3lung_window(
    rng: np.random.Generator,
    center_range: tuple[float, float] = M3LUNG_TRAIN_CENTER_RANGE,
    width: float = M3LUNG_WIDTH,
) -> tuple[float, float]:
    """Draw one training-time window ``(center, width)``.

    # M3Lung-Sys Sec. III-A-2: "the value of the window center is assigned randomly from -700 to -500, and the
    # window width is assigned with a constant of 1200" (data augmentation during training).
    The centre is uniform in ``[center_range[0], center_range[1])``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (seeded by the caller)")
    lo, hi = float(center_range[0]), float(center_range[1])
    if hi < lo:
        raise ValueError("center_range must be (low, high) with low <= high")
    return float(rng.uniform(lo, hi)), float(width)


def m3lung_inference_windows(
    hu: np.ndarray,
    centers: Sequence[float] = M3LUNG_INFERENCE_CENTERS,
    width: float = M3LUNG_WIDTH,
) -> np.ndarray:
    """Window ``hu`` once per centre and stack: shape ``(len(centers),) + hu.shape``, ``float32``.

    # M3Lung-Sys Sec. III-A-2 / Sec. IV-A: at inference the window centre is set to [-700, -600, -500] (width
    # 1200) and the final predicted features/scores are averaged. The averaging is the caller's job: run the
    # model on each entry of axis 0 and average its outputs.
    """
    centers = tuple(float(c) for c in centers)
    if not centers:
        raise ValueError("need at least one window centre")
    return np.stack([apply_window(hu, c, width) for c in centers], axis=0)


def _window_counts_sorted(sorted_vals: np.ndarray, starts: np.ndarray, q: float) -> np.ndarray:
    """Number of values in ``[a, a + q]`` for each start ``a`` (values sorted ascending)."""
    hi = np.searchsorted(sorted_vals, starts + q, side="right")
    lo = np.searchsorted(sorted_vals, starts, side="left")
    return hi - lo


def _window_counts_int(vals: np.ndarray, starts: np.ndarray, q: float) -> np.ndarray:
    """Same as :func:`_window_counts_sorted` for integer values, in O(N) through a cumulative histogram."""
    vmin = int(vals.min())
    hist = np.bincount((vals.astype(np.int64) - vmin).ravel())
    cum = np.concatenate([[0], np.cumsum(hist)])  # cum[k] = number of values < vmin + k
    n = cum.size - 1

    def count_below(x: np.ndarray) -> np.ndarray:  # number of values < x
        k = np.clip(np.ceil(x - vmin).astype(np.int64), 0, n)
        return cum[k]

    def count_at_most(x: np.ndarray) -> np.ndarray:  # number of values <= x
        k = np.clip(np.floor(x - vmin).astype(np.int64) + 1, 0, n)
        return cum[k]

    return count_at_most(starts + q) - count_below(starts)


def sliding_window_normalise(
    values: np.ndarray,
    Q: float = DEFAULT_SWN_Q,
    S: float = DEFAULT_SWN_S,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Fixed-size sliding-window intensity normalisation ``W_{Q,S}``.

    # Hu et al. (weakly-supervised multiscale), Sec. pre-processing: "Rather than clipping based on HU windows,
    # we proposed to use a fixed-sized sliding window W_{Q,S} (where Q denotes the size of the window and S
    # denotes the step length of the sliding procedure) to find the range where covers most of the pixel values."

    A window ``[a, a + Q]`` slides over the value axis with step ``S`` (positions ``a`` on the grid ``k * S``, from
    just below the minimum to the maximum); the position holding the most values (those under ``mask`` when
    given, e.g. a body mask, so the air outside the patient and scanner padding do not steer it) is kept, the
    whole array is clipped to it and scaled to ``[0, 1]``. When several positions tie (e.g. the whole value range
    fits inside Q, or a constant image), the middle of the tied run is taken, so the data sit centred in the
    window; a constant image therefore maps to ~0.5.

    Q and S are not given in the paper; the defaults are :data:`DEFAULT_SWN_Q` = 1500 HU and
    :data:`DEFAULT_SWN_S` = 10 HU (see their comments for why).

    Returns ``(normalised float32 array of values.shape, (low, high))`` with ``high = low + Q``.
    """
    Q, S = float(Q), float(S)
    if not (np.isfinite(Q) and Q > 0):
        raise ValueError(f"Q must be a positive number, got {Q}")
    if not (np.isfinite(S) and S > 0):
        raise ValueError(f"S must be a positive number, got {S}")
    arr = np.asarray(values)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != arr.shape:
            raise ValueError(f"mask shape {mask.shape} differs from values shape {arr.shape}")
        sel = arr[mask]
    else:
        sel = arr.ravel()
    if np.issubdtype(sel.dtype, np.floating):
        sel = sel[np.isfinite(sel)]
    if sel.size == 0:
        raise ValueError("sliding_window_normalise: no finite values to place the window on (empty mask?)")

    vmin, vmax = float(sel.min()), float(sel.max())
    # Candidate window starts: grid k*S covering every position that can hold at least the minimum or maximum.
    k0 = int(np.floor((vmin - Q) / S))
    k1 = int(np.ceil(vmax / S))
    starts = np.arange(k0, k1 + 1, dtype=np.float64) * S
    if (np.issubdtype(sel.dtype, np.integer) or sel.dtype == bool) and vmax - vmin <= 10_000_000:
        counts = _window_counts_int(sel.astype(np.int64), starts, Q)
    else:
        counts = _window_counts_sorted(np.sort(sel.astype(np.float64)), starts, Q)
    best = counts.max()
    tied = np.flatnonzero(counts == best)
    # Tied maxima: the first contiguous run containing the first maximum, then its middle.
    run_end = tied[0]
    while run_end + 1 < counts.size and counts[run_end + 1] == best:
        run_end += 1
    low = float(0.5 * (starts[tied[0]] + starts[run_end]))
    high = low + Q
    out = np.clip((arr.astype(np.float32) - np.float32(low)) / np.float32(Q), 0.0, 1.0).astype(np.float32)
    return out, (low, high)
