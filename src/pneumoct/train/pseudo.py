"""Pseudo-labelled real slices: lesion masks on the radiologist-positive slices of the COVID-CT-MD studies (HU).

Why: the real DICOM studies are the product's input (Hounsfield units) but have no voxel masks, only slice labels
and lobe labels. In the spirit of Semi-Inf-Net (pseudo-labels from a model's confident output, then retraining),
a positive slice becomes a training row when two independent finders agree and the radiologists' labels allow it:

* **threshold baseline** (:func:`pneumoct.quantify.threshold_baseline.find_lesions_threshold` on
  :func:`~pneumoct.preprocess.lung_mask.segment_lungs`: the same calls ``diagnose`` makes) gives the voxels;
* **agreement**: the row is kept only if a learned segmenter that never saw these studies (``agree_with``, a model
  folder; default the v1 segmenter trained on the 2D sets and phantoms) also marks lesion overlapping the threshold
  mask in that slice (slice-level agreement: on HU the network's masks are too scant for voxel agreement);
* **lobe labels** (``Lobe-level-labels-updated-1.npy``: LLL, LUL, RLL, RML, RUL per slice): a lung whose lobes are
  all negative in that slice must be empty, so threshold voxels there are set to background (weak negative
  supervision of the side); a slice whose lobe labels are all zero (not filled in) keeps both sides.

Radiologist-negative slices are not used here (the hybrid table holds them as weak negatives). Rows: source
``covid-ct-md-pseudo``, patient id ``covid-ct-md/<study>`` (one split side, as the hybrid rows).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..types import LUNG_LEFT, LUNG_RIGHT

__all__ = ["table_from_ctmd_pseudo", "pseudo_masks_for_study", "LOBES_LEFT", "LOBES_RIGHT"]

log = logging.getLogger("pneumoct.train")

LOBES_LEFT = (0, 1)  # LLL, LUL (data README)
LOBES_RIGHT = (2, 3, 4)  # RLL, RML, RUL
DEFAULT_AGREE = Path(__file__).resolve().parents[3] / "experiments" / "init" / "lesion_seg_v1"


def pseudo_masks_for_study(thr_mask: np.ndarray, lung_labels: np.ndarray, slice_labels: np.ndarray,
                           lobe_labels: np.ndarray | None, net_mask: np.ndarray | None,
                           min_pixels: int = 20) -> dict[int, np.ndarray]:
    """{slice index: pseudo mask (uint8 labels)} for the radiologist-positive slices that pass the rules above.

    thr_mask, lung_labels, net_mask: (Z, Y, X) on the study grid; slice_labels: (Z,) 0/1; lobe_labels: (Z, 5) 0/1
    or None (no lobe labels: both sides kept)."""
    out: dict[int, np.ndarray] = {}
    for z in np.flatnonzero(np.asarray(slice_labels) > 0):
        m = np.where(lung_labels[z] > 0, thr_mask[z], 0).astype(np.uint8)
        if lobe_labels is not None and np.asarray(lobe_labels[z]).any():
            if not np.asarray(lobe_labels[z])[list(LOBES_LEFT)].any():
                m[lung_labels[z] == LUNG_LEFT] = 0
            if not np.asarray(lobe_labels[z])[list(LOBES_RIGHT)].any():
                m[lung_labels[z] == LUNG_RIGHT] = 0
        if int((m > 0).sum()) < int(min_pixels):
            continue
        if net_mask is not None and not ((net_mask[z] > 0) & (m > 0)).any():
            continue
        out[int(z)] = m
    return out


def table_from_ctmd_pseudo(root: str | Path | None = None, size: int = 128, *,
                           studies: Sequence[str] = ("covid", "cap"), agree_with: str | Path | None = None,
                           min_pixels: int = 20):
    """Rows (image in HU, pseudo mask) from the positive slices of the labelled studies in ``studies``."""
    from ..io import read_study
    from ..preprocess.lung_mask import segment_lungs
    from ..preprocess.slice_input import crop_slice
    from ..quantify.threshold_baseline import find_lesions_threshold
    from ..segmentation import load_segmenter, lung_margin_px, segment_volume
    from .ctmd import _CTMD_STUDIES, COVID_CT_MD_ROOT, _ctmd_label_rows
    from .table import _table, class_index

    root = Path(root or COVID_CT_MD_ROOT)
    slice_all = np.load(root / "Slice-level-labels-updated-1.npy")
    lobe_path = root / "Lobe-level-labels-updated-1.npy"
    lobe_all = np.load(lobe_path) if lobe_path.is_file() else None
    rows = _ctmd_label_rows(root)
    agree = Path(agree_with) if agree_with else DEFAULT_AGREE
    images, masks, pids, plabs, zs = [], [], [], [], []
    for key in studies:
        folder, cls, folder_id = _CTMD_STUDIES[key]
        if folder_id is None:
            continue  # no positive slice
        study = read_study(root / "dicom" / folder)
        nz = study.shape[0]
        sl = slice_all[rows[folder_id], :nz].astype(np.int64)
        lobes = None if lobe_all is None else lobe_all[rows[folder_id], :nz, :].astype(np.int64)
        lungs = segment_lungs(study).labels
        thr = find_lesions_threshold(study.hu, lungs, study.spacing).mask  # as diagnose calls it
        net = None
        seg = load_segmenter(agree) if (agree / "model.json").is_file() else None
        if seg is not None:  # as `pneumoct segment` runs it (its lung limit)
            net = segment_volume(study.hu, lungs, seg, lung_margin_px=lung_margin_px(study.spacing)).mask
        else:
            log.warning("pseudo-labels: no agreement model at %s; threshold voxels used alone", agree)
        pm = pseudo_masks_for_study(thr, lungs, sl, lobes, net, min_pixels)
        lung = lungs > 0
        for z, m in sorted(pm.items()):
            c = crop_slice(study.hu[z], lung[z], size, mask=m)
            if c is None or not c.mask.any():
                continue
            images.append(c.image), masks.append(c.mask)
            pids.append(f"covid-ct-md/{key}"), plabs.append(cls), zs.append(z)
        log.info("pseudo-labels: %s, %d of %d positive slices kept", key, len(pm), int(sl.sum()))
    return _table(images, is_hu=True, class_label=[class_index(p) for p in plabs],
                  lesion_label=[1] * len(images), masks=masks, patient_id=pids,
                  patient_label=[class_index(p) for p in plabs], slice_index=zs,
                  source=["covid-ct-md-pseudo"] * len(images), size=size)
