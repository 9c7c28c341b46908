"""`pneumoct evaluate` on prediction files: numbers checked by hand, bad files refused with exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoct.cli import main
from pneumoct.evaluate.run import Predictions, evaluate_predictions, read_predictions_csv, write_predictions_csv


def _write(path, rows, header="case_id,y_true,prob_healthy,prob_covid19"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_binary_metrics_by_hand(tmp_path):
    # 4 cases: truth h, h, c, c; predictions: 0.8/0.2 (h ok), 0.4/0.6 (h wrong), 0.3/0.7 (c ok), 0.6/0.4 (c wrong)
    f = _write(tmp_path / "p.csv", ["a,healthy,0.8,0.2", "b,healthy,0.4,0.6", "c,covid19,0.3,0.7", "d,1,0.6,0.4"])
    pred = read_predictions_csv(f)
    assert pred.class_names == ["healthy", "covid19"]
    assert pred.y_true.tolist() == [0, 0, 1, 1]
    m = evaluate_predictions(pred, tmp_path / "out", n_boot=200)
    rep = m["report"]
    assert rep["accuracy"] == pytest.approx(0.5)
    cov = rep["per_class"]["covid19"]
    assert cov["sensitivity"] == pytest.approx(0.5) and cov["specificity"] == pytest.approx(0.5)
    # AUC by hand: positive scores {0.7, 0.4}, negative {0.2, 0.6}: pairs won 0.7>0.2, 0.7>0.6, 0.4>0.2 = 3/4
    assert cov["auc"] == pytest.approx(0.75)
    assert rep["confusion_matrix"] == [[1, 1], [1, 1]]
    ci = m["bootstrap_95ci"]["accuracy"]
    assert 0.0 <= ci["low"] <= 0.5 <= ci["high"] <= 1.0
    out = tmp_path / "out"
    assert (out / "roc.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["n"] == 4
    assert "covid19" in (out / "metrics.txt").read_text()


def test_groupwise_and_comparison(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0] * 20 + [1] * 20)
    good = np.stack([1 - (0.8 * y + 0.1), 0.8 * y + 0.1], 1)
    noisy = rng.uniform(size=(40, 1))
    bad = np.concatenate([1 - noisy, noisy], 1)
    lvr = np.where(y == 1, rng.uniform(0.0, 0.4, 40), 0.0)
    a = Predictions([f"c{i}" for i in range(40)], y, good, ["healthy", "covid19"], lvr)
    b = Predictions([f"c{i}" for i in range(40)], y, bad, ["healthy", "covid19"], lvr)
    write_predictions_csv(tmp_path / "a.csv", a)
    write_predictions_csv(tmp_path / "b.csv", b)
    a2 = read_predictions_csv(tmp_path / "a.csv")
    np.testing.assert_allclose(a2.probs, good, atol=1e-6)
    m = evaluate_predictions(a2, None, compare=read_predictions_csv(tmp_path / "b.csv"), n_boot=300)
    assert m["report"]["accuracy"] == 1.0
    assert m["comparison"]["p_values"]["accuracy"]["p_value"] < 0.05  # perfect vs coin-flip model
    groups = m["groupwise_by_lesion_volume_ratio"]["groups"]
    assert sum(g["n"] for g in groups.values()) == 40


def test_cli_evaluate_and_bad_input(tmp_path, capsys):
    f = _write(tmp_path / "p.csv", ["a,healthy,0.9,0.1", "b,covid19,0.2,0.8"])
    assert main(["evaluate", "--predictions", str(f), "--out", str(tmp_path / "o"), "--bootstrap", "50"]) == 0
    assert (tmp_path / "o" / "metrics.json").exists()
    bad = _write(tmp_path / "bad.csv", ["a,flu,0.9,0.1"])
    assert main(["evaluate", "--predictions", str(bad), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown class" in err[0]
    assert main(["evaluate", "--predictions", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o3")]) == 2
    assert not (tmp_path / "o2" / "metrics.json").exists()


def test_evaluate_checkpoint_on_phantom_cohort(tmp_path):
    import torch

    from pneumoct.models import build_model
    from pneumoct.synth.writer import synthesize_cohort
    from pneumoct.train.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    cohort = tmp_path / "cohort"
    synthesize_cohort(cohort, 4, seed=3, matrix=64, n_slices=16, formats=("nifti",))
    torch.manual_seed(0)
    kwargs = {"num_classes": 4, "in_channels": 1}
    save_checkpoint(tmp_path / "ck", build_model("multiscale_cam_tiny", **kwargs), "multiscale_cam_tiny", kwargs,
                    {"family": "multiscale_cam", "input_size": 32, "channels": 1, "target": "class",
                     "classes": ["healthy", "covid19", "other_viral", "cap"], "window": [-600.0, 1200.0]})
    out = tmp_path / "ev"
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "ck"), "--data", f"phantom_cohort:{cohort}",
               "--level", "patient", "--out", str(out), "--bootstrap", "50"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 4 and "synthetic" in m["data"]
    assert sum(g["n"] for g in m["groupwise_by_lesion_volume_ratio"]["groups"].values()) == 4
    pred = read_predictions_csv(out / "predictions.csv")
    assert sorted(pred.y_true.tolist()) == [0, 1, 2, 3]  # one phantom per class
    np.testing.assert_allclose(pred.probs.sum(1), 1.0, atol=1e-4)
    # slice level: one row per slice with lungs
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "ck"), "--data", f"phantom_cohort:{cohort}",
               "--out", str(tmp_path / "ev2"), "--bootstrap", "20"])
    assert rc == 0 and read_predictions_csv(tmp_path / "ev2" / "predictions.csv").probs.shape[0] > 16
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ck"), "--data", "nonsense:x",
                 "--out", str(tmp_path / "ev3")]) == 2
