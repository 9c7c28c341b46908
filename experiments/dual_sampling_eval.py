"""Dual-sampling attention network (Ouyang et al., IEEE TMI 2020), Tables II-III analogue on synthetic phantoms.

    python experiments/dual_sampling_eval.py prepare [--max-chunks N]   # cohorts -> cache (resumable, chunked)
    python experiments/dual_sampling_eval.py train rn34_us|att_us|att_ss # one network (same split for all)
    python experiments/dual_sampling_eval.py evaluate                   # held-out test cohort -> results JSON
    python experiments/dual_sampling_eval.py bundle                     # att_us + att_ss -> weights/dual_sampling
    python experiments/dual_sampling_eval.py real                       # 3 real covid-ct-md studies (anecdote)
    python experiments/dual_sampling_eval.py results [--observations T] # the block in experiments/RESULTS.md
    python experiments/dual_sampling_eval.py train VARIANT --seed 1; ... seeds  # replicate training seed 1
    python experiments/dual_sampling_eval.py cv [--quick] [--epochs 20] [--budget-min 75]  # 5-fold CV, training cohort
    python experiments/dual_sampling_eval.py loso [--loso-epochs 20] [--quick]  # real studies, leave-one-out

``loso`` (issue 12, real data): for each real in-task covid-ct-md study S (covid, cap), train Attention RN34 + US
(this config) on the phantoms plus the OTHER real study (``dual.real_ctmd``, weak infection mask), then predict S
through ``pneumoct.volumetric.run_system("dual-sampling", ...)`` (what ``diagnose --model dual-sampling`` calls),
and the normal study as an out-of-task anecdote. Two studies: anecdotes, not statistics.

Data: synthetic phantoms only (pneumoct.synth), COVID-19 vs CAP. Training cohort = ``configs/dual_sampling_cpu.yaml``
``dual.cohort`` (seed 7000), split patient-level 80/20 into train / validation (validation picks the epoch);
test cohort = seed 27000, same generator settings, never seen in training or model selection. Infection ratios:
voxel truth for the groups (Table III) and the size-balanced sampler; our threshold lesion finder's ratio for the
Eq. 5 weight, as deployed. One thread (the machine is shared). Numbers say nothing about patients.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "dual_sampling_cpu.yaml"
CACHE = ROOT / "data" / "cache" / "dual_sampling"
RUNS = ROOT / "runs" / "dual_sampling_eval"
OUT_JSON = ROOT / "experiments" / "results" / "dual_sampling_eval.json"
TEST_SEED = 27000
N_BOOT = 1000
VARIANTS = {"rn34_us": ("RN34 + US", ["dual.attention=false", "dual.sampling=uniform"]),
            "att_us": ("Attention RN34 + US", ["dual.attention=true", "dual.sampling=uniform"]),
            "att_ss": ("Attention RN34 + SS", ["dual.attention=true", "dual.sampling=size_balanced"])}
GROUPS = (("<0.005", 0.0, 0.005), ("0.005-0.030", 0.005, 0.030), (">0.030", 0.030, 2.0))


def _cfg(variant: str = "att_us", seed: int = 0, extra=()):
    from pneumoct.train.config import load_config

    return load_config(CONFIG, VARIANTS[variant][1] + [f"name=dual_sampling_eval_{variant}", f"train.seed={seed}",
                                                       *extra])


def _runs(seed: int = 0) -> Path:
    """Seed 0: the reported runs (bundled); other training seeds beside them, to see the spread."""
    return RUNS if seed == 0 else RUNS.with_name(f"{RUNS.name}_seed{seed}")


def _chunks(cohort: dict):
    diffs = list(cohort["difficulties"])
    n = int(cohort["n_per_class"])
    per = [n // len(diffs) + (1 if i < n % len(diffs) else 0) for i in range(len(diffs))]
    for i, (d, k) in enumerate(zip(diffs, per)):
        yield i, float(d), k, int(cohort["seed"]) + 1000 * i


def _chunk_file(kind: str, seed: int, d: float, k: int, cohort: dict, prep) -> Path:
    key = f"{kind}_s{seed}_d{d:g}_k{k}_m{cohort['matrix']}_z{cohort['n_slices']}_" \
          f"{'x'.join(map(str, prep.size))}_f{prep.factor:g}_c{int(prep.crop_to_lungs)}"
    return CACHE / f"{key}.npz"


def cohorts() -> dict:
    cfg = _cfg()
    train = dict(cfg.dual.cohort)
    return {"train": train, "test": {**train, "seed": TEST_SEED, "n_per_class": 60}}


def prepare(max_chunks: int | None = None, kinds=("train", "test")) -> int:
    """Generate + pre-process missing chunks (one ``phantom_volume_cohort`` call each) of the cohorts ``kinds``;
    returns chunks done."""
    from pneumoct.preprocess.volume_dual import prepare_volume
    from pneumoct.quantify.threshold_baseline import find_lesions_threshold
    from pneumoct.train.task_dual_sampling import prep_config
    from pneumoct.train.volumes import phantom_volume_cohort

    prep = prep_config(_cfg())
    CACHE.mkdir(parents=True, exist_ok=True)
    done = 0
    for kind, co in cohorts().items():
        if kind not in kinds:
            continue
        for i, d, k, seed in _chunks(co):
            f = _chunk_file(kind, seed, d, k, co, prep)
            if f.is_file():
                continue
            if max_chunks is not None and done >= max_chunks:
                return done
            t0 = time.time()
            vols = phantom_volume_cohort(k, seed=seed, labels=("covid19", "cap"), matrix=int(co["matrix"]),
                                         n_slices=int(co["n_slices"]), difficulty=d)
            xs, ms, rows = [], [], []
            for v in vols:
                x, m, _ = prepare_volume(v.hu, v.spacing, v.lung, prep, lesion=v.lesion)
                found = find_lesions_threshold(v.hu, v.lung, v.spacing).mask
                lung = v.lung > 0
                rows.append((v.case_id, v.group, int(v.label == "covid19"), float(v.infection_ratio),
                             float(np.count_nonzero((found > 0) & lung) / max(1, np.count_nonzero(lung))), d))
                xs.append(x.astype(np.float16))
                ms.append(m.astype(np.float16))
            tmp = f.with_suffix(".tmp.npz")
            np.savez(tmp, x=np.stack(xs), m=np.stack(ms), rows=json.dumps(rows))
            tmp.replace(f)
            done += 1
            print(f"{kind} chunk {i} (difficulty {d:g}, {len(vols)} phantoms) {time.time() - t0:.0f} s", flush=True)
    return done


def load(kind: str) -> tuple[list, list[dict]]:
    """PreparedCase list + per-case info (truth ratio, finder ratio, difficulty) of a cached cohort."""
    from pneumoct.train.task_dual_sampling import PreparedCase, prep_config

    prep = prep_config(_cfg())
    co = cohorts()[kind]
    cases, info = [], []
    for _, d, k, seed in _chunks(co):
        f = _chunk_file(kind, seed, d, k, co, prep)
        if not f.is_file():
            raise SystemExit(f"{f.name} missing: run `prepare` first")
        with np.load(f) as z:  # each z[...] access reads the whole array: read once per chunk
            xs, ms, rows = z["x"], z["m"], json.loads(str(z["rows"]))
        for j, (cid, grp, y, r, rf, dd) in enumerate(rows):
            cases.append(PreparedCase(cid, grp, "synthetic phantom", int(y), float(r), xs[j], ms[j]))
            info.append({"ratio": r, "finder_ratio": rf, "difficulty": dd})
    return cases, info


def train(variant: str, seed: int = 0) -> dict:
    from pneumoct.train.task_dual_sampling import fit_dual_sampling

    torch.set_num_threads(1)
    cases, _ = load("train")
    out = _runs(seed) / variant
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.time()
    m = fit_dual_sampling(_cfg(variant, seed), out, progress=False, cases=cases)
    print(variant, f"{time.time() - t0:.0f} s", m["best"], flush=True)
    return m


def _metrics(y, p, seed=0) -> dict:
    from pneumoct.evaluate.classification import binary_metric_fn, binary_metrics, bootstrap_ci

    pp = np.stack([1 - p, p], 1)
    res = binary_metrics(y, p)
    res["ci95"] = {}
    for k in ("auc", "accuracy", "sensitivity", "specificity", "f1"):
        ci = bootstrap_ci(binary_metric_fn(k), y, pp, n_boot=N_BOOT, seed=seed)
        res["ci95"][k] = [ci["low"], ci["high"]]
    return res


def evaluate() -> dict:
    from pneumoct.evaluate.classification import binary_metric_fn, bootstrap_p_value
    from pneumoct.models.checkpoint import load_checkpoint
    from pneumoct.models.dual_sampling import dual_sampling_ensemble
    from pneumoct.train.task_dual_sampling import predict

    torch.set_num_threads(1)
    train_cases, _ = load("train")
    cases, info = load("test")
    assert not {c.group for c in cases} & {c.group for c in train_cases}, "test phantoms overlap training"
    y = np.array([c.label for c in cases])
    ratio = np.array([i["ratio"] for i in info])
    finder = np.array([i["finder_ratio"] for i in info])
    probs, meta = {}, {}
    for v in VARIANTS:
        model, ck = load_checkpoint(RUNS / v / "best")
        probs[v] = predict(model, cases)
        meta[v] = {"epoch": ck["meta"]["epoch"], "val": ck["meta"]["val"]}
    probs["att_ds"] = dual_sampling_ensemble(probs["att_us"], probs["att_ss"], finder)       # Eq. 5
    names = {**{k: v[0] for k, v in VARIANTS.items()}, "att_ds": "Attention RN34 + DS"}
    res = {"data": {"train": cohorts()["train"], "test": cohorts()["test"], "n_test": int(len(y)),
                    "n_test_covid19": int(y.sum()), "n_test_cap": int((1 - y).sum()),
                    "n_train_total": len(train_cases), "held_out": True,
                    "note": "synthetic phantoms only; test seeds disjoint from training; validation split of the "
                            "training cohort picked the epoch"},
           "ensemble_ratio": "threshold lesion finder (as deployed); groups by voxel-truth ratio",
           "finder_vs_truth_ratio": {"spearman_like_corr": float(np.corrcoef(np.argsort(np.argsort(ratio)),
                                                                            np.argsort(np.argsort(finder)))[0, 1]),
                                     "median_abs_diff": float(np.median(np.abs(finder - ratio)))},
           "checkpoints": meta, "overall": {}, "groups": {}, "paired_auc_p": {}, "cv": _cv_pointer()}
    for k, p in probs.items():
        res["overall"][names[k]] = _metrics(y, p)
        res["groups"][names[k]] = {}
        for g, lo, hi in GROUPS:
            sel = (ratio >= lo) & (ratio < hi)
            res["groups"][names[k]][g] = _metrics(y[sel], p[sel]) if sel.any() else None
    pairs = [("att_us", "rn34_us"), ("att_ss", "rn34_us"), ("att_ds", "rn34_us"), ("att_ds", "att_us"),
             ("att_ds", "att_ss")]
    for a, b in pairs:
        for metric in ("auc", "accuracy"):
            pv = bootstrap_p_value(binary_metric_fn(metric), y, np.stack([1 - probs[a], probs[a]], 1),
                                   np.stack([1 - probs[b], probs[b]], 1), n_boot=2 * N_BOOT, seed=0)
            res["paired_auc_p"][f"{names[a]} vs {names[b]} ({metric})"] = {
                "difference": pv["difference"], "p_value": pv["p_value"]}
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    return res


def _f(v, nd=3):
    return "–" if v is None else f"{v:.{nd}f}"


def markdown(res: dict) -> str:
    lines = ["| model | AUC [95% CI] | accuracy | sensitivity | specificity | F1 |", "|---|---|---|---|---|---|"]
    for name, m in res["overall"].items():
        ci = m["ci95"]
        lines.append(f"| {name} | {_f(m['auc'])} [{_f(ci['auc'][0])}, {_f(ci['auc'][1])}] | "
                     + " | ".join(f"{_f(m[k])} [{_f(ci[k][0], 2)}, {_f(ci[k][1], 2)}]"
                                  for k in ("accuracy", "sensitivity", "specificity", "f1")) + " |")
    lines += ["", "| model | group (truth ratio) | n (COVID/CAP) | AUC | accuracy | sensitivity | specificity |",
              "|---|---|---|---|---|---|---|"]
    for name, gs in res["groups"].items():
        for g, m in gs.items():
            if m is None:
                continue
            lines.append(f"| {name} | {g} | {m['n_pos']}/{m['n_neg']} | {_f(m['auc'])} | {_f(m['accuracy'])} | "
                         f"{_f(m['sensitivity'])} | {_f(m['specificity'])} |")
    lines += ["", "| paired bootstrap (2000) | difference | p |", "|---|---|---|"]
    for k, v in res["paired_auc_p"].items():
        lines.append(f"| {k} | {_f(v['difference'])} | {_f(v['p_value'])} |")
    return "\n".join(lines)


def results_section(res: dict, observations: str = "", cv_reading: str = "", cv_reading_earlier: str = "") -> str:
    """The ``<!-- dual-sampling -->`` block of experiments/RESULTS.md."""
    d = res["data"]
    cv_res = json.loads(CV_JSON.read_text()) if CV_JSON.is_file() else None
    earlier = json.loads(CV_EARLIER_JSON.read_text()) if cv_res and CV_EARLIER_JSON.is_file() else None
    if earlier and earlier["protocol"]["epochs"] == cv_res["protocol"]["epochs"]:
        earlier = None  # same schedule: nothing to compare
    out = ["<!-- dual-sampling -->", "## Dual-sampling attention network: RN34 / Attention RN34 + US / + SS / + DS "
           "(synthetic phantoms; issue 12)", "",
           "Reproduces: Ouyang et al., Dual-Sampling Attention Network for Diagnosis of COVID-19 from Community "
           "Acquired Pneumonia (IEEE TMI 2020), Tables II-III (test-set rows), COVID-19 (positive) vs CAP.", "",
           f"- **Data: synthetic phantoms only** (`pneumoct.synth` 1.1, 128 px, 48 slices, difficulties "
           f"{d['train']['difficulties']}). Training cohort seed {d['train']['seed']}: {d['n_train_total']} phantoms, "
           "patient-level split 80/20 (seed 0) into training / validation (validation picked the epoch). "
           f"**Held-out test cohort** seed {d['test']['seed']}: {d['n_test']} phantoms ({d['n_test_covid19']} "
           f"COVID-19 / {d['n_test_cap']} CAP), disjoint seeds, never used for training or selection. Same split "
           "and test set for every row.",
           "- Networks: `dual_sampling_rn34`, width 8 (paper 64), grid 64 x 96 x 96 after a lung-box crop, Adam "
           "lr 1e-3 cosine, batch 4, 20 epochs, best validation epoch as in the paper, 1 thread "
           "(`configs/dual_sampling_cpu.yaml`). "
           "Size groups and L_ex from the phantoms' voxel truth; Eq. 5's ratio from our threshold lesion finder "
           f"(as deployed; rank correlation with the truth {res['finder_vs_truth_ratio']['spearman_like_corr']:.2f}, "
           f"median |difference| {res['finder_vs_truth_ratio']['median_abs_diff']:.4f}).",
           "- Threshold 0.5; [95 % bootstrap CI, 1000 resamples] via `pneumoct.evaluate` (`binary_metrics`, "
           "`bootstrap_ci`); paired tests: paired bootstrap (`bootstrap_p_value`, 2000) on the same test cases (the "
           "paper used paired t-tests over folds: " + (
               f"see the 5-fold cross-validation at the end of this section, {cv_res['protocol']['epochs']} epochs"
               + ("" if cv_res["protocol"]["epochs"] == 20 else ", a shorter schedule")
               + (f", and the earlier {earlier['protocol']['epochs']}-epoch one beside it" if earlier else "")
               if cv_res else "**5-fold cross-validation: not run**") + "). One training "
           "per variant here, so seed noise is not measured by this table.",
           "- **Not clinical accuracy, not comparable with the paper's numbers.**", "",
           markdown(res), ""]
    reps = res.get("seed_replicates")
    if reps:
        names = {**{k: v[0] for k, v in VARIANTS.items()}, "att_ds": "Attention RN34 + DS"}
        out += ["Training-seed replicate (same data, split and test set; `train.seed` changed only): AUC / accuracy on "
                "the held-out test cohort, seed 0 (above) vs the replicate.", "",
                "| model | seed 0 | " + " | ".join(f"seed {k}" for k in reps) + " |",
                "|---|---|" + "---|" * len(reps)]
        for k, name in names.items():
            m0 = res["overall"][name]
            out.append(f"| {name} | {_f(m0['auc'])} / {_f(m0['accuracy'])} | "
                       + " | ".join(f"{_f(r[k]['auc'])} / {_f(r[k]['accuracy'])}" for r in reps.values()) + " |")
        out.append("")
    real = res.get("real_covid_ct_md", {}).get("studies")
    if real:
        out += ["Real data (3 COVID-CT-MD studies through `analyse` with the bundled US + SS networks): **an anecdote, "
                "not a figure**; the normal study is outside the COVID-19-vs-CAP task.", "",
                "| study (truth) | P(COVID-19) US | SS | ensemble | finder ratio | w_US | s |", "|---|---|---|---|---|---|---|"]
        for k, v in real.items():
            p = v["p_covid19"]
            out.append(f"| {k} | {_f(p['us'])} | {_f(p['ss'])} | {_f(p['ensemble'])} | "
                       f"{_f(v['infection_ratio_finder'], 4)} | {v['ensemble_weight_us']} | {v['seconds']} |")
        out.append("")
    if observations:
        out += [observations, ""]
    if cv_res:
        out += [cv_section(cv_res), ""]
        if cv_reading:
            out += [cv_reading, ""]
        if earlier:
            out += [cv_earlier_section(earlier, cv_res), ""]
            if cv_reading_earlier:
                out += [cv_reading_earlier, ""]
    if res.get("real_loso"):
        out += [loso_section(res["real_loso"]), ""]
    out.append("<!-- /dual-sampling -->")
    return "\n".join(out)


def cv_section(c: dict) -> str:
    """The 5-fold cross-validation part of the block (from ``experiments/results/dual_sampling_cv.json``)."""
    p, d = c["protocol"], c["data"]
    f = c["folds"]
    skipped = "; ".join(f"{NAMES[k]} not run ({v})" for k, v in c.get("skipped", {}).items())
    return "\n".join([
        "### 5-fold cross-validation (training cohort; the paper's Sec. IV-C protocol, "
        + ("the paper's 20 epochs)" if p["epochs"] == 20 else "shorter schedule)"), "",
        f"- **Data: SYNTHETIC phantoms only**: the {d['n']}-phantom training cohort (seed {d['cohort']['seed']}, "
        f"{d['n_covid19']} COVID-19 / {d['n_cap']} CAP). Patient-level stratified {p['k']}-fold split (seed "
        f"{p['fold_seed']}); for fold k the networks train on the other {p['k'] - 1} folds, the epoch is chosen on a "
        f"patient-level stratified {p['val_fraction_of_training_folds']:.0%} of those folds only (seed "
        f"{p['val_seed']}), and fold k is the test. Per fold: {f[0]['n_train']} train / {f[0]['n_val']} validation / "
        f"{f[0]['n_test']} test phantoms (test folds {', '.join(str(x['n_test']) for x in f)}).",
        f"- Schedule: **{p['epochs']} epochs** per network (every variant and fold; "
        + ("as the reported runs above, `configs/dual_sampling_cpu.yaml` and the paper (best of 20)"
           if p["epochs"] == 20 else
           "the reported runs above and `configs/dual_sampling_cpu.yaml` use 20, the paper the best of 20")
        + "), cosine decay over those epochs, best "
        "validation epoch (AUC, ties by BCE); otherwise `configs/dual_sampling_cpu.yaml`, training seed 0. "
        f"Variants: {', '.join(c['variants_run'])}" + (" and Attention RN34 + DS (Eq. 5 from the US and SS networks "
                                                        "of the same fold, finder ratio)"
                                                        if "Attention RN34 + DS" in c["mean_sd"] else "")
        + (f"; {skipped}" if skipped else "") + ".",
        f"- Machine: {c['machine']}. Wall time {c['wall_s'] / 60:.0f} min "
        f"(training {c['training_wall_s'] / 60:.0f} min).",
        "- Metrics at 0.5 on each test fold; mean ± SD over the folds; pooled out-of-fold = every phantom predicted "
        "by the model that never saw it (the paper's \"combined results of 5 validation sets\"), [95 % bootstrap CI, "
        "1000]; paired t-tests over the folds (`scipy.stats.ttest_rel`, "
        f"df {p['k'] - 1}, as the paper) and paired bootstraps (2000) on the pooled out-of-fold predictions."
        + (" Last two tables: each fold's models on the held-out test cohort above (seed "
           f"{TEST_SEED}), mean ± SD of the {p['k']} fold models, as the paper's Table II test-set column."
           if c.get("heldout_fold_models") else ""), "",
        cv_markdown(c)])


def cv_earlier_section(e: dict, c: dict) -> str:
    """The earlier CV run ``e`` (``CV_EARLIER_JSON``, other schedule, same folds) summarised beside the current ``c``:
    AUC / accuracy mean ± SD, pooled out-of-fold AUC, the fold models on the held-out cohort, and the paired t-tests
    over the folds, one column per schedule."""
    ne, nc = e["protocol"]["epochs"], c["protocol"]["epochs"]
    same = e["data"] == c["data"] and e["folds"] == c["folds"] and all(
        e["protocol"][k] == c["protocol"][k] for k in ("k", "fold_seed", "val_fraction_of_training_folds", "val_seed",
                                                        "train_seed"))

    def ms(r, m):
        return "–" if r is None or m not in r else f"{r[m]['mean']:.3f} ± {_f(r[m]['sd'])}"

    def tp(t, m):
        return "–" if t is None else f"{_f(t[m]['mean_difference'])} ({_f(t[m]['p_value'])})"

    he, hc = e.get("heldout_fold_models") or {}, c.get("heldout_fold_models") or {}
    names = list(c["mean_sd"]) + [k for k in e["mean_sd"] if k not in c["mean_sd"]]
    lines = [f"### The earlier 5-fold cross-validation at {ne} epochs (kept for comparison: "
             f"`experiments/results/{CV_EARLIER_JSON.name}`)", "",
             f"- {'Same' if same else 'Different'} data, folds, validation parts and training seed as the "
             f"{nc}-epoch run above; only the schedule differs ({ne} epochs, cosine decay over them). Machine: "
             f"{e['machine']}. Wall time {e['wall_s'] / 60:.0f} min. Variants: {', '.join(e['variants_run'])}"
             + (" and Attention RN34 + DS (Eq. 5)" if "Attention RN34 + DS" in e["mean_sd"] else "") + ".", "",
             f"| model (5-fold CV) | AUC mean ± SD, {nc} ep | {ne} ep | accuracy mean ± SD, {nc} ep | {ne} ep "
             f"| pooled out-of-fold AUC, {nc} ep | {ne} ep | fold models on the held-out cohort, AUC, {nc} ep "
             f"| {ne} ep |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rc, re_ = c["mean_sd"].get(n), e["mean_sd"].get(n)
        pc, pe = c["pooled"].get(n), e["pooled"].get(n)
        lines.append(f"| {n} | {ms(rc, 'auc')} | {ms(re_, 'auc')} | {ms(rc, 'accuracy')} | {ms(re_, 'accuracy')} | "
                     f"{'–' if pc is None else _f(pc['auc'])} | {'–' if pe is None else _f(pe['auc'])} | "
                     f"{ms(hc.get('mean_sd', {}).get(n), 'auc')} | {ms(he.get('mean_sd', {}).get(n), 'auc')} |")
    keys = list(c["ttest"]) + [k for k in e["ttest"] if k not in c["ttest"]]
    lines += ["", f"| paired t-test over the folds: mean difference (p) | AUC, {nc} ep | {ne} ep | accuracy, {nc} ep "
              f"| {ne} ep |", "|---|---|---|---|---|"]
    for k in keys:
        tc, te = c["ttest"].get(k), e["ttest"].get(k)
        lines.append(f"| {k} | {tp(tc, 'auc')} | {tp(te, 'auc')} | {tp(tc, 'accuracy')} | {tp(te, 'accuracy')} |")
    return "\n".join(lines)


def _hand_written(text: str, head: str) -> str:
    """A hand-written paragraph of the current block (kept when ``results`` is rerun without it)."""
    import re

    block = re.search(r"<!-- dual-sampling -->.*?<!-- /dual-sampling -->", text, flags=re.S)
    if not block:
        return ""
    # a paragraph ends at the next sub-heading or marker comment (the real-data LOSO block has its own markers)
    m = re.search(r"\n(" + re.escape(head) + r".*?)\n\n(?=### |<!-- )", block.group(0), flags=re.S)
    return m.group(1) if m else ""


def write_results(observations: str = "", cv_reading: str = "", cv_reading_earlier: str = "") -> None:
    import re

    res = json.loads(OUT_JSON.read_text())
    md = ROOT / "experiments" / "RESULTS.md"
    text = md.read_text()
    observations = observations or _hand_written(text, "Observations (hand-written")
    cv_reading = cv_reading or _hand_written(text, "Reading of the cross-validation (hand-written")
    cv_reading_earlier = cv_reading_earlier or _hand_written(text, "Reading of the earlier cross-validation "
                                                                     "(hand-written")
    block = results_section(res, observations, cv_reading, cv_reading_earlier)
    if "<!-- dual-sampling -->" in text:
        text = re.sub(r"<!-- dual-sampling -->.*?<!-- /dual-sampling -->", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md.write_text(text)


def bundle() -> None:
    """att_us -> weights/dual_sampling/us, att_ss -> .../ss (half precision: < 5 MB together), fingerprint, card."""
    from pneumoct.models.checkpoint import load_checkpoint, save_checkpoint
    from pneumoct.train.task_dual_sampling import build_cohort, cohort_fingerprint
    from pneumoct.fingerprint import write_fingerprint

    dest = ROOT / "src" / "pneumoct" / "weights" / "dual_sampling"
    dest.mkdir(parents=True, exist_ok=True)
    for v, sub in (("att_us", "us"), ("att_ss", "ss")):
        model, info = load_checkpoint(RUNS / v / "best")
        save_checkpoint(dest / sub, model.half(), info["model_name"], info["model_kwargs"],
                        {**info["meta"], "stored_dtype": "float16 (computed in float32)"})
    co = dict(cohorts()["train"])
    co["n_per_class"] = 6  # a sample of the same generator settings is enough for the intensity statistics
    fp = cohort_fingerprint(build_cohort(co), "dual_sampling_cpu")
    fp["model"]["n_training_phantoms"] = int(cohorts()["train"]["n_per_class"]) * 2
    write_fingerprint(fp, dest)
    (dest / "model_card.md").write_text(model_card())
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print("bundled into", dest, f"{size / 1e6:.2f} MB")


def model_card() -> str:
    """The bundle's card: exactly what it was trained on and what was measured (held out or not)."""
    res = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    co = cohorts()
    lines = ["# Model card: dual-sampling attention network (Attention RN34 + US, + SS; ensemble Eq. 5)", "",
             "**Trained on synthetic phantoms — not clinical accuracy.** Research use only; not a medical device.", "",
             "## Model",
             "- Ouyang et al., IEEE TMI 2020: 3D ResNet-34 (width 8, paper 64), stride 1 in the last stage, online "
             "attention (Eq. 1-2, alpha 100, beta 0.4), L_ex (Eq. 3) with lambda 0.5 (Eq. 4); `us/` uniform "
             "sampling, `ss/` size-balanced sampling (Sec. III-C; a class with one populated size group keeps it); "
             "ensemble Eq. 5 (w 0.35 / 0.96) with the infection ratio from pneumoct's threshold lesion finder.",
             "- Input: lung box crop, 0.7168 x 0.7168 x 1.25 mm x common factor (>= 2, as needed to fit), zero-padded "
             "to 64 x 96 x 96, window [-1350, 150] HU -> [0, 1], lung-masked. Weights stored in float16, run in float32.",
             "- Classes: COVID-19 vs community-acquired pneumonia only. Healthy / other viral studies get a "
             "meaningless score.", "",
             "## Training data",
             f"- Synthetic phantoms only (pneumoct.synth, generated in memory): cohort {co['train']} -> "
             f"{2 * int(co['train']['n_per_class'])} phantoms (half COVID-19, half CAP), patient-level split 80/20 "
             "(seed 0) into training / validation; validation picked the epoch (best AUC, ties by BCE).",
             "- Lesion masks for L_ex and the infection ratios of the size groups: the phantoms' voxel truth.", "",
             "## Measured"]
    if res.get("overall"):
        d = res["data"]
        lines.append(f"- Held out: {d['n_test']} phantoms of a separate cohort (seed {TEST_SEED}, same generator "
                     f"settings; {d['n_test_covid19']} COVID-19 / {d['n_test_cap']} CAP), never used in training or "
                     "selection. Threshold 0.5; 95 % bootstrap CIs (1000):")
        for name, m in res["overall"].items():
            ci = m["ci95"]["auc"]
            lines.append(f"  - {name}: AUC {_f(m['auc'])} [{_f(ci[0])}, {_f(ci[1])}], accuracy {_f(m['accuracy'])}, "
                         f"sensitivity {_f(m['sensitivity'])}, specificity {_f(m['specificity'])}, F1 {_f(m['f1'])}")
    else:
        lines.append("- (run `experiments/dual_sampling_eval.py evaluate`)")
    real = res.get("real_covid_ct_md", {}).get("studies")
    if real:
        lines.append("- Real data, NOT a figure (3 studies of COVID-CT-MD, an anecdote): P(COVID-19) ensemble "
                     + ", ".join(f"{k} study {_f(v['p_covid19']['ensemble'], 2)}" for k, v in real.items())
                     + " (the normal study is outside the task).")
    lines += ["- Not measured: anything on patients; cross-validation (CPU time); calibration.", "",
              "## Limitations",
              "- Phantoms are far simpler than real CT (lesion shapes, textures, anatomy); the attention maps and "
              "probabilities on real studies are unvalidated.",
              "- Coarse grid (about 3.6 mm in-plane, 6 mm between slices on a real study).", ""]
    return "\n".join(lines)


def seed_spread(seeds=(1,)) -> dict:
    """Overall test metrics of the replicate runs (other training seeds, same data and split), merged into the
    results JSON under ``seed_replicates``."""
    from pneumoct.evaluate.classification import binary_metrics
    from pneumoct.models.checkpoint import load_checkpoint
    from pneumoct.models.dual_sampling import dual_sampling_ensemble
    from pneumoct.train.task_dual_sampling import predict

    cases, info = load("test")
    y = np.array([c.label for c in cases])
    finder = np.array([i["finder_ratio"] for i in info])
    res = json.loads(OUT_JSON.read_text())
    out = res.setdefault("seed_replicates", {})
    for sd in seeds:
        probs = {v: predict(load_checkpoint(_runs(sd) / v / "best")[0], cases) for v in VARIANTS}
        probs["att_ds"] = dual_sampling_ensemble(probs["att_us"], probs["att_ss"], finder)
        out[str(sd)] = {k: {m: binary_metrics(y, p)[m] for m in ("auc", "accuracy", "sensitivity", "specificity")}
                        for k, p in probs.items()}
        print(sd, json.dumps(out[str(sd)]))
    OUT_JSON.write_text(json.dumps(res, indent=1) + "\n")
    return out


def real() -> dict:
    """The 3 real covid-ct-md studies through ``analyse`` with the bundled weights: an anecdote, not a figure."""
    from pneumoct.io import read_study
    from pneumoct.models.dual_sampling_system import analyse
    from pneumoct.preprocess.lung_mask import segment_lungs

    torch.set_num_threads(1)
    base = ROOT.parent / "shared" / "data" / "covid-ct-md" / "dicom"
    if not base.is_dir():
        base = Path("/work/shared/data/covid-ct-md/dicom")
    out = {}
    for truth, folder in (("covid19", "covid-P001"), ("cap", "cap-cap001"), ("normal", "normal-normal001")):
        st = read_study(base / folder)
        lung = segment_lungs(st).labels
        t0 = time.time()
        r = analyse(st, lung)
        out[truth] = {"p_covid19": r.info["p_covid19"], "infection_ratio_finder": r.info["infection_ratio"],
                      "ensemble_weight_us": r.info["ensemble_weight_us"], "seconds": round(time.time() - t0, 2)}
        print(truth, out[truth], flush=True)
    res = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    res["real_covid_ct_md"] = {"studies": out, "note": "3 real studies: an anecdote, not a figure; the normal study "
                               "is outside the COVID-19-vs-CAP task"}
    OUT_JSON.write_text(json.dumps(res, indent=1) + "\n")
    return out


LOSO_RUNS = RUNS.with_name("dual_sampling_loso")
LOSO_STUDIES = ("covid", "cap")  # the real studies of the task's classes; normal is outside COVID-19 vs CAP


def attention_on_slices(att: np.ndarray, lung: np.ndarray, slice_labels: np.ndarray, top: float = 0.01) -> dict:
    """Where an attention map (study grid, zero outside the lungs) puts its mass, against the radiologists' slice
    labels: fraction of the attention mass on positive slices, and of its top ``top`` lung voxels, beside the
    chance levels (the share of positive slices among the lung-bearing slices, and of the lung voxels)."""
    pos = np.asarray(slice_labels, bool)
    lung = np.asarray(lung) > 0
    mass = att.sum(axis=(1, 2), dtype=np.float64)
    vals = att[lung]
    out = {"attention_mass": float(mass.sum()), "positive_slices": int(pos.sum()), "n_slices": int(pos.size),
           "positive_slice_fraction": float(pos.mean()),
           "positive_slice_fraction_lung_slices": float(pos[lung.any(axis=(1, 2))].mean()),
           "lung_voxel_fraction_on_positive_slices": float(lung[pos].sum() / max(1, lung.sum())),
           "mass_on_positive_slices": None, "top_voxels_on_positive_slices": None}
    if mass.sum() > 0 and pos.any():  # no positive slice (the normal study): nothing to compare with
        out["mass_on_positive_slices"] = float(mass[pos].sum() / mass.sum())
        k = max(1, int(round(top * vals.size)))
        thr = np.partition(vals, vals.size - k)[vals.size - k]
        z = np.nonzero(lung & (att >= thr))[0]
        out["top_voxels_on_positive_slices"] = float(pos[z].mean())
        out["top_fraction"] = top
    return out


def _predict_real(weights_dir, studies: dict) -> dict:
    """Each real study through run_system (as diagnose --model dual-sampling): P(COVID-19) of the US network, the
    call at 0.5, the attention statistics. ``weights_dir`` None = the bundled phantom-only networks."""
    from pneumoct.volumetric import run_system

    out = {}
    for key, (study, case) in studies.items():
        t0 = time.time()
        r = run_system("dual-sampling", study, case.lung, weights_dir=None if weights_dir is None else str(weights_dir))
        p = float(r.info["p_covid19"]["us"])
        out[key] = {"truth": case.label, "p_covid19_us": round(p, 4), "call_us": "covid19" if p >= 0.5 else "cap",
                    "p_covid19_system": round(float(r.probabilities["covid19"]), 4),
                    "attention_us": attention_on_slices(r.maps["attention_us"], case.lung, case.slice_labels),
                    "seconds": round(time.time() - t0, 1)}
        print(key, json.dumps(out[key]), flush=True)
    return out


def _fold_system_dir(run: Path) -> Path:
    """A weights folder run_system reads (``us/`` and ``ss/``): the fold's US network in both places, so the
    Eq. 5 ensemble equals the US network (no SS network is trained per fold)."""
    import shutil

    sysdir = run / "system"
    shutil.rmtree(sysdir, ignore_errors=True)
    for n in ("us", "ss"):
        shutil.copytree(run / "best", sysdir / n)
    return sysdir


def loso(epochs: int = 20, quick: bool = False) -> dict:
    """Leave-one-study-out over the real in-task studies (see the module docstring); results -> OUT_JSON
    ``real_loso`` (not with ``quick``: a smoke run on a tiny cohort and network, one epoch)."""
    import shutil

    from pneumoct.io import read_study
    from pneumoct.models.checkpoint import read_checkpoint_info
    from pneumoct.train.ctmd import _CTMD_STUDIES, COVID_CT_MD_ROOT
    from pneumoct.train.task_dual_sampling import (build_cohort, fit_dual_sampling, prep_config, prepare_cases,
                                                   real_training_volumes)
    from pneumoct.train.volumes import real_ctmd_volumes

    torch.set_num_threads(1)
    t_all = time.time()
    tiny = ["dual.cohort.n_per_class=4", "dual.cohort.matrix=64", "dual.cohort.n_slices=24", "dual.size=[32,48,48]",
            "model.kwargs.width=4"] if quick else []
    work = LOSO_RUNS.with_name(LOSO_RUNS.name + "_quick") if quick else LOSO_RUNS
    base = _cfg("att_us")
    t0 = time.time()
    if quick:
        from pneumoct.train.config import load_config

        qcfg = load_config(CONFIG, VARIANTS["att_us"][1] + tiny)
        phantoms = prepare_cases(build_cohort(qcfg.dual.cohort), prep_config(qcfg))
    else:
        prepare(kinds=("train",))  # cached chunks under data/cache/dual_sampling (reused by `train`)
        phantoms, _ = load("train")
        qcfg = base
    t_phantoms = time.time() - t0
    t0 = time.time()
    real_cases = {c.case_id.split("/")[-1]: c for c in real_training_volumes(LOSO_STUDIES)}
    real_cases.update({c.case_id.split("/")[-1]: c for c in real_ctmd_volumes(("normal",))})
    studies = {k: (read_study(COVID_CT_MD_ROOT / "dicom" / _CTMD_STUDIES[k][0]), c) for k, c in real_cases.items()}
    prep = prep_config(qcfg)
    real_prepared = {k: prepare_cases([real_cases[k]], prep)[0] for k in LOSO_STUDIES}
    t_real = time.time() - t0
    print(f"phantoms {len(phantoms)} in {t_phantoms:.0f} s, real studies in {t_real:.0f} s", flush=True)
    folds = {}
    for held in LOSO_STUDIES:
        other = [k for k in LOSO_STUDIES if k != held]
        cfg_over = VARIANTS["att_us"][1] + tiny + [f"dual.real_ctmd={other}", f"train.epochs={1 if quick else epochs}",
                                                   f"name=dual_sampling_loso_held_{held}"]
        from pneumoct.train.config import load_config

        cfg = load_config(CONFIG, cfg_over)
        run = work / f"held_{held}"
        shutil.rmtree(run, ignore_errors=True)
        cases = phantoms + [real_prepared[k] for k in other]
        t0 = time.time()
        m = fit_dual_sampling(cfg, run, progress=False, cases=cases)
        t_train = time.time() - t0
        meta = read_checkpoint_info(run / "best")["meta"]
        trained_real = meta["data"]["real_studies"]
        assert f"covid-ct-md/{held}" not in trained_real, "held-out study in its fold's training"
        t0 = time.time()
        preds = _predict_real(_fold_system_dir(run), {k: studies[k] for k in (held, "normal")})
        folds[held] = {"held_out": f"covid-ct-md/{held}", "trained_on_real": trained_real,
                       "weak_ratio_of_training_real": meta["data"]["real_weak_ratios"],
                       "train_cases": meta["data"]["train_cases"], "val_cases": meta["data"]["val_cases"],
                       "epochs": cfg.train.epochs, "best_epoch": m["best"].get("epoch"),
                       "best_val": {k: m["best"].get(k) for k in ("val_auc", "val_acc", "val_loss")},
                       "held_out_prediction": preds[held], "normal_prediction": preds["normal"],
                       "train_seconds": round(t_train, 1), "predict_seconds": round(time.time() - t0, 1),
                       "run_dir": str(run.relative_to(ROOT))}
        print(held, f"trained in {t_train:.0f} s, best {m['best']}", flush=True)
    bundled = _predict_real(None, {k: studies[k] for k in (*LOSO_STUDIES, "normal")})
    res = {"data": "REAL covid-ct-md studies (covid-P001 COVID-19, cap-cap001 CAP; normal001 out of task) + "
                   "SYNTHETIC phantoms (the training cohort of configs/dual_sampling_cpu.yaml, seed 7000)",
           "protocol": "leave-one-study-out over the 2 in-task real studies: each fold trains Attention RN34 + US "
                       "(configs/dual_sampling_cpu.yaml) on the phantoms' 80 % training split + the OTHER real study "
                       "(training only, weak infection mask); the epoch is picked on the phantom validation split; "
                       "the held-out study was never in its fold's training. Prediction: "
                       "pneumoct.volumetric.run_system('dual-sampling') with the fold's US network in us/ and ss/ "
                       "(so the system output equals US).",
           "weak_mask": "threshold lesion finder's mask on the radiologist-positive slices, lung sides whose lobes "
                        "are all negative emptied (fallback: lung voxels of the positive slices)",
           "weak_mask_method": {k: real_cases[k].extra["weak_lesion_method"] for k in LOSO_STUDIES},
           "weak_ratio": {k: round(real_cases[k].extra["weak_ratio"], 5) for k in LOSO_STUDIES},
           "epochs": 1 if quick else epochs, "quick": quick, "folds": folds,
           "bundled_phantom_only_us": bundled,
           "seconds": {"phantoms": round(t_phantoms, 1), "real_studies": round(t_real, 1),
                       "total": round(time.time() - t_all, 1)},
           "machine": "2-core CPU VM shared with other jobs, 1 thread (torch.set_num_threads(1))",
           "note": "2 held-out studies: anecdotes, not statistics"}
    if not quick:
        full = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
        full["real_loso"] = res
        OUT_JSON.write_text(json.dumps(full, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return res


def loso_section(res: dict) -> str:
    """The real-data LOSO sub-block of the dual-sampling section of RESULTS.md (from ``real_loso``)."""
    def frac(a):
        v = a.get("mass_on_positive_slices")
        return "–" if v is None else f"{v:.2f}"

    f0 = next(iter(res["folds"].values()))
    lines = ["<!-- dual-sampling-real-loso -->",
             "### Real studies, leave-one-study-out (Attention RN34 + US, `dual.real_ctmd`)", "",
             f"- **Data: {res['data']}.** Protocol: {res['protocol']}",
             f"- Weak infection mask for L_ex / size group of the training real study: {res['weak_mask']}; ratios "
             f"{res['weak_ratio']}.",
             f"- {res['epochs']} epochs per fold (config otherwise unchanged: width 8, 64 x 96 x 96, Adam 1e-3 cosine, "
             f"batch 4); {f0['train_cases']} training cases ({f0['train_cases'] - 1} phantoms + 1 real), "
             f"{f0['val_cases']} validation phantoms.",
             f"- Machine: {res['machine']}; wall time {res['seconds']['total'] / 60:.1f} min in all (phantoms "
             f"{res['seconds']['phantoms']:.0f} s, real studies {res['seconds']['real_studies']:.0f} s, training "
             + ", ".join(f"fold {k} {v['train_seconds'] / 60:.1f} min" for k, v in res["folds"].items()) + ")"
             + (f"; {res['run_note']}." if res.get("run_note") else "."),
             "- **Two held-out studies: anecdotes, not statistics.** Attention columns: share of the US attention "
             "mass on radiologist-positive slices / of its top 1 % lung voxels, against the share of the lung voxels "
             "lying on those slices (what a map spread evenly over the lungs would get).", "",
             "| held-out study (truth) | fold trained on (real) | best epoch of N (val AUC) | P(COVID-19) US | call | "
             "attention mass on positive slices | top 1 % voxels on positive slices | lung voxels on positive slices |"
             " bundled phantom-only US: P / call / mass |",
             "|---|---|---|---|---|---|---|---|---|"]
    b = res["bundled_phantom_only_us"]
    for k, f in res["folds"].items():
        p, a, bb = f["held_out_prediction"], f["held_out_prediction"]["attention_us"], b[k]
        top = a.get("top_voxels_on_positive_slices")
        lines.append(f"| covid-ct-md/{k} ({p['truth']}) | {', '.join(f['trained_on_real'])} | "
                     f"{f['best_epoch'] + 1} of {f['epochs']} ({_f(f['best_val']['val_auc'])}) | {_f(p['p_covid19_us'])} | {p['call_us']} | {frac(a)} | "
                     f"{'–' if top is None else f'{top:.2f}'} | {a['lung_voxel_fraction_on_positive_slices']:.2f} | "
                     f"{_f(bb['p_covid19_us'])} / {bb['call_us']} / {frac(bb['attention_us'])} |")
    lines += ["", "Out of task (normal001 is neither COVID-19 nor CAP; its score means nothing): P(COVID-19) US "
              + ", ".join(f"fold held-out {k} {_f(f['normal_prediction']['p_covid19_us'])}" for k, f in
                          res["folds"].items())
              + f", bundled {_f(b['normal']['p_covid19_us'])}."]
    if res.get("observations"):
        lines += ["", res["observations"]]
    lines.append("<!-- /dual-sampling-real-loso -->")
    return "\n".join(lines)


def write_loso_results(observations: str = "") -> None:
    """Insert / replace the LOSO sub-block inside the dual-sampling block of RESULTS.md (the rest untouched)."""
    import re

    res = json.loads(OUT_JSON.read_text())
    if observations:
        res["real_loso"]["observations"] = observations
        OUT_JSON.write_text(json.dumps(res, indent=1) + "\n")
    block = loso_section(res["real_loso"])
    md = ROOT / "experiments" / "RESULTS.md"
    text = md.read_text()
    if "<!-- dual-sampling-real-loso -->" in text:
        text = re.sub(r"<!-- dual-sampling-real-loso -->.*?<!-- /dual-sampling-real-loso -->", lambda _: block, text,
                      flags=re.S)
    else:
        text = text.replace("<!-- /dual-sampling -->", block + "\n\n<!-- /dual-sampling -->", 1)
    md.write_text(text)


# ------------------------------------------------------------------------------------------ 5-fold cross-validation
CV_RUNS = ROOT / "runs" / "dual_sampling_cv"
CV_JSON = ROOT / "experiments" / "results" / "dual_sampling_cv.json"
# the first CV run (8 epochs, 26 min), kept beside the 20-epoch one in CV_JSON and summarised next to it in RESULTS.md
CV_EARLIER_JSON = ROOT / "experiments" / "results" / "dual_sampling_cv_8ep.json"
CV_K, CV_EPOCHS, CV_VAL_FRACTION, CV_SEED = 5, 20, 0.2, 0  # 20 epochs as the config / paper: ~85 min on 1 thread
CV_BUDGET_MIN = 75.0  # all 3 networks x 5 folds at 20 epochs fit in ~75 min of training on one (shared) core
CV_REQUIRED = ("rn34_us", "att_us")  # the paper's main comparison (attention or not), always run
CV_OPTIONAL = ("att_ss",)            # run after the required ones when the time budget allows; + DS (Eq. 5)
CV_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")
CV_PAIRS = (("att_us", "rn34_us"), ("att_ss", "rn34_us"), ("att_ds", "rn34_us"), ("att_ds", "att_us"),
            ("att_ds", "att_ss"))
NAMES = {**{k: v[0] for k, v in VARIANTS.items()}, "att_ds": "Attention RN34 + DS"}


def cv_folds(patient_ids, labels, k: int = CV_K, val_fraction: float = CV_VAL_FRACTION, seed: int = CV_SEED) -> list:
    """Patient-level stratified k-fold (:func:`pneumoct.train.sampling.patient_kfold`, seed ``seed``); in each fold
    the validation part that picks the epoch is a patient-level stratified ``val_fraction`` of the other k-1 folds
    only (:func:`patient_split`, seed ``seed + 1000 + fold``). Returns ``[{"fold", "train", "val", "test"}]``
    (row indices; train + val + test = every row, test = fold k)."""
    from pneumoct.train.sampling import patient_kfold, patient_split

    pids, labs = np.asarray(patient_ids).astype(str), np.asarray(labels)
    out = []
    for f, (rest, test) in enumerate(patient_kfold(pids, labs, k, seed)):
        tr, va = patient_split(pids[rest], labs[rest], val_fraction, seed + 1000 + f)
        out.append({"fold": f, "train": rest[tr], "val": rest[va], "test": np.sort(test)})
    return out


def run_cv(cases, out_dir: Path, variants=CV_REQUIRED, optional=(), epochs: int = CV_EPOCHS, k: int = CV_K,
           seed: int = CV_SEED, extra=(), budget_s: float | None = None, heldout=None) -> dict:
    """Train each variant on each fold (fold-major: a run cut short leaves complete paired folds) and predict its
    test fold (and ``heldout`` cases, if given). One JSON per (fold, variant) in ``out_dir``; an existing one with
    the same settings is reused (resumable). ``optional`` variants run afterwards, all folds or none: only if the
    mean time of the required trainings says they fit in ``budget_s``. Returns the raw record."""
    from pneumoct.train.task_dual_sampling import predict, train_network

    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [c.case_id for c in cases]
    folds = cv_folds([c.group for c in cases], [c.label for c in cases], k, CV_VAL_FRACTION, seed)
    settings = {"epochs": int(epochs), "k": int(k), "seed": int(seed), "extra": list(extra),
                "n_cases": len(cases), "heldout": None if heldout is None else len(heldout)}
    runs: dict = {}
    t_start = time.time()

    def one(f: dict, v: str) -> dict:
        path = out_dir / f"fold{f['fold']}_{v}.json"
        test_ids = [ids[i] for i in f["test"]]
        if path.is_file():
            rec = json.loads(path.read_text())
            if rec.get("settings") == settings and rec.get("test_ids") == test_ids:
                print(f"fold {f['fold']} {v}: reused {path.name}", flush=True)
                return rec
        t0 = time.time()
        cfg = _cfg(v, 0, [f"train.epochs={int(epochs)}", *extra])
        model, res = train_network(cfg, cases, f["train"], f["val"])
        rec = {"fold": f["fold"], "variant": v, "settings": settings, "test_ids": test_ids,
               "n_train": int(len(f["train"])), "n_val": int(len(f["val"])), "n_test": int(len(f["test"])),
               "test_p": predict(model, cases, f["test"]).tolist(),
               "heldout_p": None if heldout is None else predict(model, heldout).tolist(),
               "best": res["best"], "history": res["history"], "seconds": round(time.time() - t0, 1)}
        path.write_text(json.dumps(rec) + "\n")
        print(f"fold {f['fold']} {v}: best epoch {rec['best'].get('epoch')} val_auc {rec['best'].get('val_auc')} "
              f"{rec['seconds']:.0f} s (elapsed {time.time() - t_start:.0f} s)", flush=True)
        return rec

    for f in folds:
        for v in variants:
            runs.setdefault(v, []).append(one(f, v))
    skipped = {}
    if optional:
        like = ["att_us"] if "att_us" in runs else list(runs)  # SS trains the attention network: time like att_us
        per = float(np.mean([r["seconds"] for v in like for r in runs[v]])) if like else 0.0
        for v in optional:
            need = per * len(folds)
            if budget_s is not None and time.time() - t_start + need > budget_s:
                skipped[v] = f"time budget: ~{need:.0f} s more needed, {budget_s - (time.time() - t_start):.0f} s left"
                print(f"{v}: skipped ({skipped[v]})", flush=True)
                continue
            runs[v] = [one(f, v) for f in folds]
    return {"folds": folds, "runs": runs, "skipped": skipped, "settings": settings,
            "wall_s": round(time.time() - t_start, 1)}


def _oof(raw: dict, n: int, key: str = "test_p") -> dict:
    """variant -> out-of-fold P(COVID-19) per case (each case predicted by the one model that never saw it)."""
    out = {}
    for v, recs in raw["runs"].items():
        p = np.full(n, np.nan)
        for f, r in zip(raw["folds"], recs):
            p[f["test"]] = r[key]
        out[v] = p
    return out


def _ttest(a, b) -> dict:
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b
    if np.any(~np.isfinite(d)):
        return {"mean_difference": None, "sd_difference": None, "t": None, "p_value": None}
    if np.allclose(d, d[0]):  # constant differences: t undefined (scipy gives nan)
        return {"mean_difference": float(d.mean()), "sd_difference": 0.0, "t": None,
                "p_value": 1.0 if d[0] == 0 else None}
    r = ttest_rel(a, b)
    return {"mean_difference": float(d.mean()), "sd_difference": float(d.std(ddof=1)), "t": float(r.statistic),
            "p_value": float(r.pvalue)}


def cv_summary(cases, finder, raw: dict, n_boot: int = N_BOOT, heldout=None) -> dict:
    """Per-fold metrics at 0.5, mean ± SD over folds, pooled out-of-fold metrics with bootstrap CIs, paired t-tests
    over the folds (scipy ``ttest_rel``, as the paper) and paired bootstraps on the pooled predictions. ``heldout``:
    ``(labels, finder ratios)`` of the held-out cohort -> each fold model's metrics there (the paper's Table II
    test-set column: mean ± SD of the 5 fold models)."""
    from pneumoct.evaluate.classification import binary_metric_fn, binary_metrics, bootstrap_p_value
    from pneumoct.models.dual_sampling import dual_sampling_ensemble

    y = np.array([c.label for c in cases])
    folds = raw["folds"]
    probs = _oof(raw, len(y))
    if {"att_us", "att_ss"} <= set(probs):
        probs["att_ds"] = dual_sampling_ensemble(probs["att_us"], probs["att_ss"], np.asarray(finder))  # Eq. 5
    per_fold = {v: [binary_metrics(y[f["test"]], p[f["test"]]) for f in folds] for v, p in probs.items()}
    res = {"per_fold": {}, "mean_sd": {}, "pooled": {}, "ttest": {}, "paired_bootstrap_pooled": {}}
    for v in probs:
        res["per_fold"][NAMES[v]] = [{m: r[m] for m in ("n", "n_pos", "n_neg", *CV_METRICS)} for r in per_fold[v]]
        res["mean_sd"][NAMES[v]] = {
            m: {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}
            for m in CV_METRICS for vals in [[r[m] for r in per_fold[v] if r[m] is not None]] if vals}
        res["pooled"][NAMES[v]] = _metrics(y, probs[v])
    for a, b in CV_PAIRS:
        if a not in probs or b not in probs:
            continue
        key = f"{NAMES[a]} vs {NAMES[b]}"
        res["ttest"][key] = {m: _ttest([r[m] for r in per_fold[a]], [r[m] for r in per_fold[b]]) for m in CV_METRICS}
        res["paired_bootstrap_pooled"][key] = {}
        for m in ("auc", "accuracy"):
            pv = bootstrap_p_value(binary_metric_fn(m), y, np.stack([1 - probs[a], probs[a]], 1),
                                   np.stack([1 - probs[b], probs[b]], 1), n_boot=2 * n_boot, seed=0)
            res["paired_bootstrap_pooled"][key][m] = {"difference": pv["difference"], "p_value": pv["p_value"]}
    res["epochs_chosen"] = {NAMES[v]: [r["best"].get("epoch") for r in recs] for v, recs in raw["runs"].items()}
    res["val_auc_chosen"] = {NAMES[v]: [r["best"].get("val_auc") for r in recs] for v, recs in raw["runs"].items()}
    res["train_seconds"] = {NAMES[v]: [r["seconds"] for r in recs] for v, recs in raw["runs"].items()}
    if heldout is not None:
        hy, hf = np.asarray(heldout[0]), np.asarray(heldout[1])
        hp = {v: [np.asarray(r["heldout_p"]) for r in recs] for v, recs in raw["runs"].items()}
        if {"att_us", "att_ss"} <= set(hp):
            hp["att_ds"] = [dual_sampling_ensemble(u, s, hf) for u, s in zip(hp["att_us"], hp["att_ss"])]
        hm = {v: [binary_metrics(hy, p) for p in ps] for v, ps in hp.items()}
        res["heldout_fold_models"] = {
            "n": int(len(hy)), "mean_sd": {NAMES[v]: {m: {"mean": float(np.mean([r[m] for r in rs])),
                                                         "sd": float(np.std([r[m] for r in rs], ddof=1))}
                                                     for m in CV_METRICS} for v, rs in hm.items()},
            "ttest": {f"{NAMES[a]} vs {NAMES[b]}": {m: _ttest([r[m] for r in hm[a]], [r[m] for r in hm[b]])
                                                    for m in ("auc", "accuracy")}
                      for a, b in CV_PAIRS if a in hm and b in hm}}
    return res


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cv(quick: bool = False, epochs: int = CV_EPOCHS, budget_min: float | None = CV_BUDGET_MIN,
       heldout: bool = True) -> dict:
    """The 5-fold CV of the training cohort (seed 7000, 160 phantoms) -> ``experiments/results/dual_sampling_cv.json``.
    ``quick``: 2 folds, 1 epoch, 12 phantoms, every variant, into ``runs/dual_sampling_cv_quick`` (a smoke run)."""
    import logging
    import os
    import platform

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    t0 = time.time()
    cases, info = load("train")
    finder = np.array([i["finder_ratio"] for i in info])
    k, out_dir, out_json, optional, budget = CV_K, CV_RUNS, CV_JSON, CV_OPTIONAL, budget_min
    if quick:
        y = np.array([c.label for c in cases])
        keep = np.sort(np.r_[np.flatnonzero(y == 1)[::14][:6], np.flatnonzero(y == 0)[::14][:6]])
        cases, finder = [cases[i] for i in keep], finder[keep]
        k, epochs, out_dir, budget = 2, 1, CV_RUNS.with_name(CV_RUNS.name + "_quick"), None
        out_json = out_dir / "cv.json"
    held = None
    if heldout and not quick:
        try:
            hc, hi = load("test")
            held = (hc, np.array([c.label for c in hc]), np.array([i["finder_ratio"] for i in hi]))
        except SystemExit as e:
            print("held-out cohort not prepared, skipped:", e, flush=True)
    raw = run_cv(cases, out_dir, CV_REQUIRED, optional, epochs, k, CV_SEED,
                 budget_s=None if budget is None else 60.0 * budget, heldout=None if held is None else held[0])
    res = cv_summary(cases, finder, raw, heldout=None if held is None else held[1:])
    y = np.array([c.label for c in cases])
    res = {"data": {"cohort": cohorts()["train"], "n": len(cases), "n_covid19": int(y.sum()),
                    "n_cap": int((1 - y).sum()), "synthetic": True,
                    "note": "SYNTHETIC phantoms only (pneumoct.synth); not clinical accuracy"},
           "protocol": {"k": k, "fold_seed": CV_SEED, "val_fraction_of_training_folds": CV_VAL_FRACTION,
                        "val_seed": f"{CV_SEED} + 1000 + fold", "train_seed": 0, "epochs": epochs,
                        "selection": "best validation epoch (val AUC, ties by BCE) on the validation part",
                        "threshold": 0.5, "ensemble_ratio": "threshold lesion finder (as deployed)",
                        "paper_config_difference": f"{epochs} epochs instead of the CPU config's 20 (paper: best "
                                                   "of 20); everything else as configs/dual_sampling_cpu.yaml",
                        "quick": quick},
           "folds": [{"fold": f["fold"], "n_train": int(len(f["train"])), "n_val": int(len(f["val"])),
                      "n_test": int(len(f["test"])), "test_covid19": int(y[f["test"]].sum()),
                      "val_covid19": int(y[f["val"]].sum())} for f in raw["folds"]],
           "variants_run": [NAMES[v] for v in raw["runs"]], "skipped": raw["skipped"],
           "machine": f"{_cpu_name() or platform.machine()}, {os.cpu_count()}-core VM shared with other jobs, "
                      f"torch {torch.__version__}, 1 thread (torch.set_num_threads(1))",
           "wall_s": round(time.time() - t0, 1), "training_wall_s": raw["wall_s"], **res}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1) + "\n")
    if not quick and OUT_JSON.is_file():
        main_res = json.loads(OUT_JSON.read_text())
        main_res["cv"] = _cv_pointer()
        OUT_JSON.write_text(json.dumps(main_res, indent=1) + "\n")
    print(cv_markdown(res), flush=True)
    return res


def _cv_pointer() -> dict | str:
    """The results JSON's ``cv`` entry: where the cross-validation is and its headline numbers."""
    if not CV_JSON.is_file():
        return "not run (CPU time)"
    c = json.loads(CV_JSON.read_text())
    out = {"file": str(CV_JSON.relative_to(ROOT)), "k": c["protocol"]["k"], "epochs": c["protocol"]["epochs"],
           "data": "synthetic training cohort (seed 7000), patient-level stratified folds",
           "auc_mean_sd": {k: [v["auc"]["mean"], v["auc"]["sd"]] for k, v in c["mean_sd"].items()},
           "accuracy_mean_sd": {k: [v["accuracy"]["mean"], v["accuracy"]["sd"]] for k, v in c["mean_sd"].items()},
           "pooled_auc": {k: v["auc"] for k, v in c["pooled"].items()},
           "ttest_p": {k: {m: t[m]["p_value"] for m in ("auc", "accuracy")} for k, t in c["ttest"].items()},
           "wall_s": c["wall_s"], "skipped": c.get("skipped", {})}
    if CV_EARLIER_JSON.is_file():
        e = json.loads(CV_EARLIER_JSON.read_text())
        if e["protocol"]["epochs"] != c["protocol"]["epochs"]:
            out["earlier"] = {"file": str(CV_EARLIER_JSON.relative_to(ROOT)), "epochs": e["protocol"]["epochs"],
                              "auc_mean_sd": {k: [v["auc"]["mean"], v["auc"]["sd"]] for k, v in e["mean_sd"].items()},
                              "ttest_p": {k: {m: t[m]["p_value"] for m in ("auc", "accuracy")}
                                          for k, t in e["ttest"].items()}}
    return out


def cv_markdown(cv_res: dict) -> str:
    def ms(d):
        return "–" if d is None else f"{d['mean']:.3f} ± {_f(d['sd'])}"

    lines = [f"| model ({len(cv_res['folds'])}-fold CV) | AUC mean ± SD | accuracy | sensitivity | specificity | F1 | pooled out-of-fold AUC "
             "[95% CI] | pooled accuracy |", "|---|---|---|---|---|---|---|---|"]
    for name, m in cv_res["mean_sd"].items():
        p = cv_res["pooled"][name]
        lines.append(f"| {name} | " + " | ".join(ms(m.get(k)) for k in CV_METRICS)
                     + f" | {_f(p['auc'])} [{_f(p['ci95']['auc'][0])}, {_f(p['ci95']['auc'][1])}] | "
                       f"{_f(p['accuracy'])} |")
    lines += ["", "| per-fold AUC / accuracy | " + " | ".join(f"fold {f['fold']} (n {f['n_test']})"
                                                          for f in cv_res["folds"]) + " | chosen epochs |",
              "|---|" + "---|" * (len(cv_res["folds"]) + 1)]
    for name, rs in cv_res["per_fold"].items():
        ep = cv_res["epochs_chosen"].get(name)
        lines.append(f"| {name} | " + " | ".join(f"{_f(r['auc'])} / {_f(r['accuracy'])}" for r in rs)
                     + f" | {'–' if ep is None else ', '.join(str(e + 1) for e in ep)} |")
    lines += ["", "| paired t-test over the folds (ttest_rel): mean difference (p) | "
              + " | ".join(CV_METRICS) + " | pooled paired bootstrap AUC / accuracy (p) |",
              "|---|" + "---|" * (len(CV_METRICS) + 1)]
    for key, t in cv_res["ttest"].items():
        b = cv_res["paired_bootstrap_pooled"][key]
        lines.append(f"| {key} | " + " | ".join(f"{_f(t[m]['mean_difference'])} ({_f(t[m]['p_value'])})"
                                                for m in CV_METRICS)
                     + f" | {_f(b['auc']['difference'])} ({_f(b['auc']['p_value'])}) / "
                       f"{_f(b['accuracy']['difference'])} ({_f(b['accuracy']['p_value'])}) |")
    h = cv_res.get("heldout_fold_models")
    if h:
        lines += ["", f"| the {len(cv_res['folds'])} fold models on the held-out cohort (n {h['n']}) | "
                  + " | ".join(f"{m} mean ± SD" for m in CV_METRICS) + " |", "|---|" + "---|" * len(CV_METRICS)]
        for name, m in h["mean_sd"].items():
            lines.append(f"| {name} | " + " | ".join(ms(m[k]) for k in CV_METRICS) + " |")
        lines += ["", "| held-out, paired t-test over the fold models | AUC difference (p) | accuracy difference (p) |",
                  "|---|---|---|"]
        for key, t in h["ttest"].items():
            lines.append(f"| {key} | {_f(t['auc']['mean_difference'])} ({_f(t['auc']['p_value'])}) | "
                         f"{_f(t['accuracy']['mean_difference'])} ({_f(t['accuracy']['p_value'])}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("prepare", "train", "evaluate", "bundle", "real", "results", "seeds", "cv",
                                     "loso", "loso-results"))
    ap.add_argument("--loso-epochs", type=int, default=20, help="loso: epochs per fold")
    ap.add_argument("--seed", type=int, default=0, help="training seed (train); 0 = the reported runs")
    ap.add_argument("--observations", default="", help="hand-written observations for the RESULTS.md block "
                    "(default: keep the current ones)")
    ap.add_argument("--cv-reading", default="", help="hand-written reading of the cross-validation (default: keep)")
    ap.add_argument("--cv-reading-earlier", default="", help="hand-written reading of the earlier (8-epoch) "
                    "cross-validation in CV_EARLIER_JSON (default: keep)")
    ap.add_argument("variant", nargs="?", choices=tuple(VARIANTS))
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--kinds", default="train,test", help="prepare: cohorts to cache (train,test)")
    ap.add_argument("--quick", action="store_true", help="cv: 2 folds, 1 epoch, 12 phantoms; loso: tiny cohort / "
                    "network, 1 epoch, nothing written (smoke runs)")
    ap.add_argument("--epochs", type=int, default=CV_EPOCHS, help="cv: epochs per network (every variant and fold)")
    ap.add_argument("--budget-min", type=float, default=CV_BUDGET_MIN,
                    help="cv: Attention RN34 + SS (and DS) only if they fit in this many minutes; 0 = no limit")
    ap.add_argument("--no-heldout", action="store_true", help="cv: skip the fold models on the held-out cohort")
    a = ap.parse_args(argv)
    if a.step == "prepare":
        prepare(a.max_chunks, tuple(a.kinds.split(",")))
    elif a.step == "cv":
        cv(a.quick, a.epochs, a.budget_min or None, not a.no_heldout)
    elif a.step == "train":
        if not a.variant:
            ap.error("train needs a variant")
        train(a.variant, a.seed)
    elif a.step == "loso":
        loso(a.loso_epochs, a.quick)
    elif a.step == "loso-results":
        write_loso_results(a.observations)
    else:
        {"evaluate": evaluate, "bundle": bundle, "real": real, "seeds": seed_spread,
         "results": lambda: write_results(a.observations, a.cv_reading, a.cv_reading_earlier)}[a.step]()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
