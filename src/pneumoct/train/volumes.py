"""Whole volumes for the 3D systems (DeepSC-COVID, dual-sampling attention): one record per study, whatever its
source, so a 3D training task takes a list of :class:`VolumeCase` and never cares where it came from.

Sources: synthetic phantoms generated in memory (voxel-level lesion truth), and — added by the 3D work — the real
covid-ct-md studies (patient label; radiologist slice/lobe labels and pseudo-masks as weak lesion supervision).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..types import CLASS_NAMES


@dataclass
class VolumeCase:
    """hu: (Z, Y, X) int16 HU, canonical; spacing (z, y, x) mm; lung: (Z, Y, X) uint8 0/1 right/2 left.

    lesion: (Z, Y, X) uint8 voxel truth (0 none, 1 GGO, 2 consolidation) or None when only weak labels exist;
    slice_labels: (Z,) bool lesion-bearing slices or None; label: one of ``CLASS_NAMES``; source: where it came
    from ("synthetic phantom seed 7", "real covid-ct-md covid-P001"), said in every result; group: the patient /
    study id used for patient-level splits."""

    case_id: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    lung: np.ndarray
    label: str
    source: str
    group: str
    lesion: np.ndarray | None = None
    slice_labels: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def infection_ratio(self) -> float | None:
        """Lesion volume / lung volume from the voxel truth (None without it)."""
        if self.lesion is None:
            return None
        lung = int(np.count_nonzero(self.lung))
        # (lesion > 0), not lesion & ...: consolidation is label 2, and 2 & True == 0
        return float(np.count_nonzero((self.lesion > 0) & (self.lung > 0))) / lung if lung else 0.0


def phantom_volume_cohort(n_per_class: int, seed: int = 0, *, labels: Sequence[str] = CLASS_NAMES,
                          matrix: int = 128, n_slices: int = 48, difficulty: float = 0.0) -> list[VolumeCase]:
    """``n_per_class`` synthetic phantoms per label, generated in memory (seeded: the same call gives the same
    cohort). Each phantom is its own group (one synthetic patient)."""
    from ..synth.phantom import PhantomConfig, generate_phantom
    from ..synth.writer import case_seed

    out = []
    k = 0
    for i in range(n_per_class):
        for label in labels:
            s = case_seed(seed, k)
            k += 1
            ph = generate_phantom(PhantomConfig(label=label, seed=s, matrix=matrix, n_slices=n_slices,
                                                difficulty=difficulty))
            out.append(VolumeCase(
                case_id=f"phantom_{label}_{s}", hu=ph.study.hu.astype(np.int16),
                spacing=tuple(float(v) for v in ph.study.spacing), lung=ph.lung_mask.astype(np.uint8),
                label=label, source=f"synthetic phantom (pneumoct.synth, seed {s})", group=f"phantom_{s}",
                lesion=ph.lesion_mask.astype(np.uint8), slice_labels=ph.slice_lesion_labels.astype(bool)))
    return out


def real_ctmd_volumes(studies: Sequence[str] = ("covid", "cap", "normal"), root: Any = None) -> list[VolumeCase]:
    """The real covid-ct-md DICOM studies (``pneumoct.train.ctmd``: keys covid / cap / normal) as volume cases:
    HU read by :func:`pneumoct.io.read_study`, lungs by :func:`pneumoct.preprocess.lung_mask.segment_lungs`, the
    patient label of the folder, and the radiologists' slice labels (column i of ``Slice-level-labels-updated-1.npy``
    = canonical slice i, superior first, established on this data in docs/data_notes.md; the normal study has no
    row: all slices negative; ``extra["lobe_labels"]``: (Z, 5) bool LLL, LUL, RLL, RML, RUL, or None without a row).
    No voxel lesion mask exists (``lesion`` None): a 3D task uses the slice labels as
    weak supervision. Case ids and groups are ``covid-ct-md/<key>`` (no patient identifier)."""
    from pathlib import Path

    from ..errors import PneumoctInputError
    from ..io import read_study
    from ..preprocess.lung_mask import segment_lungs
    from .ctmd import _CTMD_STUDIES, COVID_CT_MD_ROOT, _ctmd_label_rows

    root = Path(root) if root is not None else COVID_CT_MD_ROOT
    if not (root / "Slice-level-labels-updated-1.npy").is_file():
        raise PneumoctInputError("not_found", f"covid-ct-md not found under {root}")
    labels = np.load(root / "Slice-level-labels-updated-1.npy")
    lobe_path = root / "Lobe-level-labels-updated-1.npy"
    lobes = np.load(lobe_path) if lobe_path.is_file() else None
    rows = _ctmd_label_rows(root)
    out = []
    for key in studies:
        if key not in _CTMD_STUDIES:
            raise PneumoctInputError("bad_argument", f"unknown covid-ct-md study {key!r}; choose from "
                                     f"{', '.join(_CTMD_STUDIES)}")
        folder, cls, folder_id = _CTMD_STUDIES[key]
        study = read_study(root / "dicom" / folder)
        nz = study.shape[0]
        sl = np.zeros(nz, bool) if folder_id is None else labels[rows[folder_id], :nz] > 0
        lobe = None if folder_id is None or lobes is None else (lobes[rows[folder_id], :nz, :] > 0)
        out.append(VolumeCase(
            case_id=f"covid-ct-md/{key}", hu=study.hu.astype(np.int16),
            spacing=tuple(float(v) for v in study.spacing), lung=segment_lungs(study).labels.astype(np.uint8),
            label=cls, source=f"real covid-ct-md ({key} study)", group=f"covid-ct-md/{key}", lesion=None,
            slice_labels=sl, extra={"dataset": "covid-ct-md", "lobe_labels": lobe,
                                    "metadata": {  # scanner facts for the fingerprint, no identifiers
                k: study.metadata.get(k) for k in ("convolution_kernel", "manufacturer", "manufacturer_model_name",
                                                   "slice_thickness_mm") if study.metadata.get(k) is not None}}))
    return out


def dataset_of(case: VolumeCase) -> str:
    """The dataset a case comes from, as training provenance names it: ``phantom`` or e.g. ``covid-ct-md``."""
    return str(case.extra.get("dataset") or ("phantom" if case.source.startswith("synthetic") else case.source))
