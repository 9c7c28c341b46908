"""Dual-sampling attention network (Ouyang et al., IEEE TMI 2020), Tables II-III analogue on synthetic phantoms.

    python experiments/dual_sampling_eval.py prepare [--max-chunks N]   # cohorts -> cache (resumable, chunked)
    python experiments/dual_sampling_eval.py train rn34_us|att_us|att_ss # one network (same split for all)
    python experiments/dual_sampling_eval.py evaluate                   # held-out test cohort -> results JSON
    python experiments/dual_sampling_eval.py bundle                     # att_us + att_ss -> weights/dual_sampling
    python experiments/dual_sampling_eval.py real                       # 3 real covid-ct-md studies (anecdote)
    python experiments/dual_sampling_eval.py results [--observations T] # the block in experiments/RESULTS.md
    python experiments/dual_sampling_eval.py train VARIANT --seed 1; ... seeds  # replicate training seed 1
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


def _cfg(variant: str = "att_us", seed: int = 0):
    from pneumoct.train.config import load_config

    return load_config(CONFIG, VARIANTS[variant][1] + [f"name=dual_sampling_eval_{variant}", f"train.seed={seed}"])


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
           "checkpoints": meta, "overall": {}, "groups": {}, "paired_auc_p": {}, "cv": "not run (CPU time)"}
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


def results_section(res: dict, observations: str = "") -> str:
    """The ``<!-- dual-sampling -->`` block of experiments/RESULTS.md."""
    d = res["data"]
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
           "paper used paired t-tests over folds). **5-fold cross-validation: not run** (CPU time; one training "
           "per variant, so seed noise is not measured).",
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
    if res.get("real_loso"):
        out += [loso_section(res["real_loso"]), ""]
    out.append("<!-- /dual-sampling -->")
    return "\n".join(out)


def write_results(observations: str = "") -> None:
    import re

    res = json.loads(OUT_JSON.read_text())
    md = ROOT / "experiments" / "RESULTS.md"
    text = md.read_text()
    block = results_section(res, observations)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("prepare", "train", "evaluate", "bundle", "real", "results", "seeds", "loso",
                                     "loso-results"))
    ap.add_argument("--loso-epochs", type=int, default=20, help="loso: epochs per fold")
    ap.add_argument("--quick", action="store_true", help="loso: tiny cohort / network, 1 epoch, nothing written")
    ap.add_argument("--seed", type=int, default=0, help="training seed (train); 0 = the reported runs")
    ap.add_argument("--observations", default="", help="hand-written observations for the RESULTS.md block")
    ap.add_argument("variant", nargs="?", choices=tuple(VARIANTS))
    ap.add_argument("--max-chunks", type=int, default=None)
    a = ap.parse_args(argv)
    if a.step == "prepare":
        prepare(a.max_chunks)
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
         "results": lambda: write_results(a.observations)}[a.step]()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
