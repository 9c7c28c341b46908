"""``SliceTable``: the in-memory table of lung-cropped 2D slices every 2D trainer reads.

Built once from a manifest or a dataset folder (see :mod:`pneumoct.train.data`), saved as ``.npz`` so a run
does not redo lung masks and crops. One row per slice; every crop went through
:func:`pneumoct.preprocess.slice_input.crop_slice`, the same path ``diagnose`` uses.

``patient_id`` values are anonymised case keys (``"<source>/<case>"``), never a DICOM PatientID or name.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

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
