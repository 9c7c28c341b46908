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

The per-case and scoring helpers (:func:`case_row`, :func:`system_scores`, :func:`auc_table`) are reused by
``experiments/one_cohort.py`` (every trained 3D variant on this cohort).

SYNTHETIC data only: these figures compare methods on phantoms; they are not clinical accuracy.

    python experiments/volumetric_compare.py [--per-class 6] [--seed 7301] [--boot 1000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "volumetric_compare.json"  # --out to write elsewhere
#: the held-out cohort: seed and generator settings (the 2D models' training geometry)
COHORT = {"seed": 7301, "matrix": 256, "n_slices": 48, "difficulty": 0.3}

#: task -> (which cases take part, positive class, score class): "abnormal" = the system's abnormal probability
#: (headline) or 1 - p(healthy); otherwise p(class)
TASKS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray], str]] = {
    "abnormal_vs_healthy": (lambda lab: np.ones(len(lab), bool), lambda lab: lab != "healthy", "abnormal"),
    "covid19_vs_other_pneumonia": (lambda lab: lab != "healthy", lambda lab: lab == "covid19", "covid19"),
}


def _system_scores(name: str, study, lung_labels, weights_dir: str | None = None) -> dict[str, float] | str:
    """Class probabilities of a 3D system (``diagnose --model NAME [--weights DIR]``), or why it did not run."""
    from pneumoct.errors import PneumoctInputError
    from pneumoct.volumetric import run_system

    try:
        out = run_system(name, study, lung_labels, weights_dir=weights_dir)
    except (ImportError, FileNotFoundError, PneumoctInputError) as exc:
        return f"not installed ({exc.__class__.__name__}: {str(exc)[:80]})"
    return dict(out.probabilities)


def held_out_cohort(per_class: int, seed: int = COHORT["seed"], **generator) -> list:
    """The held-out phantoms (generated in memory) and nothing else."""
    from pneumoct.train.volumes import phantom_volume_cohort

    g = {k: COHORT[k] for k in ("matrix", "n_slices", "difficulty")}
    g.update(generator)
    return phantom_volume_cohort(per_class, seed=seed, **g)


def case_row(case, extra: Callable[[Any, Any, Any], dict] | None = None) -> dict[str, Any]:
    """One case through ``analyse_study`` (once): the headline's abnormal probability, the explicit rule's and the
    M3Lung-Sys research panel's class probabilities, every bundled 3D system (:data:`pneumoct.volumetric.SYSTEMS`),
    and ``extra(study, dx, case)`` -> {system: probabilities or reason} for further systems on the same study and
    lung mask."""
    from pneumoct.api import as_study
    from pneumoct.pipeline import DiagnoseOptions, analyse_study
    from pneumoct.volumetric import SYSTEMS

    t0 = time.perf_counter()
    study = as_study(case.hu, spacing=case.spacing)
    dx = analyse_study(study, DiagnoseOptions(write_report=False, write_masks=False))
    patient = dx.result["patient"]
    m3 = (patient.get("research_panel") or {}).get("m3lung_patient", {}).get("probabilities")
    rule = (patient.get("rule_result") or {}).get("probabilities")
    row: dict[str, Any] = {"case": case.case_id, "label": case.label, "source": case.source,
                           "headline": {"abnormal": float(patient["abnormal_probability"])},
                           "rule": dict(rule) if rule else "not in the result",
                           "m3lung": dict(m3) if m3 else "not in the result"}
    t1 = time.perf_counter()
    for name in SYSTEMS:
        row[name] = _system_scores(name, study, dx.lung_labels)
    if extra is not None:
        row.update(extra(study, dx, case))
    row["seconds"] = {"analyse_study": round(t1 - t0, 2), "total": round(time.perf_counter() - t0, 2)}
    return row


def system_scores(rows: list[dict], system: str, cls: str) -> np.ndarray | None:
    """Per case: the system's score for ``cls`` ("abnormal": its abnormal probability, else 1 − p(healthy); a class
    name: p(class)); NaN where it has no such score; None when the system did not run on every case."""
    vals = []
    for r in rows:
        p = r.get(system)
        if not isinstance(p, dict):
            return None
        if cls == "abnormal":
            vals.append(p["abnormal"] if "abnormal" in p else (1.0 - p["healthy"] if "healthy" in p else np.nan))
        else:
            vals.append(p.get(cls, np.nan))
    v = np.asarray(vals, float)
    return None if np.isnan(v).all() else v


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from pneumoct.evaluate.classification import roc_auc

    return roc_auc(y, p[:, 1])


def auc_table(rows: list[dict], systems: list[str], tasks: dict, ref: str, n_boot: int) -> dict[str, dict]:
    """{task: {system: AUC with 95 % percentile bootstrap CI (``low``/``high``), ``n``, and except for ``ref`` a
    paired bootstrap p-value against ``ref`` (``paired_vs_ref``: difference = system − ref, same resampled cases)}}.
    A system takes part in a task when it has a score for every case of the task."""
    from pneumoct.evaluate.classification import bootstrap_ci, bootstrap_p_value

    labels = np.array([r["label"] for r in rows])
    out: dict[str, dict] = {}
    for task, (keep_fn, pos_fn, cls) in tasks.items():
        keep, y = keep_fn(labels), pos_fn(labels).astype(int)
        out[task] = {}
        r = system_scores(rows, ref, cls)
        ref_ok = r is not None and not np.isnan(r[keep]).any()
        for s in systems:
            v = system_scores(rows, s, cls)
            if v is None or np.isnan(v[keep]).any():
                continue
            yk, vk = y[keep], np.stack([1 - v[keep], v[keep]], 1)
            entry = bootstrap_ci(_auc, yk, vk, n_boot=n_boot, seed=0)
            entry["n"], entry["n_pos"] = int(keep.sum()), int(yk.sum())
            if s != ref and ref_ok:
                entry["paired_vs_ref"] = bootstrap_p_value(_auc, yk, vk, np.stack([1 - r[keep], r[keep]], 1),
                                                           n_boot=n_boot, seed=0)
            out[task][s] = entry
    return out


def run(per_class: int, seed: int, n_boot: int) -> dict[str, Any]:
    import torch

    from pneumoct.volumetric import SYSTEMS

    torch.set_num_threads(1)
    rows = []
    for case in held_out_cohort(per_class, seed):
        rows.append(case_row(case))
        print(f"{case.case_id:32s} {case.label:12s} {rows[-1]['seconds']['total']:6.1f} s", file=sys.stderr)
    results = auc_table(rows, ["headline", "m3lung", *SYSTEMS], TASKS, "m3lung", n_boot)
    return {"data": f"SYNTHETIC: {len(rows)} phantoms generated in memory (seed {seed}, 256 px, 48 slices, "
                    "difficulty 0.3), held out from every training run", "reference": "m3lung",
            "tasks": results, "cases": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=6)
    ap.add_argument("--seed", type=int, default=COHORT["seed"])
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
            p = e.get("paired_vs_ref")
            p_txt = f"  p vs M3Lung {p['p_value']:.3f}" if isinstance(p, dict) and p.get("p_value") is not None else ""
            print(f"  {s:14s} AUC {e['estimate']:.3f} {ci} n={e['n']}{p_txt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
