"""Speed of the learned lesion segmenter on the real DICOM studies (issue 4 target: a 150-slice study in <= 8 s on
this 2-core machine). Times `segment_volume` alone (crop + window + CLAHE + network + map back), after reading and
the lung mask, each study in this process. Writes benchmarks/results/segment_speed.json.

Usage: python benchmarks/bench_segment.py [--model DIR]   (default: the bundled weights/lesion_seg)
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CTMD = ROOT.parent / "shared" / "data" / "covid-ct-md" / "dicom"


def main() -> int:
    import torch

    from pneumoct.io import read_study
    from pneumoct.preprocess.lung_mask import segment_lungs
    from pneumoct.segmentation import load_segmenter, segment_volume

    model = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else None
    seg = load_segmenter(model)
    if seg is None:
        print("no segmenter (install one as weights/lesion_seg or pass --model)", file=sys.stderr)
        return 2
    res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
           "model": seg.provenance(), "studies": {}}
    for folder in ("covid-P001", "cap-cap001", "normal-normal001"):
        study = read_study(CTMD / folder)
        lung = segment_lungs(study).labels
        segment_volume(study.hu[:4], lung[:4], seg)  # warm-up
        t = time.perf_counter()
        out = segment_volume(study.hu, lung, seg, lung_margin_px=max(1, round(5 / float(study.spacing[2]))))
        dt = time.perf_counter() - t
        res["studies"][folder] = {"n_slices": int(study.shape[0]), "seconds": round(dt, 2),
                                  "per_150_slices_s": round(dt * 150 / study.shape[0], 2),
                                  "stages_s": {k: round(float(v), 3) for k, v in out.timing.items()}}
        print(folder, res["studies"][folder], flush=True)
    out_path = ROOT / "benchmarks" / "results" / "segment_speed.json"
    out_path.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
