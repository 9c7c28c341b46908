"""The non-learned comparator for the lesion-presence model: the HU threshold baseline's per-slice lesion area as a
slice score, against the COVID-CT-MD radiologist slice labels (same slices as the LOSO evaluation: those with
enough lung for a crop). Real data, 3 studies. Writes experiments/results/threshold_slice_baseline.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CTMD = ROOT.parent / "shared/data/covid-ct-md"
STUDIES = {"covid": ("covid-P001", 0), "cap": ("cap-cap001", 55), "normal": ("normal-normal001", None)}


def main() -> int:
    from pneumoct.evaluate.classification import roc_auc
    from pneumoct.io import read_study
    from pneumoct.preprocess.lung_mask import segment_lungs
    from pneumoct.preprocess.slice_input import crop_volume_slices
    from pneumoct.quantify import find_lesions_threshold, per_slice_lesion_area_mm2

    labels = np.load(CTMD / "Slice-level-labels-updated-1.npy")
    ys, ss, per = [], [], {}
    for key, (folder, row) in STUDIES.items():
        study = read_study(CTMD / "dicom" / folder)
        lung = segment_lungs(study).labels
        area = per_slice_lesion_area_mm2(find_lesions_threshold(study.hu, lung, study.spacing).mask, study.spacing)
        z, _ = crop_volume_slices(study.hu, lung > 0, 8)
        y = np.zeros(study.shape[0], int) if row is None else labels[row, : study.shape[0]].astype(int)
        ys.append(y[z])
        ss.append(area[z])
        per[f"covid-ct-md/{key}"] = {"n_slices": int(len(z)), "auc": roc_auc(y[z], area[z]) if 0 < y[z].sum() < len(z) else None,
                                     "slices_with_area_gt_0": int((area[z] > 0).sum()),
                                     "slice_index": z.tolist(), "lesion_area_mm2": [round(float(a), 2) for a in area[z]],
                                     "label": y[z].tolist()}
        print(key, {k: v for k, v in per[f"covid-ct-md/{key}"].items() if not isinstance(v, list)}, flush=True)
    res = {"data": "REAL: COVID-CT-MD 3 studies, radiologist slice labels", "score": "threshold-baseline lesion area per slice",
           "per_study": per, "pooled_auc": roc_auc(np.concatenate(ys), np.concatenate(ss))}
    out = ROOT / "experiments/results/threshold_slice_baseline.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print("pooled AUC", res["pooled_auc"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
