"""Validate the real-data lesion segmenters and install the shipped one (issue 4).

1. Held-out Dice: every trained run's best checkpoint on the slices of its VALIDATION patients (never trained on;
   the patient split is recomputed from the run's config). COVID-19-CT-Seg has no reliable patient mapping
   (blocks of 80 files), so its part is optimistic; MedSeg validation images are distinct images.
2. DICOM path: the three COVID-CT-MD studies segmented through diagnose's path (lung mask -> per-slice lung crop ->
   HU window -> network -> back to the slice). The 2D training sets are 8-bit images without HU; the window that
   maps DICOM onto their intensity scale was set by matching lung intensities (docs/segment.md): C -600, W 700.
   Reported: lesion volume per study, per-slice lesion area vs the radiologists' slice labels (AUC), false-positive
   volume in the normal study, time per study.

Usage: python experiments/lesion_seg_real.py RUN [RUN ...] [--install RUN]
Writes experiments/results/lesion_seg_real.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CTMD = ROOT.parent / "shared/data/covid-ct-md"
STUDIES = {"covid": ("covid-P001", 0), "cap": ("cap-cap001", 55), "normal": ("normal-normal001", None)}
DICOM_WINDOW = (-600.0, 700.0)


def heldout_dice(run: Path) -> dict:
    import torch

    from pneumoct.evaluate.segmentation import segmentation_report
    from pneumoct.train.checkpoint import load_checkpoint
    from pneumoct.train.config import load_config
    from pneumoct.train.data import build_tables
    from pneumoct.train.loop import split_indices

    cfg = load_config(run / "config.yaml")
    table = build_tables(cfg.data.tables, size=cfg.data.size, cache_dir=str(ROOT / "data/cache"))
    table = table.subset(np.flatnonzero(table.has_mask))
    # the split exactly as fit_segmentation makes it (patient level, stratified by source)
    _, strat = np.unique(table.source.astype(str), return_inverse=True)
    _, va = split_indices(table, strat.astype(np.int64), cfg.split)
    model, info = load_checkpoint(run / "best")
    from pneumoct.train.augment import to_unit

    w = (info.get("meta") or {}).get("window") or [-600.0, 1200.0]
    from pneumoct.preprocess.slice_input import harmonise

    x01 = np.stack([to_unit(table.images[i], bool(table.is_hu[i]), float(w[0]), float(w[1])) for i in va])
    x01 = harmonise(x01, (info.get("meta") or {}).get("input_transform", "none"))
    x = torch.from_numpy(x01[:, None].astype(np.float32))
    probs, classes = [], []
    with torch.inference_mode():
        for s in range(0, len(x), 32):
            out = model(x[s:s + 32])["logits"]
            if out.shape[1] == 1:
                probs.append(torch.sigmoid(out[:, 0]).numpy())
            else:
                sm = torch.softmax(out, 1)
                probs.append(1 - sm[:, 0].numpy())
                classes.append((sm[:, 1:].argmax(1) + 1).numpy())  # GGO 1 / consolidation 2 where lesion
    pred = np.concatenate(probs) >= 0.5
    truth = table.lesion_mask[va] > 0
    res = {"n_val_images": int(len(va)), "by_source": {}}
    for src in sorted(set(table.source[va].tolist())):
        sel = table.source[va] == src
        rep = segmentation_report(list(pred[sel]), list(truth[sel]), n_boot=500)
        agg = rep["classes"]["any"]["aggregate"]
        res["by_source"][src] = {k: agg[k] for k in ("dice", "iou", "sensitivity", "precision") if k in agg}
        res["by_source"][src]["n"] = int(sel.sum())
        res["by_source"][src]["data"] = "SYNTHETIC" if src.endswith("phantom") else "REAL"
        if classes and int(table.lesion_mask[va][sel].max()) >= 2:  # a source with GGO / consolidation masks
            lab = np.where(pred[sel], np.concatenate(classes)[sel], 0)
            tl = table.lesion_mask[va][sel]
            per = {}
            for c, name in ((1, "ground_glass"), (2, "consolidation")):
                r = segmentation_report(list(lab == c), list(tl == c), n_boot=500)["classes"]["any"]["aggregate"]
                per[name] = r["dice"]
            res["by_source"][src]["multiclass_dice"] = per
    return res


def dicom_check(seg_dir: Path, window) -> dict:
    from pneumoct.evaluate.classification import roc_auc
    from pneumoct.io import read_study
    from pneumoct.preprocess.lung_mask import segment_lungs
    from pneumoct.segmentation import load_segmenter, segment_volume

    seg = load_segmenter(seg_dir)
    seg.info["meta"]["window"] = list(window)
    labels = np.load(CTMD / "Slice-level-labels-updated-1.npy")
    out = {}
    for key, (folder, row) in STUDIES.items():
        study = read_study(CTMD / "dicom" / folder)
        lung = segment_lungs(study).labels
        t = time.perf_counter()
        so = segment_volume(study.hu, lung, seg, lung_margin_px=max(1, round(5 / float(study.spacing[2]))))
        dt = time.perf_counter() - t
        vox_ml = float(np.prod(study.spacing)) / 1000.0
        area = (so.mask > 0).reshape(study.shape[0], -1).sum(1) * float(study.spacing[1] * study.spacing[2])
        y = np.zeros(study.shape[0], int) if row is None else labels[row, : study.shape[0]].astype(int)
        has_lung = (lung > 0).reshape(study.shape[0], -1).any(1)
        out[key] = {"lesion_ml": round(float((so.mask > 0).sum() * vox_ml), 1),
                    "lung_ml": round(float((lung > 0).sum() * vox_ml), 1),
                    "slices_with_lesion": int((area > 0).sum()), "slices_with_lung": int(has_lung.sum()),
                    "slice_auc_vs_radiologist": (roc_auc(y[has_lung], area[has_lung]) if 0 < y[has_lung].sum() < has_lung.sum() else None),
                    "seconds_segment_volume": round(dt, 2), "n_slices": int(study.shape[0])}
        print(key, out[key], flush=True)
    return out


def phantom_check(seg_dir: Path, window, cohort: Path = ROOT / "data/phantoms/test", n: int = 12) -> dict | None:
    """SYNTHETIC check (never clinical accuracy): the first ``n`` held-out test phantoms (seed 202, no phantom of
    this cohort is ever trained on): false lesion volume on the healthy ones, Dice on the others."""
    import json as _json

    from pneumoct.evaluate.segmentation import dice
    from pneumoct.io import read_study
    from pneumoct.segmentation import load_segmenter, segment_volume
    from pneumoct.train.data import _read_label_volume

    if not (cohort / "manifest.json").is_file():
        return None
    seg = load_segmenter(seg_dir)
    seg.info["meta"]["window"] = list(window)
    healthy_ml, dices = [], []
    for row in _json.loads((cohort / "manifest.json").read_text())[:n]:
        study = read_study(cohort / row["image"])
        lung = _read_label_volume(cohort / row["lung_mask"])
        truth = _read_label_volume(cohort / row["lesion_mask"]) > 0
        so = segment_volume(study.hu, lung, seg, lung_margin_px=max(1, round(5 / float(study.spacing[2]))))
        if row["label"] == "healthy":
            healthy_ml.append(float((so.mask > 0).sum() * np.prod(study.spacing) / 1000.0))
        else:
            dices.append(float(dice(so.mask > 0, truth)))
    return {"data": f"SYNTHETIC held-out phantoms {cohort.relative_to(ROOT)} (first {n})",
            "healthy_false_lesion_ml": [round(v, 1) for v in healthy_ml],
            "lesion_cases_dice_mean": round(float(np.mean(dices)), 3) if dices else None, "n_lesion_cases": len(dices)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--install", default=None)
    ap.add_argument("--both-windows", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    res: dict = {"data": "REAL: held-out slices of COVID-19-CT-Seg PNG + MedSeg (validation patients of each run); "
                 "COVID-CT-MD 3 DICOM studies for the DICOM path", "dicom_window": list(DICOM_WINDOW), "runs": {}}
    for r in args.runs:
        run = Path(r)
        entry = {"heldout": heldout_dice(run)}
        print(run.name, json.dumps(entry["heldout"]), flush=True)
        entry["dicom"] = {f"window_{int(DICOM_WINDOW[0])}_{int(DICOM_WINDOW[1])}": dicom_check(run / "best", DICOM_WINDOW)}
        entry["phantoms"] = phantom_check(run / "best", DICOM_WINDOW)
        print("phantoms", entry["phantoms"], flush=True)
        if "--both-windows" in sys.argv:
            entry["dicom"]["window_-600_1200"] = dicom_check(run / "best", (-600.0, 1200.0))
        res["runs"][run.name] = entry
    if args.install:
        from pneumoct.train.bundle import install_run

        dest = install_run(args.install, "lesion_seg", extra_meta={"window": list(DICOM_WINDOW),
                                                                   "window_note": "HU window matching the 8-bit training sets' lung intensities"})
        res["installed"] = {"run": Path(args.install).name, "weights": str(dest.relative_to(ROOT))}
        entry = res["runs"].get(Path(args.install).name)
        if entry:  # the model card carries the real-data figures it was chosen on
            card = dest / "model_card.md"
            lines = ["", "## Real-data validation (experiments/lesion_seg_real.py)"]
            for src, v in entry["heldout"]["by_source"].items():
                d = v["dice"]
                extra = "".join(f", {k} Dice {c['mean']:.2f}" for k, c in (v.get("multiclass_dice") or {}).items())
                lines.append(f"- held-out {v.get('data', '')} {src}, {v['n']} images: Dice mean {d['mean']:.2f} "
                             f"({d['mean_low']:.2f}-{d['mean_high']:.2f}), median {d['median']:.2f}{extra}")
            for key, r in next(iter(entry["dicom"].values())).items():
                auc = r["slice_auc_vs_radiologist"]
                lines.append(f"- REAL DICOM {key}: {r['lesion_ml']} mL lesion"
                             + (f", slice AUC vs radiologist {auc:.2f}" if auc is not None else ""))
            if entry.get("phantoms"):
                ph = entry["phantoms"]
                lines.append(f"- SYNTHETIC check ({ph['data']}): healthy false lesion mL {ph['healthy_false_lesion_ml']}, "
                             f"Dice {ph['lesion_cases_dice_mean']} on {ph['n_lesion_cases']} lesion cases")
            card.write_text(card.read_text() + "\n".join(lines) + "\n")
    out = ROOT / "experiments/results/lesion_seg_real.json"
    prev = json.loads(out.read_text()) if out.exists() else {}
    res["runs"] = {**prev.get("runs", {}), **res["runs"]}  # keep other runs' results
    prev.update(res)
    out.write_text(json.dumps(prev, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
