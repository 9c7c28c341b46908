"""Per-slice lesion probability on the DICOM path = the learned lesion model fused with the threshold baseline.

On the three real COVID-CT-MD studies the classical per-slice lesion area (threshold baseline) ranks slices better
than the learned model does on a study it never saw (experiments/results/threshold_slice_baseline.json vs
lesion_presence_real.json). A logistic regression on [logit(p_model), log(1 + area_mm2)] combines both; it is
validated leave-one-study-out exactly like the model (fusion weights fitted on the two other studies, with the
fold's model), then refitted on all three studies with the shipped model and stored in its meta ("fusion").

Needs: runs/lesion_loso_{covid,cap,normal} and runs/lesion_presence_real (experiments/lesion_presence_real.py)
and experiments/results/threshold_slice_baseline.json. Writes experiments/results/lesion_fusion.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ("covid-ct-md/covid", "covid-ct-md/cap", "covid-ct-md/normal")


def features(p: np.ndarray, area: np.ndarray) -> np.ndarray:
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    return np.stack([z, np.log1p(np.maximum(area, 0.0))], 1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> np.ndarray:
    """Weights (w..., b) by Newton's method with a small ridge penalty (2 features + bias)."""
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)
    w = np.zeros(xa.shape[1])
    for _ in range(100):
        q = 1 / (1 + np.exp(-(xa @ w)))
        g = xa.T @ (q - y) + l2 * np.r_[w[:-1], 0]
        h = (xa * (q * (1 - q))[:, None]).T @ xa + l2 * np.diag(np.r_[np.ones(len(w) - 1), 0]) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(x @ w[:-1] + w[-1])))


def main() -> int:
    from pneumoct.evaluate.classification import roc_auc
    from pneumoct.train.checkpoint import load_checkpoint
    from pneumoct.train.config import load_config
    from pneumoct.train.data import build_tables
    from pneumoct.train.predict import predict_table

    cfg = load_config(ROOT / "configs/lesion_presence_real.yaml")
    table = build_tables(cfg.data.tables, size=cfg.data.size, cache_dir=str(ROOT / cfg.data.cache_dir))
    base = json.loads((ROOT / "experiments/results/threshold_slice_baseline.json").read_text())["per_study"]
    kw = dict(window_center=cfg.data.window_center, window_width=cfg.data.window_width, channels=1, num_classes=2)

    def study_rows(model, family, sid):
        sub = table.subset(np.flatnonzero((table.source == "covid-ct-md") & (table.patient_id == sid)))
        p = predict_table(model, family, sub, **kw)["probs"][:, 1]
        b = base[sid]
        area_by_z = dict(zip(b["slice_index"], b["lesion_area_mm2"]))
        area = np.array([area_by_z.get(int(z), 0.0) for z in sub.slice_index])
        return p, area, sub.lesion_label.astype(float)

    ys, fused, model_only, area_only, per = [], [], [], [], {}
    for held in STUDIES:
        model, info = load_checkpoint(ROOT / f"runs/lesion_loso_{held.split('/')[-1]}/best")
        fam = info["meta"]["family"]
        data = {sid: study_rows(model, fam, sid) for sid in STUDIES}
        xtr = np.concatenate([features(*data[s][:2]) for s in STUDIES if s != held])
        ytr = np.concatenate([data[s][2] for s in STUDIES if s != held])
        w = fit_logistic(xtr, ytr)
        p, area, y = data[held]
        f = predict(w, features(p, area))
        pos, neg = y == 1, y == 0
        per[held] = {"weights_logit_model_log_area_bias": w.tolist(),
                     "auc_fused": roc_auc(y, f) if pos.any() and neg.any() else None,
                     "auc_model": roc_auc(y, p) if pos.any() and neg.any() else None,
                     "auc_area": roc_auc(y, area) if pos.any() and neg.any() else None,
                     "sensitivity@0.5_fused": float((f[pos] >= 0.5).mean()) if pos.any() else None,
                     "specificity@0.5_fused": float((f[neg] < 0.5).mean()) if neg.any() else None}
        print(held, per[held], flush=True)
        ys.append(y), fused.append(f), model_only.append(p), area_only.append(area)
    y = np.concatenate(ys)
    # the shipped fusion: weights fitted on OUT-OF-FOLD model scores (each study scored by the model that never saw
    # it) + the area, so they say how much an unseen study's model score adds to the area (in-sample model scores
    # would make the model look far better than it is on a new scan)
    x_oof = features(np.concatenate(model_only), np.concatenate(area_only))
    w_oof = fit_logistic(x_oof, y)
    f_oof = predict(w_oof, x_oof)
    oof = {"w_logit_model": float(w_oof[0]), "w_log1p_area_mm2": float(w_oof[1]), "bias": float(w_oof[2]),
           "fitted_on": "COVID-CT-MD, 3 studies, out-of-fold lesion-model scores + threshold area",
           "pooled_auc_in_sample_weights": roc_auc(y, f_oof),
           "per_study_auc": {sid: (roc_auc(yy, predict(w_oof, features(pp, aa))) if 0 < yy.sum() < len(yy) else None)
                             for sid, yy, pp, aa in zip(STUDIES, ys, model_only, area_only)},
           "sensitivity@0.5": float((f_oof[y == 1] >= 0.5).mean()), "specificity@0.5": float((f_oof[y == 0] < 0.5).mean())}
    # the alternative that ships as the default: a logistic calibration of the threshold area alone (2 parameters
    # learned from the radiologist labels), validated leave-one-study-out the same way
    la = [np.log1p(np.maximum(a, 0.0))[:, None] for a in area_only]
    f_area = []
    for i in range(len(STUDIES)):
        w_i = fit_logistic(np.concatenate([la[j] for j in range(len(STUDIES)) if j != i]),
                           np.concatenate([ys[j] for j in range(len(STUDIES)) if j != i]))
        f_area.append(predict(w_i, la[i]))
    f_area_all = np.concatenate(f_area)
    w_area = fit_logistic(np.concatenate(la), y)
    area_cal = {"w_log1p_area_mm2": float(w_area[0]), "bias": float(w_area[1]),
                "fitted_on": "COVID-CT-MD, 3 studies, radiologist slice labels",
                "loso_pooled_auc": roc_auc(y, f_area_all),
                "loso_sensitivity@0.5": float((f_area_all[y == 1] >= 0.5).mean()),
                "loso_specificity@0.5": float((f_area_all[y == 0] < 0.5).mean()),
                "loso_specificity@0.5_normal_study": float((f_area[2] < 0.5).mean())}
    res = {"data": "REAL: COVID-CT-MD 3 DICOM studies (radiologist slice labels); leave-one-study-out",
           "area_calibration": area_cal,
           "per_study": per,
           "pooled_auc": {"fused": roc_auc(y, np.concatenate(fused)), "model_only": roc_auc(y, np.concatenate(model_only)),
                          "threshold_area_only": roc_auc(y, np.concatenate(area_only))},
           "pooled_at_0.5_fused": {"sensitivity": float((np.concatenate(fused)[y == 1] >= 0.5).mean()),
                                   "specificity": float((np.concatenate(fused)[y == 0] < 0.5).mean())}}
    final_dir = ROOT / "runs/lesion_presence_real"
    if (final_dir / "best" / "model.json").exists():
        model, info = load_checkpoint(final_dir / "best")
        data = {sid: study_rows(model, info["meta"]["family"], sid) for sid in STUDIES}
        w = fit_logistic(np.concatenate([features(*data[s][:2]) for s in STUDIES]),
                         np.concatenate([data[s][2] for s in STUDIES]))
        res["in_sample_fusion_not_shipped"] = {"w_logit_model": float(w[0]), "w_log1p_area_mm2": float(w[1]),
                                               "bias": float(w[2]), "why_not": "the shipped model saw these studies"}
        res["oof_fusion_not_shipped"] = oof
        from pneumoct.learned import bundled_weights_dir
        from pneumoct.train.bundle import install_run
        from pneumoct.train.checkpoint import read_checkpoint_info

        keep = {}
        installed = bundled_weights_dir() / "lesion_presence"
        if (installed / "model.json").exists():
            old = read_checkpoint_info(installed).get("meta") or {}
            keep = {k: old[k] for k in ("calibration", "validation_leave_one_study_out_pooled_auc") if k in old}
        install_run(final_dir, "lesion_presence", extra_meta={
            **keep, "area_calibration": area_cal,
            "validation_fusion_leave_one_study_out_pooled_auc": res["pooled_auc"]["fused"]})
    (ROOT / "experiments/results/lesion_fusion.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("pooled_auc", "pooled_at_0.5_fused")}, indent=1))
    print("out-of-fold fusion (not shipped):", json.dumps(oof))
    print("area calibration (shipped):", json.dumps(area_cal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
