"""``SliceTable``: the in-memory table of lung-cropped 2D slices every 2D trainer reads.

Built once from a manifest or a dataset folder (see :mod:`pneumoct.train.data`), saved as ``.npz`` so a run
does not redo lung masks and crops. One row per slice; every crop went through
:func:`pneumoct.preprocess.slice_input.crop_slice`, the same path ``diagnose`` uses.

``patient_id`` values are anonymised case keys (``"<source>/<case>"``), never a DICOM PatientID or name.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..types import CLASS_NAMES

__all__ = ["SliceTable"]


@dataclass
class SliceTable:
    """images: (N, S, S) float32, HU where ``is_hu`` else grey levels already windowed, in [0, 1].
    is_hu: (N,) bool. class_label: (N,) int64 slice class in ``CLASS_NAMES`` order (-1 = unknown).
    lesion_label: (N,) int64 1 = slice shows lesion, 0 = none, -1 = unknown.
    lesion_mask: (N, S, S) uint8 lesion labels (0 bg, 1 GGO, 2 consolidation, or 1 = any) where ``has_mask``.
    has_mask: (N,) bool. patient_id: (N,) str. patient_label: (N,) int64 the patient's class.
    slice_index: (N,) int64 the slice's index in its study (canonical order, superior first); -1 for 2D images.
    source: (N,) str dataset name (e.g. ``"covid19-ct-seg-png"``, ``"phantom"``) — says where every row came from.
    """

    images: np.ndarray
    is_hu: np.ndarray
    class_label: np.ndarray
    lesion_label: np.ndarray
    lesion_mask: np.ndarray
    has_mask: np.ndarray
    patient_id: np.ndarray
    patient_label: np.ndarray
    slice_index: np.ndarray
    source: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.images)
        for f in fields(self):
            v = getattr(self, f.name)
            if len(v) != n:
                raise ValueError(f"SliceTable.{f.name} has {len(v)} rows, images has {n}")

    def __len__(self) -> int:
        return int(len(self.images))

    @property
    def size(self) -> int:
        return int(self.images.shape[-1]) if len(self) else 0

    def subset(self, idx) -> "SliceTable":
        idx = np.asarray(idx)
        return SliceTable(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @staticmethod
    def concat(tables: list["SliceTable"]) -> "SliceTable":
        tables = [t for t in tables if len(t)]
        if not tables:
            raise ValueError("nothing to concatenate")
        sizes = {t.size for t in tables}
        if len(sizes) != 1:
            raise ValueError(f"tables have different crop sizes {sorted(sizes)}")
        return SliceTable(**{f.name: np.concatenate([getattr(t, f.name) for t in tables]) for f in fields(SliceTable)})

    @staticmethod
    def empty(size: int) -> "SliceTable":
        return SliceTable(
            images=np.zeros((0, size, size), np.float32), is_hu=np.zeros(0, bool),
            class_label=np.zeros(0, np.int64), lesion_label=np.zeros(0, np.int64),
            lesion_mask=np.zeros((0, size, size), np.uint8), has_mask=np.zeros(0, bool),
            patient_id=np.zeros(0, "<U64"), patient_label=np.zeros(0, np.int64),
            slice_index=np.zeros(0, np.int64), source=np.zeros(0, "<U32"),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``.npz`` atomically (write, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(tmp, **{f.name: getattr(self, f.name) for f in fields(self)})
        tmp.replace(path)
        return path

    @staticmethod
    def load(path: str | Path) -> "SliceTable":
        with np.load(Path(path), allow_pickle=False) as z:  # no pickle: plain arrays only
            return SliceTable(**{f.name: z[f.name] for f in fields(SliceTable)})

    def summary(self) -> dict:
        """Counts a model card can print: rows per source, per class, lesion/no-lesion, patients."""
        out: dict = {"slices": len(self), "patients": int(len(np.unique(self.patient_id)))}
        out["by_source"] = {str(s): int((self.source == s).sum()) for s in np.unique(self.source)}
        out["by_class_label"] = {int(c): int((self.class_label == c).sum()) for c in np.unique(self.class_label)}
        out["by_lesion_label"] = {int(c): int((self.lesion_label == c).sum()) for c in np.unique(self.lesion_label)}
        out["with_mask"] = int(self.has_mask.sum())
        return out


# -- building a table from rows (shared by every source in data.py and hybrid.py) ---------------------------------


def class_index(label: Any) -> int:
    """A class name (``CLASS_NAMES``, case-insensitive) or index → index. Raises ``ValueError`` otherwise."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(CLASS_NAMES):
            return int(label)
        raise ValueError(f"class index {label} out of range 0..{len(CLASS_NAMES) - 1}")
    s = str(label).strip().lower()
    if s.lstrip("-").isdigit():
        return class_index(int(s))
    aliases = {"normal": "healthy", "covid": "covid19", "covid-19": "covid19", "h1n1": "other_viral",
               "viral": "other_viral", "community-acquired pneumonia": "cap"}
    s = aliases.get(s, s)
    if s in CLASS_NAMES:
        return CLASS_NAMES.index(s)
    raise ValueError(f"unknown class {label!r}; choose from {', '.join(CLASS_NAMES)} or 0..{len(CLASS_NAMES) - 1}")


def _table(images: list[np.ndarray], *, is_hu: bool, class_label: Sequence[int], lesion_label: Sequence[int],
           masks: list[np.ndarray | None], patient_id: Sequence[str], patient_label: Sequence[int],
           slice_index: Sequence[int], source: Sequence[str], size: int) -> SliceTable:
    n = len(images)
    if n == 0:
        return SliceTable.empty(size)
    has_mask = np.array([m is not None for m in masks], bool)
    lm = np.zeros((n, size, size), np.uint8)
    for i, m in enumerate(masks):
        if m is not None:
            lm[i] = m
    return SliceTable(
        images=np.stack(images).astype(np.float32), is_hu=np.full(n, bool(is_hu)),
        class_label=np.asarray(class_label, np.int64), lesion_label=np.asarray(lesion_label, np.int64),
        lesion_mask=lm, has_mask=has_mask, patient_id=np.asarray(patient_id, "<U64"),
        patient_label=np.asarray(patient_label, np.int64), slice_index=np.asarray(slice_index, np.int64),
        source=np.asarray(source, "<U32"),
    )
