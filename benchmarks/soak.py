"""Soak test (issue 11): many `diagnose` runs over the awkward-input corpus in ONE process.

Runs ``pneumoct.pipeline.diagnose`` (the code of ``pneumoct diagnose``) ``--runs`` times, cycling through the
synthetic corpus of ``tests/corpus.py`` (readable cases analysed and written, refused cases refused), each run into
the same output folder per case (so reruns also exercise the stale-file rules). After each run it records the
process's resident memory, its open file descriptors, files left in the temporary folder and files in the output
folders that are not ours. Writes ``benchmarks/results/soak.json``.

    python benchmarks/soak.py --runs 200
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the corpus builder lives with the tests that use it

#: files `diagnose` may leave in a study's output folder
OURS = {"result.json", "report.html", "lung_mask.nii.gz", "lesion_mask.nii.gz"}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def soak(runs: int, work: Path, *, quiet: bool = False) -> dict:
    import corpus as C

    from pneumoct.errors import PneumoctInputError
    from pneumoct.pipeline import DiagnoseOptions, diagnose

    _, cases = C.build_phantom_corpus(work / "cases")
    out_root = work / "out"
    # a private temporary folder: anything pneumoct leaves there is ours (zip extractions, half-written files)
    tmp = work / "tmp"
    tmp.mkdir()
    old_tmp = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    opts = DiagnoseOptions()
    rss, fds, outcomes, seconds = [], [], [], []
    stray_out: set[str] = set()
    for i in range(runs):
        case = cases[i % len(cases)]
        t0 = time.perf_counter()
        try:
            diagnose(case.path, out_root / case.name, opts)
            outcome = "analysed"
        except PneumoctInputError as exc:
            outcome = f"refused:{exc.code}"
        seconds.append(time.perf_counter() - t0)
        outcomes.append((case.name, outcome))
        rss.append(_rss_mb())
        fds.append(_n_fds())
        for d in out_root.iterdir() if out_root.exists() else ():
            stray_out |= {f"{d.name}/{p.name}" for p in d.iterdir() if p.name not in OURS}
        if not quiet:
            print(f"[{i + 1}/{runs}] {case.name:14s} {outcome:28s} {seconds[-1]:5.2f} s  rss {rss[-1]:7.1f} MB  "
                  f"fds {fds[-1]}", file=sys.stderr)
    tempfile.tempdir = old_tmp
    stray_tmp = sorted(os.listdir(tmp))
    half = len(rss) // 2
    # memory slope over the second half (after caches and models have been loaded), MB per 100 runs
    slope = float(np.polyfit(np.arange(half, len(rss)), rss[half:], 1)[0] * 100) if len(rss) - half >= 3 else None
    per_case: dict[str, set] = {}
    for name, outcome in outcomes:
        per_case.setdefault(name, set()).add(outcome)
    return {
        "runs": runs,
        "data": "SYNTHETIC: tests/corpus.py phantom corpus (generator pneumoct.synth, 128 px, 64 slices)",
        "n_cases": len(cases),
        "outcomes": {k: sorted(v) for k, v in per_case.items()},
        "consistent_outcomes": all(len(v) == 1 for v in per_case.values()),
        "rss_mb_first_last": [round(rss[0], 1), round(rss[-1], 1)],
        "rss_mb_max": round(max(rss), 1),
        "rss_slope_mb_per_100_runs_second_half": None if slope is None else round(slope, 2),
        "open_fds_first_last_max": [fds[0], fds[-1], max(fds)],
        "stray_temp_files": stray_tmp,
        "stray_output_files": sorted(stray_out),
        "seconds_per_run_median": round(float(np.median(seconds)), 3),
        "seconds_total": round(float(np.sum(seconds)), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="pneumoct_soak_") as work:
        res = soak(args.runs, Path(work))
    res["date"] = time.strftime("%Y-%m-%d")
    res["machine"] = f"{os.cpu_count()} CPU cores, no GPU"
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
