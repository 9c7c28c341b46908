"""Dice of the classical lung mask against real 2D lung masks and against phantom ground truth.

Real: ../shared/data/covid19-ct-seg-png (1614 slices, 8-bit CLAHE-windowed, no HU; every slice has infection).
Synthetic: pneumoct.synth phantoms (3D, HU), per class.
Writes benchmarks/results/lung_mask_eval.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pneumoct.preprocess.lung_mask import segment_lungs, segment_lungs_2d

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * (a & b).sum() / s


def eval_png(limit: int | None = None) -> dict:
    folder = DATA / "covid19-ct-seg-png"
    if not folder.is_dir():
        return {"skipped": f"{folder} not found"}
    files = sorted((folder / "ct").glob("*.png"))[:limit]
    scores, lesion_recall = [], []
    for f in files:
        img = np.asarray(Image.open(f).convert("L"))
        gt = np.asarray(Image.open(folder / "lungs" / f.name).convert("L")) > 127
        les = np.asarray(Image.open(folder / "covid" / f.name).convert("L")) > 127
        pred = segment_lungs_2d(img) > 0
        scores.append(dice(pred, gt))
        if les.sum() > 0:
            lesion_recall.append(float((pred & les).sum() / les.sum()))
    s = np.array(scores)
    return {"data": "real: covid19-ct-seg-png (COVID-19-CT-Seg, 2D 8-bit CLAHE PNG, all slices with infection)",
            "n_slices": len(files), "dice_mean": round(float(s.mean()), 4), "dice_median": round(float(np.median(s)), 4),
            "dice_p5": round(float(np.percentile(s, 5)), 4),
            "lesion_pixels_inside_lung_mask_mean": round(float(np.mean(lesion_recall)), 4)}


def eval_phantoms(n_per_class: int = 2, matrix: int = 256, n_slices: int = 90) -> dict:
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom
    from pneumoct.types import CLASS_NAMES

    rows = []
    for label in CLASS_NAMES:
        for k in range(n_per_class):
            ph = generate_phantom(PhantomConfig(label=label, seed=1000 + k, matrix=matrix, n_slices=n_slices))
            t = time.perf_counter()
            res = segment_lungs(ph.study)
            dt = time.perf_counter() - t
            gt = ph.lung_mask
            les = ph.lesion_mask > 0
            rows.append({
                "label": label, "seed": 1000 + k, "dice": round(dice(res.labels > 0, gt > 0), 4),
                "dice_right": round(dice(res.labels == 1, gt == 1), 4),
                "dice_left": round(dice(res.labels == 2, gt == 2), 4),
                "lesion_voxels_inside_mask": None if not les.any() else round(float(((res.labels > 0) & les).sum() / les.sum()), 4),
                "seconds": round(dt, 2)})
    d = np.array([r["dice"] for r in rows])
    rec = [r["lesion_voxels_inside_mask"] for r in rows if r["lesion_voxels_inside_mask"] is not None]
    return {"data": f"synthetic phantoms (pneumoct.synth), {matrix}x{matrix}x{n_slices}, seeds 1000..",
            "cases": rows, "dice_mean": round(float(d.mean()), 4), "dice_min": round(float(d.min()), 4),
            "lesion_voxels_inside_mask_mean": round(float(np.mean(rec)), 4) if rec else None}


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else None
    out = {"png_2d": eval_png(limit), "phantoms_3d": eval_phantoms()}
    path = ROOT / "benchmarks" / "results" / "lung_mask_eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "cases"} for k, v in out.items()}, indent=2))
