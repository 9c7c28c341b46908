"""Whole-command speed and peak memory of `pneumoct diagnose` on this machine (issue 10).

What a user waits for: ``python -m pneumoct diagnose STUDY --out DIR`` from process start to exit (result.json,
report.html and both masks written), each run a fresh process, median of ``--repeats`` (default 5; the real studies
interleaved: every repeat visits each study and command once). Beside it:

* ``pneumoct segment`` on the same real studies, whole command (target <= 5 s for ~150 slices);
* the bare SimpleITK read of the same study (``ImageSeriesReader`` / ``ReadImage`` in a fresh process, median) —
  the issue's target is <= 6x that read and <= 8 s for ~150 slices;
* the stage times ``result.json`` records (from the median run), the peak RSS of the command's process and, from
  one more (untimed) run, the peak memory of its process tree (PSS sampled every 50 ms; the command finds the
  lungs in a forked child);
* synthetic 512x512 phantoms (pneumoct.synth, NIfTI) of 100 / 300 / 500 slices: how time and memory grow with the
  slice count (least-squares slope in s per 100 slices); target 500 slices <= 25 s and <= 2.5 GB.

Data: REAL = the three COVID-CT-MD studies in ../shared/data (JPEG-Lossless DICOM, 148-168 slices, 512x512);
SYNTHETIC = phantoms. Writes benchmarks/results/diagnose.json.

    python benchmarks/bench_diagnose.py [--quick] [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CTMD = ROOT.parent / "shared" / "data" / "covid-ct-md" / "dicom"
OUT = ROOT / "benchmarks" / "results" / "diagnose.json"

_READ = r"""
import sys, SimpleITK as sitk
p = sys.argv[1]
if p.endswith((".nii", ".nii.gz", ".nrrd", ".mha")):
    img = sitk.ReadImage(p)
else:
    r = sitk.ImageSeriesReader(); r.SetFileNames(r.GetGDCMSeriesFileNames(p)); img = r.Execute()
print(img.GetSize())
"""


def compile_sources() -> None:
    """Byte-compile pneumoct's sources before timing, as an installed package is (pip compiles at install time, and
    Python caches bytecode at the first run unless PYTHONDONTWRITEBYTECODE is set, as on this VM and CI): every
    timed run then starts like a user's second run instead of compiling ~100 modules (all of them: 0.24 s here)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src" / "pneumoct")], check=False,
                   capture_output=True)


def _tree_pss_mb(pid: int) -> float | None:
    """Proportional set size of a process and all its descendants, MB (Linux): shared pages (the volume a forked
    child reads copy-on-write) counted once in total, unlike summing RSS."""
    total, todo = 0, [pid]
    try:
        while todo:
            p = todo.pop()
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    except (OSError, StopIteration, ValueError):  # a process ended meanwhile, or not Linux
        return None if total == 0 else total / 1024.0
    return total / 1024.0


def _timed(cmd: list[str], env: dict, sample_memory: bool = False) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB of that process, exit code) of one fresh process. ``sample_memory``: also the peak
    memory of its whole process tree (PSS every 50 ms: the command may fork a child), in
    ``_timed.last_tree_pss_mb`` — a separate run, since reading the page tables slows the process it reads."""
    import threading

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            v = _tree_pss_mb(proc.pid)
            if v is not None:
                peak[0] = max(peak[0], v)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    done.set()
    if sample_memory:
        sampler.join()
    _timed.last_tree_pss_mb = round(peak[0], 1) if peak[0] else None
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}: exit {proc.returncode}: {err.strip().splitlines()[-1:]}")
    return wall, usage.ru_maxrss / 1024.0, proc.returncode


def _diagnose_run(path: str, out: str, env: dict) -> dict:
    wall, rss, _ = _timed([sys.executable, "-m", "pneumoct", "diagnose", path, "--out", out], env)
    res = json.loads(Path(out, "result.json").read_text())
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(rss, 1), "stages_s": res["timing_s"],
            "files": sorted(p.name for p in Path(out).iterdir()), "n_slices": res["volume"]["shape_zyx"][0],
            "label": res["patient"]["label"], "lesion_volume_ml": res["quantification"].get("lesion_volume_ml")}


def _segment_run(path: str, out: str, env: dict) -> dict:
    wall, rss, _ = _timed([sys.executable, "-m", "pneumoct", "segment", path, "--out", out], env)
    res = json.loads(Path(out, "segment.json").read_text())
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(rss, 1), "stages_s": res.get("timing")}


def _median_run(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    return runs[walls.index(statistics.median_low(walls))]


def _summary_diagnose(runs: list[dict], reads: list[float], data: str, mem: float | None) -> dict:
    walls = [r["wall_s"] for r in runs]
    med, read_med = _median_run(runs), statistics.median(reads)
    return {"data": data, "n_slices": med["n_slices"], "command_wall_s_median": statistics.median(walls),
            "command_wall_s_runs": walls, "bare_sitk_read_s_median": round(read_med, 3),
            "bare_sitk_read_s_runs": [round(r, 3) for r in reads],
            "ratio_to_bare_read": round(statistics.median(walls) / read_med, 2),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs), "peak_tree_pss_mb": mem,
            "stages_s_median_run": med["stages_s"], "files": med["files"], "label": med["label"],
            "lesion_volume_ml": med["lesion_volume_ml"]}


def _summary_segment(runs: list[dict], data: str, mem: float | None) -> dict:
    walls = [r["wall_s"] for r in runs]
    return {"data": data, "command_wall_s_median": statistics.median(walls), "command_wall_s_runs": walls,
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs), "peak_tree_pss_mb": mem,
            "stages_s_median_run": _median_run(runs)["stages_s"]}


def bench_real(cases: dict[str, str], tmp: str, repeats: int) -> tuple[dict, dict]:
    """Every repeat visits every study (bare read, ``diagnose``, ``segment``) before the next repeat starts, so a
    slow spell of the VM (its speed drifts 10-25 % within minutes) lands on every study and command alike."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    reads = {c: [] for c in cases}
    diag = {c: [] for c in cases}
    seg = {c: [] for c in cases}
    for i in range(repeats):
        for case, path in cases.items():
            reads[case].append(_timed([sys.executable, "-c", _READ, path], env)[0])
            diag[case].append(_diagnose_run(path, os.path.join(tmp, f"out_{case}_{i}"), env))
            seg[case].append(_segment_run(path, os.path.join(tmp, f"seg_{case}_{i}"), env))
    data = {c: f"REAL: covid-ct-md/{c} (JPEG-Lossless DICOM)" for c in cases}
    real = {c: _summary_diagnose(diag[c], reads[c], data[c], _memory_run(
        [sys.executable, "-m", "pneumoct", "diagnose", p, "--out", os.path.join(tmp, f"mem_{c}")], env))
        for c, p in cases.items()}
    segment = {c: _summary_segment(seg[c], data[c], _memory_run(
        [sys.executable, "-m", "pneumoct", "segment", p, "--out", os.path.join(tmp, f"memseg_{c}")], env))
        for c, p in cases.items()}
    return real, segment


def bench_study(path: str, tmp: str, repeats: int, data: str) -> dict:
    """``diagnose`` on one study, ``repeats`` fresh processes in a row (the synthetic scaling runs)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    reads = [_timed([sys.executable, "-c", _READ, path], env)[0] for _ in range(repeats)]
    runs = [_diagnose_run(path, os.path.join(tmp, f"out_{Path(path).name}_{i}"), env) for i in range(repeats)]
    return _summary_diagnose(runs, reads, data, _memory_run(
        [sys.executable, "-m", "pneumoct", "diagnose", path, "--out", os.path.join(tmp, f"mem_{Path(path).name}")],
        env))


def _memory_run(cmd: list[str], env: dict) -> float | None:
    """One more run, not timed: the peak PSS of the command's process tree (MB)."""
    _timed(cmd, env, sample_memory=True)
    return _timed.last_tree_pss_mb


def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one real study, 100 slices only, 1 repeat")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    repeats = 1 if a.quick else max(1, a.repeats)
    compile_sources()
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()},
                     "date": time.strftime("%Y-%m-%d"), "repeats": repeats,
                     "what": "python -m pneumoct diagnose STUDY --out DIR, process start to exit, fresh process "
                             "(pneumoct's bytecode compiled before, as installed)",
                     "real": {}, "segment_command": {}, "synthetic_scaling": []}
    with tempfile.TemporaryDirectory() as tmp:
        if CTMD.is_dir():
            cases = ("covid-P001",) if a.quick else ("covid-P001", "cap-cap001", "normal-normal001")
            results["real"], results["segment_command"] = bench_real({c: str(CTMD / c) for c in cases}, tmp,
                                                                     repeats)
            for case in cases:
                r = results["real"][case]
                print(case, json.dumps({k: r[k] for k in ("n_slices", "command_wall_s_median",
                                                          "bare_sitk_read_s_median", "peak_rss_mb_max",
                                                          "peak_tree_pss_mb")}))
                r = results["segment_command"][case]
                print("segment", case, json.dumps({k: r[k] for k in ("command_wall_s_median", "peak_rss_mb_max",
                                                                     "peak_tree_pss_mb")}))
        else:
            results["real"] = {"skipped": f"{CTMD} not found"}
        from pneumoct.io.writers import write_volume
        from pneumoct.synth.phantom import PhantomConfig, generate_phantom

        for n in ((100,) if a.quick else (100, 300, 500)):
            ph = generate_phantom(PhantomConfig(label="covid19", seed=5, matrix=512, n_slices=n))
            path = os.path.join(tmp, f"synth_{n}.nii.gz")
            write_volume(path, ph.study.hu, ph.study)
            del ph
            r = bench_study(path, tmp, 1 if n > 100 else min(repeats, 3),
                            f"SYNTHETIC: pneumoct.synth covid19 phantom, 512x512x{n}, NIfTI")
            results["synthetic_scaling"].append(r)
            print(n, json.dumps({k: r[k] for k in ("command_wall_s_median", "peak_rss_mb_max",
                                                   "peak_tree_pss_mb")}))
    sc = results["synthetic_scaling"]
    s = _slope([r["n_slices"] for r in sc], [r["command_wall_s_median"] for r in sc])
    results["seconds_per_100_slices"] = None if s is None else round(100 * s, 3)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
