"""Evaluate the M3Lung-Sys hand-crafted lung crop (pneumoct.preprocess.lung_crop) on real data.

Main evaluation: the 1614 slices of COVID-19-CT-Seg in its 2D PNG form (``../shared/data/covid19-ct-seg-png``:
``ct/NNN.png`` 8-bit CLAHE-windowed, no HU; ``lungs/NNN.png`` lung mask 0/255), with the grey-level variant
:func:`m3lung_lung_crop_8bit`. Per slice:

* coverage  — fraction of ground-truth lung pixels inside the crop box (margin included);
* box_area  — crop-box area / image area;
* dice      — Dice of the step-5 lung mask against the ground-truth lung mask.

Several settings are reported: the default (Otsu threshold on a Gaussian-smoothed copy, sigma 1 px, paper
kernel 1x8 and margin 10 px), the paper's steps with no smoothing, and without the body restriction of Step 4.
Note: the images are 256x256, so the paper's 1x8 kernel and 10 px margin are twice as large relative to the
anatomy as on the 512x512 slices of the paper.

Secondary sanity check (no ground truth): the HU volume crop (:func:`m3lung_crop_volume`, T_h = -300 HU) on the
three DICOM studies of ``covid-ct-md`` — box area and slices with lung. Skipped with ``--no-hu``.

Writes ``benchmarks/results/lung_crop_covid19_ct_seg_png.json`` and prints a summary. Exits 0 with a message when
the data folder is absent. Usage: ``python benchmarks/lung_crop_eval.py [--data DIR] [--no-hu] [--limit N]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
RESULT = REPO / "benchmarks" / "results" / "lung_crop_covid19_ct_seg_png.json"

VARIANTS = {
    "default": {},
    "paper_steps_no_smoothing": {"smooth_sigma": 0.0},
    "no_body_restriction": {"restrict_to_body": False},
}


def _stats(x: np.ndarray) -> dict:
    return {
        "mean": round(float(np.mean(x)), 4),
        "median": round(float(np.median(x)), 4),
        "p5": round(float(np.percentile(x, 5)), 4),
        "min": round(float(np.min(x)), 4),
    }


def evaluate_png(png_dir: Path, limit: int | None = None) -> dict:
    from PIL import Image

    from pneumoct.preprocess.lung_crop import m3lung_lung_crop_8bit

    files = sorted((png_dir / "ct").glob("*.png"))
    if limit:
        files = files[:limit]
    images, gts = [], []
    for f in files:
        images.append(np.asarray(Image.open(f).convert("L")))
        gts.append(np.asarray(Image.open(png_dir / "lungs" / f.name).convert("L")) > 127)

    out: dict = {}
    for name, kw in VARIANTS.items():
        t0 = time.perf_counter()
        cov, area, dice, fallback = [], [], [], 0
        for img, gt in zip(images, gts):
            crop = m3lung_lung_crop_8bit(img, out_size=None, **kw)
            r0, r1, c0, c1 = crop.bbox
            n_gt = int(gt.sum())
            inside = int(gt[r0:r1, c0:c1].sum())
            cov.append(inside / n_gt if n_gt else 1.0)
            area.append((r1 - r0) * (c1 - c0) / gt.size)
            m = crop.lung_mask
            denom = int(m.sum()) + n_gt
            dice.append(2.0 * int((m & gt).sum()) / denom if denom else 1.0)
            fallback += int(crop.fallback)
        cov_a, area_a, dice_a = np.array(cov), np.array(area), np.array(dice)
        out[name] = {
            "settings": {
                "threshold": "Otsu of the (smoothed) image",
                "smooth_sigma_px": kw.get("smooth_sigma", 1.0),
                "kernel": [1, 8],
                "margin_px": 10,
                "restrict_to_body": kw.get("restrict_to_body", True),
            },
            "coverage": _stats(cov_a),
            "coverage_slices_ge_0.95": round(float(np.mean(cov_a >= 0.95)), 4),
            "coverage_slices_ge_0.99": round(float(np.mean(cov_a >= 0.99)), 4),
            "box_area_fraction": _stats(area_a),
            "dice_step5_mask": _stats(dice_a),
            "fallback_slices": fallback,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return {"n_slices": len(files), "variants": out}


def evaluate_hu(dicom_root: Path) -> dict | None:
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover
        return None
    from pneumoct.preprocess.lung_crop import m3lung_crop_volume

    res = {}
    for case in sorted(p for p in dicom_root.iterdir() if p.is_dir()):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(case)))
        vol = sitk.GetArrayFromImage(reader.Execute())
        t0 = time.perf_counter()
        crop = m3lung_crop_volume(vol, out_size=None)
        r0, r1, c0, c1 = crop.bbox
        res[case.name] = {
            "shape_zyx": [int(s) for s in vol.shape],
            "bbox_rc": [r0, r1, c0, c1],
            "box_area_fraction": round((r1 - r0) * (c1 - c0) / float(vol.shape[1] * vol.shape[2]), 4),
            "slices_with_lung": int(crop.slice_has_lung.sum()),
            "fallback": bool(crop.fallback),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    ap.add_argument("--no-hu", action="store_true", help="skip the HU sanity check on covid-ct-md")
    ap.add_argument("--limit", type=int, default=None, help="only the first N PNG slices (quick runs)")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)

    png_dir = args.data / "covid19-ct-seg-png"
    if not (png_dir / "ct").is_dir() or not (png_dir / "lungs").is_dir():
        print(f"SKIP: data folder {png_dir} is absent; nothing evaluated.")
        return 0

    t0 = time.perf_counter()
    report: dict = {
        "benchmark": "M3Lung-Sys hand-crafted lung crop (pneumoct.preprocess.lung_crop)",
        "data_source": (
            "COVID-19-CT-Seg (Ma et al., 'Towards efficient COVID-19 CT annotation'; 20 patients: 10 coronacases.org"
            " + 10 Radiopaedia), public 2D PNG conversion in ../shared/data/covid19-ct-seg-png: 256x256 8-bit"
            " CLAHE-windowed slices (no HU), lung masks lungs/NNN.png; only slices with infection were kept."
        ),
        "method": "m3lung_lung_crop_8bit (grey-level variant: Otsu threshold instead of T_h=-300 HU)",
        "metrics": {
            "coverage": "fraction of ground-truth lung pixels inside the crop box (margin included)",
            "box_area_fraction": "crop-box area / image area",
            "dice_step5_mask": "Dice of the step-5 hand-crafted lung mask vs the ground-truth lung mask",
        },
        "caveats": [
            "real public data, not made by this project; 8-bit contrast-enhanced images, so the HU threshold of the"
            " paper is replaced by Otsu's threshold",
            "images are 256x256: the paper's 1x8 kernel and 10 px margin are relatively twice as large as at 512x512",
            "every slice contains infection; slices above/below the lungs are not in this set",
        ],
    }
    report["covid19_ct_seg_png"] = evaluate_png(png_dir, args.limit)
    dicom_root = args.data / "covid-ct-md" / "dicom"
    if not args.no_hu and dicom_root.is_dir():
        hu = evaluate_hu(dicom_root)
        if hu is not None:
            report["hu_volume_sanity_covid_ct_md"] = {
                "note": "COVID-CT-MD sample studies (real DICOM, HU); no lung ground truth: box size only;"
                " m3lung_crop_volume with T_h=-300 HU, kernel 1x8, margin 10, 3D component filter 0.02",
                "cases": hu,
            }
    report["environment"] = {"python": platform.python_version(), "numpy": np.__version__}
    report["total_seconds"] = round(time.perf_counter() - t0, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    png = report["covid19_ct_seg_png"]
    print(f"Lung crop on {png['n_slices']} COVID-19-CT-Seg PNG slices (8-bit, real data):")
    for name, v in png["variants"].items():
        print(
            f"  {name:26s} coverage mean {v['coverage']['mean']:.4f} median {v['coverage']['median']:.4f}"
            f" p5 {v['coverage']['p5']:.4f} | box area mean {v['box_area_fraction']['mean']:.3f}"
            f" | step-5 Dice mean {v['dice_step5_mask']['mean']:.3f} median {v['dice_step5_mask']['median']:.3f}"
            f" p5 {v['dice_step5_mask']['p5']:.3f} | fallback {v['fallback_slices']} | {v['seconds']:.1f}s"
        )
    for case, v in report.get("hu_volume_sanity_covid_ct_md", {}).get("cases", {}).items():
        print(f"  HU volume {case}: box {v['bbox_rc']} area {v['box_area_fraction']:.3f},"
              f" {v['slices_with_lung']}/{v['shape_zyx'][0]} slices with lung")
    print(f"wrote {args.out} ({report['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
