"""Whole-command time and peak memory of `pneumoct diagnose STUDY --model NAME` for the 3D systems (issue 12).

Targets: a real 150-slice study in <= 20 s on 2 CPU cores; a 300-slice study within 4 GB. Each run is a fresh
process (process start to exit, all files written), median of ``--repeats``. Data: REAL covid-ct-md covid-P001
(148 slices, JPEG-Lossless DICOM) and the same study stacked with its mirror into 296 slices (NIfTI; a volume of
real anatomy twice as long, for the memory target). Writes benchmarks/results/volumetric.json.

    python benchmarks/bench_volumetric.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_diagnose import CTMD, _memory_run, _timed, compile_sources  # noqa: E402  (the same fresh-process timer)

OUT = ROOT / "benchmarks" / "results" / "volumetric.json"


def _stacked_study(dest: Path) -> Path:
    import numpy as np

    from pneumoct.io import read_study
    from pneumoct.io.writers import write_volume

    from pneumoct.types import SliceInfo, StudyVolume

    st = read_study(CTMD / "covid-P001")
    hu = np.concatenate([st.hu, st.hu[::-1]])
    slices = [SliceInfo(index=k, position_mm=st.origin[2] - k * st.spacing[0]) for k in range(len(hu))]
    long = StudyVolume(hu=hu, spacing=st.spacing, origin=st.origin, direction=st.direction, slices=slices,
                       source_format="dicom")
    write_volume(dest, hu, long)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    compile_sources()
    from pneumoct.volumetric import SYSTEMS

    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, no GPU", "runs": []}
    with tempfile.TemporaryDirectory(prefix="pneumoct_bench3d_") as tmp:
        studies = [("REAL covid-ct-md covid-P001, 148 slices", str(CTMD / "covid-P001"), args.repeats),
                   ("REAL covid-P001 + its mirror, 296 slices (NIfTI)",
                    str(_stacked_study(Path(tmp) / "p296.nii.gz")), 1)]
        for data, path, repeats in studies:
            for system in SYSTEMS:
                walls, rss = [], []
                for i in range(repeats):
                    out = os.path.join(tmp, f"out_{system}_{i}")
                    w, r, _ = _timed([sys.executable, "-m", "pneumoct", "diagnose", path, "--out", out,
                                      "--model", system], env)
                    walls.append(round(w, 2))
                    rss.append(round(r, 1))
                    timing = json.loads(Path(out, "result.json").read_text())["timing_s"]
                row = {"data": data, "system": system, "command_wall_s_median": statistics.median(walls),
                       "command_wall_s_runs": walls, "peak_rss_mb_max": max(rss),
                       # the whole process tree (the lungs run in a forked child), one more untimed run
                       "peak_tree_pss_mb": _memory_run([sys.executable, "-m", "pneumoct", "diagnose", path, "--out",
                                                        os.path.join(tmp, f"mem_{system}"), "--model", system], env),
                       "volumetric_s_last_run": timing.get("volumetric")}
                res["runs"].append(row)
                print(json.dumps(row))
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
