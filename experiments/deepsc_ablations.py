"""DeepSC-COVID ablations (Wang et al., IEEE TMI 2022, Sec. V-E, Fig. 8-9, Table III) at CPU size, on SYNTHETIC
phantoms (issue 12).

Seven variants of configs/deepsc_cpu.yaml, each changed in exactly one field:

    full              lambda_ta = 10, multi-scale task-aware loss, 3D inception blocks, cross-stitch unit
    no_inception      model.kwargs.inception = false (a plain 3x3x3 conv of the same width, Fig. 8)
    no_cross_stitch   model.kwargs.cross_stitch = false (F_seg = I_seg, F_cls = I_cls, Fig. 8)
    lambda_ta_0/1/100 deepsc.lambda_ta (Fig. 9; 0 = no task-aware loss)
    single_scale_ta   deepsc.multi_scale_ta = false (only the finest S/V pair, Table III)

Every variant is trained through ``pneumoct.train.entry.train_from_config`` (what ``pneumoct train`` runs) into
runs/deepsc_ablations/<variant>/, on the same data: in-memory phantoms only (``deepsc.real_ctmd: []``: the 3 real
covid-ct-md studies of the bundled model are NOT used), training seed 1000, validation (epoch choice) seed 2000,
``train.seed`` 0; the schedule is shortened (fewer phantoms and epochs than the bundled config, the same for every
variant) so that all seven train in about 40 minutes on one thread. Every variant is then scored on ONE held-out
cohort (seed 3000, same generator settings), with the chain ``diagnose`` runs (``deepsc_eval.cohort_predictions``):
patient-level 4-class accuracy, macro AUC, healthy-vs-abnormal AUC, lesion Dice (study grid, lesion-bearing
phantoms), each with a 95 % percentile bootstrap CI, and a paired bootstrap p-value against the full model (the same
resampled cases for both; ``pneumoct.evaluate.classification``).

    python experiments/deepsc_ablations.py                 # the recorded run (~40 min, one thread)
    python experiments/deepsc_ablations.py --quick         # smoke run: tiny inputs and network, ~1 min
    python experiments/deepsc_ablations.py --epochs-scale 2 --variants full,lambda_ta_0 --out /tmp/a.json

Writes experiments/results/deepsc_ablations.json and the "deepsc_ablations" section of experiments/RESULTS.md (only a
full run of all seven variants touches RESULTS.md). Synthetic phantoms, CPU-sized network, one training seed: not
the paper's setting and not clinical accuracy.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from common import machine, one_thread, replace_section, write_json  # noqa: E402

CONFIG = ROOT / "configs" / "deepsc_cpu.yaml"
OUT = ROOT / "experiments" / "results" / "deepsc_ablations.json"
WORK = ROOT / "runs" / "deepsc_ablations"

#: (key, row label, the one dotted config field it changes, its value); "full" changes nothing
VARIANTS: list[tuple[str, str, str | None, Any]] = [
    ("full", "full (λ_ta = 10, multi-scale TA, inception, cross-stitch)", None, None),
    ("no_inception", "w/o 3D inception blocks (plain 3×3×3 conv)", "model.kwargs.inception", False),
    ("no_cross_stitch", "w/o cross-stitch unit", "model.kwargs.cross_stitch", False),
    ("lambda_ta_0", "λ_ta = 0 (no task-aware loss)", "deepsc.lambda_ta", 0.0),
    ("lambda_ta_1", "λ_ta = 1", "deepsc.lambda_ta", 1.0),
    ("lambda_ta_100", "λ_ta = 100", "deepsc.lambda_ta", 100.0),
    ("single_scale_ta", "single-scale task-aware loss", "deepsc.multi_scale_ta", False),
]

#: the recorded run's schedule (same for every variant); generator settings are the bundled config's
#: (measured: with the bundled batch 2 / lr 2e-3 / 5e-4 the 8 + 4 epochs left the classifier at chance, probabilities
#: uniform to 0.01; batch 1 and lr 5e-3 / 1e-3 give it twice the steps and a ranking above chance, 5.3 min a variant)
SCHEDULE = {"train_per_class": 6, "val_per_class": 2, "pretrain_epochs": 8, "finetune_epochs": 4,
            "batch_size": 1, "pretrain_lr": 0.005, "finetune_lr": 0.001,
            "train_seed": 1000, "val_seed": 2000, "test_seed": 3000, "test_per_class": 6, "train_run_seed": 0,
            "generator": {"matrix": 96, "n_slices": 32, "difficulty": 0.2}, "input": None, "model_kwargs": {},
            "n_boot": 1000}
#: --quick: a handful of tiny phantoms, a tiny network and input, one epoch per stage (plumbing, not results)
QUICK = {"train_per_class": 1, "val_per_class": 1, "pretrain_epochs": 1, "finetune_epochs": 1, "test_per_class": 1,
         "generator": {"matrix": 64, "n_slices": 16, "difficulty": 0.2},
         "input": {"patch": [8, 32, 32], "cls_slices": 8, "z_spacing_mm": None},
         "model_kwargs": {"stem": 4, "seg_base": 4, "cls_widths": [4, 8, 8]}, "n_boot": 200}

METRICS = ("accuracy", "macro_auc", "abnormal_auc", "lesion_dice")


# ------------------------------------------------------------------------------------------------ configs
def base_config(schedule: dict) -> dict:
    """configs/deepsc_cpu.yaml as a dict, with the ablation schedule: synthetic phantoms only, shortened, explicit
    model flags (inception, cross-stitch on) so every variant differs from it in one value."""
    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    raw["name"] = "deepsc_ablation"
    raw["model"]["kwargs"] = {**raw["model"]["kwargs"], **schedule["model_kwargs"], "inception": True,
                              "cross_stitch": True}
    raw["train"]["seed"] = int(schedule["train_run_seed"])
    raw["train"]["threads"] = 1
    raw["train"]["batch_size"] = int(schedule["batch_size"])
    d = raw["deepsc"]
    d["phantoms"] = {"n_per_class": int(schedule["train_per_class"]), "seed": int(schedule["train_seed"]),
                     **schedule["generator"]}
    d["val_phantoms"] = {"n_per_class": int(schedule["val_per_class"]), "seed": int(schedule["val_seed"]),
                         **schedule["generator"]}
    d["real_ctmd"] = []  # synthetic phantoms only: the real studies are not used
    if schedule["input"] is not None:
        d["input"] = dict(schedule["input"])
    d["pretrain_epochs"] = int(schedule["pretrain_epochs"])
    d["finetune_epochs"] = int(schedule["finetune_epochs"])
    d["pretrain_lr"] = float(schedule["pretrain_lr"])
    d["finetune_lr"] = float(schedule["finetune_lr"])
    return raw


def _set(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    if last not in node:
        raise KeyError(f"{dotted} is not a field of the base config")
    node[last] = value


def variant_configs(schedule: dict | None = None) -> dict[str, dict]:
    """{variant key: raw config dict}; each differs from "full" in the one field of :data:`VARIANTS`."""
    base = base_config(schedule or SCHEDULE)
    out = {}
    for key, _, field, value in VARIANTS:
        raw = copy.deepcopy(base)
        if field is not None:
            _set(raw, field, value)
        out[key] = raw
    return out


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: leaf value} (for comparing configs)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: dict, b: dict) -> dict[str, tuple[Any, Any]]:
    fa, fb = flat(a), flat(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


# ------------------------------------------------------------------------------------------------ train / test
def train_variant(raw: dict, out_dir: Path) -> dict:
    """One training run through the entry point of ``pneumoct train``; returns its metrics and wall time."""
    from pneumoct.train.config import parse_config
    from pneumoct.train.entry import train_from_config

    cfg = parse_config(raw, ROOT)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # our own run folder from an earlier run of this script
    t0 = time.perf_counter()
    metrics = train_from_config(cfg, out_dir, progress=False)
    one_thread()
    hist = [{k: r.get(k) for k in ("stage", "epoch", "train_loss", "val_loss", "val_auc", "val_dice", "val_score")}
            for r in metrics.get("history", [])]
    return {"seconds": round(time.perf_counter() - t0, 1), "best": metrics.get("best"), "epochs": len(hist),
            "history": hist}


def _dice_mean(y: np.ndarray, p: np.ndarray) -> float:
    """Mean of column 0 (a per-case Dice packed as a score column, so the bootstrap helpers resample it)."""
    return float(np.mean(p[:, 0]))


def score(preds: dict[str, dict], n_boot: int) -> dict[str, dict]:
    """Per variant: each metric with its 95 % bootstrap CI and, except the full model, a paired bootstrap p-value
    against the full model (same resampled cases; difference = variant - full)."""
    from pneumoct.evaluate.classification import accuracy_metric, bootstrap_ci, bootstrap_p_value, \
        classification_report
    from pneumoct.evaluate.run import abnormal_auc, macro_auc

    ref = preds["full"]

    def views(pr):  # metric -> (function, y, scores); Dice on the lesion-bearing cases only
        has = np.array([d is not None for d in pr["dice"]])
        d = np.array([v for v in pr["dice"] if v is not None], float)
        return {"accuracy": (accuracy_metric, pr["y"], pr["probs"]),
                "macro_auc": (macro_auc, pr["y"], pr["probs"]),
                "abnormal_auc": (abnormal_auc, pr["y"], pr["probs"]),
                "lesion_dice": (_dice_mean, pr["y"][has], np.stack([d, 1.0 - d], 1))}

    vref = views(ref)
    out = {}
    for key, pr in preds.items():
        if pr["case_ids"] != ref["case_ids"]:
            raise RuntimeError(f"{key}: not the same test cases as the full model")
        v = views(pr)
        rep = classification_report(pr["y"], pr["probs"], pr["classes"], positive_is_abnormal=True)
        res = {"confusion_matrix": rep["confusion_matrix"], "n": int(len(pr["y"])),
               "n_dice": int(len(v["lesion_dice"][1]))}
        for m, (fn, y, s) in v.items():
            ci = bootstrap_ci(fn, y, s, n_boot=n_boot, seed=0)
            res[m] = {"estimate": ci["estimate"], "ci95": [ci["low"], ci["high"]], "n_valid": ci["n_valid"]}
            if key != "full":
                pv = bootstrap_p_value(fn, y, s, vref[m][2], n_boot=n_boot, seed=0)
                res[m]["vs_full"] = {"difference": pv["difference"], "p_value": pv["p_value"],
                                     "n_valid": pv["n_valid"]}
        out[key] = res
    return out


def run(schedule: dict, variants: list[str], work: Path) -> dict:
    from pneumoct.train.volumes import phantom_volume_cohort
    from deepsc_eval import cohort_predictions

    one_thread()
    t_all = time.perf_counter()
    configs = variant_configs(schedule)
    full = configs["full"]
    test = phantom_volume_cohort(int(schedule["test_per_class"]), int(schedule["test_seed"]), **schedule["generator"])
    train_info, preds = {}, {}
    for key in variants:
        print(f"[deepsc_ablations] training {key} ...", file=sys.stderr, flush=True)
        train_info[key] = train_variant(configs[key], work / key)
        t0 = time.perf_counter()
        preds[key] = cohort_predictions(work / key / "best", test)
        train_info[key]["test_seconds"] = round(time.perf_counter() - t0, 1)
        b = train_info[key]["best"] or {}
        print(f"[deepsc_ablations] {key}: {train_info[key]['seconds']:.0f} s, best stage {b.get('stage')} epoch "
              f"{b.get('epoch')} val_score {b.get('val_score')}", file=sys.stderr, flush=True)
    if "full" not in preds:
        raise ValueError("the variants must include 'full' (the reference of the paired tests)")
    scores = score(preds, int(schedule["n_boot"]))
    rows = {key: {"label": label, "changes": None if field is None else {field: value},
                  "config_diff_vs_full": {k: list(v) for k, v in config_diff(full, configs[key]).items()},
                  "training": train_info[key], "test": scores[key],
                  "per_case": {"probs": np.round(preds[key]["probs"], 4).tolist(),
                               "dice": [None if d is None else round(float(d), 4) for d in preds[key]["dice"]]}}
            for key, label, field, value in VARIANTS if key in preds}
    return {
        "data": {"kind": "SYNTHETIC phantoms only (pneumoct.synth, generated in memory); no real studies "
                         "(deepsc.real_ctmd: [])",
                 "train": {"seed": schedule["train_seed"], "per_class": schedule["train_per_class"]},
                 "validation": {"seed": schedule["val_seed"], "per_class": schedule["val_per_class"],
                                "use": "epoch choice (train.monitor val_score)"},
                 "test": {"seed": schedule["test_seed"], "per_class": schedule["test_per_class"],
                          "case_ids": preds["full"]["case_ids"], "y": preds["full"]["y"].tolist(),
                          "classes": preds["full"]["classes"]},
                 "generator": schedule["generator"]},
        "schedule": {k: schedule[k] for k in ("pretrain_epochs", "finetune_epochs", "batch_size", "pretrain_lr",
                                               "finetune_lr", "train_run_seed", "input", "model_kwargs", "n_boot")},
        "base_config": full, "machine": machine(), "variants": rows,
        "seconds": round(time.perf_counter() - t_all, 1),
    }


# ------------------------------------------------------------------------------------------------ report
def _f(v, d=3):
    return "n/a" if v is None else f"{v:.{d}f}"


def _cell(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{_f(m['estimate'])} ({_f(lo, 2)}–{_f(hi, 2)})"


def _p(m: dict) -> str:
    vs = m.get("vs_full")
    if vs is None:
        return "—"
    return f"{'+' if (vs['difference'] or 0) >= 0 else '−'}{_f(abs(vs['difference'] or 0), 3)}, p {_f(vs['p_value'], 3)}"


def reading(res: dict) -> list[str]:
    """The data-driven part of the honest reading: chance check of the full model, significant differences."""
    v = res["variants"]
    full = v["full"]["test"]
    k = len(res["data"]["test"]["classes"])
    lines = []
    acc, mauc, aauc = full["accuracy"], full["macro_auc"], full["abnormal_auc"]
    above = [name for name, m, chance in (("accuracy", acc, 1 / k), ("macro AUC", mauc, 0.5),
                                          ("healthy-vs-abnormal AUC", aauc, 0.5))
             if m["ci95"][0] is not None and m["ci95"][0] > chance]
    lines.append(f"- Full model vs chance: 4-class accuracy {_f(acc['estimate'])} (chance {1 / k:.2f}), macro AUC "
                 f"{_f(mauc['estimate'])}, healthy-vs-abnormal AUC {_f(aauc['estimate'])} (chance 0.5). "
                 + (f"95 % CI above chance for: {', '.join(above)}." if above else
                    "No CI lies entirely above chance: the short schedule leaves the model weak."))
    cm = np.asarray(full["confusion_matrix"])
    top = int(cm.sum(0).max())
    if acc["ci95"][0] is not None and acc["ci95"][0] <= 1 / k:
        lines.append(f"- The full model's 4-class accuracy is not above chance: its probabilities stay close to uniform "
                     f"and the argmax falls on one class for {top} of {int(cm.sum())} test cases; what it learned in "
                     "this short schedule shows in the rankings (AUCs) and the lesion Dice, not in the 4-class call.")
    same1 = [key for key, row in v.items() if key != "full" and _stage1(row) and _stage1(row) == _stage1(v["full"])]
    if same1:
        lines.append(f"- Stage 1 (pre-training, no task-aware term) is identical to the full model's, epoch for epoch, "
                     f"for {', '.join(same1)} (same seed, architecture and data): these variants differ only in the "
                     f"{res['schedule']['finetune_epochs']} joint fine-tuning epochs.")
    same = [key for key, row in v.items() if key != "full" and row["per_case"] == v["full"]["per_case"]]
    if same:
        lines.append(f"- {', '.join(same)}: test predictions identical to the full model's (the changed term never "
                     "acted on the kept model).")
    sig, sig_keys = [], []
    n_tests = 0
    for key, row in v.items():
        if key == "full":
            continue
        for m in METRICS:
            vs = row["test"][m].get("vs_full") or {}
            if vs.get("p_value") is None:
                continue
            n_tests += 1
            if vs["p_value"] < 0.05:
                sig_keys.append(key)
                sig.append(f"{key} {m} {'higher' if vs['difference'] > 0 else 'lower'} than full "
                           f"({vs['difference']:+.3f}, p {vs['p_value']:.3f})")
    if sig:
        lines.append(f"- Paired differences with p < 0.05 ({len(sig)} of {n_tests} tests, no correction for multiple "
                     f"comparisons; about {0.05 * n_tests:.1f} expected by chance alone): " + "; ".join(sig) + ".")
    else:
        lines.append(f"- No paired difference vs the full model reaches p < 0.05 ({n_tests} tests): on these cases "
                     "no ablation is shown to be better or worse than the full model.")
    lines += _epoch_choice(res, sorted(set(sig_keys), key=list(v).index))
    return lines


def _epoch_choice(res: dict, keys: list[str]) -> list[str]:
    """Which epoch each run kept, and what the full model's validation figures were at the variants' kept epochs:
    a difference can come from the epoch choice on the small validation set rather than from the ablated part."""
    v = res["variants"]
    kept = {k: (row["training"].get("best") or {}).get("epoch") for k, row in v.items()}
    n_val = res["data"]["validation"]["per_class"] * len(res["data"]["test"]["classes"])
    out = [f"- Kept epoch (0-based; best `val_score` = mean of validation AUC and Dice on {n_val} validation "
           "phantoms): " + ", ".join(f"{k} {e}" for k, e in kept.items()) + "."]
    other = [k for k in keys if kept[k] != kept["full"]]
    if other:
        hist = {h["epoch"]: h for h in v["full"]["training"].get("history", [])}
        f = hist.get(kept["full"], {})
        at = sorted({kept[k] for k in other if kept[k] in hist})
        out.append(f"- {', '.join(other)} kept another epoch than the full model: the full model kept epoch "
                   f"{kept['full']} (validation AUC {_f(f.get('val_auc'))}, Dice {_f(f.get('val_dice'))}); at "
                   + ", ".join(f"epoch {e} its validation AUC was {_f(hist[e].get('val_auc'))} and Dice "
                               f"{_f(hist[e].get('val_dice'))}" for e in at)
                   + ". Differences of these variants can therefore come from which epoch a noisy "
                   f"{n_val}-case validation set picked rather than from the ablated component; one training seed "
                   "cannot separate the two.")
    return out


def _stage1(row: dict) -> list:
    return [(h["train_loss"], h["val_score"]) for h in row["training"].get("history", []) if h["stage"] == 1]


def report(res: dict) -> str:
    d, s = res["data"], res["schedule"]
    g = d["generator"]
    v = res["variants"]
    n, n_dice = v["full"]["test"]["n"], v["full"]["test"]["n_dice"]
    lines = [
        "## DeepSC-COVID ablations (issue 12; paper Sec. V-E) — `experiments/deepsc_ablations.py`", "",
        f"- **Data: SYNTHETIC phantoms only** (`pneumoct.synth`, in memory, {g['matrix']} px, {g['n_slices']} slices, "
        f"difficulty {g['difficulty']}); `deepsc.real_ctmd: []` — the 3 real covid-ct-md studies the bundled model "
        f"saw are not used. Training seed {d['train']['seed']} ({d['train']['per_class']} per class), validation "
        f"(epoch choice) seed {d['validation']['seed']} ({d['validation']['per_class']} per class), held-out test "
        f"seed {d['test']['seed']} ({d['test']['per_class']} per class, n = {n}; {n_dice} lesion-bearing for "
        f"Dice). Same split, same `train.seed` {s['train_run_seed']}, same test cases for every variant.",
        f"- Schedule (all variants): configs/deepsc_cpu.yaml with {s['pretrain_epochs']} pre-training + "
        f"{s['finetune_epochs']} joint fine-tuning epochs, {s['batch_size']} study per step, lr {s['pretrain_lr']} / "
        f"{s['finetune_lr']} (bundled model: 16 + 10 epochs, batch 2, lr 0.002 / 0.0005, on 8 phantoms per class + 3 "
        "real studies; its batch and lr left the classifier at chance in this short schedule), trained through "
        "`pneumoct.train.entry.train_from_config` (what `pneumoct train` runs) into "
        f"`{res['work']}/<variant>/`.",
        f"- Machine: 2-core CPU VM shared with other work; {res['machine']}. Wall time of this script: "
        f"{res['seconds'] / 60:.1f} min (the per-variant training minutes below vary with the other load).",
        "- **Not the paper's setting** (CPU-sized network and inputs, toy phantoms, short schedule, one training "
        "seed, 4 product classes) **and not clinical accuracy.** Cells: estimate (95 % percentile bootstrap CI, "
        f"{s['n_boot']} resamples of the test cases); \"vs full\": difference variant − full and the two-sided "
        "paired bootstrap p-value (both models on the same resampled cases). The p-values cover test-case "
        "sampling only, not training randomness (one training seed per variant).", "",
        "| variant | 4-class accuracy | vs full | macro AUC | vs full | healthy-vs-abnormal AUC | vs full | "
        "lesion Dice (study grid) | vs full | train min | best (stage, epoch) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in v.items():
        t, tr = row["test"], row["training"]
        b = tr.get("best") or {}
        lines.append(f"| {row['label']} | {_cell(t['accuracy'])} | {_p(t['accuracy'])} | {_cell(t['macro_auc'])} | "
                     f"{_p(t['macro_auc'])} | {_cell(t['abnormal_auc'])} | {_p(t['abnormal_auc'])} | "
                     f"{_cell(t['lesion_dice'])} | {_p(t['lesion_dice'])} | {tr['seconds'] / 60:.1f} | "
                     f"{b.get('stage')}, {b.get('epoch')} |")
    lines += ["", "Reading:", *reading(res),
              f"- With n = {n} test cases ({n_dice} for Dice) the CIs are wide (an accuracy CI spans about ±0.2): "
              "differences between variants smaller than that are within the noise, and the ordering of the rows "
              "is not evidence for or against the paper's Fig. 8-9 / Table III.",
              "- Not shown here: whether the paper's ablation effects exist at this scale would need more test "
              "cases and several training seeds per variant."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny data, network and schedule (~1 min)")
    ap.add_argument("--epochs-scale", type=float, default=1.0,
                    help="multiply both stages' epochs (rounded, at least 1 each)")
    ap.add_argument("--train-per-class", type=int)
    ap.add_argument("--test-per-class", type=int)
    ap.add_argument("--variants", default=",".join(k for k, *_ in VARIANTS),
                    help="comma-separated subset (must include full); RESULTS.md is written only for all seven")
    ap.add_argument("--boot", type=int, help="bootstrap resamples (default 1000; --quick 200)")
    ap.add_argument("--out", type=Path, help=f"JSON path (default {OUT.relative_to(ROOT)}; --quick: under --work)")
    ap.add_argument("--work", type=Path, help="run folders (default runs/deepsc_ablations[_quick])")
    ap.add_argument("--from-json", type=Path, help="no training: re-render the report (and, for a full run of all "
                    "seven variants, the RESULTS.md section) from a JSON this script wrote")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text(encoding="utf-8"))
        text = report(res)
        if not res.get("quick") and len(res["variants"]) == len(VARIANTS):
            replace_section("deepsc_ablations", text)
        print(text)
        return 0
    schedule = copy.deepcopy(SCHEDULE)
    if args.quick:
        schedule.update(copy.deepcopy(QUICK))
    for stage in ("pretrain_epochs", "finetune_epochs"):
        schedule[stage] = max(1, int(round(schedule[stage] * args.epochs_scale)))
    if args.train_per_class:
        schedule["train_per_class"] = args.train_per_class
    if args.test_per_class:
        schedule["test_per_class"] = args.test_per_class
    if args.boot:
        schedule["n_boot"] = args.boot
    variants = [k.strip() for k in args.variants.split(",") if k.strip()]
    known = [k for k, *_ in VARIANTS]
    bad = [k for k in variants if k not in known]
    if bad or "full" not in variants:
        ap.error(f"--variants: unknown {bad} or 'full' missing (known: {', '.join(known)})")
    work = args.work or (WORK.with_name(WORK.name + "_quick") if args.quick else WORK)
    out = args.out or (work / "deepsc_ablations.json" if args.quick else OUT)
    res = run(schedule, [k for k in known if k in variants], work)
    res["quick"] = bool(args.quick)
    w = work.resolve()
    res["work"] = str(w.relative_to(ROOT)) if w.is_relative_to(ROOT) else str(w)
    res["command"] = "python experiments/deepsc_ablations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(out, res)
    text = report(res)
    if not args.quick and len(variants) == len(VARIANTS):
        replace_section("deepsc_ablations", text)
    print(text)
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
