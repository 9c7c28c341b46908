"""Issue 12: the 3D systems (DeepSC-COVID, dual-sampling attention) beside the 2D systems, patient level, on ONE
held-out synthetic cohort, every system on the same cases, with bootstrap intervals and paired tests.

The cohort is generated in memory (``pneumoct.train.volumes.phantom_volume_cohort``) with a seed no training run
uses (``--seed``, default 7301), at the 2D models' training geometry (256 px, 48 slices, difficulty 0.3). Each case
goes through the code of ``pneumoct diagnose`` (``pipeline.analyse_study``: lung mask, lesions, headline, the M3Lung-Sys
research panel) and through every installed 3D system (``pneumoct.volumetric.run_system`` on the same lung mask).

Two patient-level tasks every system can score:
* abnormal vs healthy: headline abnormal probability (lesion burden), M3Lung-Sys 1 − p(healthy), and any 3D system
  whose classes include "healthy";
* COVID-19 vs other pneumonia (healthy cases left out): p(covid19) of each system that has that class.

SYNTHETIC data only: these figures compare methods on phantoms; they are not clinical accuracy.

    python experiments/volumetric_compare.py [--per-class 6] [--seed 7301] [--boot 1000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "volumetric_compare.json"  # --out to write elsewhere


def _system_scores(name: str, study, lung_labels) -> dict[str, float] | str:
    """Class probabilities of a 3D system, or why it did not run (not installed, failed)."""
    from pneumoct.errors import PneumoctInputError
    from pneumoct.volumetric import run_system

    try:
        out = run_system(name, study, lung_labels)
    except (ImportError, FileNotFoundError, PneumoctInputError) as exc:
        return f"not installed ({exc.__class__.__name__}: {str(exc)[:80]})"
    return dict(out.probabilities)


def run(per_class: int, seed: int, n_boot: int) -> dict[str, Any]:
    import torch

    from pneumoct.api import as_study
    from pneumoct.evaluate.classification import bootstrap_ci, bootstrap_p_value, roc_auc
    from pneumoct.pipeline import DiagnoseOptions, analyse_study
    from pneumoct.train.volumes import phantom_volume_cohort
    from pneumoct.volumetric import SYSTEMS

    torch.set_num_threads(1)
    cases = phantom_volume_cohort(per_class, seed=seed, matrix=256, n_slices=48, difficulty=0.3)
    opts = DiagnoseOptions(write_report=False, write_masks=False)
    rows = []
    for case in cases:
        t0 = time.perf_counter()
        study = as_study(case.hu, spacing=case.spacing)
        dx = analyse_study(study, opts)
        patient = dx.result["patient"]
        m3 = (patient.get("research_panel") or {}).get("m3lung_patient", {}).get("probabilities")
        row = {"case": case.case_id, "label": case.label, "source": case.source,
               "headline_abnormal": float(patient["abnormal_probability"]), "m3lung": m3}
        for name in SYSTEMS:
            row[name] = _system_scores(name, study, dx.lung_labels)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(f"{case.case_id:32s} {case.label:12s} {row['seconds']:6.1f} s", file=sys.stderr)

    def scores(system: str, cls: str) -> np.ndarray | None:
        vals = []
        for r in rows:
            if system == "headline":
                vals.append(r["headline_abnormal"] if cls == "abnormal" else np.nan)
                continue
            p = r.get(system)
            if not isinstance(p, dict):
                return None
            if cls == "abnormal":
                vals.append(1.0 - p["healthy"] if "healthy" in p else np.nan)
            else:
                vals.append(p.get(cls, np.nan))
        v = np.asarray(vals, float)
        return None if np.isnan(v).all() else v

    labels = np.array([r["label"] for r in rows])
    tasks = {
        "abnormal_vs_healthy": (np.ones(len(rows), bool), (labels != "healthy").astype(int), "abnormal"),
        "covid19_vs_other_pneumonia": (labels != "healthy", (labels == "covid19").astype(int), "covid19"),
    }
    systems = ["headline", "m3lung", *SYSTEMS]
    results: dict[str, Any] = {}
    for task, (keep, y, cls) in tasks.items():
        results[task] = {}
        ref = scores("m3lung", cls)
        for s in systems:
            v = scores(s, cls)
            if v is None or np.isnan(v[keep]).any():
                continue
            yk, vk = y[keep], np.stack([1 - v[keep], v[keep]], 1)
            auc = lambda yy, pp: roc_auc(yy, pp[:, 1])  # noqa: E731
            entry = bootstrap_ci(auc, yk, vk, n_boot=n_boot, seed=0)
            entry["n"] = int(keep.sum())
            if s != "m3lung" and ref is not None:
                entry["paired_p_vs_m3lung"] = bootstrap_p_value(
                    auc, yk, np.stack([1 - ref[keep], ref[keep]], 1), vk, n_boot=n_boot, seed=0)
            results[task][s] = entry
    return {"data": f"SYNTHETIC: {len(rows)} phantoms generated in memory (seed {seed}, 256 px, 48 slices, "
                    "difficulty 0.3), held out from every training run", "tasks": results, "cases": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=6)
    ap.add_argument("--seed", type=int, default=7301)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    res = run(args.per_class, args.seed, args.boot)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    for task, per in res["tasks"].items():
        print(task)
        for s, e in per.items():
            lo, hi = e["low"], e["high"]
            ci = f"[{lo:.2f}, {hi:.2f}]" if lo is not None else "[—]"
            p = e.get("paired_p_vs_m3lung")
            p_txt = f"  p vs M3Lung {p['p_value']:.3f}" if isinstance(p, dict) and "p_value" in p else ""
            print(f"  {s:14s} AUC {e['estimate']:.3f} {ci} n={e['n']}{p_txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
