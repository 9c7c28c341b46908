"""Hu et al. multi-scale CAM network on synthetic phantoms (CPU-sized): Table 2's three-way rows -- Conv3, Conv4,
Conv5 single-scale auxiliary classifiers vs the joint Conv3+4+5 classifier -- of Hu et al., "Weakly Supervised
Deep Learning for COVID-19 Infection Detection and Classification from CT Images".

    python experiments/hu_scales.py [--size 64] [--epochs 8] [--max-batches 40] [--seeds 0 1] [--quick]

Three-way set-up as in the paper: NP (non-pneumonia = healthy phantoms) / COVID-19 / CAP (``target:
covid_cap_np``; other-viral phantoms dropped). Loss: class-balanced focal loss (gamma 1), Adam betas (0.5, 0.9)
as in the paper (lr raised to 1e-3 for the short CPU schedule). Each scale set is trained from scratch
(``build_model("multiscale_cam_cpu", use_scales=...)``). Slices: the paper "sampled all the available slices";
its volumes are mostly infected, whereas ~half the slices of a diseased phantom are lesion-free and look exactly
like a healthy slice, so we train and evaluate on slices under the M3Lung-Sys rule (all NP slices, lesion slices
of COVID-19 / CAP patients). Metrics on the held-out test cohort, slice level: accuracy, per-class sensitivity,
macro precision / specificity, macro AUC (one-vs-rest), plus patient-level accuracy (mean slice probability).

Synthetic phantoms: not clinical accuracy, not comparable with the paper.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from pneumoct.train.table import SliceTable  # noqa: E402

CLASSES = ["non_pneumonia", "covid19", "cap"]  # pneumoct.train.config.TARGETS["covid_cap_np"]
VARIANTS = [  # Table 2 three-way rows
    ("Conv3 auxiliary classifier", ("conv3",)),
    ("Conv4 auxiliary classifier", ("conv4",)),
    ("Conv5 auxiliary classifier", ("conv5",)),
    ("Joint classifier Conv3+4+5", ("conv3", "conv4", "conv5")),
]
DEFAULTS = {"size": 64, "epochs": 8, "max_batches": 40, "batch_size": 16, "lr": 1e-3, "patience": 4,
            "seeds": [0, 1], "split_seed": 0, "model": "multiscale_cam_cpu", "out_root": "runs/experiments/hu"}
AUGMENT = {"flip": True, "rotation_deg": 10.0, "p_crop": 0.0}  # configs/multiscale_cam_cpu.yaml
KEYS = (["accuracy", "macro_auc", "macro_precision", "macro_specificity"]
        + [f"sensitivity.{c}" for c in CLASSES] + ["patient_accuracy"])


def _three_way(table: SliceTable) -> SliceTable:
    from pneumoct.train.loop import prepare_table
    from pneumoct.train.sampling import m3lung_slice_rule

    out, _ = prepare_table(m3lung_slice_rule(table), "covid_cap_np")
    return out


def run_hu_scales(train_table: SliceTable, test_table: SliceTable, settings: dict | None = None) -> dict:
    """Train one network per scale set and seed; returns ``{"settings", "rows": [{name, scales, metrics}],
    "per_seed"}``, ``metrics`` = {metric: {mean, sd, min, max, n}} (all in [0, 1])."""
    from pneumoct.train.predict import predict_table
    from pneumoct.train.sampling import m3lung_slice_rule

    s = {**DEFAULTS, **(settings or {})}
    common.one_thread()
    out_root = common.ROOT / s["out_root"]
    train_rule = m3lung_slice_rule(train_table)  # fit() applies the target mapping itself
    test3 = _three_way(test_table)
    pids = np.unique(test3.patient_id)
    per_seed = {name: [] for name, _ in VARIANTS}
    for seed in s["seeds"]:
        for name, scales in VARIANTS:
            tag = f"{'_'.join(scales)}_seed{seed}"
            model, _ = common.train_slice_model(
                s["model"], {"num_classes": 3, "in_channels": 1, "use_scales": list(scales)}, train_rule,
                out_root / tag, s, target="covid_cap_np", m3lung_rule=False,
                loss={"focal_gamma": 1.0, "class_weights": True}, augment=AUGMENT, seed=seed, betas=(0.5, 0.9),
                balanced=False)
            probs = predict_table(model, "multiscale_cam", test3, num_classes=3)["probs"]
            m = common.metrics(test3.class_label, probs, CLASSES)
            pp = np.stack([probs[test3.patient_id == p].mean(0) for p in pids])
            py = np.array([test3.class_label[test3.patient_id == p][0] for p in pids])
            m["patient_accuracy"] = float((pp.argmax(1) == py).mean())
            m["n_patients"] = int(len(pids))
            per_seed[name].append(m)
            print(f"[seed {seed}] {name}: acc {m['accuracy']:.3f} auc {m['macro_auc']:.3f} "
                  f"patient acc {m['patient_accuracy']:.3f}", flush=True)
    rows = [{"name": n, "scales": list(sc), "metrics": common.mean_over_seeds(per_seed[n], KEYS)} for n, sc in VARIANTS]
    return {"settings": s, "rows": rows, "per_seed": per_seed, "n_test_slices": len(test3),
            "n_test_patients": int(len(pids))}


def markdown(res: dict, info: dict | None, elapsed: float) -> str:
    s = res["settings"]
    md = [common.header("Hu et al. multi-scale CAM: single scales vs joint (synthetic phantoms)", s, info, elapsed,
                        "Hu et al., Weakly Supervised Deep Learning for COVID-19 Infection Detection and "
                        "Classification from CT Images, Table 2 (three-way NP / COVID-19 / CAP rows)")]
    md += [f"Model `{s['model']}` (Hu et al.'s VGG-style backbone, widths halved), one network per scale set. Slice "
           f"level: {res['n_test_slices']} test slices (NP slices + lesion slices of COVID-19 / CAP test patients); "
           f"patient accuracy: argmax of the mean slice probability, {res['n_test_patients']} test patients.", "",
           "| Scales | accuracy | macro AUC | sens. NP | sens. COVID-19 | sens. CAP | macro precision | "
           "macro specificity | patient acc |", "|---|---|---|---|---|---|---|---|---|"]
    order = ["accuracy", "macro_auc"] + [f"sensitivity.{c}" for c in CLASSES] + \
        ["macro_precision", "macro_specificity", "patient_accuracy"]
    for r in res["rows"]:
        md.append(f"| {r['name']} | " + " | ".join(common.fmt(r["metrics"][k]) for k in order) + " |")
    md.append("")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=DEFAULTS["size"])
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    ap.add_argument("--max-batches", type=int, default=DEFAULTS["max_batches"])
    ap.add_argument("--seeds", type=int, nargs="+", default=DEFAULTS["seeds"])
    ap.add_argument("--model", default=DEFAULTS["model"], choices=["multiscale_cam_cpu", "multiscale_cam_tiny"])
    ap.add_argument("--quick", action="store_true", help="2 epochs, 10 batches/epoch, seed 0 (a plumbing check)")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md / results JSON")
    a = ap.parse_args(argv)
    common.one_thread()
    timer = common.Timer()
    settings = {"size": a.size, "epochs": a.epochs, "max_batches": a.max_batches, "seeds": a.seeds,
                "model": a.model}
    if a.quick:
        settings.update(epochs=2, max_batches=10, seeds=[0])
    train, test = common.cohort_tables(a.size)
    res = run_hu_scales(train, test, settings)
    elapsed = timer()
    res["elapsed_s"] = elapsed
    res["machine"] = common.machine()
    info = common.cohort_info()
    res["data"] = info
    md = markdown(res, info, elapsed)
    print(md)
    if not a.no_write:
        common.write_json(common.RESULTS_DIR / "hu_scales.json", res)
        common.replace_section("hu-scales", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
