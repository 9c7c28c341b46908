"""Which rows a trainer sees: the M3Lung-Sys slice rule, patient-level splits, class-balanced sampling.

Splits are always made at the patient level (``patient_id``): slices of one patient are strongly correlated,
so a slice-level split would leak. Note that ``covid19-ct-seg-png`` lost its patient mapping (its ids are
best-effort blocks), so splits involving that set remain optimistic.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .table import SliceTable

__all__ = ["m3lung_slice_rule", "patient_split", "patient_kfold", "class_balanced_sampler", "uniform_order",
           "size_balanced_groups", "size_balanced_weights", "size_balanced_order", "SIZE_GROUPS"]


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


# ----------------------------------------------------------------------------- dual-sampling (Sec. III-C) samplers
#: the four groups of the dual-sampling paper's size-balanced sampling, in the order of its weight vector
SIZE_GROUPS = ("covid_small", "covid_large", "cap_small", "cap_large")
COVID_SMALL_BELOW, CAP_LARGE_ABOVE = 0.030, 0.001


def uniform_order(n: int, seed: int) -> np.ndarray:
    """Uniform sampling (Sec. III-C): every training case once per epoch, in a seeded random order."""
    return np.random.default_rng(seed).permutation(int(n))


def size_balanced_groups(is_covid: Sequence[bool], ratio: Sequence[float]) -> np.ndarray:
    """Group index (0..3, :data:`SIZE_GROUPS`) per case: COVID-19 small (ratio < 0.030) / large, CAP small /
    large (ratio > 0.001), ratio = infection volume / lung volume."""
    c = np.asarray(is_covid, bool)
    r = np.asarray(ratio, float)
    return np.where(c, np.where(r < COVID_SMALL_BELOW, 0, 1), np.where(r > CAP_LARGE_ABOVE, 3, 2)).astype(np.int64)


def size_balanced_weights(groups: Sequence[int]) -> np.ndarray:
    """Sec. III-C group weights [N_large^covid / N_small^covid, 1, 1, N_small^cap / N_large^cap]. Returns the 4
    weights (not normalised).

    The formula assumes all four groups are populated. An empty group gets weight 0 (never drawn), and when a
    class has only one populated group that group gets weight 1 (there is nothing to balance it against; the
    ratio would be 0 or undefined and would drop the whole class, e.g. a cohort without small-infection CAP)."""
    n = np.bincount(np.asarray(groups, np.int64), minlength=4).astype(float)
    w = np.array([n[1] / n[0] if n[0] and n[1] else 1.0, 1.0, 1.0, n[2] / n[3] if n[2] and n[3] else 1.0])
    w[n == 0] = 0.0
    return w


def size_balanced_order(groups: Sequence[int], n_draws: int, seed: int) -> np.ndarray:
    """Size-balanced sampling (Sec. III-C): each draw picks a group with probability W_g / W_sum, then a case of
    that group uniformly (with replacement). Returns ``n_draws`` case indices."""
    g = np.asarray(groups, np.int64)
    w = size_balanced_weights(g)
    if w.sum() <= 0:
        raise ValueError("size-balanced sampling needs at least one non-empty group")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(g == k) for k in range(4)]
    picks = rng.choice(4, size=int(n_draws), p=w / w.sum())
    return np.array([members[k][rng.integers(len(members[k]))] for k in picks], np.int64)
