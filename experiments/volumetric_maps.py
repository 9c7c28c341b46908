"""Issue 12: do the 3D explanation maps point at the lesions? Every map `pneumoct diagnose --model deepsc|dual-sampling`
writes as NIfTI, scored against the voxel lesion truth of held-out SYNTHETIC phantoms, beside a uniform-random control.

Cohort: ``pneumoct.train.volumes.phantom_volume_cohort`` generated in memory (default seed 7301, 6 per class, 256 px,
48 slices, difficulty 0.3: the cohort of ``volumetric_compare.py``); only its lesion-bearing phantoms are scored (the
healthy ones have no lesion to point at). Its case seeds are checked against every phantom seed the bundled models
were trained or validated on (read from the weights' ``model.json`` meta and the 2D cohort constant; the run stops if
one is shared).

Per case, each system goes through the code of ``diagnose --model NAME`` (``pipeline.analyse_study`` with
``DiagnoseOptions.model``, which calls ``volumetric.run_system`` with the pipeline's lung mask and threshold lesion
mask); its maps (``VolumetricOutput.maps``, on the study grid, what ``<system>_<map>.nii.gz`` holds) are scored
inside the phantom's TRUE lungs against its lesion truth (GGO + consolidation) cut to the lungs:

* pointing game (``pneumoct.explain.scores.pointing_game``, 3D, tolerance in mm): the map's maximum within 10 mm of a
  lesion voxel, and strictly inside one (0 mm); chance = share of lung voxels within 10 mm of a lesion;
* energy inside (``energy_inside``): share of the map's in-lung energy on the lesions; chance = lesion share of the
  lung (a uniform map);
* voxel AUC (``pneumoct.evaluate.classification.roc_auc``) of the map value, lesion vs non-lesion lung voxels;
* Dice of the isodata-thresholded map (``threshold_iou_dice``, threshold computed inside the lungs).

Maps: DeepSC-COVID ``segmentation`` (S^, Eq. 3: a segmentation output, the reference) and ``evidence`` (the mean of
the multi-layer evidence masks V1-V3, Eq. 5, of the predicted class); dual-sampling ``attention_us`` and
``attention_ss`` (T(A), Eq. 1-2, of the two networks); the 2D lesion-presence network's Conv4 CAM that plain
``diagnose`` draws (per slice, min-max scaled on each slice, stacked on the study grid: ``cam2d``; the same with each
slice's CAM times the network's own slice score: ``cam2d_x_slice_score``, so slices compare); controls: uniform
random values in the lungs (seeded), and the CT itself (HU window [-1000, 0] -> [0, 1], in the lungs: "dense is
lesion", a map every study gives for free). Mean and 95 % bootstrap CI over cases
(``pneumoct.evaluate.segmentation.aggregate``), and per-case paired differences to the random control.

SYNTHETIC phantoms only: this measures where the maps look on phantoms, not on patients.

    python experiments/volumetric_maps.py [--per-class 6] [--seed 7301] [--boot 1000]
    python experiments/volumetric_maps.py --quick      # 2 small cases, nothing written to RESULTS.md
    python experiments/volumetric_maps.py --from-json RUN.json --reading READING.md   # re-render, no rerun
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
OUT = ROOT / "experiments" / "results" / "volumetric_maps.json"
TAG = "volumetric-maps"
TOLERANCE_MM = 10.0
SYSTEM_MAPS = {"deepsc": ("segmentation", "evidence"), "dual-sampling": ("attention_us", "attention_ss")}
METRICS = ("pointing_game", "pointing_game_strict", "energy_inside", "voxel_auc", "dice")
CHANCE = {"pointing_game": "chance_pointing", "energy_inside": "chance_energy", "voxel_auc": None}


# ---------------------------------------------------------------------------------------------------- held out
def training_phantom_seeds() -> dict[str, set[int]]:
    """Every phantom seed the bundled models were trained or validated on, from what their weights record."""
    from pneumoct.fingerprint import BUNDLED_PHANTOM_COHORT
    from pneumoct.learned import bundled_weights_dir
    from pneumoct.synth.writer import case_seed
    from pneumoct.types import CLASS_NAMES

    w = bundled_weights_dir()
    out: dict[str, set[int]] = {}
    meta = json.loads((w / "deepsc" / "model.json").read_text())["meta"]["data"]
    for part in ("phantoms", "val_phantoms"):  # phantom_volume_cohort: case k of seed s -> case_seed(s, k)
        c = meta[part]
        out[f"deepsc {part} (seed {c['seed']})"] = {case_seed(c["seed"], k)
                                                     for k in range(int(c["n_per_class"]) * len(CLASS_NAMES))}
    for net in ("us", "ss"):
        c = json.loads((w / "dual_sampling" / net / "model.json").read_text())["meta"]["data"]["cohort"]
        # task_dual_sampling.build_cohort: one phantom_volume_cohort per difficulty, seed + 1000 * chunk, 2 labels
        diffs, n = list(c["difficulties"]), int(c["n_per_class"])
        seeds = set()
        for i in range(len(diffs)):
            k = n // len(diffs) + (1 if i < n % len(diffs) else 0)
            seeds |= {case_seed(int(c["seed"]) + 1000 * i, j) for j in range(2 * k)}
        out[f"dual-sampling {net} (seed {c['seed']} + 1000 x chunk)"] = seeds
    c = BUNDLED_PHANTOM_COHORT  # the on-disk cohort of the 2D models (m3lung, lesion_seg)
    out[f"2D models' cohort {c['path']} (seed {c['seed']})"] = {case_seed(c["seed"], i) for i in range(c["cases"])}
    return out


def check_held_out(case_seeds: list[int]) -> dict[str, Any]:
    train = training_phantom_seeds()
    shared = {name: sorted(set(case_seeds) & s) for name, s in train.items()}
    if any(shared.values()):
        raise SystemExit(f"cohort shares phantom seeds with training data: {shared}")
    return {"checked_against": {k: len(v) for k, v in train.items()},
            "n_unique_seeds": len(set().union(*train.values())), "shared_seeds": 0}


# ---------------------------------------------------------------------------------------------------- scoring
def chance_levels(lesion: np.ndarray, lung: np.ndarray, spacing, tol_mm: float = TOLERANCE_MM) -> dict[str, float]:
    """What a map that knows nothing gets: a uniform map's energy (lesion share of the lung) and the chance that a
    random lung voxel is within ``tol_mm`` of a lesion (pointing game of a random map)."""
    from scipy import ndimage as ndi

    near = ndi.distance_transform_edt(~lesion, sampling=spacing) <= tol_mm
    return {"chance_energy": float(lesion[lung].mean()), "chance_pointing": float(near[lung].mean()),
            "chance_pointing_strict": float(lesion[lung].mean())}


def score_map(m: np.ndarray, lesion: np.ndarray, lung: np.ndarray, spacing, tol_mm: float = TOLERANCE_MM) -> dict:
    """The scores of one 3D map inside the lungs (module docstring). ``lesion`` is already cut to the lungs."""
    from pneumoct.evaluate.classification import roc_auc
    from pneumoct.explain.scores import energy_inside, pointing_game, threshold_iou_dice

    vals = np.nan_to_num(np.asarray(m, np.float64)[lung])
    iou, dice = threshold_iou_dice(m, lesion, region=lung)
    return {
        "pointing_game": float(pointing_game(m, lesion, tol_mm, spacing=spacing, region=lung)),
        "pointing_game_strict": float(pointing_game(m, lesion, 0.0, spacing=spacing, region=lung)),
        "energy_inside": energy_inside(m, lesion, region=lung),
        "voxel_auc": roc_auc(lesion[lung], vals),
        "dice": dice, "iou": iou,
        "constant": bool(float(vals.max() - vals.min()) <= 0.0),
        "fraction_nonzero": float(np.count_nonzero(vals) / vals.size),
    }


def cam_volume(learned, shape, weighted: bool) -> np.ndarray | None:
    """The 2D lesion network's CAM (as ``diagnose`` draws it) stacked on the study grid; 0 on slices it skipped."""
    if not getattr(learned, "cam_maps", None):
        return None
    vol = np.zeros(shape, np.float32)
    for z in learned.cam_maps:
        s = learned.slice_map("cam", z)
        if s is None:
            continue
        if weighted:
            p = learned.lesion_probability_model[z]
            s = s * (0.0 if np.isnan(p) else float(p))
        vol[z] = s
    return vol


# ---------------------------------------------------------------------------------------------------- run
def run(per_class: int, seed: int, n_boot: int, *, matrix: int = 256, n_slices: int = 48, difficulty: float = 0.3,
        max_cases: int | None = None, random_seed: int = 0) -> dict[str, Any]:
    import torch

    from pneumoct.api import as_study
    from pneumoct.evaluate.segmentation import aggregate
    from pneumoct.pipeline import DiagnoseOptions, analyse_study
    from pneumoct.train.volumes import phantom_volume_cohort

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    cases = phantom_volume_cohort(per_class, seed=seed, matrix=matrix, n_slices=n_slices, difficulty=difficulty)
    held_out = check_held_out([int(c.group.split("_")[-1]) for c in cases])
    lesion_cases = [c for c in cases if c.lesion is not None and np.any((c.lesion > 0) & (c.lung > 0))]
    n_no_lesion = len(cases) - len(lesion_cases)
    if max_cases is not None:
        lesion_cases = lesion_cases[:max_cases]
    rows = []
    for i, case in enumerate(lesion_cases):
        t0 = time.perf_counter()
        lung = case.lung > 0
        lesion = (case.lesion > 0) & lung
        sp = tuple(float(v) for v in case.spacing)
        study = as_study(case.hu, spacing=case.spacing)
        maps: dict[str, np.ndarray] = {}
        row: dict[str, Any] = {"case": case.case_id, "label": case.label, "source": case.source,
                               "lesion_voxels": int(lesion.sum()), "lung_voxels": int(lung.sum()),
                               **chance_levels(lesion, lung, sp)}
        # diagnose --model deepsc (its 2D models run as well: the CAM comes from this same run)
        dx = analyse_study(study, DiagnoseOptions(write_report=False, write_masks=False, model="deepsc"))
        vo = dx.volumetric
        for name in SYSTEM_MAPS["deepsc"]:
            maps[f"deepsc/{name}"] = vo.maps[name]
        row["deepsc_call"] = max(vo.probabilities, key=vo.probabilities.get)
        for weighted, key in ((False, "cam2d"), (True, "cam2d_x_slice_score")):
            cam = cam_volume(dx.learned, study.hu.shape, weighted)
            if cam is not None:
                maps[f"diagnose-2d/{key}"] = cam
        # diagnose --model dual-sampling: the 2D networks do not touch the 3D maps (same lungs, same threshold mask)
        dx2 = analyse_study(study, DiagnoseOptions(write_report=False, write_masks=False, model="dual-sampling",
                                                   use_learned_models=False))
        assert np.array_equal(dx2.lung_labels, dx.lung_labels)
        for name in SYSTEM_MAPS["dual-sampling"]:
            maps[f"dual-sampling/{name}"] = dx2.volumetric.maps[name]
        row["dual_sampling_p_covid19"] = {k: round(float(v), 4)
                                          for k, v in dx2.volumetric.info["p_covid19"].items()}
        row["pipeline_lung_dice"] = float(2 * np.count_nonzero(lung & (dx.lung_labels > 0))
                                          / (lung.sum() + np.count_nonzero(dx.lung_labels)))
        rng = np.random.default_rng([random_seed, i])
        rnd = np.zeros(study.hu.shape, np.float32)
        rnd[lung] = rng.random(int(lung.sum()))
        maps["control/random"] = rnd
        maps["control/ct_density"] = (np.clip((case.hu.astype(np.float32) + 1000.0) / 1000.0, 0, 1) * lung)
        row["scores"] = {k: score_map(m, lesion, lung, sp) for k, m in maps.items()}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(f"{case.case_id:32s} {case.label:12s} {row['seconds']:6.1f} s  " + "  ".join(
            f"{k.split('/')[-1]}:{v['voxel_auc']:.2f}" for k, v in row["scores"].items()), file=sys.stderr)

    names = list(rows[0]["scores"]) if rows else []
    table: dict[str, Any] = {}
    for name in names:
        entry = {}
        for metric in METRICS:
            per_case = [r["scores"][name][metric] for r in rows]
            entry[metric] = aggregate(per_case, n_boot=n_boot, seed=0)
            if name != "control/random":  # paired: this map minus the random control, case by case
                diff = [None if a is None or b is None else a - b
                        for a, b in zip(per_case, (r["scores"]["control/random"][metric] for r in rows))]
                entry[metric]["paired_diff_vs_random"] = aggregate(diff, n_boot=n_boot, seed=0)
        entry["constant_maps"] = int(sum(r["scores"][name]["constant"] for r in rows))
        entry["mean_fraction_nonzero_in_lung"] = float(np.mean([r["scores"][name]["fraction_nonzero"]
                                                                for r in rows]))
        table[name] = entry
    chance = {k: aggregate([r[k] for r in rows], n_boot=n_boot, seed=0)
              for k in ("chance_energy", "chance_pointing", "chance_pointing_strict")}
    return {
        "data": (f"SYNTHETIC phantoms generated in memory (pneumoct.train.volumes.phantom_volume_cohort seed {seed}, "
                 f"{per_class} per class, {matrix} px, {n_slices} slices, difficulty {difficulty}); "
                 f"{len(rows)} lesion-bearing phantoms scored ({n_no_lesion} without lesion left out)"),
        "settings": {"per_class": per_class, "seed": seed, "matrix": matrix, "n_slices": n_slices,
                     "difficulty": difficulty, "n_boot": n_boot, "tolerance_mm": TOLERANCE_MM,
                     "random_control_seed": random_seed, "max_cases": max_cases},
        "held_out": held_out,
        "n_cases": len(rows),
        "chance": chance,
        "maps": table,
        "cases": rows,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }


def by_group(res: dict, n_boot: int) -> dict:
    """Voxel AUC and pointing game of every map per phantom class, and of DeepSC's evidence map per DeepSC call (its
    Eq. 5 masks are those of the predicted class), from the per-case rows."""
    from pneumoct.evaluate.segmentation import aggregate

    rows = res["cases"]
    out: dict[str, Any] = {"by_label": {}, "deepsc_evidence_by_call": {}}
    for lab in sorted({r["label"] for r in rows}):
        rr = [r for r in rows if r["label"] == lab]
        out["by_label"][lab] = {name: {m: aggregate([r["scores"][name][m] for r in rr], n_boot=n_boot, seed=0)
                                       for m in ("voxel_auc", "pointing_game")} for name in res["maps"]}
    for call in sorted({r.get("deepsc_call") for r in rows if r.get("deepsc_call")}):
        rr = [r for r in rows if r.get("deepsc_call") == call]
        out["deepsc_evidence_by_call"][call] = {m: aggregate([r["scores"]["deepsc/evidence"][m] for r in rr],
                                                             n_boot=n_boot, seed=0)
                                                for m in ("voxel_auc", "pointing_game")}
    return out


# ---------------------------------------------------------------------------------------------------- output
MAP_LABEL = {
    "deepsc/segmentation": "DeepSC-COVID `segmentation` (S^, Eq. 3; a segmentation output)",
    "deepsc/evidence": "DeepSC-COVID `evidence` (mean of V1–V3, Eq. 5, predicted class)",
    "dual-sampling/attention_us": "dual-sampling `attention_us` (T(A), Eq. 1–2, US network)",
    "dual-sampling/attention_ss": "dual-sampling `attention_ss` (T(A), Eq. 1–2, SS network)",
    "diagnose-2d/cam2d": "2D lesion network CAM (Conv4) stacked, per-slice [0, 1] as drawn",
    "diagnose-2d/cam2d_x_slice_score": "2D CAM × the network's slice score",
    "control/ct_density": "control: CT density (HU [-1000, 0] → [0, 1])",
    "control/random": "control: uniform random (seed 0)",
}


def _ci(a: dict, digits: int = 2) -> str:
    if a.get("mean") is None:
        return "n/a"
    return f"{a['mean']:.{digits}f} [{a['mean_low']:.{digits}f}, {a['mean_high']:.{digits}f}]"


def markdown(res: dict, machine: str, reading: str = "") -> str:
    s = res["settings"]
    ch = res["chance"]
    lines = [
        "## 3D explanation maps against lesion truth (issue 12) — `experiments/volumetric_maps.py`",
        "",
        f"- **Data: SYNTHETIC phantoms** {res['data'].removeprefix('SYNTHETIC phantoms ')}. Case seeds checked "
        "against every phantom seed the bundled models were trained or validated on (DeepSC 1000 / 2000, "
        f"dual-sampling 7000 + 1000 × chunk, the 2D models' seed-101 cohort; {res['held_out']['n_unique_seeds']} "
        "distinct seeds): none shared — held out."
        + (" Same cohort as `volumetric_compare.py`." if (s["seed"], s["matrix"], s["n_slices"], s["difficulty"])
           == (7301, 256, 48, 0.3) and s["max_cases"] is None else ""),
        "- Each case through the code of `diagnose --model deepsc` and `diagnose --model dual-sampling` "
        "(`pipeline.analyse_study` → `volumetric.run_system`); every map as written to `<system>_<map>.nii.gz`, "
        "scored inside the phantom's true lungs against its lesion truth (GGO + consolidation) cut to the lungs. "
        f"Pointing game: map maximum within {s['tolerance_mm']:.0f} mm of a lesion voxel (and strictly inside one); "
        "energy inside: share of the map's in-lung energy on lesions; voxel AUC: map value, lesion vs other lung "
        "voxels; Dice of the isodata-thresholded map (threshold from in-lung values).",
        f"- Mean over cases [95 % bootstrap CI, {s['n_boot']} resamples of the cases]; Δ random: mean paired "
        "difference to the random control on the same cases [CI].",
        f"- Chance levels (mean over cases): energy {_ci(ch['chance_energy'], 3)} (lesion share of the lung); "
        f"pointing game {_ci(ch['chance_pointing'])} (share of lung voxels within {s['tolerance_mm']:.0f} mm of a "
        f"lesion), strict {_ci(ch['chance_pointing_strict'], 3)}.",
        f"- Machine: {machine}. Wall time {res['wall_s'] / 60:.1f} min ({res['n_cases']} cases; both pipelines, "
        "the 2D models and scoring). `results/volumetric_maps.json` holds every case.",
        "",
        "| map | pointing game (10 mm) | strict (in lesion) | energy inside | voxel AUC | Dice (isodata) | "
        "Δ random: energy / AUC / Dice | constant maps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in res["maps"].items():
        if name == "control/random":
            delta = "—"
        else:
            delta = " / ".join(_ci(e[m]["paired_diff_vs_random"], 3 if m == "energy_inside" else 2)
                               for m in ("energy_inside", "voxel_auc", "dice"))
        lines.append(
            f"| {MAP_LABEL.get(name, name)} | {_ci(e['pointing_game'])} | {_ci(e['pointing_game_strict'])} | "
            f"{_ci(e['energy_inside'], 3)} | {_ci(e['voxel_auc'])} | {_ci(e['dice'])} | {delta} | "
            f"{e['constant_maps']} / {res['n_cases']} |")
    groups = res.get("groups")
    if groups:
        labs = list(groups["by_label"])
        lines += ["", "Voxel AUC by phantom class (mean [95 % CI]; n = "
                  + ", ".join(f"{lab} {groups['by_label'][lab]['control/random']['voxel_auc']['n']}" for lab in labs)
                  + "):", "", "| map | " + " | ".join(labs) + " |", "|---|" + "---|" * len(labs)]
        for name in res["maps"]:
            lines.append(f"| {MAP_LABEL.get(name, name)} | "
                         + " | ".join(_ci(groups["by_label"][lab][name]["voxel_auc"]) for lab in labs) + " |")
        calls = groups["deepsc_evidence_by_call"]
        lines += ["", "DeepSC-COVID `evidence` by DeepSC's own call (the Eq. 5 masks are the predicted class's): "
                  + "; ".join(f"called {c} (n = {v['voxel_auc']['n']}): voxel AUC {_ci(v['voxel_auc'])}, pointing "
                              f"{_ci(v['pointing_game'])}" for c, v in calls.items()) + "."]
    lines.append("")
    lines.append("**Not clinical evidence**: phantoms are far simpler than CT of patients; the CPU-sized networks and "
                 "few cases give wide intervals.")
    if reading:
        lines += ["", reading.strip()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=6)
    ap.add_argument("--seed", type=int, default=7301)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reading", type=Path, default=None,
                    help="a text file with the hand-written reading of the results, put under the table")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="render a finished run's JSON (e.g. with --reading) into RESULTS.md and OUT, no rerun")
    ap.add_argument("--quick", action="store_true", help="2 small cases (128 px, 32 slices), 100 resamples; "
                                                         "writes only --out (default a temp file), not RESULTS.md")
    args = ap.parse_args()
    from common import machine, replace_section, write_json

    if args.from_json:
        res = json.loads(args.from_json.read_text(encoding="utf-8"))
        res["held_out"].setdefault("n_unique_seeds", len(set().union(*training_phantom_seeds().values())))
        out = args.out or OUT
    elif args.quick:
        res = run(1, args.seed, 100, matrix=128, n_slices=32, max_cases=2)
        out = args.out or Path("/tmp/volumetric_maps_quick.json")
    else:
        res = run(args.per_class, args.seed, args.boot)
        out = args.out or OUT
    res["groups"] = by_group(res, res["settings"]["n_boot"])
    write_json(out, res)
    reading = args.reading.read_text(encoding="utf-8") if args.reading else ""
    md = markdown(res, machine().replace("1 thread", "1 thread on a 2-core CPU VM"), reading)
    print(md)
    if not args.quick and (args.out is None or args.from_json):
        replace_section(TAG, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
