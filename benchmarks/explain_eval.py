"""Score a trained model's explanation maps against lesion masks.

For every method applicable to the checkpoint's family (``pneumoct.explain.methods.applicable_methods``: Hu et al.
integrated gradients + CAM + Grad-CAM, JCS Grad-CAM (+ IG), M3Lung-Sys prototype map + Grad-CAM (+ IG)), on the
lesion-positive slices that carry a lesion mask: pointing-game hit rate, mean energy inside the lesions,
mean IoU / Dice of the isodata-thresholded map, box precision / lesion recall of Hu et al.'s saliency boxes, and the
same for a seeded uniform random map (control). ``chance_energy`` = mean lesion-area fraction (the energy-inside
score of a flat map).

Usage::

    python benchmarks/explain_eval.py --checkpoint DIR --data phantom:COHORT_DIR|covid19_ct_seg_png|medseg \
        [--limit N] [--methods cam,integrated_gradients] [--class-idx K] [--out benchmarks/results/explain_X.json]

The class explained is, by default, each slice's predicted class (``--class-idx`` forces one, e.g. the lesion /
COVID class). Research use only, not a medical device.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from pneumoct.explain.methods import applicable_methods, evaluate_explanations, model_family  # noqa: E402

__all__ = ["lesion_rows", "rows_to_unit", "evaluate_rows", "write_report", "parse_data", "summary_table",
           "main"]


def parse_data(spec: str, limit: int | None) -> dict:
    """``phantom:DIR`` | ``covid19_ct_seg_png`` | ``medseg`` (optionally ``kind:PATH``) -> build_table spec."""
    kind, _, path = spec.partition(":")
    out: dict[str, Any] = {"kind": "phantom_cohort" if kind == "phantom" else kind}
    if path:
        out["path"] = path
    if limit:
        out["limit"] = int(limit)
    return out


def validation_patients(run_dir: Path) -> set[str]:
    """The patient ids a run held out for validation (its split recomputed from its config and data)."""
    from pneumoct.train.config import load_config
    from pneumoct.train.data import build_tables
    from pneumoct.train.loop import prepare_table, split_indices

    cfg = load_config(Path(run_dir) / "config.yaml")
    cache = cfg.data.cache_dir
    if cache and not Path(cache).is_absolute():
        cache = str(REPO / cache)
    table = build_tables(cfg.data.tables, size=cfg.data.size, cache_dir=cache)
    table, py = prepare_table(table, cfg.data.target)
    _, va = split_indices(table, py, cfg.split)
    return set(np.asarray(table.patient_id)[va].tolist())


def lesion_rows(lesion_mask: np.ndarray, has_mask: np.ndarray) -> np.ndarray:
    """Indices of rows that have a lesion mask with at least one lesion pixel."""
    lm = np.asarray(lesion_mask)
    nonempty = lm.reshape(len(lm), -1).max(1) > 0 if len(lm) else np.zeros(0, bool)
    return np.nonzero(np.asarray(has_mask, bool) & nonempty)[0]


def rows_to_unit(table, rows: Sequence[int], window: Any = None) -> np.ndarray:
    """Model inputs in [0, 1] for the selected rows, through the training path ``pneumoct.train.augment.to_unit``."""
    try:
        from pneumoct.train.augment import to_unit
    except ImportError:  # the augment module not there: the same two cases by hand
        to_unit = None
    from pneumoct.preprocess.slice_input import LESION_MODEL_WINDOW, window_input

    out = []
    for i in rows:
        img, is_hu = table.images[i], bool(table.is_hu[i])
        if to_unit is not None:
            try:
                u = to_unit(img, is_hu, window=window) if window is not None else to_unit(img, is_hu)
            except TypeError:
                u = to_unit(img, is_hu)
        else:
            u = window_input(img, *(window or LESION_MODEL_WINDOW)) if is_hu else np.clip(img, 0.0, 1.0)
        out.append(np.asarray(u, np.float32))
    return np.stack(out)


def evaluate_rows(model, family: str, images01: np.ndarray, masks: np.ndarray, methods: Sequence[str] | None,
                  *, data: str, class_idx: int | None = None, tolerance_px: float = 15.0, batch_size: int = 8,
                  ig_internal_batch_size: int | None = 25) -> dict:
    """``evaluate_explanations`` plus bookkeeping; returns the JSON-ready report."""
    methods = list(methods) if methods else list(applicable_methods(family or model))
    t0 = time.time()
    rep = evaluate_explanations(model, family, images01, masks, methods, class_idx=class_idx, batch_size=batch_size,
                                score_kwargs={"tolerance_px": tolerance_px},
                                internal_batch_size=ig_internal_batch_size)
    rep.update({
        "data": data,
        "family": model_family(family) if family else model_family(model),
        "methods_run": methods,
        "class_idx": "predicted" if class_idx is None else int(class_idx),
        "tolerance_px": tolerance_px,
        "input_shape": list(np.asarray(images01).shape[1:]),
        "seconds": round(time.time() - t0, 1),
        "python": platform.python_version(),
    })
    return rep


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def summary_table(report: dict, methods: Sequence[str] | None = None) -> str:
    """A markdown table of a report's means, rounded as the report's table and docs/explanations.md show them
    (scores to 2 decimals, energy inside to 3, with the chance level). After a new run on a shipped checkpoint,
    copy these numbers into ``EXPLANATION_SCORES`` in ``pneumoct/report/html.py`` (with the date, data and the
    checkpoint's sha256); ``tests/test_report_explanations.py`` compares the two."""
    chance = report.get("chance_energy")
    names = list(methods) if methods else list(report["methods"])
    lines = ["| map | pointing | energy inside (chance) | Dice | box lesion recall | box precision | n |",
             "|---|---|---|---|---|---|---|"]

    def f(v, nd):
        return "—" if v is None else f"{v:.{nd}f}"
    for name in names:
        m = report["methods"][name]
        lines.append(f"| {name} | {f(m['pointing_game'], 2)} | {f(m['energy_inside'], 3)} ({f(chance, 3)}) | "
                     f"{f(m['dice'], 2)} | {f(m['lesion_recall'], 2)} | {f(m['box_precision'], 2)} | {m['n']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--data", required=True, help="phantom:COHORT_DIR | covid19_ct_seg_png | medseg")
    ap.add_argument("--limit", type=int, default=None, help="limit passed to build_table")
    ap.add_argument("--max-rows", type=int, default=None, help="score at most this many lesion slices")
    ap.add_argument("--methods", default=None, help="comma-separated; default: all applicable to the family")
    ap.add_argument("--class-idx", type=int, default=None)
    ap.add_argument("--tolerance-px", type=float, default=15.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--val-of-run", type=Path, default=None,
                    help="score only slices of that run's validation patients (never trained on)")
    args = ap.parse_args(argv)

    import torch

    from pneumoct.train.checkpoint import load_checkpoint
    from pneumoct.train.data import build_table

    model, info = load_checkpoint(args.checkpoint)
    meta = dict(info.get("meta", {}))
    family = meta.get("family") or model_family(model)
    model = model.to(args.device).eval()
    spec = parse_data(args.data, args.limit)
    table = build_table(spec, int(meta.get("input_size", 128)))
    rows = lesion_rows(table.lesion_mask, table.has_mask)
    if args.val_of_run is not None:
        val_ids = validation_patients(args.val_of_run)
        rows = rows[np.isin(np.asarray(table.patient_id)[rows], sorted(val_ids))]
    if args.max_rows:
        rows = rows[: args.max_rows]
    if len(rows) == 0:
        print(f"no lesion-positive rows with masks in {args.data}", file=sys.stderr)
        return 1
    x = rows_to_unit(table, rows, meta.get("window"))
    masks = table.lesion_mask[rows] > 0
    methods = args.methods.split(",") if args.methods else None
    torch.set_grad_enabled(True)
    rep = evaluate_rows(model, family, x, masks, methods, data=args.data, class_idx=args.class_idx,
                        tolerance_px=args.tolerance_px)
    rep["checkpoint"] = str(args.checkpoint)
    if args.val_of_run is not None:
        rep["rows"] = f"validation patients of run {args.val_of_run.name} only (not trained on)"
    rep["sources"] = sorted(set(str(s) for s in np.asarray(table.source)[rows]))
    rep["n_patients"] = int(len(set(np.asarray(table.patient_id)[rows])))
    name = args.data.split(":")[0] if ":" in args.data else args.data
    out = args.out or REPO / "benchmarks" / "results" / f"explain_{name}.json"
    write_report(rep, out)
    for k, v in rep["methods"].items():
        print(f"{k:34s} " + " ".join(f"{m}={v[m]:.3f}" if v[m] is not None else f"{m}=NA"
                                     for m in ("pointing_game", "energy_inside", "iou", "dice", "lesion_recall"))
              + f" n={v['n']}")
    print(f"chance energy {rep['chance_energy']:.3f}; wrote {out}")
    print(summary_table(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
