"""Evaluate the HU-threshold lesion baseline (``find_lesions_threshold``) on phantoms and on real studies.

Synthetic: pneumoct.synth phantoms (3D, HU, voxel lesion truth), classes healthy / covid19 / other_viral / cap,
seeds 11-14 at matrix 256 x 80 slices, plus two cases per lesion class at difficulty 0.5. Per case: predicted vs
true lesion volume ratio (LVR), voxel Dice (lesion vs not), Dice per class (GGO / consolidation), false-positive
volume, lesion count vs truth, and for other_viral the share of nodules >= 5 mm that are hit.

Real: covid-ct-md DICOM studies (covid-P001, cap-cap001, normal-normal001). No voxel truth exists, so only the
lesion volume (mL), LVR and component count are reported; the normal study should have clearly less than the
other two. Timings of ``find_lesions_threshold`` on the real 512 x 512 studies are reported too.

The lung mask is always ``segment_lungs`` (what the pipeline uses), not the phantom's truth lung mask.

Each phantom case also carries ``with_true_lung_mask``: the same finder on the phantom's true lung mask, which
separates errors of the lung mask (tissue it takes in, lesions it leaves out) from errors of the lesion finder.

Usage::

    python benchmarks/lesion_baseline_eval.py                   # evaluate the installed baseline -> "current"
    python benchmarks/lesion_baseline_eval.py --before OLD.py --note "..."   # also an older file defining
                                                                # find_lesions_threshold, same cases, -> "before"
    python benchmarks/lesion_baseline_eval.py --finder FILE.py --tag NAME    # only another implementation
    python benchmarks/lesion_baseline_eval.py --quick --no-real # seeds 11-12 only, no real studies

Results go to ``benchmarks/results/lesion_baseline_eval.json``; runs with another tag already in that file are
kept. Phantoms, studies and lung masks are cached in memory within a run, so a --before run costs little more.
Timings: ``seconds_*`` are wall clock, ``cpu_seconds_*`` process CPU time (steadier on a shared machine).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage as ndi

from pneumoct.io import read_study
from pneumoct.preprocess.lung_mask import segment_lungs
from pneumoct.quantify import find_lesions_threshold
from pneumoct.synth.phantom import PhantomConfig, generate_phantom
from pneumoct.types import LESION_CONSOLIDATION, LESION_GGO

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "covid-ct-md" / "dicom"
REAL = ("covid-P001", "cap-cap001", "normal-normal001")
OUT = ROOT / "benchmarks" / "results" / "lesion_baseline_eval.json"
STRUCT26 = np.ones((3, 3, 3), bool)

_CACHE: dict[Any, Any] = {}  # phantoms, studies and lung masks, in memory for one run


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    s = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return None if s == 0 else round(2.0 * np.count_nonzero(a & b) / s, 4)


def n_components(mask: np.ndarray) -> int:
    return int(ndi.label(mask, structure=STRUCT26)[1]) if mask.any() else 0


def phantom_and_lungs(label: str, seed: int, difficulty: float, matrix: int, n_slices: int):
    key = ("ph", label, seed, difficulty, matrix, n_slices)
    if key not in _CACHE:
        ph = generate_phantom(PhantomConfig(label=label, seed=seed, matrix=matrix, n_slices=n_slices,
                                            difficulty=difficulty))
        lungs = segment_lungs(ph.study).labels
        _CACHE[key] = (ph, lungs)
    return _CACHE[key]


def nodule_hits(ph, pred: np.ndarray, min_diameter_mm: float = 5.0) -> dict[str, Any] | None:
    """Nodules (other_viral) of at least ``min_diameter_mm``: hit if a predicted lesion voxel lies within the
    nodule's radius (+ one pixel) of its centre."""
    nods = [L for L in ph.lesions if L["kind"] == "nodule"]
    if not nods:
        return None
    sp = np.asarray(ph.study.spacing, float)
    big = [L for L in nods if 2 * L["radius_mm"] >= min_diameter_mm]
    hit = 0
    for L in big:
        c = np.asarray(L["centre"], float)
        r = L["radius_mm"] + sp[1]
        lo = np.maximum(np.floor(c - r / sp), 0).astype(int)
        hi = np.minimum(np.ceil(c + r / sp) + 1, pred.shape).astype(int)
        sub = pred[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        zz, yy, xx = np.meshgrid(*[(np.arange(lo[k], hi[k]) - c[k]) * sp[k] for k in range(3)], indexing="ij")
        if np.any(sub[(zz**2 + yy**2 + xx**2) <= r * r] > 0):
            hit += 1
    return {"nodules": len(nods), f"nodules_ge_{min_diameter_mm:g}mm": len(big), "hit": hit,
            "recall": round(hit / len(big), 4) if big else None}


def eval_phantom_case(finder: Callable, label: str, seed: int, difficulty: float, matrix: int,
                      n_slices: int) -> dict[str, Any]:
    ph, lungs = phantom_and_lungs(label, seed, difficulty, matrix, n_slices)
    sp = ph.study.spacing
    vml = ph.study.voxel_volume_ml
    t, c = time.perf_counter(), time.process_time()
    f = finder(ph.study.hu, lungs, sp)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    pred, truth = f.mask, ph.lesion_mask
    p, g = pred > 0, truth > 0
    lung_vox = int(np.count_nonzero(lungs))
    row = {
        "label": label, "seed": seed, "difficulty": difficulty,
        "spacing_mm": [round(float(s), 3) for s in sp],
        "lvr_true": round(float(ph.lesion_volume_ratio), 5),
        "lvr_pred": round(float(np.count_nonzero(p) / max(lung_vox, 1)), 5),
        "lesion_ml_true": round(float(np.count_nonzero(g) * vml), 2),
        "lesion_ml_pred": round(float(np.count_nonzero(p) * vml), 2),
        "dice": dice(p, g),
        "dice_ggo": dice(pred == LESION_GGO, truth == LESION_GGO),
        "dice_consolidation": dice(pred == LESION_CONSOLIDATION, truth == LESION_CONSOLIDATION),
        "false_positive_ml": round(float(np.count_nonzero(p & ~g) * vml), 2),
        "false_negative_ml": round(float(np.count_nonzero(g & ~p) * vml), 2),
        "count_pred": n_components(p),
        "count_true_components": n_components(g),
        "count_true_placed": len(ph.lesions),
        "truth_inside_lung_mask": None if not g.any() else round(float(np.count_nonzero(g & (lungs > 0))
                                                                         / np.count_nonzero(g)), 4),
        "seconds_finder": round(dt, 3),
        "cpu_seconds_finder": round(dc, 3),
    }
    nh = nodule_hits(ph, pred)
    if nh is not None:
        row["nodule_detection"] = nh
    # diagnostic: the same finder on the phantom's true lung mask separates lung-mask errors from lesion errors
    ft = finder(ph.study.hu, ph.lung_mask, sp).mask > 0
    row["with_true_lung_mask"] = {"lvr_pred": round(float(np.count_nonzero(ft) / max(np.count_nonzero(ph.lung_mask), 1)), 5),
                                  "dice": dice(ft, g),
                                  "false_positive_ml": round(float(np.count_nonzero(ft & ~g) * vml), 2)}
    return row


def eval_real(finder: Callable, names=REAL, repeats: int = 2) -> dict[str, Any]:
    rows = []
    for name in names:
        path = DATA / name
        if not path.is_dir():
            rows.append({"study": name, "skipped": f"{path} not found"})
            continue
        key = ("real", name)
        if key not in _CACHE:
            study = read_study(path)
            _CACHE[key] = (study, segment_lungs(study).labels)
        study, lungs = _CACHE[key]
        times, cpus = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            f = finder(study.hu, lungs, study.spacing)
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        p = f.mask > 0
        vml = study.voxel_volume_ml
        lung_vox = int(np.count_nonzero(lungs))
        rows.append({
            "study": name, "shape": list(study.shape), "spacing_mm": [round(float(s), 4) for s in study.spacing],
            "lung_ml": round(lung_vox * vml, 1),
            "lesion_ml": round(float(np.count_nonzero(p) * vml), 2),
            "ggo_ml": round(float(np.count_nonzero(f.mask == LESION_GGO) * vml), 2),
            "consolidation_ml": round(float(np.count_nonzero(f.mask == LESION_CONSOLIDATION) * vml), 2),
            "lvr": round(float(np.count_nonzero(p) / max(lung_vox, 1)), 5),
            "lesion_components": n_components(p),
            "seconds_finder_min": round(min(times), 3),
            "cpu_seconds_finder_min": round(min(cpus), 3),
        })
    by = {r["study"]: r for r in rows if "lesion_ml" in r}
    checks = {}
    if {"covid-P001", "normal-normal001"} <= by.keys():
        checks["covid_lesion_ml_gt_normal"] = by["covid-P001"]["lesion_ml"] > by["normal-normal001"]["lesion_ml"]
    if {"cap-cap001", "normal-normal001"} <= by.keys():
        checks["cap_lesion_ml_gt_normal"] = by["cap-cap001"]["lesion_ml"] > by["normal-normal001"]["lesion_ml"]
    return {"data": "real covid-ct-md (DICOM, 512x512, 2 mm slices; no voxel lesion truth)", "studies": rows,
            "checks": checks}


def summarise(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in sorted({r["label"] for r in rows}):
        rs = [r for r in rows if r["label"] == label and r["difficulty"] == 0.0]
        hard = [r for r in rows if r["label"] == label and r["difficulty"] > 0.0]
        s: dict[str, Any] = {"n": len(rs), "lvr_pred_mean": round(float(np.mean([r["lvr_pred"] for r in rs])), 5),
                             "lvr_true_mean": round(float(np.mean([r["lvr_true"] for r in rs])), 5),
                             "false_positive_ml_mean": round(float(np.mean([r["false_positive_ml"] for r in rs])), 2),
                             "count_pred_mean": round(float(np.mean([r["count_pred"] for r in rs])), 1)}
        for key in ("dice", "dice_ggo", "dice_consolidation"):
            v = [r[key] for r in rs if r[key] is not None]
            s[f"{key}_mean"] = round(float(np.mean(v)), 4) if v else None
            s[f"{key}_min"] = round(float(np.min(v)), 4) if v else None
        s["count_true_mean"] = round(float(np.mean([r["count_true_placed"] for r in rs])), 1)
        s["with_true_lung_mask_lvr_pred_mean"] = round(float(np.mean([r["with_true_lung_mask"]["lvr_pred"] for r in rs])), 5)
        v = [r["with_true_lung_mask"]["dice"] for r in rs if r["with_true_lung_mask"]["dice"] is not None]
        s["with_true_lung_mask_dice_mean"] = round(float(np.mean(v)), 4) if v else None
        if hard:
            v = [r["dice"] for r in hard if r["dice"] is not None]
            s["difficulty_0.5_dice_mean"] = round(float(np.mean(v)), 4) if v else None
        nd = [r["nodule_detection"] for r in rows if r["label"] == label and "nodule_detection" in r]
        if nd:
            tot = sum(d["nodules_ge_5mm"] for d in nd)
            s["nodule_ge_5mm_recall"] = round(sum(d["hit"] for d in nd) / tot, 4) if tot else None
        out[label] = s
    return out


def load_finder(path: str | None) -> Callable:
    if path is None:
        return find_lesions_threshold
    spec = importlib.util.spec_from_file_location("finder_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.find_lesions_threshold


def run(finder: Callable, quick: bool = False, real: bool = True, matrix: int = 256,
        n_slices: int = 80) -> dict[str, Any]:
    t0 = time.perf_counter()
    labels = ("healthy", "covid19", "other_viral", "cap")
    seeds = (11, 12) if quick else (11, 12, 13, 14)
    cases = [(lab, s, 0.0) for lab in labels for s in seeds]
    if not quick:
        cases += [(lab, s, 0.5) for lab in labels[1:] for s in (21, 22)]
    rows = [eval_phantom_case(finder, lab, s, d, matrix, n_slices) for lab, s, d in cases]
    res: dict[str, Any] = {
        "synthetic": {"data": f"synthetic phantoms (pneumoct.synth), {matrix}x{matrix}x{n_slices}, seeds "
                              f"{list(seeds)} at difficulty 0, seeds [21, 22] at difficulty 0.5; lung mask from "
                              "segment_lungs", "summary": summarise(rows), "cases": rows},
    }
    if real:
        res["real"] = eval_real(finder)
    res["seconds_total"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--finder", help="a .py file defining find_lesions_threshold (default: the installed one)")
    ap.add_argument("--tag", default="current", help="key under which the run is stored in the JSON")
    ap.add_argument("--before", help="also evaluate this .py file (e.g. the previous threshold_baseline.py) on the "
                    "same cases in the same run, stored under --before-tag")
    ap.add_argument("--before-tag", default="before")
    ap.add_argument("--note", default=None, help="free text stored with the --before run (what that file is)")
    ap.add_argument("--quick", action="store_true", help="seeds 11-12 only, no difficulty-0.5 cases")
    ap.add_argument("--no-real", action="store_true", help="skip the real covid-ct-md studies")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    runs = {}
    res = run(load_finder(args.finder), quick=args.quick, real=not args.no_real)
    res["finder"] = args.finder or "pneumoct.quantify.find_lesions_threshold"
    runs[args.tag] = res
    if args.before:
        ref = run(load_finder(args.before), quick=args.quick, real=not args.no_real)
        ref["finder"] = args.before if args.note is None else f"{args.before} ({args.note})"
        runs[args.before_tag] = ref
    out = Path(args.out)
    doc: dict[str, Any] = {}
    if out.exists():
        try:
            doc = json.loads(out.read_text())
        except json.JSONDecodeError:
            doc = {}
    doc["description"] = ("HU-threshold lesion baseline: synthetic phantoms (with voxel truth) and real "
                          "covid-ct-md studies (volumes only). See benchmarks/lesion_baseline_eval.py.")
    doc.setdefault("runs", {}).update(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    for tag, r in runs.items():
        print(f"== {tag}: {r['finder']}")
        print(json.dumps({"synthetic": r["synthetic"]["summary"],
                          "real": [{k: x.get(k) for k in ("study", "lesion_ml", "lvr", "lesion_components",
                                                          "seconds_finder_min", "cpu_seconds_finder_min")}
                                   for x in r.get("real", {}).get("studies", [])],
                          "seconds_total": r["seconds_total"]}, indent=1))


if __name__ == "__main__":
    main()
