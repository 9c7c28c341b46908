"""End-to-end speed and peak memory of `pneumoct diagnose` on this machine.

* the three real studies in ../shared/data/covid-ct-md (JPEG-Lossless DICOM): total time, decode time alone,
  per-stage times, peak RSS — targets: <= 15 s each, <= 3 GB;
* synthetic phantoms (pneumoct.synth, 512×512, NIfTI) with 100/300/500 slices: how time grows with slices.

Each run is a fresh subprocess so peak RSS (ru_maxrss) is that study's alone.
Writes benchmarks/results/diagnose.json. Usage: python benchmarks/bench_diagnose.py [--quick]
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CTMD = ROOT.parent / "shared" / "data" / "covid-ct-md" / "dicom"

_CHILD = r"""
import json, resource, sys, time
from pneumoct.io import read_study
from pneumoct.pipeline import diagnose
path, out = sys.argv[1], sys.argv[2]
t = time.perf_counter(); study = read_study(path); decode = time.perf_counter() - t
del study
t = time.perf_counter(); result = diagnose(path, out); total = time.perf_counter() - t
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"decode_s": round(decode, 3), "diagnose_total_s": round(total, 3), "stages_s": result["timing_s"],
                  "peak_rss_mb": round(peak_mb, 1), "n_slices": result["volume"]["shape_zyx"][0],
                  "label": result["patient"]["label"],
                  "lung_volume_ml": result["quantification"]["lung_volume_ml"]["total"],
                  "lesion_volume_ml": result["quantification"].get("lesion_volume_ml")}))
"""


def run_child(path: str, out: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, path, out], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    quick = "--quick" in sys.argv
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()},
                     "date": time.strftime("%Y-%m-%d"), "real": {}, "synthetic_scaling": []}
    with tempfile.TemporaryDirectory() as tmp:
        if CTMD.is_dir():
            for case in ("covid-P001", "cap-cap001", "normal-normal001"):
                r = run_child(str(CTMD / case), os.path.join(tmp, case))
                r["data"] = f"real: covid-ct-md/{case} (JPEG-Lossless DICOM)"
                results["real"][case] = r
                print(case, json.dumps(r))
        else:
            results["real"] = {"skipped": f"{CTMD} not found"}
        from pneumoct.synth.phantom import PhantomConfig, generate_phantom
        from pneumoct.io.writers import write_volume
        for n in ((100,) if quick else (100, 300, 500)):
            ph = generate_phantom(PhantomConfig(label="covid19", seed=5, matrix=512, n_slices=n))
            path = os.path.join(tmp, f"synth_{n}.nii.gz")
            write_volume(path, ph.study.hu, ph.study)
            del ph
            r = run_child(path, os.path.join(tmp, f"out_{n}"))
            r["data"] = f"synthetic phantom (pneumoct.synth) covid19, 512x512x{n}, NIfTI"
            results["synthetic_scaling"].append(r)
            print(n, json.dumps(r))
    out = ROOT / "benchmarks" / "results" / "diagnose.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
