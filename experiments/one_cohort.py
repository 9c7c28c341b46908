"""Issue 12, last piece: every 3D variant (DeepSC-COVID and its ablations, the dual-sampling networks RN34 + US,
Attention RN34 + US / + SS / + DS) beside the 2D systems of ``pneumoct diagnose`` and the bundled 3D systems, on ONE
held-out synthetic cohort, patient level, same cases for every system, with bootstrap intervals.

    python experiments/one_cohort.py train            # train (or reuse) every variant into runs/one_cohort/
    python experiments/one_cohort.py score            # the held-out cohort -> experiments/results/one_cohort.json
    python experiments/one_cohort.py report           # the RESULTS.md section from that JSON
    python experiments/one_cohort.py all [--quick]    # the three in turn (--quick: tiny smoke run under /tmp)

The recorded run (experiments/RESULTS.md, section one-cohort): ``train --dual-epochs 8`` then ``score --per-class 10``.

Training data per family, exactly as the family's own experiment defines it (code reused, not copied):

* DeepSC-COVID variants: ``deepsc_ablations.variant_configs`` / ``train_variant`` with its recorded schedule
  (``deepsc_ablations.SCHEDULE``: phantoms seed 1000 train, seed 2000 validation, 96 px, 32 slices, difficulty 0.2,
  8 + 4 epochs; no real studies).
* dual-sampling networks: ``dual_sampling_eval._cfg`` (configs/dual_sampling_cpu.yaml; cohort seed 7000, chunks
  7000 + 1000 k, 128 px, 48 slices, difficulties 0 / 0.35 / 0.7 / 1, 80/20 patient split, COVID-19 vs CAP) through
  ``task_dual_sampling.fit_dual_sampling``; the epoch count can be shortened (``--dual-epochs``).

Scoring: the test cohort (``volumetric_compare.run``'s, seed 7301, 256 px, 48 slices, difficulty 0.3) goes through
``pipeline.analyse_study`` once per case (headline, M3Lung-Sys research panel, bundled 3D systems via
``pneumoct.volumetric.run_system``), and each trained 3D variant through the chain ``diagnose --model`` /
``evaluate --checkpoint`` uses: DeepSC runs through ``run_system("deepsc", ..., weights_dir=run/best)``, one
dual-sampling network through ``dual_sampling_system.predict_network`` (``evaluate --checkpoint``), the DS ensemble
through ``run_system("dual-sampling", ..., weights_dir=<us/ + ss/>)``. Seeds of every training / validation cohort
are checked disjoint from the test cohort's case seeds.

SYNTHETIC data only: not clinical accuracy.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import deepsc_ablations as dsa  # noqa: E402
import dual_sampling_eval as dse  # noqa: E402
from common import machine, one_thread, replace_section, write_json  # noqa: E402

WORK = ROOT / "runs" / "one_cohort"
OUT = ROOT / "experiments" / "results" / "one_cohort.json"
TAG = "one-cohort"
DUAL_EPOCHS = 8  # configs/dual_sampling_cpu.yaml: 20; shortened to fit the time box (the 5-fold CV used 8)
DUAL_NETS = ("rn34_us", "att_us", "att_ss")
#: --quick: tiny DeepSC (deepsc_ablations.QUICK) and a tiny dual-sampling network on a tiny in-memory cohort
QUICK_DUAL = ["model.kwargs.width=2", "dual.size=[16,32,32]", "train.batch_size=2",
              "dual.cohort={n_per_class: 3, seed: 7000, matrix: 64, n_slices: 16, difficulties: [0.5]}"]
QUICK_TEST = {"per_class": 1, "matrix": 64, "n_slices": 16, "difficulty": 0.3}
FULL_TEST = {"per_class": 6, "matrix": 256, "n_slices": 48, "difficulty": 0.3}


def _log(msg: str) -> None:
    print(f"[one_cohort {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def deepsc_schedule(quick: bool) -> dict:
    s = copy.deepcopy(dsa.SCHEDULE)
    if quick:
        s.update(copy.deepcopy(dsa.QUICK))
    return s


def dual_extra(quick: bool, epochs: int) -> list[str]:
    return [*(QUICK_DUAL if quick else []), f"train.epochs={1 if quick else int(epochs)}"]


# ------------------------------------------------------------------------------------------------ train
def _done(run: Path) -> bool:
    return (run / "DONE").is_file() and (run / "best" / "model.json").is_file()


def train_all(work: Path, quick: bool, dual_epochs: int) -> dict:
    """Train every variant not yet present under ``work`` (a finished run folder is reused); records per run in
    ``work/<family>/<variant>/one_cohort_train.json``."""
    one_thread()
    info = {}
    configs = dsa.variant_configs(deepsc_schedule(quick))
    for key in configs:
        run = work / "deepsc" / key
        if _done(run):
            _log(f"deepsc/{key}: reusing {run}")
        else:
            _log(f"deepsc/{key}: training ...")
            rec = dsa.train_variant(configs[key], run)
            write_json(run / "one_cohort_train.json", rec)
            _log(f"deepsc/{key}: {rec['seconds']:.0f} s, best {rec['best']}")
        info[f"deepsc/{key}"] = _train_record(run)
    cases = None
    for v in DUAL_NETS:
        run = work / "dual" / v
        if _done(run):
            _log(f"dual/{v}: reusing {run}")
        else:
            from pneumoct.train.task_dual_sampling import fit_dual_sampling

            if cases is None and not quick:  # the cached training cohort of dual_sampling_eval (prepared once)
                t0 = time.perf_counter()
                dse.prepare(kinds=("train",))
                cases, _ = dse.load("train")
                _log(f"dual training cohort: {len(cases)} cases ready in {time.perf_counter() - t0:.0f} s")
            if run.exists():
                import shutil

                shutil.rmtree(run)
            _log(f"dual/{v}: training ...")
            t0 = time.perf_counter()
            m = fit_dual_sampling(dse._cfg(v, 0, extra=dual_extra(quick, dual_epochs)), run, progress=False,
                                  cases=cases)  # --quick: None -> the tiny dual.cohort built in memory
            one_thread()
            write_json(run / "one_cohort_train.json", {"seconds": round(time.perf_counter() - t0, 1),
                                                       "best": m.get("best")})
            _log(f"dual/{v}: {time.perf_counter() - t0:.0f} s, best {m.get('best')}")
        info[f"dual/{v}"] = _train_record(run)
    return info


def _train_record(run: Path) -> dict:
    """Wall time, kept epoch and the epochs run of one training folder (from its records and config.yaml)."""
    import yaml

    f = run / "one_cohort_train.json"
    rec = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    cfg = run / "config.yaml"
    raw = yaml.safe_load(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    d = raw.get("deepsc") or {}
    epochs = ([d.get("pretrain_epochs"), d.get("finetune_epochs")] if raw.get("task") == "deepsc"
              else (raw.get("train") or {}).get("epochs"))
    best = rec.get("best") or {}
    w = run.resolve()
    return {"run": str(w.relative_to(ROOT)) if w.is_relative_to(ROOT) else str(w), "seconds": rec.get("seconds"),
            "epochs": epochs, "best_epoch": best.get("epoch"), "best_stage": best.get("stage"),
            "best_val_auc": best.get("val_auc")}



# ------------------------------------------------------------------------------------------------ systems
TASKS_EXTRA = {"covid19_vs_cap": (lambda lab: np.isin(lab, ("covid19", "cap")), lambda lab: lab == "covid19",
                                  "covid19")}
REFERENCE = "m3lung"
DS_LABELS = {"rn34_us": "RN34 + US", "att_us": "Attention RN34 + US", "att_ss": "Attention RN34 + SS",
             "att_ds": "Attention RN34 + DS (Eq. 5 of US + SS)"}


def systems(quick: bool = False) -> dict[str, dict]:
    """{system key: {label, dim (2D/3D), family, trained_on}} in table order."""
    sch = deepsc_schedule(quick)
    g = sch["generator"]
    dsc = (f"phantoms seed {sch['train_seed']} ({sch['train_per_class']}/class) + validation seed {sch['val_seed']} "
           f"({sch['val_per_class']}/class), {g['matrix']} px, {g['n_slices']} slices, difficulty {g['difficulty']}; "
           f"{sch['pretrain_epochs']} + {sch['finetune_epochs']} epochs (deepsc_ablations schedule)")
    co = dict(dse._cfg("att_us", 0, extra=dual_extra(quick, DUAL_EPOCHS)).dual.cohort)
    dual = (f"COVID-19/CAP phantoms seed {co['seed']} (chunks + 1000 k, {co['n_per_class']}/class, {co['matrix']} px, "
            f"{co['n_slices']} slices, difficulties {co['difficulties']}), 80/20 train/validation split")
    out = {
        "headline": {"label": "headline (calibrated lesion burden, threshold mask)", "dim": "2D", "family": "headline",
                     "trained_on": "logistic calibration on 3 real covid-ct-md studies (weights/lesion_burden)"},
        "rule": {"label": "explicit rule on the threshold measurements", "dim": "2D", "family": "rule",
                 "trained_on": "none (hand-set rule, uncalibrated shares)"},
        "m3lung": {"label": "M3Lung-Sys patient network (research panel)", "dim": "2D", "family": "m3lung",
                   "trained_on": "bundled: on-disk phantoms `pneumoct synth --cases 64 --seed 101` (256 px, 48 "
                                 "slices, difficulty 0.3)"},
        "deepsc": {"label": "DeepSC-COVID, bundled", "dim": "3D", "family": "deepsc",
                   "trained_on": "bundled: configs/deepsc_cpu.yaml (phantoms seed 1000, 8/class, validation seed "
                                 "2000, 3/class, + 3 real covid-ct-md studies; 16 + 10 epochs)"},
        "dual-sampling": {"label": "dual-sampling Attention RN34 + DS, bundled", "dim": "3D", "family": "dual",
                          "trained_on": "bundled: configs/dual_sampling_cpu.yaml (cohort seed 7000, 80/class), "
                                        "20 epochs"},
    }
    for key, label, *_ in dsa.VARIANTS:
        out[f"deepsc/{key}"] = {"label": f"DeepSC-COVID {label}", "dim": "3D", "family": "deepsc", "trained_on": dsc}
    for v in (*DUAL_NETS, "att_ds"):
        out[f"dual/{v}"] = {"label": DS_LABELS[v], "dim": "3D", "family": "dual", "trained_on": dual}
    return out


def ds_folder(work: Path) -> Path:
    """A weights folder for ``diagnose --model dual-sampling --weights``: us/ and ss/ linked to the trained runs."""
    d = work / "dual" / "att_ds"
    d.mkdir(parents=True, exist_ok=True)
    for sub, run in (("us", "att_us"), ("ss", "att_ss")):
        link = d / sub
        if not link.exists():
            link.symlink_to(Path("..") / run / "best")
    return d


def variant_scorer(work: Path):
    """``extra(study, dx, case)`` for :func:`volumetric_compare.case_row`: every trained variant on the study and
    the lung mask ``analyse_study`` produced, through the ``diagnose --model`` / ``evaluate --checkpoint`` chain."""
    from pneumoct.models.checkpoint import load_checkpoint
    from pneumoct.models.dual_sampling_system import predict_network
    from volumetric_compare import _system_scores

    nets = {}
    for v in DUAL_NETS:
        model, info = load_checkpoint(work / "dual" / v / "best")
        nets[v] = (model.float().eval(), info)  # as evaluate/volumetric.py loads one network
    ds = ds_folder(work)

    def extra(study, dx, case) -> dict:
        out = {}
        for key, *_ in dsa.VARIANTS:
            out[f"deepsc/{key}"] = _system_scores("deepsc", study, dx.lung_labels, str(work / "deepsc" / key / "best"))
        for v in DUAL_NETS:
            p = float(predict_network(nets[v], study, dx.lung_labels))
            out[f"dual/{v}"] = {"covid19": p, "cap": 1.0 - p}
        out["dual/att_ds"] = _system_scores("dual-sampling", study, dx.lung_labels, str(ds))
        return out

    return extra


# ------------------------------------------------------------------------------------------------ seeds
def _cohort_seeds(c: dict, labels: int) -> set[int]:
    """Per-case seeds of a ``phantom_volume_cohort`` (``{seed, n_per_class}``) or of a dual-sampling cohort
    (``difficulties``: one chunk per difficulty, seed + 1000 k, ``dual_sampling_eval._chunks``)."""
    from pneumoct.synth.writer import case_seed

    if "difficulties" in c:
        return {case_seed(s, j) for _, _, k, s in dse._chunks(c) for j in range(labels * k)}
    return {case_seed(int(c["seed"]), k) for k in range(labels * int(c["n_per_class"]))}


def training_seeds(work: Path | None = None, quick: bool = False) -> dict[str, set[int]]:
    """Per-case phantom seeds of every training and validation cohort behind the scored systems: the bundled
    models' (``volumetric_maps.training_phantom_seeds``, from what their weights record) and the trained variants'
    (from each run's checkpoint metadata when ``work`` holds it, else from the configs the training uses)."""
    from pneumoct.types import CLASS_NAMES
    from volumetric_maps import training_phantom_seeds

    out = {f"bundled {k}": v for k, v in training_phantom_seeds().items()}
    sch = deepsc_schedule(quick)
    cfg_cohorts = {"deepsc": {"phantoms": {"seed": sch["train_seed"], "n_per_class": sch["train_per_class"]},
                              "val_phantoms": {"seed": sch["val_seed"], "n_per_class": sch["val_per_class"]}},
                   "dual": {"cohort": dict(dse._cfg("att_us", 0, extra=dual_extra(quick, DUAL_EPOCHS)).dual.cohort)}}
    runs = [("deepsc", k, len(CLASS_NAMES)) for k, *_ in dsa.VARIANTS] + [("dual", v, 2) for v in DUAL_NETS]
    for fam, key, n_labels in runs:
        meta_file = None if work is None else work / fam / key / "best" / "model.json"
        data = (json.loads(meta_file.read_text(encoding="utf-8"))["meta"]["data"]
                if meta_file is not None and meta_file.is_file() else cfg_cohorts[fam])
        for part, c in ((p, data[p]) for p in ("phantoms", "val_phantoms", "cohort") if p in data):
            what = "train + validation" if part == "cohort" else ("validation" if part.startswith("val") else "train")
            out[f"{fam}/{key} {what} (seed {c['seed']})"] = _cohort_seeds(c, n_labels)
    return out


def check_disjoint(test_seeds: set[int], train: dict[str, set[int]]) -> dict[str, dict]:
    """{cohort: {n, overlap}}; raises RuntimeError if any test case seed is a training / validation seed."""
    rep = {name: {"n": len(s), "overlap": len(s & test_seeds)} for name, s in train.items()}
    bad = {k: v for k, v in rep.items() if v["overlap"]}
    if bad:
        raise RuntimeError(f"test phantoms overlap training / validation cohorts: {bad}")
    return rep


# ------------------------------------------------------------------------------------------------ scoring
def accuracy_table(rows: list[dict], keys: list[str], ref: str, n_boot: int) -> dict[str, dict]:
    """4-class accuracy (argmax) with a 95 % bootstrap CI for every system with all four class probabilities, and
    a paired bootstrap p-value against ``ref`` (difference = system − ref)."""
    from pneumoct.evaluate.classification import accuracy_metric, bootstrap_ci, bootstrap_p_value
    from pneumoct.types import CLASS_NAMES

    y = np.array([CLASS_NAMES.index(r["label"]) for r in rows])

    def probs(s):
        if not all(isinstance(r.get(s), dict) and set(CLASS_NAMES) <= set(r[s]) for r in rows):
            return None
        return np.array([[r[s][c] for c in CLASS_NAMES] for r in rows], float)

    pref, out = probs(ref), {}
    for s in keys:
        p = probs(s)
        if p is None:
            continue
        e = bootstrap_ci(accuracy_metric, y, p, n_boot=n_boot, seed=0)
        e["n"] = int(len(y))
        if s != ref and pref is not None:
            e["paired_vs_ref"] = bootstrap_p_value(accuracy_metric, y, p, pref, n_boot=n_boot, seed=0)
        out[s] = e
    return out


def score_rows(rows: list[dict], keys: list[str], n_boot: int, ref: str = REFERENCE) -> dict[str, dict]:
    """Every task: the AUC tasks of ``volumetric_compare.TASKS`` + COVID-19 vs CAP, and the 4-class accuracy."""
    from volumetric_compare import TASKS, auc_table

    out = auc_table(rows, keys, {**TASKS, **TASKS_EXTRA}, ref, n_boot)
    out["four_class_accuracy"] = accuracy_table(rows, keys, ref, n_boot)
    return out


def score(work: Path, per_class: int, n_boot: int, quick: bool) -> dict:
    import torch

    from volumetric_compare import COHORT, case_row, held_out_cohort

    one_thread()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    gen = {k: (QUICK_TEST if quick else FULL_TEST)[k] for k in ("matrix", "n_slices", "difficulty")}
    cases = held_out_cohort(per_class, COHORT["seed"], **gen)
    test_seeds = {int(c.group.rsplit("_", 1)[1]) for c in cases}
    seeds = check_disjoint(test_seeds, training_seeds(work, quick))
    extra = variant_scorer(work)
    rows = []
    for case in cases:
        rows.append(case_row(case, extra))
        _log(f"{case.case_id:30s} {case.label:12s} {rows[-1]['seconds']['total']:6.1f} s")
    sysinfo = systems(quick)
    keys = list(sysinfo)
    training = {k: _train_record(work / k) for k in keys if k.startswith(("deepsc/", "dual/")) and k != "dual/att_ds"}
    labels = [r["label"] for r in rows]
    return {
        "data": {"kind": "SYNTHETIC phantoms only (pneumoct.synth, generated in memory); not clinical data",
                 "test": {"seed": COHORT["seed"], "per_class": per_class, **gen, "n": len(rows),
                          "labels": {c: labels.count(c) for c in sorted(set(labels))},
                          "case_seeds": sorted(test_seeds)},
                 "seed_check": seeds},
        "systems": sysinfo, "reference": REFERENCE, "training": training,
        "schedules": {"deepsc": {k: deepsc_schedule(quick)[k] for k in
                                 ("pretrain_epochs", "finetune_epochs", "batch_size", "pretrain_lr", "finetune_lr",
                                  "train_run_seed")},
                      "dual": {"epochs": training.get("dual/att_us", {}).get("epochs"), "train_seed": 0,
                               "config": "configs/dual_sampling_cpu.yaml"}},
        "tasks": score_rows(rows, keys, n_boot), "cases": rows, "machine": machine(), "quick": quick,
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "n_boot": n_boot,
        "score_seconds": round(time.perf_counter() - t_all, 1),
    }



# ------------------------------------------------------------------------------------------------ report
TASK_NAMES = {"abnormal_vs_healthy": "abnormal vs healthy (AUC)",
              "covid19_vs_other_pneumonia": "COVID-19 vs other pneumonia (AUC)",
              "covid19_vs_cap": "COVID-19 vs CAP (AUC)", "four_class_accuracy": "4-class accuracy"}
READING = ROOT / "experiments" / "results" / "one_cohort_reading.md"  # hand-written reading, kept on regeneration


def _f(v, d=2):
    return "–" if v is None else f"{v:.{d}f}"


def _cell(e: dict | None) -> tuple[str, str]:
    if e is None:
        return "n/a", ""
    pv = e.get("paired_vs_ref")
    p = "ref." if pv is None else f"{(pv['difference'] or 0):+.2f}, p {_f(pv['p_value'], 3)}"
    return f"{_f(e['estimate'])} [{_f(e['low'])}, {_f(e['high'])}]", p


def reading(res: dict) -> list[str]:
    """Data-driven reading: chance checks and the paired differences with p < 0.05 (uncorrected)."""
    lines, sysinfo = [], res["systems"]
    chance = {"four_class_accuracy": 0.25}
    for task, per in res["tasks"].items():
        if not per:
            continue
        c = chance.get(task, 0.5)
        above = [s for s, e in per.items() if e["low"] is not None and e["low"] > c]
        best = max(per, key=lambda s: per[s]["estimate"] or -1)
        sig = [f"{s} ({e['paired_vs_ref']['difference']:+.2f}, p {e['paired_vs_ref']['p_value']:.3f})"
               for s, e in per.items() if (e.get("paired_vs_ref") or {}).get("p_value") is not None
               and e["paired_vs_ref"]["p_value"] < 0.05]
        n_tests = sum(1 for e in per.values() if (e.get("paired_vs_ref") or {}).get("p_value") is not None)
        lines.append(
            f"- {TASK_NAMES[task]}, n = {next(iter(per.values()))['n']}: highest estimate {best} "
            f"({_f(per[best]['estimate'], 3)}); 95 % CI entirely above chance ({c:g}) for {len(above)} of {len(per)} "
            f"systems" + (f" ({', '.join(above)})" if above and len(above) < len(per) else "") + "; "
            + (f"paired p < 0.05 vs {res['reference']} for {len(sig)} of {n_tests} systems: {'; '.join(sig)}"
               if sig else f"no paired difference vs {res['reference']} reaches p < 0.05 ({n_tests} tests)")
            + ".")
    return lines


def report(res: dict) -> str:
    d, t = res["data"], res["data"]["test"]
    sch = res["schedules"]
    tasks = res["tasks"]
    tr = res["training"]
    ds_ep = sch["dual"]["epochs"]
    lines = [
        "## 2D and 3D systems on one held-out cohort (issue 12) — `experiments/one_cohort.py`", "",
        "- **SYNTHETIC phantoms only — not clinical accuracy.** Every number compares methods on toy phantoms "
        "generated in memory (`pneumoct.synth`).",
        f"- **Test cohort** (held out from every training and validation run): `phantom_volume_cohort` seed "
        f"{t['seed']}, {t['per_class']} per class × 4 classes = {t['n']} phantoms ({t['matrix']} px, "
        f"{t['n_slices']} slices, difficulty {t['difficulty']}; the 2D models' training geometry). Its case seeds were "
        "checked against the per-case seeds of every training / validation cohort behind the scored systems "
        f"({len(d['seed_check'])} cohorts: the bundled models' as their weights record them, each trained variant's "
        f"from its checkpoint; {sum(v['n'] for v in d['seed_check'].values())} seeds with repeats): "
        f"{sum(v['overlap'] for v in d['seed_check'].values())} shared (per cohort in the JSON).",
        "- Every case goes once through `pipeline.analyse_study` (what `pneumoct diagnose` runs: lung mask, "
        "threshold lesions, headline, explicit rule, M3Lung-Sys research panel) and every 3D system through the "
        "chain `diagnose --model` / `evaluate --checkpoint` uses on the same lung mask: `run_system(\"deepsc\", "
        "weights_dir=<run>/best)` for each DeepSC variant, `dual_sampling_system.predict_network` for one "
        "dual-sampling network, `run_system(\"dual-sampling\", weights_dir=<us/ + ss/>)` for DS (Eq. 5, ratio "
        "from the threshold lesion finder), `run_system` with the bundled weights for the bundled 3D systems. "
        "Multi-scale CAM and JCS give no patient-level probability in `analyse_study`'s result (JCS's joint mode "
        "gates on the headline's classifier), so they are not rows.",
        f"- **Training data per system** (one training seed, `train.seed` 0, per variant): DeepSC variants — "
        f"{res['systems']['deepsc/full']['trained_on']}; lr {sch['deepsc']['pretrain_lr']} / "
        f"{sch['deepsc']['finetune_lr']}, batch {sch['deepsc']['batch_size']} (**shortened**: the bundled model had "
        f"16 + 10 epochs). Dual-sampling networks — {res['systems']['dual/att_us']['trained_on']}; "
        f"configs/dual_sampling_cpu.yaml with **{ds_ep} epochs** (shortened from 20 to fit the time box; cosine "
        "decay over those epochs, best validation epoch). Bundled systems — as in their model cards: "
        + "; ".join(f"{res['systems'][k]['label']}: {res['systems'][k]['trained_on']}"
                    for k in ("m3lung", "deepsc", "dual-sampling", "headline")) + ".",
        "- Note the geometry shift: the 3D variants were trained at their families' sizes (DeepSC 96 px / 32 "
        "slices / difficulty 0.2; dual-sampling 128 px / 48 slices / difficulties 0–1) and are tested at 256 px / "
        "48 slices / difficulty 0.3 (their input chains resample to the network grid).",
        "- Tasks (patient level): abnormal vs healthy (headline abnormal probability, else 1 − p(healthy)); "
        "COVID-19 vs other pneumonia (CAP + other viral, healthy left out; p(COVID-19)); COVID-19 vs CAP only "
        "(the dual-sampling task; p(COVID-19)); 4-class accuracy (argmax) for 4-class systems. The dual-sampling "
        "networks have no healthy class and are trained on COVID-19 vs CAP only: their \"other pneumonia\" column "
        "includes other-viral cases outside their task. Cells: estimate [95 % percentile bootstrap CI, "
        f"{res['n_boot']} resamples of the cases]; \"vs {res['reference']}\": difference system − M3Lung-Sys and the "
        "two-sided paired bootstrap p-value (same resampled cases), **no correction for multiple comparisons**; the "
        "p-values cover test-case sampling only, not training randomness.",
        f"- {res['date']}, {res['machine']}; 2-core CPU VM, 1 thread. Scoring wall time "
        f"{res['score_seconds'] / 60:.1f} min; training wall time (sum of runs) "
        f"{sum((v.get('seconds') or 0) for v in tr.values()) / 60:.1f} min. Results: "
        "`experiments/results/one_cohort.json` (per-case probabilities included).", "",
        "| system | 2D/3D | " + " | ".join(f"{TASK_NAMES[k]} | vs M3Lung-Sys" for k in TASK_NAMES) + " |",
        "|---|---|" + "---|---|" * len(TASK_NAMES),
    ]
    for key, info in res["systems"].items():
        cells = []
        for task in TASK_NAMES:
            c, p = _cell(tasks.get(task, {}).get(key))
            cells += [c, p if c != "n/a" else ""]
        lines.append(f"| {info['label']} (`{key}`) | {info['dim']} | " + " | ".join(cells) + " |")
    lines += ["", "| trained variant | train min | epochs | kept epoch (stage) | validation AUC at kept epoch |",
              "|---|---|---|---|---|"]
    for key, rec in tr.items():
        lines.append(f"| `{key}` | {_f((rec.get('seconds') or 0) / 60, 1)} | {rec.get('epochs')} | "
                     f"{rec.get('best_epoch')}" + (f" ({rec['best_stage']})" if rec.get("best_stage") else "")
                     + f" | {_f(rec.get('best_val_auc'), 3)} |")
    lines += ["", "Reading (computed from the numbers):", *reading(res)]
    if READING.is_file() and not res.get("quick"):
        lines += ["", READING.read_text(encoding="utf-8").strip()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("train", "score", "report", "all"))
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny data and networks, 1 epoch, under /tmp")
    ap.add_argument("--work", type=Path, help="run folders (default runs/one_cohort; --quick: a temp folder)")
    ap.add_argument("--out", type=Path, help="results JSON (default experiments/results/one_cohort.json)")
    ap.add_argument("--dual-epochs", type=int, default=DUAL_EPOCHS)
    ap.add_argument("--per-class", type=int, help="test cases per class (default 6; --quick 1)")
    ap.add_argument("--boot", type=int, help="bootstrap resamples (default 1000; --quick 200)")
    args = ap.parse_args(argv)
    work = args.work or (Path("/tmp/one_cohort_quick") if args.quick else WORK)
    if args.stage in ("train", "all"):
        t0 = time.perf_counter()
        train_all(work, args.quick, args.dual_epochs)
        _log(f"training stage {time.perf_counter() - t0:.0f} s")
    out = args.out or (work / "one_cohort.json" if args.quick else OUT)
    if args.stage in ("score", "all"):
        per_class = args.per_class or (QUICK_TEST["per_class"] if args.quick else FULL_TEST["per_class"])
        res = score(work, per_class, args.boot or (200 if args.quick else 1000), args.quick)
        res["command"] = "python experiments/one_cohort.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_json(out, res)
        _log(f"wrote {out}")
    if args.stage in ("report", "score", "all"):
        res = json.loads(out.read_text(encoding="utf-8"))
        text = report(res)
        if not res.get("quick"):
            replace_section(TAG, text)
        print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
