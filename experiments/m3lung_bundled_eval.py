"""Evaluate the shipped M3Lung-Sys pair (src/pneumoct/weights/m3lung_slice + m3lung_patient) on the held-out
synthetic cohort data/phantoms/test (24 phantoms, seeds disjoint from the training cohort).

Slice level: slices kept by the M3Lung-Sys rule (lesion slices of diseased phantoms, all slices of healthy ones),
4 classes, multi-window inference. Patient level: the patient network on the slice features, compared (paired
bootstrap, M3Lung-Sys footnote 3) with the mean of the slice probabilities; group-wise by lesion volume ratio.
Synthetic data: these figures are not clinical accuracy.

Writes experiments/results/m3lung_bundled/{slice,patient,patient_mean}/metrics.{json,txt}, roc.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    import torch

    from pneumoct.evaluate.run import Predictions, evaluate_predictions, write_predictions_csv
    from pneumoct.learned import load_bundled_models
    from pneumoct.train.data import build_tables
    from pneumoct.train.patient import extract_patient_features, pad_batch
    from pneumoct.train.predict import predict_table
    from pneumoct.train.sampling import m3lung_slice_rule
    from pneumoct.types import CLASS_NAMES

    torch.set_num_threads(2)
    cohort = ROOT / "data/phantoms/test"
    models = load_bundled_models()
    m3, pat = models["m3lung_slice"], models["m3lung_patient"]
    size, ch = int(m3.meta["input_size"]), int(m3.meta["channels"])
    centers = m3.meta.get("window_centers") or [-700.0, -600.0, -500.0]
    table = build_tables([{"kind": "phantom_cohort", "path": str(cohort)}], size, cache_dir=str(ROOT / "data/cache"))
    out = ROOT / "experiments/results/m3lung_bundled"
    note = f"synthetic phantoms {cohort.relative_to(ROOT)} ({len(np.unique(table.patient_id))} cases, held out)"
    results = {}

    st = m3lung_slice_rule(table)
    pr = predict_table(m3.model, "m3lung_slice", st, window_centers=centers, channels=ch, num_classes=4)
    ids = [f"{p}#{i}" for p, i in zip(st.patient_id, st.slice_index)]
    sl = Predictions(ids, st.class_label, pr["probs"], CLASS_NAMES)
    (out / "slice").mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / "slice" / "predictions.csv", sl)
    results["slice"] = evaluate_predictions(sl, out / "slice", data_note=note + ", slice level (M3Lung rule)")

    feats, pids = extract_patient_features(m3.model, table, channels=ch, window_centers=centers)
    x, mask = pad_batch(feats)
    with torch.inference_mode():
        probs = torch.softmax(pat.model(x, mask)["logits"], 1).numpy()
    man = {f"phantom/{r['case_id']}": r for r in json.loads((cohort / "manifest.json").read_text())}
    y = np.array([CLASS_NAMES.index(man[p]["label"]) for p in pids])
    lvr = [float(man[p]["lesion_volume_ratio"]) for p in pids]
    pp = Predictions(list(pids), y, probs, CLASS_NAMES, lvr)
    # the simple baseline: mean of each patient's slice class probabilities (all slices with lung)
    allp = predict_table(m3.model, "m3lung_slice", table, window_centers=centers, channels=ch, num_classes=4)["probs"]
    mean = np.stack([allp[table.patient_id == p].mean(0) for p in pids])
    pm = Predictions(list(pids), y, mean, CLASS_NAMES, lvr)
    for name, pred in (("patient", pp), ("patient_mean", pm)):
        (out / name).mkdir(parents=True, exist_ok=True)
        write_predictions_csv(out / name / "predictions.csv", pred)
    results["patient_mean"] = evaluate_predictions(pm, out / "patient_mean", data_note=note + ", mean of slice probabilities")
    results["patient"] = evaluate_predictions(pp, out / "patient", compare=pm,
                                              data_note=note + ", M3Lung-Sys patient network (vs mean of slices)")
    for k, r in results.items():
        rep = r["report"]
        print(k, "acc", round(rep["accuracy"], 3), "macro_auc", r["bootstrap_95ci"]["macro_auc"]["estimate"])
    print("p-value patient net vs mean:", results["patient"]["comparison"]["p_values"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
