"""Evaluate the bundled DeepSC-COVID (src/pneumoct/weights/deepsc) and, with ``--loso``, leave-one-study-out on the 3
real covid-ct-md studies.

1. Held-out synthetic cohort: phantoms generated in memory with seeds disjoint from training (train seed 1000,
   validation 2000, this cohort ``--seed`` 3000), same generator settings as training. Patient level: 4-class
   accuracy, macro AUC and healthy-vs-abnormal AUC with 95 % bootstrap CIs (pneumoct.evaluate); lesion Dice on the
   study grid (voxel truth of the phantoms; lesion-bearing phantoms only), via the same chain ``diagnose`` runs.
2. The 3 real studies with the bundled model: they were IN its training set (not held out): class call and
   slice-level AUC of the per-slice maximum lesion probability against the radiologists' slice labels.
3. ``--loso``: for each real study, train configs/deepsc_cpu.yaml without it (shorter schedule, ``--loso-epochs``),
   predict it: class call, slice-level AUC. 3 studies: anecdotes, not statistics.

    python experiments/deepsc_eval.py [--loso] [--cases-per-class 6]

Writes experiments/results/deepsc_eval.json and the "deepsc_eval" section of experiments/RESULTS.md.
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
sys.path.insert(0, str(ROOT / "experiments"))
from common import machine, replace_section, write_json  # noqa: E402

BUNDLED = ROOT / "src" / "pneumoct" / "weights" / "deepsc"


def _predict(model, spec, hu, lung, spacing):
    from pneumoct.models.deepsc_system import infer
    from pneumoct.preprocess.volume_deepsc import prepare

    pv = prepare(hu, lung, spacing, spec)
    res = infer(model, pv)
    seg = pv.to_study_grid(res["segmentation"]) * (lung > 0)
    return res["probs"], seg


def _load(model_dir):
    from pneumoct.models.checkpoint import load_checkpoint
    from pneumoct.preprocess.volume_deepsc import DeepSCInputSpec

    model, info = load_checkpoint(model_dir)
    return model, info, DeepSCInputSpec.from_dict(info["meta"]["input_spec"])


def cohort_predictions(model_dir: Path, cases: list) -> dict:
    """A trained DeepSC-COVID folder on volume cases, through the chain ``diagnose`` runs: ``classes``, ``case_ids``,
    ``y`` (N,) class indices, ``probs`` (N, K), ``dice`` (N,) lesion Dice on the study grid at 0.5 (None for a case
    without lesion truth). Cases whose label is not among the model's classes are left out."""
    from pneumoct.evaluate.segmentation import dice
    from pneumoct.train.task_deepsc import target_index

    model, info, spec = _load(model_dir)
    names = info["meta"]["classes"]
    ids, ys, ps, dices = [], [], [], []
    for c in cases:
        y = target_index(c.label, names)
        if y is None:
            continue
        p, seg = _predict(model, spec, c.hu, c.lung, c.spacing)
        ids.append(c.case_id)
        ys.append(y)
        ps.append(p)
        dices.append(dice(seg >= 0.5, c.lesion > 0) if c.lesion is not None and c.lesion.any() else None)
    return {"classes": names, "case_ids": ids, "y": np.asarray(ys), "probs": np.stack(ps), "dice": dices}


def synthetic_cohort(model_dir: Path, n_per_class: int, seed: int, settings: dict) -> dict:
    from pneumoct.evaluate.classification import bootstrap_ci, classification_report
    from pneumoct.evaluate.run import abnormal_auc, macro_auc
    from pneumoct.train.volumes import phantom_volume_cohort

    pred = cohort_predictions(model_dir, phantom_volume_cohort(n_per_class, seed, **settings))
    names, y, p = pred["classes"], pred["y"], pred["probs"]
    dices = [v for v in pred["dice"] if v is not None]
    rep = classification_report(y, p, names, positive_is_abnormal=names[0] == "healthy")
    ci = {"accuracy": bootstrap_ci(lambda a, b: float((b.argmax(1) == a).mean()), y, p, seed=0),
          "macro_auc": bootstrap_ci(macro_auc, y, p, seed=0)}
    if names[0] == "healthy":
        ci["abnormal_auc"] = bootstrap_ci(abnormal_auc, y, p, seed=0)
    d = np.asarray(dices)
    return {"data": f"synthetic phantoms generated in memory, seed {seed}, {n_per_class} per class, {settings}; "
                    "held out (training seeds 1000, validation 2000)",
            "n": int(len(y)), "classes": names, "accuracy": rep["accuracy"], "macro_auc": macro_auc(y, p),
            "abnormal_auc": abnormal_auc(y, p) if names[0] == "healthy" else None, "ci95": {
                k: [v["low"], v["high"]] for k, v in ci.items()}, "confusion_matrix": rep["confusion_matrix"],
            "lesion_dice": {"n": int(d.size), "mean": float(d.mean()) if d.size else None,
                            "median": float(np.median(d)) if d.size else None}}


def real_studies(model_dir: Path, keys, cases=None) -> dict:
    from pneumoct.evaluate.classification import roc_auc
    from pneumoct.train.volumes import real_ctmd_volumes

    model, info, spec = _load(model_dir)
    names = info["meta"]["classes"]
    out = {}
    for c in cases if cases is not None else real_ctmd_volumes(tuple(keys)):
        p, seg = _predict(model, spec, c.hu, c.lung, c.spacing)
        peak = seg.max(axis=(1, 2))
        lab = np.asarray(c.slice_labels, bool)
        out[c.case_id] = {"truth": c.label, "call": names[int(np.argmax(p))],
                          "probabilities": {n: round(float(v), 4) for n, v in zip(names, p)},
                          "slice_auc": roc_auc(lab, peak) if lab.any() and not lab.all() else None,
                          "positive_slices_truth": int(lab.sum()), "slices_with_mask": int((peak >= 0.5).sum()),
                          "n_slices": int(lab.size)}
    return out


def loso(epochs: tuple[int, int], work: Path, phantoms_per_class: int) -> dict:
    import torch

    from pneumoct.train.config import load_config
    from pneumoct.train.task_deepsc import fit_deepsc
    from pneumoct.train.volumes import real_ctmd_volumes

    keys = ("covid", "cap", "normal")
    real = {c.case_id.split("/")[-1]: c for c in real_ctmd_volumes(keys)}
    out = {}
    for held in keys:
        torch.set_num_threads(1)
        cfg = load_config(ROOT / "configs" / "deepsc_cpu.yaml",
                          [f"deepsc.real_ctmd={[k for k in keys if k != held]}",
                           f"deepsc.pretrain_epochs={epochs[0]}", f"deepsc.finetune_epochs={epochs[1]}"])
        run = work / f"loso_{held}"
        shutil.rmtree(run, ignore_errors=True)
        from pneumoct.train.deepsc_options import DeepSCOptions
        from pneumoct.train.task_deepsc import load_cases

        opts = DeepSCOptions.from_config(cfg.deepsc)
        opts = dataclass_replace(opts, phantoms={**opts.phantoms, "n_per_class": phantoms_per_class})
        cfg.deepsc = {**cfg.deepsc, "phantoms": opts.phantoms}  # the run's record says what it trained on
        train = load_cases(dataclass_replace(opts, real_ctmd=[]), "train") + [real[k] for k in keys if k != held]
        fit_deepsc(cfg, run, progress=False, cases=(train, load_cases(opts, "val")))
        out[held] = real_studies(run / "best", [held], cases=[real[held]])[f"covid-ct-md/{held}"]
    return out


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def _fmt(v, d=3):
    return "n/a" if v is None else f"{v:.{d}f}"


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(BUNDLED))
    ap.add_argument("--cases-per-class", type=int, default=6)
    ap.add_argument("--seed", type=int, default=3000)
    ap.add_argument("--loso", action="store_true")
    ap.add_argument("--skip-real", action="store_true", help="no real studies (smoke runs)")
    ap.add_argument("--loso-epochs", default="8,4")
    ap.add_argument("--loso-phantoms", type=int, default=4, help="training phantoms per class in each LOSO run")
    ap.add_argument("--work", default=str(ROOT / "runs" / "deepsc_eval"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    model_dir = Path(args.weights)
    info = json.loads((model_dir / "model.json").read_text())
    settings = {"matrix": 96, "n_slices": 32, "difficulty": 0.2}
    res = {"weights": str(model_dir.relative_to(ROOT)) if model_dir.is_relative_to(ROOT) else str(model_dir),
           "weights_sha256": info["sha256"], "trained_on": info["meta"].get("trained_on"),
           "synthetic_heldout": synthetic_cohort(model_dir, args.cases_per_class, args.seed, settings),
           "real_in_training": {} if args.skip_real else real_studies(model_dir, ("covid", "cap", "normal"))}
    if args.loso:
        e = tuple(int(v) for v in args.loso_epochs.split(","))
        res["loso"] = {"epochs": list(e), "phantoms_per_class": args.loso_phantoms,
                       "studies": loso(e, Path(args.work), args.loso_phantoms)}
    res["seconds"] = round(time.time() - t0, 1)
    if not args.skip_real:  # a smoke run never overwrites the recorded results
        write_json(ROOT / "experiments" / "results" / "deepsc_eval.json", res)
        replace_section("deepsc_eval", report(res))
    print(report(res))
    return 0


def report(res: dict) -> str:
    s = res["synthetic_heldout"]
    ci = s["ci95"]
    lines = ["## DeepSC-COVID, bundled CPU model (issue 12) — `experiments/deepsc_eval.py`", "",
             f"Weights `{res['weights']}` (sha256 {res['weights_sha256'][:12]}), trained on: {res['trained_on']}.",
             f"Machine: {machine()}; this script {res['seconds'] / 60:.1f} min.", "",
             f"**Held-out synthetic phantoms** ({s['data']}; n = {s['n']}):", "",
             "| metric | value | 95 % bootstrap CI |", "|---|---|---|",
             f"| accuracy ({len(s['classes'])} classes) | {_fmt(s['accuracy'])} | {_fmt(ci['accuracy'][0])}–{_fmt(ci['accuracy'][1])} |",
             f"| macro AUC | {_fmt(s['macro_auc'])} | {_fmt(ci['macro_auc'][0])}–{_fmt(ci['macro_auc'][1])} |"]
    if s.get("abnormal_auc") is not None:
        lines.append(f"| healthy-vs-abnormal AUC | {_fmt(s['abnormal_auc'])} | "
                     f"{_fmt(ci['abnormal_auc'][0])}–{_fmt(ci['abnormal_auc'][1])} |")
    d = s["lesion_dice"]
    lines += [f"| lesion Dice, study grid (lesion-bearing phantoms, n = {d['n']}) | mean {_fmt(d['mean'])}, median "
              f"{_fmt(d['median'])} | |", "",
              f"Confusion matrix (rows = truth, {', '.join(s['classes'])}): {s['confusion_matrix']}", "",
              "**Real covid-ct-md studies — IN the training set (not held out)**: class call; slice-level AUC of the "
              "per-slice maximum lesion probability against the radiologists' slice labels.", "",
              "| study | truth | call | probabilities | slice AUC | slices with mask / labelled positive / all |",
              "|---|---|---|---|---|---|"]
    for k, r in res["real_in_training"].items():
        lines.append(f"| {k} | {r['truth']} | {r['call']} | {r['probabilities']} | {_fmt(r['slice_auc'])} | "
                     f"{r['slices_with_mask']} / {r['positive_slices_truth']} / {r['n_slices']} |")
    if "loso" in res:
        lines += ["", f"**Leave-one-study-out on the 3 real studies** (held out: trained without the study, "
                      f"{res['loso']['epochs'][0]} + {res['loso']['epochs'][1]} epochs, "
                      f"{res['loso']['phantoms_per_class']} training phantoms per class + the other 2 real studies, "
                      "other settings of configs/deepsc_cpu.yaml; 3 studies: anecdotes, not statistics):", "",
                  "| held-out study | truth | call | probabilities | slice AUC | slices with mask / labelled positive / all |",
                  "|---|---|---|---|---|---|"]
        for k, r in res["loso"]["studies"].items():
            lines.append(f"| covid-ct-md/{k} | {r['truth']} | {r['call']} | {r['probabilities']} | "
                         f"{_fmt(r['slice_auc'])} | {r['slices_with_mask']} / {r['positive_slices_truth']} / "
                         f"{r['n_slices']} |")
    lines += ["", "Synthetic figures are not clinical accuracy; the real studies above the LOSO table were seen in "
                  "training."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
