"""Hand-computed checks of pneumoct.evaluate.classification."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from pneumoct.evaluate import (
    accuracy_metric,
    bootstrap_ci,
    bootstrap_p_value,
    classification_report,
    confusion_matrix,
    format_table,
    groupwise_report,
    lvr_groups,
    plot_roc_png,
    roc_auc,
    roc_curve,
)
from pneumoct.types import CLASS_NAMES

# 10 cases, 4 classes.  Truth and argmax prediction:
Y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
PRED = np.array([0, 0, 1, 1, 1, 0, 2, 1, 3, 2])
# confusion matrix by hand (rows = truth)
CM = [[2, 1, 0, 0],
      [1, 2, 0, 0],
      [0, 1, 1, 0],
      [0, 0, 1, 1]]


def probs_from_pred(pred: np.ndarray, k: int = 4, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 0.2, size=(pred.size, k))
    p[np.arange(pred.size), pred] = rng.uniform(0.5, 0.9, size=pred.size)
    return p  # rows deliberately do not sum to 1


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    tot = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return tot / (pos.size * neg.size)


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(Y, PRED, 4)
    assert cm.tolist() == CM
    assert cm.dtype == np.int64


def test_report_hand_computed():
    p = probs_from_pred(PRED)
    r = classification_report(Y, p, CLASS_NAMES)
    json.dumps(r, allow_nan=False)  # JSON-serialisable, no NaN
    assert r["confusion_matrix"] == CM
    assert r["n"] == 10
    assert r["accuracy"] == pytest.approx(0.6)
    pc = r["per_class"]
    # healthy: tp 2, fn 1, fp 1, tn 6
    assert pc["healthy"]["sensitivity"] == pytest.approx(2 / 3)
    assert pc["healthy"]["specificity"] == pytest.approx(6 / 7)
    assert pc["healthy"]["precision"] == pytest.approx(2 / 3)
    assert pc["healthy"]["f1"] == pytest.approx(2 / 3)
    # covid19: tp 2, fn 1, fp 2, tn 5
    assert (pc["covid19"]["tp"], pc["covid19"]["fn"], pc["covid19"]["fp"], pc["covid19"]["tn"]) == (2, 1, 2, 5)
    assert pc["covid19"]["recall"] == pytest.approx(2 / 3)
    assert pc["covid19"]["specificity"] == pytest.approx(5 / 7)
    assert pc["covid19"]["precision"] == pytest.approx(0.5)
    assert pc["covid19"]["f1"] == pytest.approx(4 / 7)
    # other_viral: tp 1, fn 1, fp 1, tn 7
    assert pc["other_viral"]["sensitivity"] == pytest.approx(0.5)
    assert pc["other_viral"]["specificity"] == pytest.approx(7 / 8)
    assert pc["other_viral"]["f1"] == pytest.approx(0.5)
    # cap: tp 1, fn 1, fp 0, tn 8
    assert pc["cap"]["precision"] == pytest.approx(1.0)
    assert pc["cap"]["specificity"] == pytest.approx(1.0)
    assert pc["cap"]["f1"] == pytest.approx(2 / 3)
    # macro = plain means of the four
    assert r["macro"]["sensitivity"] == pytest.approx(np.mean([2 / 3, 2 / 3, 0.5, 0.5]))
    assert r["macro"]["specificity"] == pytest.approx(np.mean([6 / 7, 5 / 7, 7 / 8, 1.0]))
    assert r["macro"]["f1"] == pytest.approx(np.mean([2 / 3, 4 / 7, 0.5, 2 / 3]))
    # per-class AUC = brute-force pair count on that column
    for c, name in enumerate(CLASS_NAMES):
        assert pc[name]["auc"] == pytest.approx(brute_auc((Y == c).astype(int), p[:, c]))


def test_fpe_fne_fdpe_by_hand():
    r = classification_report(Y, probs_from_pred(PRED), CLASS_NAMES)
    ab = r["abnormal"]
    # 3 healthy, 7 diseased.  healthy->covid (1 FP); covid->healthy (1 FN); other->covid, cap->other (2 FD)
    assert (ab["n_negative"], ab["n_positive"]) == (3, 7)
    assert (ab["false_positives"], ab["false_negatives"], ab["false_disease_predictions"]) == (1, 1, 2)
    assert ab["fpe"] == pytest.approx(1 / 3)
    assert ab["fne"] == pytest.approx(1 / 7)
    assert ab["fdpe"] == pytest.approx(2 / 7)
    assert ab["sensitivity"] == pytest.approx(6 / 7)
    assert ab["specificity"] == pytest.approx(2 / 3)
    # disjoint error decomposition
    err = 1 - r["accuracy"]
    assert err == pytest.approx((3 * ab["fpe"] + 7 * (ab["fne"] + ab["fdpe"])) / 10)
    # abnormal AUC scores 1 - p_healthy after row normalisation
    p = probs_from_pred(PRED)
    score = 1 - p[:, 0] / p.sum(axis=1)
    assert ab["auc"] == pytest.approx(brute_auc((Y != 0).astype(int), score))
    assert classification_report(Y, p, CLASS_NAMES, positive_is_abnormal=False)["abnormal"] is None


def test_perfect_predictions_zero_errors():
    p = np.eye(4)[Y]
    r = classification_report(Y, p, CLASS_NAMES)
    assert r["accuracy"] == 1.0
    assert r["abnormal"]["fpe"] == r["abnormal"]["fne"] == r["abnormal"]["fdpe"] == 0.0
    assert all(r["per_class"][n]["auc"] == 1.0 for n in CLASS_NAMES)


def test_auc_hand_and_ties():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # one tied pos/neg pair counts 1/2: (0.5 vs 0.5) .5 + 1 + 1 + 1 = 3.5 / 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert roc_auc([1, 0, 1, 0], [0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.0)
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 30)
        y[:2] = (0, 1)
        s = rng.integers(0, 5, 30).astype(float)  # many ties
        assert roc_auc(y, s) == pytest.approx(brute_auc(y, s))


def test_auc_edge_cases():
    assert roc_auc([0, 1, 0, 1, 1], np.full(5, 0.3)) == 0.5  # constant scores
    assert roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None  # no negatives
    assert roc_auc([0, 0], [0.1, 0.2]) is None  # no positives
    with pytest.raises(ValueError, match="empty"):
        roc_auc([], [])
    with pytest.raises(ValueError):
        roc_auc([0, 2], [0.1, 0.2])


def test_roc_curve_points_and_endpoints():
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thr[0] == np.inf and thr[1:].tolist() == [0.8, 0.4, 0.35, 0.1]
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 40)
    y[:2] = (0, 1)
    s = np.round(rng.uniform(size=40), 1)
    fpr, tpr, _ = roc_curve(y, s)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(y, s))
    fpr, tpr, _ = roc_curve([0, 1, 1], [0.2, 0.2, 0.2])  # constant: straight diagonal
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        roc_curve([1, 1], [0.1, 0.2])


def test_absent_class_and_bad_inputs():
    y = np.array([0, 0, 1, 1, 2, 2])  # no CAP
    p = np.eye(4)[[0, 1, 1, 1, 2, 3]] * 3.0  # rows sum to 3: accepted, argmax used
    r = classification_report(y, p, CLASS_NAMES)
    cap = r["per_class"]["cap"]
    assert cap["n"] == 0 and cap["sensitivity"] is None and cap["auc"] is None and cap["f1"] is None
    assert cap["specificity"] == pytest.approx(5 / 6)
    assert cap["precision"] == 0.0
    assert r["macro"]["n_classes_auc"] == 3 and r["macro"]["n_classes_sensitivity"] == 3
    assert r["accuracy"] == pytest.approx(4 / 6)
    json.dumps(r, allow_nan=False)
    # a class never predicted has precision None
    r2 = classification_report(y, np.eye(4)[[0, 0, 1, 1, 1, 1]], CLASS_NAMES)
    assert r2["per_class"]["other_viral"]["precision"] is None
    assert r2["per_class"]["other_viral"]["sensitivity"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        classification_report([], np.zeros((0, 4)), CLASS_NAMES)
    with pytest.raises(ValueError, match="columns"):
        classification_report(y, np.zeros((6, 3)), CLASS_NAMES)
    with pytest.raises(ValueError, match="rows"):
        classification_report(y, np.zeros((5, 4)), CLASS_NAMES)
    with pytest.raises(ValueError, match="NaN"):
        classification_report(y, np.full((6, 4), np.nan), CLASS_NAMES)
    with pytest.raises(ValueError, match="outside"):
        classification_report([0, 4], np.zeros((2, 4)), CLASS_NAMES)
    # no healthy cases: FPE undefined, not an error
    r3 = classification_report([1, 2], np.eye(4)[[1, 2]], CLASS_NAMES)
    assert r3["abnormal"]["fpe"] is None and r3["abnormal"]["fne"] == 0.0


def _noisy_model(n: int, acc: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    pred = np.where(rng.uniform(size=n) < acc, y, (y + rng.integers(1, 4, n)) % 4)
    return y, probs_from_pred(pred, seed=seed + 100)


def test_bootstrap_ci():
    y, p = _noisy_model(60, 0.8, 0)
    a = bootstrap_ci(accuracy_metric, y, p, n_boot=500, seed=7)
    b = bootstrap_ci(accuracy_metric, y, p, n_boot=500, seed=7)
    c = bootstrap_ci(accuracy_metric, y, p, n_boot=500, seed=8)
    assert a == b  # deterministic for a seed
    assert (a["low"], a["high"]) != (c["low"], c["high"])
    assert a["low"] <= a["estimate"] <= a["high"]
    assert a["estimate"] == pytest.approx(accuracy_metric(y, p))
    assert a["n_valid"] == 500
    y2, p2 = _noisy_model(1200, 0.8, 0)
    big = bootstrap_ci(accuracy_metric, y2, p2, n_boot=500, seed=7)
    assert big["low"] <= big["estimate"] <= big["high"]
    assert (big["high"] - big["low"]) < 0.5 * (a["high"] - a["low"])
    # undefined resamples are dropped, not propagated as NaN
    auc3 = lambda yy, pp: roc_auc(yy == 3, pp[:, 3])  # noqa: E731
    yr = np.array([0] * 19 + [3])
    pr = np.eye(4)[yr]
    ci = bootstrap_ci(auc3, yr, pr, n_boot=200, seed=0)
    assert 0 < ci["n_valid"] < 200 and ci["low"] == ci["high"] == 1.0
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci(accuracy_metric, [], np.zeros((0, 4)))


def test_bootstrap_p_value():
    y, p_b = _noisy_model(100, 0.55, 1)
    p_a = np.eye(4)[y]  # perfect model
    res = bootstrap_p_value(accuracy_metric, y, p_a, p_b, n_boot=1000, seed=0)
    assert res["p_value"] < 0.01
    assert res["p_value"] == pytest.approx(2 / 1001)
    assert res["difference"] == pytest.approx(1 - accuracy_metric(y, p_b))
    same = bootstrap_p_value(accuracy_metric, y, p_b, p_b.copy(), n_boot=300, seed=0)
    assert same["p_value"] == 1.0 and same["difference"] == 0.0
    # symmetric in A/B
    rev = bootstrap_p_value(accuracy_metric, y, p_b, p_a, n_boot=1000, seed=0)
    assert rev["p_value"] == res["p_value"]
    # two nearly equivalent models: large p
    _, p_c = _noisy_model(100, 0.55, 1)
    p_c = p_c.copy()
    wrong = np.flatnonzero(np.argmax(p_c, 1) != y)[0]
    p_c[wrong] = np.eye(4)[y[wrong]]  # fixes exactly one case
    assert bootstrap_p_value(accuracy_metric, y, p_c, p_b, n_boot=500, seed=0)["p_value"] > 0.2


def test_lvr_groups_and_groupwise():
    lvr = np.array([0.0, 0.01, 0.05, 0.07, 0.15, 0.25, 0.5, 1.0, 0.049, 0.3])
    g = lvr_groups(lvr)
    assert g.tolist() == ["[0,0.05)", "[0,0.05)", "[0.05,0.1)", "[0.05,0.1)", "[0.1,0.2)", "[0.2,0.3)",
                          "[0.3,1]", "[0.3,1]", "[0,0.05)", "[0.3,1]"]
    with pytest.raises(ValueError):
        lvr_groups([1.2])
    with pytest.raises(ValueError):
        lvr_groups([np.nan])
    y = np.array([0, 1, 1, 1, 2, 3, 1, 1, 3, 1])
    pred = np.array([0, 0, 1, 1, 2, 2, 1, 0, 3, 1])
    rep = groupwise_report(y, np.eye(4)[pred], g)
    json.dumps(rep, allow_nan=False)
    assert list(rep["groups"]) == ["[0,0.05)", "[0.05,0.1)", "[0.1,0.2)", "[0.2,0.3)", "[0.3,1]"]
    small = rep["groups"]["[0,0.05)"]  # cases 0, 1, 8: truth 0, 1, 3; pred 0, 0, 3
    assert small["n"] == 3
    assert small["n_per_class"] == {"healthy": 1, "covid19": 1, "other_viral": 0, "cap": 1}
    assert small["accuracy"] == pytest.approx(2 / 3)
    assert small["sensitivity"]["covid19"] == 0.0 and small["sensitivity"]["other_viral"] is None
    assert small["sensitivity_abnormal"] == pytest.approx(0.5) and small["specificity_healthy"] == 1.0
    large = rep["groups"]["[0.3,1]"]  # cases 6, 7, 9: all covid, pred 1, 0, 1
    assert large["n"] == 3 and large["accuracy"] == pytest.approx(2 / 3)
    assert large["sensitivity"]["covid19"] == pytest.approx(2 / 3)
    assert large["specificity_healthy"] is None
    assert sum(v["n"] for v in rep["groups"].values()) == 10
    text = format_table(rep)
    assert "[0.3,1]" in text and "0.6667" in text


def test_format_table():
    r = classification_report(Y, probs_from_pred(PRED), CLASS_NAMES)
    text = format_table(r)
    lines = text.splitlines()
    assert "accuracy = 0.6000" in lines[0]
    assert "FPE = 0.3333" in text and "FNE = 0.1429" in text and "FDPE = 0.2857" in text
    row = next(line for line in lines if line.startswith("covid19 "))
    assert "0.6667" in row and "0.7143" in row and "0.5000" in row
    assert "confusion matrix" in text
    y = np.array([0, 0, 1, 1])
    assert " - " in format_table(classification_report(y, np.eye(4)[y], CLASS_NAMES)) + " "


def test_plot_roc_png(tmp_path):
    p = probs_from_pred(PRED)
    out = tmp_path / "sub" / "roc.png"
    skipped = plot_roc_png(Y, p, CLASS_NAMES, out)
    assert skipped == []
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in out.parent.iterdir()] == ["roc.png"]  # no leftover temp file
    y = np.array([0, 0, 1, 1, 2, 2])
    assert plot_roc_png(y, np.eye(4)[y], CLASS_NAMES, tmp_path / "r2.png") == ["cap"]
    assert (tmp_path / "r2.png").stat().st_size > 0
