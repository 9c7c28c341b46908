"""Validate and build the bundled lesion-presence model (real data only).

1. Leave-one-study-out over the three COVID-CT-MD studies (the only real data here with Hounsfield units and
   both lesion and lesion-free slices, read through the same DICOM -> lung mask -> crop -> window path as
   ``diagnose``): for each study, train with that study left out of training AND validation, predict its slices.
   Pooled and per-study AUC / sensitivity / specificity are honest held-out-patient figures, on 3 patients.
2. The final model: the same config on all data; copied with provenance into ``src/pneumoct/weights/``.

Writes ``experiments/results/lesion_presence_real.json``. Run:  python experiments/lesion_presence_real.py
(``--skip-final`` for the validation only; ``--epochs N`` to shorten).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ("covid-ct-md/covid", "covid-ct-md/cap", "covid-ct-md/normal")


def _metrics(y: np.ndarray, p: np.ndarray) -> dict:
    from pneumoct.evaluate.classification import bootstrap_ci, roc_auc

    pred = p >= 0.5
    pos, neg = y == 1, y == 0
    out = {"n_slices": int(len(y)), "n_lesion": int(pos.sum()), "n_no_lesion": int(neg.sum()),
           "auc": roc_auc(y, p),
           "sensitivity@0.5": float(pred[pos].mean()) if pos.any() else None,
           "specificity@0.5": float((~pred[neg]).mean()) if neg.any() else None,
           "accuracy@0.5": float((pred == pos).mean())}
    if pos.any() and neg.any():
        ci = bootstrap_ci(lambda yy, pp: roc_auc(yy, pp[:, 1]), y, np.stack([1 - p, p], 1), n_boot=1000, seed=0)
        out["auc_95ci_slice_bootstrap"] = [ci["low"], ci["high"]]
    return out


def fit_platt(p: np.ndarray, y: np.ndarray) -> dict:
    """Platt scaling on logit(p): p' = sigmoid(a * logit(p) + b), fitted by Newton's method (2 parameters)."""
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    a, b = 1.0, 0.0
    for _ in range(50):
        q = 1 / (1 + np.exp(-(a * z + b)))
        g = np.array([((q - y) * z).sum(), (q - y).sum()])
        w = q * (1 - q) + 1e-9
        h = np.array([[(w * z * z).sum(), (w * z).sum()], [(w * z).sum(), w.sum()]]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return {"a": float(a), "b": float(b)}


def apply_platt(p: np.ndarray, cal: dict) -> np.ndarray:
    z = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    return 1 / (1 + np.exp(-(cal["a"] * z + cal["b"])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/lesion_presence_real.yaml"))
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--skip-final", action="store_true")
    ap.add_argument("--skip-loso", action="store_true")
    ap.add_argument("--studies", default=",".join(STUDIES), help="held-out studies for the LOSO part")
    ap.add_argument("--reuse", action="store_true", help="reuse finished LOSO runs instead of retraining")
    args = ap.parse_args(argv)

    import torch

    from pneumoct.train.bundle import install_run
    from pneumoct.train.checkpoint import load_checkpoint
    from pneumoct.train.config import load_config
    from pneumoct.train.loop import fit, prepare_table  # noqa: F401
    from pneumoct.train.data import build_tables
    from pneumoct.train.predict import predict_table

    cfg = load_config(args.config)
    if args.epochs:
        cfg.train.epochs = args.epochs
    torch.set_num_threads(cfg.train.threads or 2)
    t0 = time.time()
    table = build_tables(cfg.data.tables, size=cfg.data.size, cache_dir=str(ROOT / cfg.data.cache_dir)
                         if cfg.data.cache_dir and not Path(cfg.data.cache_dir).is_absolute() else cfg.data.cache_dir)
    res: dict = {"data": "REAL public data only (../shared/data): COVID-CT-MD (3 studies, radiologist slice labels), "
                 "COVID-19-CT-Seg PNG (lesion masks), MedSeg (lesion masks)",
                 "config": Path(args.config).name, "table": table.summary(), "machine": "2-core CPU, no GPU"}
    out_json = ROOT / "experiments/results/lesion_presence_real.json"
    if not args.skip_loso:
        ys, ps, per = [], [], {}
        for held in args.studies.split(","):
            cfg.split.exclude_patients = [held]
            run = Path(args.runs) / f"lesion_loso_{held.split('/')[-1]}"
            if not (args.reuse and (run / "DONE").exists()):
                shutil.rmtree(run, ignore_errors=True)  # a fresh run each time: this script reruns experiments
                fit(cfg, run, progress=False, table=table)
            model, info = load_checkpoint(run / "best")
            hu_rows = table.source == "covid-ct-md"  # whole-slice crops of the DICOM studies (the diagnose path)
            sub = table.subset(np.flatnonzero(hu_rows & (table.patient_id == held)))
            cal_sub = table.subset(np.flatnonzero(hu_rows & (table.patient_id != held)))
            kw = dict(window_center=cfg.data.window_center, window_width=cfg.data.window_width,
                      channels=cfg.data.channels, num_classes=2)
            p = predict_table(model, info["meta"]["family"], sub, **kw)["probs"][:, 1]
            # calibration of the DICOM path on the OTHER studies only (the held-out one stays unseen)
            cal = fit_platt(predict_table(model, info["meta"]["family"], cal_sub, **kw)["probs"][:, 1],
                            cal_sub.lesion_label.astype(float))
            y = sub.lesion_label.astype(int)
            pc = apply_platt(p, cal)
            per[held] = {**_metrics(y, p), "calibration": cal,
                         "calibrated": {k: v for k, v in _metrics(y, pc).items() if k.endswith("@0.5")}}
            ys.append(y)
            ps.append(pc)
            print(held, per[held], flush=True)
        res["leave_one_study_out"] = {"per_study": per,
                                      "pooled_calibrated": _metrics(np.concatenate(ys), np.concatenate(ps)),
                                      "note": "each study predicted by a model that never saw it (not in training, "
                                      "not in validation); 3 patients only: wide uncertainty; slice bootstrap CIs "
                                      "ignore within-patient correlation and are too narrow"}
    if not args.skip_final:
        cfg.split.exclude_patients = None
        run = Path(args.runs) / "lesion_presence_real"
        shutil.rmtree(run, ignore_errors=True)
        metrics = fit(cfg, run, progress=False, table=table)
        loso = res.get("leave_one_study_out", {}).get("pooled_calibrated", {})
        model, info = load_checkpoint(run / "best")
        hu = table.subset(np.flatnonzero(table.source == "covid-ct-md"))
        p_hu = predict_table(model, info["meta"]["family"], hu, window_center=cfg.data.window_center,
                             window_width=cfg.data.window_width, channels=cfg.data.channels, num_classes=2)["probs"][:, 1]
        cal = fit_platt(p_hu, hu.lesion_label.astype(float))
        cal["fitted_on"] = "covid-ct-md whole-slice rows (3 studies, in-sample)"
        dest = install_run(run, "lesion_presence", extra_meta={
            "calibration": cal,
            "validation_leave_one_study_out_pooled_auc": loso.get("auc")})
        res["final_calibration"] = cal
        res["final"] = {"run": str(run.relative_to(ROOT)) if run.is_relative_to(ROOT) else str(run),
                        "best": metrics.get("best"), "weights": str(dest.relative_to(ROOT))}
    res["seconds"] = round(time.time() - t0, 1)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(out_json.read_text()) if out_json.exists() else {}
    prev.update(res)
    out_json.write_text(json.dumps(prev, indent=2, default=str) + "\n")
    print(json.dumps(res.get("leave_one_study_out", {}).get("pooled_calibrated", {}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
