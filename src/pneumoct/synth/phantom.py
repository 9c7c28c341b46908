"""Seeded synthetic chest-CT phantoms with voxel ground truth (anatomy + class-specific lesions).

Everything is built in millimetres in a *patient frame*: ``X`` toward the patient's left, ``Y`` posterior,
``zz`` inferior (depth below the top of the anatomical chest), origin at the body centre. The patient frame is
rotated by a few degrees and shifted inside the image (patients never lie perfectly straight), then sampled on
the canonical grid of :mod:`pneumoct.types` (slice 0 superior, row 0 anterior, column 0 patient right).

Work is organised so that a 512 x 512 x 500 volume stays well under 3 GB and a 512 x 512 x 300 one generates in
seconds: the trunk anatomy is analytic and evaluated slice by slice on 2D coordinate grids; tubes (aorta, great
vessels, airway and vessel trees) and lesions are rasterised on bounded sub-blocks, with sub-slice sampling in
z so that thick slices get realistic partial volume. See ``docs/phantoms.md`` for the model and its gaps.

Stages live in sibling modules: :mod:`.geometry` (helpers, image geometry), :mod:`.anatomy` (patient anatomy),
:mod:`.trees` (tube rasteriser, airway/vessel trees), :mod:`.lesion_shapes` and :mod:`.lesion_placement`
(lesions), :mod:`.render` (slice painting). This module holds the public API and the driver.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from ..types import (
    CLASS_NAMES,
    LUNG_LEFT,
    LUNG_RIGHT,
    SliceInfo,
    StudyVolume,
)
from .anatomy import _Anatomy, _central_structures, _Grids, _lung_slice
from .geometry import _Geom, _rng, _unit
from .lesion_placement import _LungPoints, _place_lesions
from .lesion_shapes import _LesionCanvas
from .render import HU_MAX, HU_MIN, _kernel_noise_norm, _paint_slice  # noqa: F401  (HU_MIN/HU_MAX re-exported)
from .trees import _offset_tree, _raster_tubes, _tree

# 1.1: kernel blur in mm (not pixels) and mediastinal tubes attached to the mediastinum (no lung islands round the
# SVC, hila in hilar fat); 1.0 phantoms trained the bundled weights (their fingerprints say so)
GENERATOR_VERSION = "pneumoct.synth 1.1"
DATA_SOURCE = "synthetic phantom (pneumoct.synth)"

#: slice spacings (mm) a drawn geometry picks from, with their weights (thin reconstructions are most common)
_SPACINGS = np.array([0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0])
_SPACING_P = np.array([0.06, 0.08, 0.18, 0.14, 0.10, 0.10, 0.08, 0.10, 0.16])
#: (lower, upper) of the chest length a scan covers, mm
_CHEST_LENGTH_MM = (255.0, 330.0)


# ----------------------------------------------------------------------------------------------------- public API
@dataclass
class PhantomConfig:
    """What to generate. ``None`` fields are drawn from ``seed`` (see ``Phantom.config`` for the resolved values).

    label: one of ``pneumoct.types.CLASS_NAMES``.
    matrix: in-plane pixels (square); real CT is 512.
    n_slices: slice count; None -> drawn so that the slices cover a chest (~255-330 mm), within [24, 500].
    slice_spacing_mm: None -> drawn from 0.625-5 mm (or chest length / n_slices when n_slices is given).
    pixel_spacing_mm: None -> a field of view of 320-420 mm over ``matrix`` pixels.
    difficulty: 0..1; 1 = smaller, fewer lesions whose density is closer to aerated lung.
    noise_hu: standard deviation of the (kernel-correlated) image noise in HU.
    pad_hu: value outside the reconstruction circle; None -> drawn, -2048 (70 %) or -3024 (30 %). A value of
        -1024 or more makes the DICOM series store unsigned pixels.
    """

    label: str
    seed: int = 0
    matrix: int = 256
    n_slices: int | None = None
    slice_spacing_mm: float | None = None
    pixel_spacing_mm: float | None = None
    difficulty: float = 0.0
    noise_hu: float = 15.0
    pad_hu: int | None = None

    def __post_init__(self) -> None:
        if self.label not in CLASS_NAMES:
            raise ValueError(f"label must be one of {CLASS_NAMES}, got {self.label!r}")
        if int(self.matrix) < 32:
            raise ValueError("matrix must be at least 32")
        if self.n_slices is not None and int(self.n_slices) < 1:
            raise ValueError("n_slices must be positive")
        for name in ("slice_spacing_mm", "pixel_spacing_mm"):
            v = getattr(self, name)
            if v is not None and not (float(v) > 0):
                raise ValueError(f"{name} must be positive")
        if not 0.0 <= float(self.difficulty) <= 1.0:
            raise ValueError("difficulty must be in [0, 1]")
        if float(self.noise_hu) < 0:
            raise ValueError("noise_hu must be >= 0")
        if self.pad_hu is not None and not -3024 <= int(self.pad_hu) <= -1000:
            raise ValueError("pad_hu must be within [-3024, -1000]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Phantom:
    """A generated case. Arrays are canonical (Z, Y, X), same shape as ``study.hu``."""

    study: StudyVolume
    lung_mask: np.ndarray  # uint8: 0 background, 1 right lung (image left), 2 left lung
    lesion_mask: np.ndarray  # uint8: 0 none, 1 ground-glass, 2 consolidation; always inside the lung mask
    label: str
    slice_lesion_labels: np.ndarray  # bool (Z,)
    lesion_volume_ratio: float
    lesions: list[dict]
    config: PhantomConfig  # resolved: every drawn geometry field filled in
    #: landmarks (slice indices, mm) and drawn patient parameters, for reports and tests
    anatomy: dict[str, Any] = field(default_factory=dict)

    @property
    def lung_volume_ml(self) -> float:
        return float((self.lung_mask > 0).sum()) * self.study.voxel_volume_ml


# ------------------------------------------------------------------------------------------------------ geometry
def _resolve_geometry(cfg: PhantomConfig) -> tuple[_Geom, dict[str, Any]]:
    g = _rng(cfg.seed, 1)
    chest_len = g.uniform(*_CHEST_LENGTH_MM)
    dz_draw = float(g.choice(_SPACINGS, p=_SPACING_P / _SPACING_P.sum()))
    fov_draw = g.uniform(320.0, 420.0)
    pad_draw = int(g.choice([-2048, -3024], p=[0.7, 0.3]))
    z_origin = round(g.uniform(-260.0, 60.0), 1)
    off_x, off_y = g.uniform(-6, 6), g.uniform(-28, 2)
    rot = math.radians(g.uniform(-4.0, 4.0))
    partial_pos = g.uniform(0.45, 0.6)

    M = int(cfg.matrix)
    if cfg.n_slices is not None and cfg.slice_spacing_mm is not None:
        n, dz = int(cfg.n_slices), float(cfg.slice_spacing_mm)
    elif cfg.n_slices is not None:
        n = int(cfg.n_slices)
        dz = round(chest_len / n, 3)
    elif cfg.slice_spacing_mm is not None:
        dz = float(cfg.slice_spacing_mm)
        n = int(np.clip(round(chest_len / dz), 24, 500))
    else:
        dz = dz_draw
        n = int(np.clip(round(chest_len / dz), 24, 500))
    if cfg.pixel_spacing_mm is not None:
        ps = float(cfg.pixel_spacing_mm)
    else:
        ps = round(fov_draw / M, 4)
    fov = ps * M
    if fov < 200.0:
        raise ValueError(f"field of view {fov:.0f} mm (matrix x pixel spacing) is too small for a chest; "
                         "use at least 200 mm")
    pad = int(cfg.pad_hu) if cfg.pad_hu is not None else pad_draw
    coverage = n * dz
    if coverage >= 0.85 * chest_len:
        chest_len = min(coverage, 340.0)
        zz0 = -(coverage - chest_len) / 2.0 + dz / 2.0
    else:  # a partial scan: a slab of the chest around the lower-middle lung
        zz0 = float(np.clip(partial_pos * chest_len - coverage / 2.0, 0.0, chest_len - coverage)) + dz / 2.0
    c = (M - 1) / 2.0
    origin = (round(-c * ps + g.uniform(-3, 3), 3), round(-c * ps + g.uniform(-3, 3) + 10.0, 3), z_origin)
    geom = _Geom(M=M, n=n, ps=ps, dz=dz, fov=fov, zz0=zz0, origin=origin, pad=pad, tx=off_x, ty=off_y,
                 cos=math.cos(rot), sin=math.sin(rot))
    return geom, {"chest_length_mm": chest_len, "rotation_deg": round(math.degrees(rot), 2)}


# ------------------------------------------------------------------------------------------------------ driver
def generate_phantom(cfg: PhantomConfig) -> Phantom:
    """Generate one phantom. Same config -> identical arrays. The anatomy and noise depend on ``seed`` only
    (not on the label), so phantoms that share a seed differ only by their lesions."""
    geom, ginfo = _resolve_geometry(cfg)
    label_idx = CLASS_NAMES.index(cfg.label)
    an = _Anatomy(_rng(cfg.seed, 2), geom, ginfo["chest_length_mm"])
    rng_tree = _rng(cfg.seed, 3)
    rng_noise = _rng(cfg.seed, 4)
    rng_les = _rng(cfg.seed, 5, label_idx)
    shape = (geom.n, geom.M, geom.M)
    gr = _Grids(geom)

    # 1) mediastinal tubes and central airways
    cen = _central_structures(an, geom, _rng(cfg.seed, 6))
    medtube = np.zeros(shape, np.uint8)
    wall = cen["airway_wall"]
    _raster_tubes(medtube, cen["tubes"], geom)
    _raster_tubes(medtube, [(p0, p1, r0 + wall(r0), r1 + wall(r1)) for p0, p1, r0, r1 in cen["airway_central"]], geom)
    air_outer = np.zeros(shape, np.uint8)
    air_lumen = np.zeros(shape, np.uint8)
    _raster_tubes(air_outer, [(p0, p1, r0 + wall(r0), r1 + wall(r1)) for p0, p1, r0, r1 in cen["airway_central"]],
                  geom)
    _raster_tubes(air_lumen, cen["airway_central"], geom)

    # 2) lungs, slice by slice
    lung_soft = np.zeros(shape, np.uint8)
    lung = np.zeros(shape, np.uint8)
    right = gr.X < 1.0
    for i in range(geom.n):
        f = _lung_slice(an, gr, geom, float(geom.zz(i)), medtube[i])
        lung_soft[i] = np.rint(f * 255.0).astype(np.uint8)
        hard = f >= 0.5
        lung[i][hard & right] = LUNG_RIGHT
        lung[i][hard & ~right] = LUNG_LEFT
    lung_ml = float((lung > 0).sum()) * geom.dz * geom.ps * geom.ps / 1000.0

    # 3) airway and vessel trees inside each lung
    lp = _LungPoints(lung, geom, an)
    r_air_min = max(1.1, 0.45 * geom.ps)
    r_ves_min = max(0.5, 0.3 * geom.ps)
    vessel = np.zeros(shape, np.uint8)
    airway_segs: dict[int, list[dict]] = {}
    artery_leaves: dict[int, np.ndarray] = {}
    n_segments = 0
    for side in (LUNG_RIGHT, LUNG_LEFT):
        pts = lp.p[lp.of(side)]
        root, direction, r0 = cen["bronchus_root"][side]
        tree = _tree(rng_tree, root, direction, pts, r0, r_min=r_ves_min, g0=2, g_max=16)
        air = [sg for sg in tree if sg["r"] >= r_air_min and sg["gen"] <= 8]
        airway_segs[side] = tree  # full tree (children index into it); airways are its segments with r >= r_air_min
        _raster_tubes(air_outer, [(sg["p0"], sg["p1"], sg["r"] + wall(sg["r"]), sg["r"] + wall(sg["r"])) for sg in air],
                      geom)
        _raster_tubes(air_lumen, [(sg["p0"], sg["p1"], sg["r"], sg["r"]) for sg in air], geom)
        art_root_off = cen["art_root"][side] - root
        arteries = _offset_tree(tree, art_root_off, 0.8, lambda sg: 0.95 * sg["r"])
        _raster_tubes(vessel, arteries, geom)
        artery_leaves[side] = np.array([a[1] for a, sg in zip(arteries, tree) if not sg["children"]]).reshape(-1, 3)
        vroot = cen["vein_root"][side]
        veins = _tree(rng_tree, vroot, _unit(vroot - cen["carina"]), pts, 5.5 * an.s, r_min=r_ves_min, g0=2,
                      g_max=16, frac=0.5, split="minor")
        _raster_tubes(vessel, [(sg["p0"], sg["p1"], sg["r"], sg["r"]) for sg in veins], geom)
        n_segments += len(tree) + len(veins)

    # 4) lesions
    canvas = _LesionCanvas(shape, lung, geom)
    lesions, extra = _place_lesions(cfg.label, rng_les, canvas, lp, an, geom,
                                    {"airway_segs": airway_segs, "artery_leaves": artery_leaves,
                                     "r_air_min": r_air_min}, cfg.difficulty)
    if extra:
        _raster_tubes(air_outer, [(p0, p1, r0 + 0.3, r1 + 0.3) for p0, p1, r0, r1 in extra], geom, weight=0.6)
        _raster_tubes(air_lumen, extra, geom)
    lesion_mask = canvas.label
    lesion_mask[lung == 0] = 0

    # confounders that are not lesions: calcified granulomas (anatomy stream, so shared across labels)
    rng_conf = _rng(cfg.seed, 7)
    granulomas = []
    for _ in range(int(rng_conf.integers(0, 3)) if rng_conf.random() < 0.35 else 0):
        j = int(rng_conf.integers(len(lp.p))) if len(lp.p) else None
        if j is None or lp.depth[j] < 6.0:
            continue
        zg, xg, yg = lp.p[j]
        granulomas.append((float(zg), float(xg), float(yg), float(rng_conf.uniform(1.5, 3.0)),
                           float(rng_conf.uniform(300.0, 800.0))))

    # 5) paint the image slice by slice
    has_les = bool(canvas.alpha.any())
    vols = {"medtube": medtube, "lung_soft": lung_soft, "lung": lung, "vessel": vessel, "air_outer": air_outer,
            "air_lumen": air_lumen, "les_alpha": canvas.alpha if has_les else None,
            "les_target": canvas.target if has_les else None}
    kn = _kernel_noise_norm(an.blur_px)
    hu = np.empty(shape, np.int16)
    for i in range(geom.n):
        img = _paint_slice(i, an, gr, geom, vols, rng_noise, float(cfg.noise_hu), kn, granulomas)
        hu[i] = np.rint(img).astype(np.int16)
    del vols, medtube, lung_soft, vessel, air_outer, air_lumen, canvas

    # 6) study volume + truth
    resolved = dataclasses.replace(cfg, n_slices=geom.n, slice_spacing_mm=geom.dz, pixel_spacing_mm=geom.ps,
                                   pad_hu=geom.pad)
    uid_base = [GENERATOR_VERSION, str(cfg.seed), cfg.label, repr(sorted(resolved.to_dict().items()))]
    study_uid = generate_uid(entropy_srcs=uid_base + ["study"])
    series_uid = generate_uid(entropy_srcs=uid_base + ["series"])
    for_uid = generate_uid(entropy_srcs=uid_base + ["frame-of-reference"])
    ox, oy, oz = geom.origin
    slices = [SliceInfo(index=i, position_mm=round(oz - i * geom.dz, 4),
                        sop_instance_uid=generate_uid(entropy_srcs=uid_base + ["sop", str(i)])) for i in range(geom.n)]
    study = StudyVolume(
        hu=hu, spacing=(geom.dz, geom.ps, geom.ps), origin=(ox, oy, oz), direction=np.diag([1.0, 1.0, -1.0]),
        slices=slices, source_format="synthetic",
        metadata={"modality": "CT", "manufacturer": "pneumoct-synth", "synthetic": True,
                  "study_instance_uid": study_uid, "series_instance_uid": series_uid,
                  "frame_of_reference_uid": for_uid, "generator": GENERATOR_VERSION, "pad_hu": geom.pad,
                  "convolution_kernel": "SYNTH-SOFT", "slice_thickness_mm": geom.dz},
    )
    lung_vox = int((lung > 0).sum())
    les_vox = int((lesion_mask > 0).sum())
    slice_idx = lambda z: int(round((z - geom.zz0) / geom.dz))  # noqa: E731
    anatomy = {
        "lung_volume_ml": round(lung_ml, 1),
        "patient_scale": round(an.s, 3),
        "rotation_deg": ginfo["rotation_deg"],
        "slice_of": {"lung_apex": slice_idx(an.zz_apex), "carina": slice_idx(an.zz_carina),
                     "right_dome": slice_idx(an.zz_domeR), "left_dome": slice_idx(an.zz_domeL),
                     "costophrenic_recess": slice_idx(an.zz_rec)},
        "lung_base_hu": round(an.lung_base, 1),
        "n_tree_segments": n_segments,
        "n_granulomas": len(granulomas),
        "blur_px": round(an.blur_px, 3),
    }
    return Phantom(
        study=study, lung_mask=lung, lesion_mask=lesion_mask, label=cfg.label,
        slice_lesion_labels=(lesion_mask > 0).any(axis=(1, 2)),
        lesion_volume_ratio=float(les_vox / lung_vox) if lung_vox else 0.0,
        lesions=lesions, config=resolved, anatomy=anatomy,
    )
