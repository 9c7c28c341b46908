"""Classical (non-learned) 3D lung segmentation with right/left labels.

Steps, all on a working grid of ~1.5 mm in-plane (block-averaged, which also denoises), then brought back to the
study grid:

1. body: the largest 3D component above -500 HU, holes filled slice by slice; this drops outside air, the
   scanner table and the reconstruction-circle padding;
2. internal air: below ``air_threshold_hu`` inside the body; 3D components that are big and lung-like
   (mean density between pure gas and soft tissue) are kept, bowel gas and the oesophagus are dropped;
3. trachea and main bronchi: grown from a seed found in the top slices below ``airway_threshold_hu``; the
   threshold is lowered if the growth leaks into the parenchyma. Airways inside the lung come back in step 5,
   because the lung encloses them; the trachea and the main bronchi at the hilum do not;
4. right/left: every lung-like 3D component is kept (smaller pieces must be lung-dense, not gas, and lie in the
   lungs' slices), so the small aerated remnant of a lung filled by consolidation and a lobe cut off by it are not
   dropped; each takes the side of the body midline (median body-centre column) that holds most of it, the image
   left (low column index) being the patient's right (``LUNG_RIGHT``). A component spanning the midline (lungs
   joined at a junction line) is split by eroding until one seed lies on each side and giving each voxel to its
   seed, or cut at the midline when erosion cannot separate them;
5. disease kept inside the lung: consolidation and ground-glass are denser than aerated lung, so a plain
   threshold leaves holes exactly where the disease is. Each lung is hole-filled per slice and closed with a
   disc of ``closing_radius_mm`` (which fills subpleural pockets whose mouth is narrower than the disc), with
   bone excluded; the closing runs per lung so the two lungs never merge. On a lung whose aerated part is below
   ``small_lung_fraction`` of the other's (mostly filled by disease), holes are filled without the organ-dome
   guard.

Known limits (measured in ``benchmarks/RESULTS.md``): a consolidation that replaces a whole lobe against the
chest wall is wider than any sensible closing disc and stays partly outside the mask; the closing also fills the
narrow costophrenic and cardiophrenic corners a little. A "white lung" whose consolidation is not enclosed by
aerated lung in-plane (dependent consolidation under an anterior aerated strip) keeps its side and its aerated part,
but its consolidation stays outside the mask (phantoms: ~14 % of that lung covered; tests/test_lung_mask.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ..parallel import Background, map_axis, run_chunks
from ..types import LUNG_LEFT, LUNG_RIGHT, StudyVolume
from .components import label as label_components

log = logging.getLogger("pneumoct.preprocess.lung_mask")


@dataclass
class LungMaskParams:
    working_spacing_mm: float = 1.5  # in-plane pixel size of the working grid
    body_threshold_hu: float = -500.0
    air_threshold_hu: float = -400.0
    airway_threshold_hu: float = -940.0  # lumen of the large airways; lowered on leak
    min_lung_ml: float = 80.0  # internal-air components below this are not lung
    # lung pieces at least this share of the largest are lungs as they are; smaller pieces (the aerated remnant of
    # a lung filled by consolidation, a lobe cut off by it) are kept when lung-like: median density above
    # gas_median_hu (stomach, bowel and airway gas are ~ -1000 HU, aerated lung ~ -850) and at least half of
    # them within the slices of the large pieces
    primary_fraction: float = 0.15
    gas_median_hu: float = -950.0
    # a lung whose aerated volume is below this share of the other lung's is treated as mostly filled by disease:
    # its holes are filled without the organ-dome guard (see organ_dome_holes)
    small_lung_fraction: float = 0.5
    closing_radius_mm: float = 12.0
    bone_threshold_hu: float = 250.0  # closing never adds voxels denser than this


@dataclass
class LungMaskResult:
    """labels: (Z, Y, X) uint8, 0 background, 1 right lung, 2 left lung (study grid, canonical orientation).

    ``body`` (body without table and outside air) and ``airway`` (trachea + main bronchi that were removed) are
    (Z, Y, X) bool on the study grid, brought up from the working grid only when asked for (nothing in
    ``diagnose`` needs them)."""

    labels: np.ndarray
    body_work: np.ndarray  # working grid (see info["working_pixel_mm"])
    airway_work: np.ndarray
    factor: int = 1
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def body(self) -> np.ndarray:
        return _upsample_labels(self.body_work, self.factor, self.labels.shape).astype(bool)

    @property
    def airway(self) -> np.ndarray:
        return _upsample_labels(self.airway_work, self.factor, self.labels.shape).astype(bool)


def _block_mean(hu: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return hu.astype(np.float32)
    z, y, x = hu.shape
    py, px = (-y) % factor, (-x) % factor
    out = np.empty((z, (y + py) // factor, (x + px) // factor), np.float32)

    def run(r: range) -> None:
        # slabs of slices (threads split them): the row sums stay a few MB instead of half a float32 volume, which
        # a forked lung mask would fault in fresh
        arr = hu[r.start:r.stop]
        if py or px:
            arr = np.pad(arr, ((0, 0), (0, py), (0, px)), mode="edge")
        # rows, then columns, summed straight into float32 (sums of <= 64 int16 values are exact there): twice as
        # fast as an int32 accumulator converted afterwards, and several times faster than a float reshape-mean
        rows = np.add(arr[:, 0::factor], arr[:, 1::factor], dtype=np.float32)
        for dy in range(2, factor):
            rows += arr[:, dy::factor]
        o = np.add(rows[:, :, 0::factor], rows[:, :, 1::factor])
        for dx in range(2, factor):
            o += rows[:, :, dx::factor]
        o /= np.float32(factor * factor)
        out[r.start:r.stop] = o

    def slabs(r: range) -> None:
        for z0 in range(r.start, r.stop, 8):
            run(range(z0, min(z0 + 8, r.stop)))

    run_chunks(slabs, z)
    return out


def _upsample_labels(labels: np.ndarray, factor: int, shape: tuple[int, int, int]) -> np.ndarray:
    if factor == 1:
        return labels
    up = np.repeat(np.repeat(labels, factor, axis=1), factor, axis=2)
    return up[:, : shape[1], : shape[2]]


def _upsampled_count(mask_work: np.ndarray, factor: int, shape: tuple[int, int, int]) -> int:
    """``count_nonzero(_upsample_labels(mask_work, factor, shape))`` without building the study-grid volume: each
    working pixel stands for factor x factor study pixels, fewer in the last row / column the crop cuts."""
    if factor == 1:
        return int(np.count_nonzero(mask_work))
    per_pixel = mask_work.sum(axis=0, dtype=np.int64)  # (Yw, Xw)
    wy = np.clip(shape[1] - factor * np.arange(per_pixel.shape[0]), 0, factor)
    wx = np.clip(shape[2] - factor * np.arange(per_pixel.shape[1]), 0, factor)
    return int(wy @ per_pixel @ wx)


def _largest_component(mask: np.ndarray, connectivity: int) -> np.ndarray:
    lab, n = label_components(mask, connectivity)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(lab[mask != 0], minlength=n + 1)  # the mask's voxels only: no volume-sized int64 copy
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill holes of a 2D mask: background not 4-connected to the border becomes foreground.

    Same result as ``ndi.binary_fill_holes`` but by one labelling pass, several times faster on large holes.
    """
    lab, n = label_components(~mask, 4)
    if n == 0:
        return mask.copy()
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    outside = np.zeros(n + 1, bool)
    outside[border] = True
    outside[0] = False
    return mask | ~outside[lab] & (lab > 0)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)

    def fill(zs: range) -> None:
        for z in zs:
            out[z] = fill_holes_2d(mask[z]) if mask[z].any() else mask[z]

    run_chunks(fill, mask.shape[0])
    return out


def _open_square3_inplane(m: np.ndarray) -> np.ndarray:
    """In-plane binary opening by a 3x3 square (outside the array counts as background). The square is separable,
    so a minimum then a maximum filter give the same pixels as ``binary_opening`` in fewer passes."""
    eroded = _erode_square3_inplane(m).view(np.uint8)
    return ndi.maximum_filter(eroded, size=(1, 3, 3), mode="constant", cval=0).view(bool)


def _erode_square3_inplane(m: np.ndarray) -> np.ndarray:
    """In-plane binary erosion by a 3x3 square, outside the array counting as background (a separable minimum)."""
    return ndi.minimum_filter(m.view(np.uint8), size=(1, 3, 3), mode="constant", cval=0).view(bool)


def body_mask(work: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """Body without table: largest 3D component above ``threshold_hu``, holes filled per slice."""
    dense = work > threshold_hu
    # a light in-plane opening detaches the table where it touches the back through a thin blanket
    # in-plane structure: slabs of slices on threads give exactly the whole-volume result
    dense = map_axis(_open_square3_inplane, dense)
    body = _largest_component(dense, 6)
    return _fill_holes_per_slice(body)


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    idx = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != 0)))[0]
    if idx.size == 0:
        return None
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.nonzero(mask.any(axis=other))[0]
        slices.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(slices)


def find_airway(work: np.ndarray, internal_air: np.ndarray, pixel_mm: float, slice_mm: float,
                threshold_hu: float = -940.0) -> tuple[np.ndarray, dict[str, Any]]:
    """Trachea and main bronchi by region growing from a seed in the top slices.

    The seed is the most superior small (0.5–8 cm²), roughly round, very dark air blob near the body's midline.
    Growing is limited to ``threshold_hu``; if the grown volume or any slice's area explodes (a leak into the
    parenchyma), the threshold is lowered by 20 HU and the growth retried.
    """
    info: dict[str, Any] = {"found": False}
    empty = np.zeros_like(internal_air)
    zs = np.nonzero(internal_air.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return empty, info
    pixel_area_cm2 = pixel_mm * pixel_mm / 100.0
    cols = np.nonzero(internal_air.any(axis=(0, 1)))[0]
    mid_col = 0.5 * (cols[0] + cols[-1])
    half_width = 0.5 * (cols[-1] - cols[0] + 1)
    seed_z, seed_mask = None, None
    search_end = min(zs[0] + max(3, int(round(60.0 / slice_mm))), zs[-1] + 1)
    for z in range(zs[0], search_end):
        lab, n = label_components((work[z] < threshold_hu + 40) & internal_air[z], 8)
        if n == 0:
            continue
        best = None
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            comp = lab[sl] == i
            area = comp.sum() * pixel_area_cm2
            if not 0.5 <= area <= 8.0:
                continue
            cy, cx = ndi.center_of_mass(comp)
            cx += sl[1].start
            if abs(cx - mid_col) > 0.35 * half_width:
                continue
            h, w = comp.shape
            if max(h, w) > 3.0 * max(1, min(h, w)):  # not round: not the trachea
                continue
            score = -area  # the trachea is the largest round midline air blob; oesophageal air is smaller
            if best is None or score < best[0]:
                best = (score, i)
        if best is not None:
            seed_z, seed_mask = z, lab == best[1]
            break
    if seed_z is None:
        return empty, info
    max_volume_ml = 220.0
    max_slice_area_cm2 = 12.0
    for attempt in range(6):
        thr = threshold_hu - 20.0 * attempt
        grow_region = (work < thr) & internal_air
        seeds = np.zeros_like(grow_region)
        seeds[seed_z] = seed_mask & grow_region[seed_z]
        if not seeds.any():
            continue
        lab, _ = label_components(grow_region, 6)
        ids = np.unique(lab[seeds])
        ids = ids[ids > 0]
        airway = np.isin(lab, ids)
        volume_ml = airway.sum() * pixel_mm * pixel_mm * slice_mm / 1000.0
        per_slice_cm2 = airway.sum(axis=(1, 2)) * pixel_area_cm2
        if volume_ml <= max_volume_ml and per_slice_cm2.max() <= max_slice_area_cm2:
            info.update(found=True, threshold_hu=thr, volume_ml=round(float(volume_ml), 1),
                        seed_slice=int(seed_z))
            return airway, info
    # every threshold leaked: keep the trachea alone, slice by slice from the seed down while it stays small
    airway = np.zeros_like(internal_air)
    current = seed_mask
    for z in range(seed_z, internal_air.shape[0]):
        lab, n = label_components((work[z] < threshold_hu) & internal_air[z], 8)
        ids = np.unique(lab[current & (lab > 0)])
        if ids.size == 0:
            break
        nxt = np.isin(lab, ids)
        if nxt.sum() * pixel_area_cm2 > 8.0:
            break
        airway[z] = nxt
        current = ndi.binary_dilation(nxt, iterations=2)
    info.update(found=bool(airway.any()), threshold_hu=threshold_hu, fallback="trachea-tracking",
                seed_slice=int(seed_z))
    return airway, info


#: a lung component with at least this share of its voxels across the body midline may be two lungs joined at a
#: junction line (or a small remnant of one lung joined to the other): it is eroded to look for one seed per side
_MIN_CROSS_FRACTION = 0.03
#: within the first few erosions (a thin bridge, ~4.5 mm on the 1.5 mm grid) a seed down to this share of the
#: other is accepted: the aerated remnant of a lung filled by consolidation, joined to the healthy lung
_SMALL_SEED_FRACTION = 0.02
_SMALL_SEED_EROSIONS = 3
#: when no erosion separates them and no other lung lies on its smaller side, a component with at least this share
#: on each side is cut at the midline (a thin aerated remnant joined to the other lung through a wide bridge, such
#: as a trachea the airway search missed, vanishes under erosion first)
_CUT_FRACTION = 0.05


def split_left_right(lung: np.ndarray, max_erosions: int = 12, *, midline_col: float | None = None,
                     cross_fraction: float = 0.2, seed_fraction: float = 0.15) -> tuple[np.ndarray, dict[str, Any]]:
    """Label lung voxels 1 (right, low column index) or 2 (left) from a boolean lung mask on the working grid.

    No component is dropped: the caller decides what is lung. Each 3D component goes to the side of the body
    midline (``midline_col``, a column index; default the image centre) that holds most of its voxels, so a small
    second lung (the aerated remnant of a lung filled by consolidation) and extra pieces of one lung (a lobe cut
    off by consolidation) keep their own side.

    A component with voxels on both sides (at least 3 % on the smaller side; below ``cross_fraction`` there, only
    when no other component of at least ``seed_fraction`` of it lies on that side) may be two lungs joined at a
    junction line. It is eroded in-plane until its largest piece and the largest piece on the other side each lie
    on one side (less than ``cross_fraction`` across), the smaller at least ``seed_fraction`` of the larger (2 %
    within the first 3 erosions: a thin bridge to a small remnant); each voxel then goes to its seed. If no erosion
    separates them, a component with at least 5 % on each side is cut at the midline; any other goes whole to its
    majority side (one lung reaching over the midline).

    If the midline puts the two largest components on the same side although they lie side by side (column ranges
    overlapping by at most 10 %: two lungs, not two pieces of one lung), the midline estimate is wrong and the
    midpoint of their centroid columns is used instead.
    """
    info: dict[str, Any] = {}
    labels = np.zeros(lung.shape, np.uint8)
    box = _bbox(lung)
    if box is None:
        return labels, info
    mid = (lung.shape[2] - 1) / 2.0 if midline_col is None else float(midline_col)
    sub_labels, info = _split_left_right_box(lung[box], max_erosions, mid - box[2].start, cross_fraction,
                                             seed_fraction)
    if "midline_col" in info:
        info["midline_col"] = round(info["midline_col"] + box[2].start, 1)
    labels[box] = sub_labels
    return labels, info


def _split_left_right_box(lung: np.ndarray, max_erosions: int, mid: float, cross_fraction: float,
                          seed_fraction: float) -> tuple[np.ndarray, dict[str, Any]]:
    info: dict[str, Any] = {}
    labels = np.zeros(lung.shape, np.uint8)
    lab, n = label_components(lung, 6)
    if n == 0:
        return labels, info
    # per-component counts from the lung voxels only (a fraction of the box): sizes, column sums, right-side counts
    flat = np.flatnonzero(lung)
    vox_lab = lab.ravel()[flat]
    vox_col = flat % lung.shape[2]
    del flat
    sizes = np.bincount(vox_lab, minlength=n + 1)
    sizes[0] = 0
    col_sum = np.bincount(vox_lab, weights=vox_col.astype(np.float64), minlength=n + 1)
    centroid_col = col_sum / np.maximum(sizes, 1)
    objs = ndi.find_objects(lab)

    def right_counts(m: float) -> np.ndarray:
        c = min(max(int(np.ceil(m)), 0), lung.shape[2])  # columns < m lie on the patient's right
        return np.bincount(vox_lab[vox_col < c], minlength=n + 1)

    def minority(i: int) -> float:
        return min(right_n[i], sizes[i] - right_n[i]) / sizes[i]

    right_n = right_counts(mid)
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] > 0]
    if len(order) >= 2 and sizes[order[1]] >= seed_fraction * sizes[order[0]]:
        a, b = order[0], order[1]
        same_side = (2 * right_n[a] >= sizes[a]) == (2 * right_n[b] >= sizes[b])
        ca, cb = objs[a - 1][2], objs[b - 1][2]
        overlap = max(0, min(ca.stop, cb.stop) - max(ca.start, cb.start))
        side_by_side = overlap <= 0.1 * min(ca.stop - ca.start, cb.stop - cb.start)  # two lungs, not two lobes
        if same_side and side_by_side and minority(a) < cross_fraction and minority(b) < cross_fraction:
            mid = 0.5 * (centroid_col[a] + centroid_col[b])
            right_n = right_counts(mid)
            info["midline"] = "midpoint of the two largest components (the body midline put both on one side)"
    info["midline_col"] = float(mid)

    how = []
    for i in order:
        sl = objs[i - 1]
        comp = lab[sl] == i
        majority = LUNG_RIGHT if 2 * right_n[i] >= sizes[i] else LUNG_LEFT
        # a small share across while the other side has its own lung: this one only reaches over the midline
        other_lung = minority(i) < cross_fraction and any(
            j != i and sizes[j] >= seed_fraction * sizes[i] and (2 * right_n[j] >= sizes[j]) != (majority == LUNG_RIGHT)
            for j in order)
        if minority(i) < _MIN_CROSS_FRACTION or other_lung:
            labels[sl][comp] = majority
            continue
        right_cols = (np.arange(sl[2].start, sl[2].stop) < mid)[None, None, :]
        split = _erosion_split(comp, right_cols, max_erosions, cross_fraction, seed_fraction)
        if split is not None:
            part_right, k = split
            labels[sl][comp & part_right] = LUNG_RIGHT
            labels[sl][comp & ~part_right] = LUNG_LEFT
            how.append(f"joined lungs split after {k} erosions")
        elif minority(i) >= _CUT_FRACTION:
            labels[sl][comp & right_cols] = LUNG_RIGHT
            labels[sl][comp & ~right_cols] = LUNG_LEFT
            how.append("joined lungs cut at the midline")
        else:
            labels[sl][comp] = majority
    vox_side = labels.ravel()[np.flatnonzero(lung)]
    n_right = int(np.count_nonzero(np.bincount(vox_lab[vox_side == LUNG_RIGHT], minlength=n + 1)[1:]))
    n_left = int(np.count_nonzero(np.bincount(vox_lab[vox_side == LUNG_LEFT], minlength=n + 1)[1:]))
    if how:
        info["split"] = how[0]
    elif n_right and n_left:
        info["split"] = "separate components"
    else:
        info["split"] = "single lung component"
    info["components"] = {"total": len(order), "right": n_right, "left": n_left}
    return labels, info


def _erosion_split(main: np.ndarray, right_cols: np.ndarray, max_erosions: int, cross_fraction: float,
                   seed_fraction: float) -> tuple[np.ndarray, int] | None:
    """Split one component that spans both sides of the midline by in-plane erosion (see ``split_left_right``).

    Returns (right-lung part of ``main``, erosions) or None."""
    bb = _bbox(main)
    rc = np.broadcast_to(right_cols, main.shape)
    # k in-plane erosions by a 3x3 square (outside the array counts as background), one more per step; the split
    # is usually found within 1-3 of them (separable minimum filters on slabs: cheaper than a distance transform)
    eroded = main
    for k in range(1, max_erosions + 1):
        eroded = map_axis(_erode_square3_inplane, eroded)
        if not eroded.any():
            return None
        elab, en = label_components(eroded, 6)
        if en < 2:
            continue
        esizes = np.bincount(elab[eroded], minlength=en + 1)  # the pieces' voxels only (label 0 is never read)
        frac = np.bincount(elab[eroded & rc], minlength=en + 1) / np.maximum(esizes, 1)
        big = int(np.argmax(esizes))
        if cross_fraction < frac[big] < 1 - cross_fraction:
            continue  # the largest piece still spans the midline
        big_right = frac[big] >= 0.5
        other = (frac <= cross_fraction) if big_right else (frac >= 1 - cross_fraction)
        other &= esizes > 0
        other[0] = False
        if not other.any():
            continue
        o = int(np.argmax(np.where(other, esizes, -1)))
        need = seed_fraction if k > _SMALL_SEED_EROSIONS else min(seed_fraction, _SMALL_SEED_FRACTION)
        if esizes[o] < need * esizes[big]:
            continue
        r, left_id = (big, o) if big_right else (o, big)
        markers = np.zeros(main.shape, np.uint8)
        markers[elab == r] = 1
        markers[elab == left_id] = 2
        full = _assign_to_markers(main, markers, bb)
        # voxels no seed reached in their slice fall back to the midline
        part_right = (full == 1) | ((full == 0) & rc)
        return part_right, k
    return None


def _assign_to_markers(mask: np.ndarray, markers: np.ndarray, bb: tuple[slice, ...]) -> np.ndarray:
    """Give every voxel of ``mask`` the label of the seed it belongs to.

    Slice by slice: a 2D blob touching one seed label takes it whole; only blobs touching both (the junction)
    or neither are split pixel-wise by the nearest seed in that slice (2D EDT), which is far cheaper than a
    3D nearest-seed transform and keeps the split line where the lungs actually meet.
    """
    out = np.zeros(mask.shape, np.uint8)  # seed labels 1, 2
    # a slice without seeds uses the seeds of the nearest slice above that has some (none above: no seeds)
    has = markers.any(axis=(1, 2))
    source = np.maximum.accumulate(np.where(has, np.arange(mask.shape[0]), -1))
    z_start = bb[0].start

    def assign(zs: range) -> None:  # slices are independent once their seed slice is known: threads split them
        for z in range(z_start + zs.start, z_start + zs.stop):
            m = mask[z]
            if not m.any():
                continue
            if has[z]:
                mk = markers[z]
            elif z > 0 and source[z - 1] >= 0:
                mk = markers[source[z - 1]]
            else:
                mk = markers[z]
            lab, n = label_components(m, 8)
            # per blob: which seed labels (1, 2) it touches
            touch = np.bincount(lab[m] * 3 + mk[m], minlength=3 * (n + 1)).reshape(n + 1, 3)[:, 1:] > 0
            only = np.where(touch[:, 0] & ~touch[:, 1], 1, np.where(touch[:, 1] & ~touch[:, 0], 2, 0))
            only[0] = 0
            res = only[lab]
            split = touch[:, 0] == touch[:, 1]  # both seeds (the junction) or none: nearest seed per pixel
            split[0] = False
            if split.any() and mk.any():
                _, (iy, ix) = ndi.distance_transform_edt(mk == 0, return_indices=True)
                sel = split[lab]
                res[sel] = mk[iy, ix][sel]
            out[z] = res

    run_chunks(assign, bb[0].stop - bb[0].start)
    return out


def _envelope(rows: list[float], cols: list[float], left: bool) -> list[int]:
    """Indices of the vertices of the left (``left``: smallest column) convex envelope of points given one per row,
    rows increasing — one half of Andrew's monotone chain; collinear points are dropped."""
    out: list[int] = []
    for i, (r, c) in enumerate(zip(rows, cols)):
        while len(out) >= 2:
            j, k = out[-2], out[-1]
            cross = (rows[k] - rows[j]) * (c - cols[j]) - (cols[k] - cols[j]) * (r - rows[j])
            if (cross <= 0) if left else (cross >= 0):  # k is not strictly outside the segment j -> i
                out.pop()
            else:
                break
        out.append(i)
    return out


def _envelope_at(rows: np.ndarray, cols: np.ndarray, idx: list[int], rs: np.ndarray) -> np.ndarray:
    """The envelope's column at rows ``rs`` (linear between its vertices, the hull's edge equation)."""
    if len(idx) == 1:
        return np.full(rs.shape, float(cols[idx[0]]))
    vr, vc = rows[idx], cols[idx]
    seg = np.clip(np.searchsorted(vr, rs, side="right") - 1, 0, len(idx) - 2)
    r0, r1, c0, c1 = vr[seg], vr[seg + 1], vc[seg], vc[seg + 1]
    return c0 + (rs - r0) * (c1 - c0) / (r1 - r0)


def _convex_hull(m: np.ndarray) -> np.ndarray:
    """Filled convex hull of a 2D mask (pixel centres), rasterised one row interval at a time.

    The hull of a pixel set is the hull of each row's leftmost and rightmost pixels, and in every row it spans from
    the left convex envelope of the leftmost pixels to the right envelope of the rightmost ones: two monotone
    chains over rows already in order (the same pixels as rasterising a Qhull polygon — tested — at a third of
    the time). A set on one line has no area: the mask is returned as it is."""
    rows = np.nonzero(m.any(axis=1))[0]
    cols = np.nonzero(m.any(axis=0))[0]
    if rows.size == 0:
        return m.copy()
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1  # the hull lies inside the bounding box
    sub = m[r0:r1, c0:c1]
    rr = np.flatnonzero(sub.any(axis=1))
    first = np.argmax(sub[rr], axis=1)
    last = sub.shape[1] - 1 - np.argmax(sub[rr, ::-1], axis=1)
    rf, ff, lf = rr.astype(np.float64), first.astype(np.float64), last.astype(np.float64)
    pts = np.concatenate([np.stack([rf, ff], 1), np.stack([rf, lf], 1)])
    d = pts - pts[0]
    far = d[np.argmax(np.abs(d).sum(axis=1))]
    if not np.any(far[0] * d[:, 1] - far[1] * d[:, 0]):  # all on one line (or one point)
        return m.copy()
    rows_l = rf.tolist()
    rs = np.arange(sub.shape[0], dtype=np.float64)
    lo = _envelope_at(rf, ff, _envelope(rows_l, ff.tolist(), True), rs)
    hi = _envelope_at(rf, lf, _envelope(rows_l, lf.tolist(), False), rs)
    cc = np.arange(sub.shape[1])
    out = m.copy()
    out[r0:r1, c0:c1] |= (cc[None, :] >= np.ceil(lo[:, None] - 1e-9)) & (cc[None, :] <= np.floor(hi[:, None] + 1e-9))
    return out


def _peripheral_pockets(m: np.ndarray, allowed: np.ndarray, centre: tuple[float, float],
                        intensity: np.ndarray | None = None, basal: bool = False,
                        n_samples: int = 24, max_pocket_fraction: float = 0.35,
                        medial_band: float = 0.25) -> np.ndarray:
    """Pixels of the lung's convex hull that lie *outside* the lung as seen from the body centre.

    A subpleural consolidation makes a concave bite in the aerated lung against the chest wall. Its pixels are
    in the lung's convex hull, and the straight line from the body centre to them crosses aerated lung first.
    The mediastinum (heart, great vessels) is also in the hull, but the line from the centre reaches it without
    crossing lung, so it is not added.
    """
    full = np.zeros_like(m)
    rows = np.nonzero(m.any(axis=1))[0]
    if rows.size == 0:
        return full
    # everything that can be a pocket lies in the lung's convex hull, so inside its bounding box: the masks and
    # labels below live on that box (+1 px, so the touching test's dilation sees the same neighbours); the rays
    # from the body centre are sampled on the whole slice (they leave the box)
    cols_m = np.nonzero(m.any(axis=0))[0]
    r0, c0 = max(int(rows[0]) - 1, 0), max(int(cols_m[0]) - 1, 0)
    box = (slice(r0, int(rows[-1]) + 2), slice(c0, int(cols_m[-1]) + 2))
    mb = m[box]
    cand = _convex_hull(mb) & ~mb & allowed[box]
    # the medial band (mediastinum, anterior junction, spine) is never a pleural pocket
    cols = np.nonzero(allowed.any(axis=0))[0]
    if cols.size:
        half_width = 0.5 * (cols[-1] - cols[0] + 1)
        medial = np.abs(np.arange(m.shape[1]) - centre[1]) < medial_band * half_width
        cand[:, medial[box[1]]] = False
    if not cand.any():
        return full
    by, bx = np.nonzero(cand)
    py, px = by + r0, bx + c0
    t = np.linspace(0.05, 0.92, n_samples, dtype=np.float32)[:, None]
    ry = np.clip(np.rint(centre[0] + t * (py - centre[0])), 0, m.shape[0] - 1).astype(np.intp)
    rx = np.clip(np.rint(centre[1] + t * (px - centre[1])), 0, m.shape[1] - 1).astype(np.intp)
    crosses = m[ry, rx].any(axis=0)
    # ... and beyond them, outward, there is chest wall, not lung again: a dome of liver or spleen ringed by
    # lung in this slice has lung on its far side too
    t_out = np.linspace(1.03, 2.0, n_samples, dtype=np.float32)[:, None]
    oy = np.rint(centre[0] + t_out * (py - centre[0]))
    ox = np.rint(centre[1] + t_out * (px - centre[1]))
    inside = (oy >= 0) & (oy < m.shape[0]) & (ox >= 0) & (ox < m.shape[1])
    oyi = np.clip(oy, 0, m.shape[0] - 1).astype(np.intp)
    oxi = np.clip(ox, 0, m.shape[1] - 1).astype(np.intp)
    lung_beyond = (m[oyi, oxi] & inside).any(axis=0)
    keep_px = crosses & ~lung_beyond
    out = np.zeros_like(cand)
    out[by[keep_px], bx[keep_px]] = True
    # keep only pockets that touch the lung (a stray hull corner across the mediastinum is not a pocket)
    # Pockets larger than a fraction of the aerated lung in the slice are not trusted: at the lung bases the
    # hull reaches over the liver, spleen and bowel, which also lie beyond a thin lung sliver.
    lab, n = label_components(out, 8)
    if n:
        touching = np.zeros(n + 1, bool)
        # the dilation only on the pockets' box (+1 px): the same pixels as on the whole slice, ~10x cheaper
        rs, cs = by[keep_px], bx[keep_px]
        pbox = (slice(max(int(rs.min()) - 1, 0), int(rs.max()) + 2),
                slice(max(int(cs.min()) - 1, 0), int(cs.max()) + 2))
        touching[np.unique(lab[pbox][ndi.binary_dilation(mb[pbox]) & out[pbox]])] = True
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        touching &= sizes <= max_pocket_fraction * np.count_nonzero(mb)
        if basal and intensity is not None:
            # Below the lung's widest slice the lung wraps round the diaphragm domes, and the liver or spleen
            # dome looks exactly like a pocket lying *anterior* to the lung crescent. Such a pocket is accepted
            # only with evidence of lung disease inside it (ground-glass or air bronchograms below -300 HU, away
            # from the partial-volume rim next to the aerated lung); homogeneous solid organ is not.
            lung_row = float(np.nonzero(mb)[0].mean())  # box rows, like `rows` below
            rows_out = np.nonzero(out)[0]
            row_sum = np.bincount(lab[out], weights=rows_out.astype(np.float64), minlength=n + 1)
            anterior = row_sum / np.maximum(sizes, 1) < lung_row
            interior = out & (ndi.distance_transform_edt(~mb) > 2.5)
            ib = intensity[box]
            low = np.bincount(lab[interior], weights=(ib[interior] < -300.0).astype(np.float64),
                              minlength=n + 1)
            n_int = np.bincount(lab[interior], minlength=n + 1)
            evidence = low >= 0.2 * np.maximum(n_int, 1)
            touching &= ~anterior | evidence
        touching[0] = False
        full[box] = touching[lab]
    return full


def _slice_closer(mask: np.ndarray, radius_px: float, centres: np.ndarray | None = None,
                  intensity: np.ndarray | None = None, basal_fraction: float = 0.5,
                  hole_blocked: np.ndarray | None = None):
    """``close(z, allowed_z) -> (Y, X) bool``: slice z of ``mask`` hole-filled, disc-closed (EDT based) and with its
    peripheral pockets, additions limited to ``allowed_z`` (see :func:`_close_per_slice`). Slices are independent,
    so callers may run them on threads in any order."""
    pad = int(np.ceil(radius_px)) + 2
    areas = mask.sum(axis=(1, 2))
    max_area = max(int(areas.max()), 1) if areas.size else 1
    z_max = int(np.argmax(areas)) if areas.size else 0

    def close(z: int, allowed_z: np.ndarray) -> np.ndarray:
        m = mask[z]
        out = m.copy()
        if not m.any():
            return out
        rows = np.nonzero(m.any(axis=1))[0]
        cols = np.nonzero(m.any(axis=0))[0]
        r0, r1 = max(rows[0] - pad, 0), min(rows[-1] + pad + 1, m.shape[0])
        c0, c1 = max(cols[0] - pad, 0), min(cols[-1] + pad + 1, m.shape[1])
        # the crop reaches `pad` (> radius + 1) px beyond the lung, so the dilated lung never touches its border
        # and the closing cannot stick to it; only where the image edge cut the crop short is it padded
        top, left = pad - (rows[0] - r0), pad - (cols[0] - c0)
        bottom, right = pad - (r1 - 1 - rows[-1]), pad - (c1 - 1 - cols[-1])
        sub = np.pad(m[r0:r1, c0:c1], ((top, bottom), (left, right)))
        dilated = ndi.distance_transform_edt(~sub) <= radius_px
        closed = ndi.distance_transform_edt(dilated) > radius_px
        out[r0:r1, c0:c1] |= closed[top : top + r1 - r0, left : left + c1 - c0] & allowed_z[r0:r1, c0:c1]
        if centres is not None and np.isfinite(centres[z]).all():
            # "basal": small lung cross-sections below the slice of largest area (the diaphragm domes)
            basal = bool(areas[z] < basal_fraction * max_area and z > z_max)
            out |= _peripheral_pockets(out, allowed_z, (float(centres[z][0]), float(centres[z][1])),
                                       None if intensity is None else intensity[z], basal)
        cur = out[r0:r1, c0:c1]
        holes = fill_holes_2d(cur) & ~cur
        if hole_blocked is not None:
            holes &= ~hole_blocked[z, r0:r1, c0:c1]
        out[r0:r1, c0:c1] = cur | holes
        return out

    return close


def _close_per_slice(mask: np.ndarray, radius_px: float, allowed: np.ndarray,
                     centres: np.ndarray | None = None, intensity: np.ndarray | None = None,
                     basal_fraction: float = 0.5, hole_blocked: np.ndarray | None = None) -> np.ndarray:
    """Per-slice hole filling + disc closing (EDT based) + peripheral pockets, additions limited to ``allowed``.

    centres: (Z, 2) body centre (row, col) per slice for the pocket test; no pocket filling when None.
    hole_blocked: (Z, Y, X) tissue that is a 2D hole of the lung but extra-pulmonary in 3D (a diaphragm dome
    ringed by lung in one slice); such holes are not filled.
    """
    close = _slice_closer(mask, radius_px, centres, intensity, basal_fraction, hole_blocked)
    out = np.empty_like(mask)

    def close_slices(zs: range) -> None:  # slices are independent: threads split the z range (same result)
        for z in zs:
            out[z] = close(z, allowed[z])

    run_chunks(close_slices, mask.shape[0])
    return out


def segment_lungs(study: StudyVolume, params: LungMaskParams | None = None) -> LungMaskResult:
    """3D lung mask with right/left labels for a HU study in canonical orientation."""
    if study.is_2d_image:
        raise ValueError("segment_lungs needs Hounsfield units; 2D 8-bit images are handled per slice")
    p = params or LungMaskParams()
    hu = study.hu
    slice_mm, row_mm, col_mm = (float(s) for s in study.spacing)
    pixel_mm_in = 0.5 * (row_mm + col_mm)
    factor = max(1, int(p.working_spacing_mm / pixel_mm_in + 0.1))  # working pixel at most ~1.5 mm
    pixel_mm = pixel_mm_in * factor
    voxel_ml = pixel_mm * pixel_mm * slice_mm / 1000.0
    work = _block_mean(hu, factor)
    info: dict[str, Any] = {"method": "classical-3d", "working_pixel_mm": round(pixel_mm, 3)}

    body = body_mask(work, p.body_threshold_hu)
    air = (work < p.air_threshold_hu) & body
    lab, n = label_components(air, 6)
    internal_air = np.zeros_like(air)
    kept = []
    if n:
        # counts and sums over the air voxels only (the same per-label order of summation as over the volume,
        # without its int64 / float64 copies)
        vox = lab[air]
        sizes = np.bincount(vox, minlength=n + 1)
        big = np.flatnonzero(sizes * voxel_ml >= p.min_lung_ml)
        big = big[big > 0]  # thousands of air specks: only the few large components need their mean density
        if big.size:
            sums = np.bincount(vox, weights=work[air], minlength=n + 1)
            mean_hu = sums[big] / sizes[big]
            # lungs are aerated tissue (about -900..-700 HU on average); bowel gas is close to pure air
            kept = [int(i) for i in big[mean_hu >= -975]]
        if kept:
            keep = np.zeros(n + 1, bool)
            keep[kept] = True
            internal_air = keep[lab]
    lab = vox = None  # a forked lung mask faults in every fresh page: keep only what later steps read
    info["air_components_kept"] = len(kept)
    if not internal_air.any():
        labels = np.zeros(hu.shape, np.uint8)
        info["warning"] = "no lungs found"
        return LungMaskResult(labels, body, np.zeros(body.shape, bool), factor, info)

    airway, airway_info = find_airway(work, air, pixel_mm, slice_mm, p.airway_threshold_hu)
    del air
    info["airway"] = airway_info
    lung = internal_air
    del internal_air
    box = _bbox(airway)
    if box is not None:  # the airway's in-plane rim only: dilate on its box (+1 px), not the whole volume
        box = (box[0], slice(max(box[1].start - 1, 0), box[1].stop + 1),
               slice(max(box[2].start - 1, 0), box[2].stop + 1))
        lung[box] &= ~ndi.binary_dilation(airway[box], structure=np.ones((1, 3, 3), bool))
    # drop what the airway removal cut off (e.g. the trachea's wall rim); every other lung-like piece stays, on the
    # side of the body midline that holds it (a small second lung, a lobe cut off by consolidation)
    lung, lung_lab, n_lab = _drop_small_labelled(lung, p.min_lung_ml / 2, voxel_ml)
    lung, extra_info = _lung_like_components(lung, work, p, labelled=(lung_lab, n_lab))
    del lung_lab
    info.update(extra_info)
    centres = _body_centres(body)
    # the organ-dome test needs only the union of the two lungs, which the split labels whole (every lung voxel
    # becomes right or left): it runs in a second thread beside the split (same result, tested)
    domes = Background(organ_dome_holes, body, lung, name="pneumoct-domes")
    labels_work, split_info = split_left_right(lung, midline_col=_midline_col(centres, lung))
    info.update(split_info)

    radius_px = p.closing_radius_mm / pixel_mm
    allowed = body & (work < p.bone_threshold_hu)
    blocked = domes.result()
    # a lung whose aerated part is less than `small_lung_fraction` of the other's is mostly filled by disease (or
    # collapsed): its 2D holes are consolidation far more likely than an organ dome, so the dome guard is off there
    n_aer = {lab_id: int(np.count_nonzero(labels_work == lab_id)) for lab_id in (LUNG_RIGHT, LUNG_LEFT)}
    guard = {lab_id: None if 0 < n_aer[lab_id] < p.small_lung_fraction * n_aer[3 - lab_id] else blocked
             for lab_id in (LUNG_RIGHT, LUNG_LEFT)}
    info["dome_guard_off"] = [name for name, lab_id in (("right", LUNG_RIGHT), ("left", LUNG_LEFT))
                              if guard[lab_id] is None]
    close_right = _slice_closer(labels_work == LUNG_RIGHT, radius_px, centres, work, hole_blocked=guard[LUNG_RIGHT])
    close_left = _slice_closer(labels_work == LUNG_LEFT, radius_px, centres, work, hole_blocked=guard[LUNG_LEFT])
    right = np.empty(labels_work.shape, bool)
    left = np.empty(labels_work.shape, bool)

    def close_slices(zs: range) -> None:  # one pass, both lungs: the left lung never takes the closed right lung
        for z in zs:
            right[z] = close_right(z, allowed[z])
            left[z] = close_left(z, allowed[z] & ~right[z])

    run_chunks(close_slices, labels_work.shape[0])
    right &= ~(labels_work == LUNG_LEFT)
    labels_work = np.zeros_like(labels_work)
    labels_work[right] = LUNG_RIGHT
    labels_work[left & ~right] = LUNG_LEFT
    labels_work[airway] = 0

    labels = _upsample_labels(labels_work, factor, hu.shape)
    volumes = {name: round(float(_upsampled_count(labels_work == lab_id, factor, hu.shape) * study.voxel_volume_ml),
                           1) for name, lab_id in (("right_ml", LUNG_RIGHT), ("left_ml", LUNG_LEFT))}
    info["volumes"] = volumes
    return LungMaskResult(labels=np.ascontiguousarray(labels, dtype=np.uint8), body_work=body, airway_work=airway,
                          factor=factor, info=info)


def organ_dome_holes(body: np.ndarray, lung: np.ndarray, open_fraction: float = 0.3) -> np.ndarray:
    """2D holes of the lung that are organ domes, not disease.

    In one slice a diaphragm dome (liver, spleen) can be ringed by lung exactly like a consolidation. In 3D they
    differ: a lesion is capped above and below by lung, while a dome runs down into its organ, which in the
    slices below lies *outside* the lung. Holes are grouped in 3D; a group whose faces along z meet open
    (not lung-enclosed) body tissue for more than ``open_fraction`` of those faces is a dome.
    """
    holes = np.zeros_like(lung)
    open_tissue = np.zeros_like(lung)

    def per_slice(zs: range) -> None:
        for z in zs:
            if lung[z].any():
                filled = fill_holes_2d(lung[z])
                holes[z] = filled & ~lung[z] & body[z]
                open_tissue[z] = body[z] & ~filled
            else:
                open_tissue[z] = body[z]

    run_chunks(per_slice, lung.shape[0])
    lab, n = label_components(holes, 6)
    if n == 0:
        return holes
    open_faces = np.zeros(n + 1)
    lung_faces = np.zeros(n + 1)
    for a, b in ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))):
        face = holes[a] & ~holes[b]
        la = lab[a]
        open_faces += np.bincount(la[face & open_tissue[b]], minlength=n + 1)
        lung_faces += np.bincount(la[face & lung[b]], minlength=n + 1)
    dome = open_faces > open_fraction * np.maximum(open_faces + lung_faces, 1)
    dome[0] = False
    return dome[lab]


def _midline_col(centres: np.ndarray, lung: np.ndarray) -> float | None:
    """Body midline column: the median of the per-slice body centre columns over the slices holding lung."""
    zs = lung.any(axis=(1, 2))
    cols = centres[zs, 1] if zs.any() else centres[:, 1]
    cols = cols[np.isfinite(cols)]
    return float(np.median(cols)) if cols.size else None


def _lung_like_components(lung: np.ndarray, work: np.ndarray, p: LungMaskParams,
                          labelled: tuple[np.ndarray, int] | None = None) -> tuple[np.ndarray, dict]:
    """Keep the large air pieces (at least ``primary_fraction`` of the largest) and the smaller ones that look like
    lung: median density above ``gas_median_hu`` and at least half of their voxels within the slices of the large
    pieces. Gas in the stomach, bowel or airways (~ -1000 HU) and pieces below the lungs are dropped.
    ``labelled``: (labels, n) of ``lung``'s 6-connected components, if already at hand (label 0 and unused
    numbers outside ``lung``)."""
    lab, n = labelled if labelled is not None else label_components(lung, 6)
    # sizes from the lung's voxels only; with ``labelled`` some label numbers may be unused (dropped pieces)
    sizes = np.bincount(lab.ravel()[np.flatnonzero(lung)], minlength=n + 1)
    sizes[0] = 0
    present = sizes > 0
    if np.count_nonzero(present) <= 1:
        return lung, {}
    keep = sizes >= p.primary_fraction * sizes.max()
    keep[0] = False
    objs = ndi.find_objects(lab)
    z0 = min(objs[i - 1][0].start for i in np.flatnonzero(keep))
    z1 = max(objs[i - 1][0].stop for i in np.flatnonzero(keep))
    kept, dropped = 0, 0
    for i in np.flatnonzero(~keep & present):
        sl = objs[i - 1]
        comp = lab[sl] == i
        per_z = comp.sum(axis=(1, 2))
        zs = np.arange(sl[0].start, sl[0].stop)
        within = per_z[(zs >= z0) & (zs < z1)].sum() / max(int(per_z.sum()), 1)
        if float(np.median(work[sl][comp])) > p.gas_median_hu and within >= 0.5:
            keep[i] = True
            kept += 1
        else:
            dropped += 1
    if not (kept or dropped):
        return lung, {}
    return keep[lab], {"small_pieces": {"kept_as_lung": kept, "dropped_as_gas_or_below_lungs": dropped}}


def _body_centres(body: np.ndarray) -> np.ndarray:
    """(Z, 2) centroid (row, col) of the body per slice; NaN where a slice has no body."""
    centres = np.full((body.shape[0], 2), np.nan, np.float32)
    rows = np.arange(body.shape[1], dtype=np.float32)[:, None]
    cols = np.arange(body.shape[2], dtype=np.float32)[None, :]
    for z in range(body.shape[0]):
        b = body[z]
        n = b.sum()
        if n:
            centres[z] = ((b * rows).sum() / n, (b * cols).sum() / n)
    return centres


def _drop_small_labelled(mask: np.ndarray, min_ml: float, voxel_ml: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(mask without its 6-connected pieces under ``min_ml``, labels of the pieces kept (dropped ones set to 0;
    their numbers stay unused), number of labels): the kept pieces' labelling serves the next step too."""
    lab, n = label_components(mask, 6)
    if n == 0:
        return mask, lab, 0
    flat = np.flatnonzero(mask)  # the mask's voxels only (lung: a fifth of the volume)
    vox_lab = lab.ravel()[flat]
    keep = np.bincount(vox_lab, minlength=n + 1) * voxel_ml >= min_ml
    out = np.zeros(mask.shape, bool)
    kept = keep[vox_lab]
    out.ravel()[flat[kept]] = True
    lab.ravel()[flat[~kept]] = 0
    return out, lab, n


#: a 2D image is "cropped through the body" when less than this share of its border pixels is air; measured:
#: 0.78-1.0 on the full-field COVID-19-CT-Seg slices, 0.01-0.37 on the body-cropped MedSeg exports
CUT_BORDER_AIR_FRACTION = 0.5
#: in a body-cropped image, an air component with at least this share of its pixels in the border band (3 % of the
#: image side) is outside air in a corner, not lung
BORDER_AIR_FRACTION = 0.5


def _cut_through_body(dark: np.ndarray) -> bool:
    """True when the image was cropped through the body (e.g. MedSeg exports): its border is mostly tissue."""
    border = np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]])
    return float(border.mean()) < CUT_BORDER_AIR_FRACTION


def _border_air(lab: np.ndarray, n: int) -> np.ndarray:
    """(n + 1,) bool: components of ``lab`` lying mostly in the image's border band (outside air in corners)."""
    b = max(2, int(round(0.03 * max(lab.shape))))
    band = np.zeros(lab.shape, bool)
    band[:b] = band[-b:] = True
    band[:, :b] = band[:, -b:] = True
    total = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
    in_band = np.bincount(lab[band].ravel(), minlength=n + 1).astype(np.float64)
    out = in_band >= BORDER_AIR_FRACTION * np.maximum(total, 1)
    out[0] = False
    return out


def segment_lungs_2d(image: np.ndarray, *, is_hu: bool = False, pixel_mm: float = 1.4,
                     closing_radius_mm: float = 12.0, threshold: float | None = None) -> np.ndarray:
    """The same lung finding on one 2D slice (HU, or an 8-bit windowed image without HU).

    For 8-bit images the air/tissue threshold is Otsu's unless given; ``pixel_mm`` is a guess of the pixel
    size when the image carries none (1.4 mm ≈ a 360 mm field of view at 256 px). Returns (H, W) uint8 labels
    1 right / 2 left. There is no 3D airway growing here: small air blobs (< 2 cm²) are dropped instead.
    """
    from skimage.filters import threshold_otsu

    img = image.astype(np.float32)
    if not is_hu:
        # CLAHE-enhanced 8-bit slices are noisy; a light blur keeps the lung's texture from crossing Otsu
        img = ndi.gaussian_filter(img, 1.5)
    if threshold is None:
        threshold = -400.0 if is_hu else float(threshold_otsu(img))
    dense = img > threshold
    dense = ndi.binary_opening(dense, structure=np.ones((3, 3), bool))
    body = _largest_component(dense, 4)
    # exported 8-bit slices are often cropped through the chest (MedSeg), so the lungs reach the image edge and
    # are not holes of the body: a plain hole filling then keeps only air specks as "lung" (the cause of the
    # near-empty 2D `segment` masks). Such images take every dark region as candidate, minus corner air.
    cut = _cut_through_body(img <= threshold)
    body = fill_holes_2d(np.pad(body, 1, constant_values=True))[1:-1, 1:-1] if cut else fill_holes_2d(body)
    air = (img <= threshold) & body
    lab, n = label_components(air, 8)
    if n == 0:
        return np.zeros(image.shape, np.uint8)
    if cut:
        lab[_border_air(lab, n)[lab]] = 0
    sizes = np.bincount(lab.ravel(), minlength=n + 1) * (pixel_mm * pixel_mm / 100.0)  # cm²
    sizes[0] = 0
    # small air blobs (bowel, oesophagus, air under the table) go; a small aerated remnant of a lung mostly filled
    # by disease is rarely below 5 % of the largest air region
    keep = (sizes >= 2.0) & (sizes >= 0.05 * sizes.max())
    # side by each air component's centroid against the body's centre column: no component is dropped (a lung
    # mostly filled by consolidation leaves a small aerated part, which must stay), and rotated exports (lungs
    # above / below each other) keep both lungs, if with arbitrary side labels
    centre_col = float(np.nonzero(body)[1].mean())
    col_sum = np.bincount(lab.ravel(), weights=np.broadcast_to(np.arange(image.shape[1]), image.shape).ravel(),
                          minlength=n + 1)
    cols = col_sum / np.maximum(np.bincount(lab.ravel(), minlength=n + 1), 1)
    side = np.where(cols < centre_col, LUNG_RIGHT, LUNG_LEFT)
    side[~keep] = 0
    labels = side[lab].astype(np.uint8)
    radius_px = closing_radius_mm / pixel_mm
    allowed = body[None]
    centres = None if cut else _body_centres(allowed)  # no pleural pockets where the body outline is unknown
    right = _close_per_slice((labels == LUNG_RIGHT)[None], radius_px, allowed, centres)[0]
    left = _close_per_slice((labels == LUNG_LEFT)[None], radius_px, allowed & ~right[None], centres)[0]
    out = np.zeros(image.shape, np.uint8)
    out[right] = LUNG_RIGHT
    out[left & ~right] = LUNG_LEFT
    return out
