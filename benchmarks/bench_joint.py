"""JCS joint diagnosis (Wu et al., Fig. 1): time the two paths of `diagnose` (issue 4).

"always": every study is segmented by the learned segmenter; "positive": the segmenter runs only when the
patient classifier calls the study abnormal (abnormal probability >= 0.5). Each study is read once; both modes
then run `analyse_study` (lungs, threshold baseline, learned classifiers, gate, segmenter, quantification) with
the bundled weights, no report. Data: the three REAL COVID-CT-MD DICOM studies in ../shared/data and two
SYNTHETIC phantoms (one healthy, one COVID-19; seeded). Writes benchmarks/results/joint_diagnosis.json.

Usage: python benchmarks/bench_joint.py
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CTMD = ROOT.parent / "shared" / "data" / "covid-ct-md" / "dicom"


def _studies():
    from pneumoct.io import read_study
    from pneumoct.synth.writer import synthesize_cohort

    for folder in ("covid-P001", "cap-cap001", "normal-normal001"):
        if (CTMD / folder).is_dir():
            yield f"real:{folder}", read_study(CTMD / folder)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize_cohort(tmp, n_cases=2, seed=7, labels=["healthy", "covid19"], matrix=256, n_slices=80,
                          formats=("nifti",))
        for case, label in (("case_0000", "healthy"), ("case_0001", "covid19")):
            yield f"synthetic:{label}", read_study(Path(tmp) / case / "image.nii.gz")


def main() -> int:
    import torch

    from pneumoct.pipeline import DiagnoseOptions, analyse_study

    torch.set_num_threads(2)
    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
           "what": "analyse_study wall time (s) per mode, report not written; gate = m3lung_patient abnormal >= 0.5",
           "studies": {}}
    for name, study in _studies():
        entry = {"n_slices": int(study.shape[0])}
        for mode in ("always", "positive"):
            timing: dict = {}
            t = time.perf_counter()
            out = analyse_study(study, DiagnoseOptions(segment_when=mode, write_report=False), timing)
            dt = time.perf_counter() - t
            seg = out.result["segmentation"]
            entry[mode] = {"seconds": round(dt, 2), "segmented": seg["ran"],
                           "segmenter_s": round(timing.get("lesions", 0.0), 2),
                           "lesion_volume_ml": out.result["quantification"]["lesion_volume_ml"],
                           "patient_label": out.result["patient"]["label"]}
            if "gate" in seg:
                entry[mode]["gate_abnormal_probability"] = seg["gate"]["abnormal_probability"]
        res["studies"][name] = entry
        print(name, json.dumps(entry), flush=True)
    out_path = ROOT / "benchmarks" / "results" / "joint_diagnosis.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
