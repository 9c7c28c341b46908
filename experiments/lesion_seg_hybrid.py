"""Train the hybrid-case segmenter: three leave-one-study-out fold models and the shipped (all-studies) model.

    python experiments/lesion_seg_hybrid.py            # trains what is missing under runs/ (about 10 min a run, 2 cores)
    python experiments/lesion_seg_hybrid.py --only full
    python experiments/lesion_seg_hybrid.py --variant pseudo   # + pseudo-labelled real slices (seg_v3)

Fold ``<study>`` = ``configs/lesion_seg_hybrid_cpu.yaml`` with that COVID-CT-MD study left out of the hybrid /
weak-negative table, so experiments/real_validation.py can measure each fold model on the one real DICOM study it
never saw. The 2D sets and phantoms are the same in every run (their own patient-level validation split).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"hybrid": ROOT / "configs" / "lesion_seg_hybrid_cpu.yaml",
           "pseudo": ROOT / "configs" / "lesion_seg_pseudo_cpu.yaml"}
STUDIES = ("covid", "cap", "normal")


def run_dir(fold: str, variant: str = "hybrid") -> Path:
    return ROOT / "runs" / (f"lesion_seg_{variant}_cpu" if fold == "full" else f"lesion_seg_{variant}_loso_{fold}")


def fold_config(fold: str, variant: str = "hybrid") -> dict:
    raw = copy.deepcopy(yaml.safe_load(CONFIGS[variant].read_text()))
    if fold != "full":
        raw["name"] = f"lesion_seg_{variant}_loso_{fold}"
        for spec in raw["data"]["tables"]:
            if spec["kind"] in ("covid_ct_md_hybrid", "covid_ct_md_pseudo"):
                spec["studies"] = [s for s in spec["studies"] if s != fold]
    return raw


def train(fold: str, variant: str = "hybrid") -> Path:
    from pneumoct.train.config import parse_config
    from pneumoct.train.entry import train_from_config
    from pneumoct.train.run import is_complete

    out = run_dir(fold, variant)
    if is_complete(out):
        print(f"{fold}: done already ({out})")
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)  # an unfinished run: start again (the segmentation task does not resume)
    cfg = parse_config(fold_config(fold, variant), base_dir=ROOT)
    train_from_config(cfg, out, progress=False)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=STUDIES + ("full",), action="append")
    ap.add_argument("--variant", choices=tuple(CONFIGS), default="hybrid")
    args = ap.parse_args(argv)
    for fold in args.only or (*STUDIES, "full"):
        print(f"training {fold} -> {train(fold, args.variant)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
