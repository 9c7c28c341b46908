"""Which rows a trainer sees: the M3Lung-Sys slice rule, patient-level splits, class-balanced sampling.

Splits are always made at the patient level (``patient_id``): slices of one patient are strongly correlated,
so a slice-level split would leak. Note that ``covid19-ct-seg-png`` lost its patient mapping (its ids are
best-effort blocks), so splits involving that set remain optimistic.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .table import SliceTable

__all__ = ["m3lung_slice_rule", "patient_split", "patient_kfold", "class_balanced_sampler"]


def m3lung_slice_rule(table: SliceTable) -> SliceTable:
    """The M3Lung-Sys slice-annotation rule, for slice-level training only.

    M3Lung-Sys (Sec. III, data annotation): "(2) If a slice is determined to have any lesion, label it with the
    corresponding CT volume's category; (3) Except for healthy cases, all slices from other cases considered as
    normal are discarded; (4) All slices from healthy people are annotated as Healthy. Note that we evaluate our
    model with the whole CT volume ... the discarded slices are only removed [for training]."

    So: healthy patients' slices → class 0 (kept, whatever their lesion label); diseased patients' slices with
    ``lesion_label == 0`` → dropped; ``lesion_label == 1`` → the patient's class; ``lesion_label == -1``
    (unknown) → kept with the patient's class.
    """
    healthy = table.patient_label == 0
    keep = healthy | (table.lesion_label != 0)
    out = table.subset(np.flatnonzero(keep))
    out.class_label = np.where(out.patient_label == 0, 0, out.patient_label).astype(np.int64)
    return out


def _patients(patient_ids: Sequence[str], patient_labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique patients, their label (must be one per patient) and the row → patient index."""
    pids = np.asarray(patient_ids).astype(str)
    labs = np.asarray(patient_labels).astype(np.int64)
    if len(pids) != len(labs):
        raise ValueError("patient_ids and patient_labels differ in length")
    uniq, inv = np.unique(pids, return_inverse=True)
    plab = np.full(len(uniq), -1, np.int64)
    for p in range(len(uniq)):
        vals = np.unique(labs[inv == p])
        if len(vals) != 1:
            raise ValueError(f"patient {uniq[p]!r} has several patient labels {vals.tolist()}")
        plab[p] = vals[0]
    return uniq, plab, inv


def patient_split(patient_ids: Sequence[str], patient_labels: Sequence[int], val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train_idx, val_idx)``: patients split per class (stratified), ``round(val_fraction * n)``
    of each class's patients to validation, at least one when the class has ≥ 2 patients, never all of them."""
    uniq, plab, inv = _patients(patient_ids, patient_labels)
    rng = np.random.default_rng(seed)
    val_p = np.zeros(len(uniq), bool)
    for c in np.unique(plab):
        members = np.flatnonzero(plab == c)
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_val = int(round(float(val_fraction) * n))
        if n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        else:
            n_val = 0
        val_p[members[:n_val]] = True
    val_rows = val_p[inv]
    train_idx, val_idx = np.flatnonzero(~val_rows), np.flatnonzero(val_rows)
    pids = np.asarray(patient_ids).astype(str)
    assert not set(pids[train_idx]) & set(pids[val_idx]), "a patient landed on both sides of the split"
    return train_idx, val_idx


def patient_kfold(patient_ids: Sequence[str], patient_labels: Sequence[int], k: int = 5,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold: each class's patients (shuffled) dealt round-robin over the folds, continuing
    where the previous class stopped so fold sizes stay even. Every patient is in exactly one val fold."""
    if k < 2:
        raise ValueError("k must be at least 2")
    uniq, plab, inv = _patients(patient_ids, patient_labels)
    if len(uniq) < k:
        raise ValueError(f"{len(uniq)} patients cannot fill {k} folds")
    rng = np.random.default_rng(seed)
    fold_of = np.full(len(uniq), -1, np.int64)
    start = 0
    for c in np.unique(plab):
        members = np.flatnonzero(plab == c)
        members = members[rng.permutation(len(members))]
        for j, m in enumerate(members):
            fold_of[m] = (start + j) % k
        start = (start + len(members)) % k
    folds = []
    pids = np.asarray(patient_ids).astype(str)
    for f in range(k):
        val_rows = fold_of[inv] == f
        tr, va = np.flatnonzero(~val_rows), np.flatnonzero(val_rows)
        assert not set(pids[tr]) & set(pids[va])
        folds.append((tr, va))
    return folds


def class_balanced_sampler(labels: Sequence[int], num_samples: int | None = None, seed: int = 0):
    """A ``WeightedRandomSampler`` (with replacement) drawing each class equally often: weight = 1 / class count.
    Rows with a negative label get weight 0. ``num_samples`` defaults to the number of rows."""
    import torch
    from torch.utils.data import WeightedRandomSampler

    labs = np.asarray(labels).astype(np.int64)
    valid = labs >= 0
    if not valid.any():
        raise ValueError("no labelled rows to sample")
    counts = np.bincount(labs[valid])
    w = np.zeros(len(labs), np.float64)
    w[valid] = 1.0 / counts[labs[valid]]
    g = torch.Generator()
    g.manual_seed(int(seed))
    return WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), int(num_samples or len(labs)),
                                 replacement=True, generator=g)
