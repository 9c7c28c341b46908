"""Smoke test of experiments/volumetric_maps.py (issue 12): its --quick path (2 small held-out phantoms through
both `diagnose --model` systems, every map scored) runs end to end in ~20 s and gives well-formed scores. Says
nothing about the maps' quality, except that the random control sits at chance and the lesion network of DeepSC
(a segmentation output) beats it on voxel AUC."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.slow
def test_volumetric_maps_quick():
    sys.path.insert(0, str(EXP))
    mod = importlib.import_module("volumetric_maps")
    res = mod.run(1, 7301, 50, matrix=128, n_slices=32, max_cases=2)
    assert res["n_cases"] == 2 and res["held_out"]["shared_seeds"] == 0
    expected = {f"{s}/{m}" for s, ms in mod.SYSTEM_MAPS.items() for m in ms} | {"control/random"}
    assert expected <= set(res["maps"])
    for name, e in res["maps"].items():
        for metric in mod.METRICS:
            a = e[metric]
            assert a["n"] == 2 and 0.0 <= a["mean_low"] <= a["mean"] <= a["mean_high"] <= 1.0, (name, metric)
    rnd = res["maps"]["control/random"]
    assert abs(rnd["voxel_auc"]["mean"] - 0.5) < 0.05
    assert abs(rnd["energy_inside"]["mean"] - res["chance"]["chance_energy"]["mean"]) < 0.01
    assert res["maps"]["deepsc/segmentation"]["voxel_auc"]["mean"] > 0.7
    md = mod.markdown(res, "test machine")
    assert "SYNTHETIC" in md and "control: uniform random" in md and "Same cohort" not in md
