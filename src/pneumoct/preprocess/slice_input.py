"""The one path from an axial slice to a 2D network input, shared by training and ``diagnose``.

Every 2D model in pneumoct sees the same thing: the slice cropped to its lungs and resized to a square
``size x size`` grid (M3Lung-Sys Sec. III-A-1, Step 6: bounding rectangle of the lungs + margin, crop,
resize; aspect ratio not kept, as in the paper). What differs between sources is only where the lung mask
comes from (our 3D lung mask for CT volumes, the dataset's lung mask or :func:`segment_lungs_2d` for 8-bit
2D images) and whether the pixels are Hounsfield units (windowed later, so training can jitter the window) or
grey levels already windowed by the exporter.

Keeping this in one function is the point: a model trained on crops made one way and run on crops made
another way is silently wrong.

Shapes: ``image`` (Y, X) HU or grey; ``lung`` (Y, X) bool; output ``(size, size)`` float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .lung_crop import BBox, crop_to_box, expand_bbox, mask_bbox, uncrop_to_slice
from .resample import zoom_to_shape
from .windowing import M3LUNG_WIDTH, apply_window

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_MARGIN_FRACTION",
    "MIN_LUNG_PIXELS",
    "LESION_MODEL_WINDOW",
    "SliceCrop",
    "SliceInputs",
    "lung_slice_box",
    "crop_slice",
    "crop_volume_slices",
    "window_input",
    "grey_to_unit",
    "map_back_to_slice",
    "harmonise",
    "INPUT_TRANSFORMS",
]

DEFAULT_INPUT_SIZE = 128  # CPU setting; the papers use 224 (M3Lung-Sys, JCS) and 512 (Hu et al.)
# 3 % of the slice side: 15 px on a 512 matrix, 8 px on 256 (M3Lung-Sys Step 6 uses 10 px on its slices).
DEFAULT_MARGIN_FRACTION = 0.03
MIN_LUNG_PIXELS = 0.002  # fraction of the slice: less lung than this and the slice is not offered to a model
# The window used for HU inputs when no other is asked: M3Lung-Sys centre -600, width 1200 (Sec. III-A-2).
LESION_MODEL_WINDOW = (-600.0, M3LUNG_WIDTH)


@dataclass
class SliceCrop:
    """A lung-cropped slice. ``box`` = (r0, r1, c0, c1) half-open in slice pixels; ``image`` (size, size)."""

    box: BBox
    image: np.ndarray
    slice_shape: tuple[int, int]
    mask: np.ndarray | None = None  # an optional label mask (e.g. lesions) cropped the same way, uint8


def lung_slice_box(lung: np.ndarray, margin_fraction: float = DEFAULT_MARGIN_FRACTION,
                   min_fraction: float = MIN_LUNG_PIXELS) -> BBox | None:
    """Box of the lung pixels of one slice grown by ``margin_fraction`` of the slice side; None if too little lung."""
    lung = np.asarray(lung, dtype=bool)
    if lung.ndim != 2:
        raise ValueError(f"expected a 2D lung mask, got shape {lung.shape}")
    if lung.sum() < max(1.0, float(min_fraction) * lung.size):
        return None
    tight = mask_bbox(lung)
    if tight is None:
        return None
    margin = int(round(float(margin_fraction) * max(lung.shape)))
    return expand_bbox(tight, margin, lung.shape)


def crop_slice(image: np.ndarray, lung: np.ndarray, size: int = DEFAULT_INPUT_SIZE, *,
               mask: np.ndarray | None = None, box: Sequence[int] | None = None,
               margin_fraction: float = DEFAULT_MARGIN_FRACTION) -> SliceCrop | None:
    """Crop ``image`` (HU or grey, (Y, X)) to the lungs of ``lung`` and resize to ``(size, size)``.

    ``mask`` (same shape, labels) is cropped with nearest-neighbour resizing. ``box`` overrides the lung box.
    Returns None when the slice holds too little lung to be worth classifying.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):  # RGB exports → grey
        image = image[..., :3].astype(np.float32).mean(axis=-1)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {image.shape}")
    if box is None:
        box = lung_slice_box(lung, margin_fraction)
        if box is None:
            return None
    box = tuple(int(v) for v in box)
    crop = zoom_to_shape(crop_to_box(image.astype(np.float32), box), (size, size), order=1).astype(np.float32)
    cropped_mask = None
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != image.shape:
            raise ValueError(f"mask shape {m.shape} differs from image shape {image.shape}")
        cropped_mask = zoom_to_shape(crop_to_box(m.astype(np.uint8), box), (size, size), order=0).astype(np.uint8)
    return SliceCrop(box=box, image=crop, slice_shape=(int(image.shape[0]), int(image.shape[1])), mask=cropped_mask)


def crop_volume_slices(hu: np.ndarray, lung: np.ndarray, size: int = DEFAULT_INPUT_SIZE, *,
                       masks: np.ndarray | None = None,
                       margin_fraction: float = DEFAULT_MARGIN_FRACTION) -> tuple[np.ndarray, list[SliceCrop | None]]:
    """Crop every slice of a (Z, Y, X) volume. Returns ``(z_indices, crops)``; ``crops[i]`` is None when
    slice i has too little lung; ``z_indices`` lists the slices that have a crop."""
    hu = np.asarray(hu)
    lung = np.asarray(lung)
    if hu.ndim != 3 or lung.shape != hu.shape:
        raise ValueError(f"need a (Z, Y, X) volume and a lung mask of the same shape, got {hu.shape} / {lung.shape}")
    crops: list[SliceCrop | None] = []
    for k in range(hu.shape[0]):
        crops.append(crop_slice(hu[k], lung[k] > 0, size, mask=None if masks is None else masks[k],
                                margin_fraction=margin_fraction))
    z = np.array([k for k, c in enumerate(crops) if c is not None], dtype=np.int64)
    return z, crops


class SliceInputs:
    """One study's 2D network inputs, prepared once and shared by every 2D model of a run (the slice classifier,
    M3Lung-Sys, the segmenter), as a recorded, invertible chain — in the spirit of MONAI's invertible transforms:

    1. ``lung_box``: per slice, :func:`lung_slice_box` (lung bounding box + ``margin_fraction`` of the side; slices
       with less lung than ``MIN_LUNG_PIXELS`` get none and are not offered to any model);
    2. ``crop_resize``: the box cropped and resized (bilinear) to each model's square input size, cached per size;
    3. ``window``: HU → [0, 1] through the model's window (and its ``input_transform``), per model.

    :meth:`invert` maps a map on a crop grid back onto its slice (the inverse of steps 1-2); :meth:`record` is the
    chain with its parameters, written to ``result.json``. Training builds its rows with :func:`crop_slice`, the
    same step 1-2 code, so a model sees at inference what it saw in training.

    hu: (Z, Y, X) HU (or grey for 8-bit stacks); lung: (Z, Y, X) bool/labels.
    """

    def __init__(self, hu: np.ndarray, lung: np.ndarray, margin_fraction: float = DEFAULT_MARGIN_FRACTION):
        hu = np.asarray(hu)
        lung = np.asarray(lung)
        if hu.ndim != 3 or lung.shape != hu.shape:
            raise ValueError(f"need a (Z, Y, X) volume and a lung mask of the same shape, got {hu.shape} / "
                             f"{lung.shape}")
        self.hu = hu
        self.margin_fraction = float(margin_fraction)
        self.slice_shape = (int(hu.shape[1]), int(hu.shape[2]))
        self.boxes: list[BBox | None] = [lung_slice_box(lung[k] > 0, margin_fraction) for k in range(hu.shape[0])]
        self.z = np.array([k for k, b in enumerate(self.boxes) if b is not None], dtype=np.int64)
        self._crops: dict[int, np.ndarray] = {}
        self._windows: list[dict] = []

    def crops(self, size: int) -> np.ndarray:
        """(N, size, size) float32 crops of the slices in :attr:`z` (step 2), cached per size."""
        size = int(size)
        if size not in self._crops:
            out = np.empty((len(self.z), size, size), np.float32)
            for i, k in enumerate(self.z):
                out[i] = zoom_to_shape(crop_to_box(self.hu[k].astype(np.float32), self.boxes[k]), (size, size),
                                       order=1)
            self._crops[size] = out
        return self._crops[size]

    def inputs(self, size: int, center: float, width: float, transform: str = "none", *,
               is_hu: bool = True, model: str = "", defer_transform: bool = False) -> np.ndarray:
        """(N, size, size) network input in [0, 1] (step 3), recorded in the chain under ``model``.
        ``defer_transform``: the input before its ``transform``, which the caller applies (:func:`harmonise`, per
        batch, e.g. beside the network); recorded all the same."""
        x = window_input(self.crops(size), center, width) if is_hu else grey_to_unit(self.crops(size))
        self._windows.append({"model": model, "size": int(size), "window": [float(center), float(width)] if is_hu
                              else "grey/255", "input_transform": transform})
        return harmonise(x, transform) if transform != "none" and not defer_transform else x

    def crop(self, k: int) -> SliceCrop | None:
        """The crop geometry of slice ``k`` (no pixels), for :meth:`invert` / :func:`map_back_to_slice`."""
        b = self.boxes[k] if 0 <= k < len(self.boxes) else None
        return None if b is None else SliceCrop(box=b, image=np.empty((0, 0), np.float32), slice_shape=self.slice_shape)

    def invert(self, crop_map: np.ndarray, k: int, *, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """A map on slice ``k``'s crop grid → the full slice grid (the inverse of steps 1-2)."""
        b = self.boxes[k]
        if b is None:
            raise ValueError(f"slice {k} has no lung crop")
        return uncrop_to_slice(crop_map, b, self.slice_shape, order=order, fill=fill)

    def record(self) -> list[dict]:
        """The chain as run: step names, parameters and, for step 3, one entry per model input made."""
        seen, windows = set(), []
        for w in self._windows:
            key = (w["model"], w["size"], str(w["window"]), w["input_transform"])
            if key not in seen:
                seen.add(key)
                windows.append(w)
        return [{"step": "lung_box", "margin_fraction": self.margin_fraction, "min_lung_fraction": MIN_LUNG_PIXELS,
                 "slices_with_crop": int(len(self.z)), "slices": int(len(self.boxes))},
                {"step": "crop_resize", "sizes": sorted(self._crops), "interpolation": "bilinear"},
                {"step": "window", "inputs": windows}]


def window_input(hu_crop: np.ndarray, center: float = LESION_MODEL_WINDOW[0],
                 width: float = LESION_MODEL_WINDOW[1]) -> np.ndarray:
    """HU crop → [0, 1] float32 through a window (the network input)."""
    return apply_window(np.asarray(hu_crop, dtype=np.float32), center, width).astype(np.float32)


def grey_to_unit(grey_crop: np.ndarray) -> np.ndarray:
    """8-bit grey crop (already windowed by its exporter) → [0, 1] float32."""
    return np.clip(np.asarray(grey_crop, dtype=np.float32) / 255.0, 0.0, 1.0)


def map_back_to_slice(crop_map: np.ndarray, crop: SliceCrop, *, order: int = 1, fill: float = 0.0) -> np.ndarray:
    """A map on the (size, size) crop grid (heat map, mask) → the full slice grid, registered to the slice."""
    return uncrop_to_slice(crop_map, crop.box, crop.slice_shape, order=order, fill=fill)


INPUT_TRANSFORMS = ("none", "clahe")


def harmonise(x01: np.ndarray, transform: str = "clahe") -> np.ndarray:
    """Optional last input step, the same in training and inference: ``"clahe"`` applies contrast-limited
    adaptive histogram equalisation (kernel 1/8 of the side, clip 0.01) to each (S, S) image in [0, 1].

    Why: the real 2D training sets are 8-bit exports, one of them already CLAHE-enhanced, while DICOM studies are
    windowed from HU; equalising every input (both looks, and DICOM at inference) removes most of the intensity
    and local-contrast differences between them. ``"none"`` returns the input.
    """
    if transform in (None, "none"):
        return x01
    if transform != "clahe":
        raise ValueError(f"unknown input transform {transform!r}; choose from {INPUT_TRANSFORMS}")
    from .clahe import equalize_adapthist_stack

    x = np.asarray(x01, np.float32)
    flat = np.clip(x.reshape((-1,) + x.shape[-2:]), 0.0, 1.0)
    # scikit-image's equalize_adapthist on each image, computed for the whole stack at once (the same values)
    out = equalize_adapthist_stack(flat, kernel_size=max(8, x.shape[-1] // 8), clip_limit=0.01)
    return out.reshape(x.shape).astype(np.float32)
