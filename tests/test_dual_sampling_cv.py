"""5-fold cross-validation of the dual-sampling networks (experiments/dual_sampling_eval.py ``cv``): the fold
split (patient-level, stratified, validation only from the training folds) and the CV path end to end on toy
volumes (2 folds, 1 epoch, width 4). Says nothing about the models' quality."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXP = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def dse():
    sys.path.insert(0, str(EXP))
    import dual_sampling_eval

    return dual_sampling_eval


@pytest.mark.parametrize("n_pos,n_neg,k", [(80, 80, 5), (37, 23, 5), (6, 6, 2), (9, 4, 3)])
def test_cv_folds_disjoint_covering_stratified(dse, n_pos, n_neg, k):
    rng = np.random.default_rng(n_pos)
    labels = rng.permutation(np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)])
    pids = [f"p{i:03d}" for i in range(len(labels))]
    folds = dse.cv_folds(pids, labels, k=k)
    assert len(folds) == k
    tests = [set(f["test"].tolist()) for f in folds]
    for i in range(k):
        for j in range(i + 1, k):
            assert not tests[i] & tests[j], "test folds overlap"
    assert set().union(*tests) == set(range(len(labels))), "test folds do not cover the cohort"
    for c in (0, 1):
        counts = [int(np.sum(labels[f["test"]] == c)) for f in folds]
        assert max(counts) - min(counts) <= 1, (c, counts)
    for f in folds:
        tr, va, te = set(f["train"].tolist()), set(f["val"].tolist()), set(f["test"].tolist())
        assert not va & te and not tr & te and not tr & va
        assert tr | va | te == set(range(len(labels)))
        assert len(va) >= 2 and set(labels[f["val"]]) == {0, 1}
    again = dse.cv_folds(pids, labels, k=k)  # seeded
    assert all(np.array_equal(a[s], b[s]) for a, b in zip(folds, again) for s in ("train", "val", "test"))


def test_cv_folds_patient_level(dse):
    """Rows of one patient (several scans) stay together in train, val or test."""
    pids = [f"p{i // 2}" for i in range(40)]
    labels = [(i // 2) % 2 for i in range(40)]
    for f in dse.cv_folds(pids, labels, k=5):
        sides = [{pids[i] for i in f[s]} for s in ("train", "val", "test")]
        assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]


def _toy(n: int, seed: int = 0):
    from pneumoct.train.task_dual_sampling import PreparedCase

    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:16, :32, :32]
    out = []
    for i in range(n):
        covid = i % 2 == 0
        c = (8, rng.integers(6, 10), rng.integers(4, 8)) if covid else (8, 16, 16)
        blob = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 16
        x = 0.2 * rng.random((16, 32, 32)) + (0.7 if covid else 0.3) * blob
        out.append(PreparedCase(f"toy{i}", f"toy{i}", "toy", int(covid), 0.05 if covid else 0.002 * (i % 3),
                                x.astype(np.float16), blob.astype(np.float16)))
    return out


def test_cv_quick_end_to_end(dse, tmp_path):
    torch.set_num_threads(1)
    cases = _toy(16)
    finder = np.array([c.ratio for c in cases])
    extra = ["model.kwargs.width=4", "dual.size=[16,32,32]"]
    raw = dse.run_cv(cases, tmp_path, variants=("rn34_us", "att_us"), optional=("att_ss",), epochs=1, k=2,
                     extra=extra, budget_s=1e6, heldout=_toy(6, seed=5))
    assert set(raw["runs"]) == {"rn34_us", "att_us", "att_ss"} and not raw["skipped"]
    assert len(list(tmp_path.glob("fold*_*.json"))) == 6
    res = dse.cv_summary(cases, finder, raw, n_boot=50, heldout=(np.array([c.label for c in _toy(6, 5)]),
                                                                 np.full(6, 0.01)))
    assert set(res["mean_sd"]) == {"RN34 + US", "Attention RN34 + US", "Attention RN34 + SS", "Attention RN34 + DS"}
    for name, folds in res["per_fold"].items():
        assert len(folds) == 2 and sum(f["n"] for f in folds) == 16
        for f in folds:
            for m in dse.CV_METRICS:
                assert f[m] is None or 0.0 <= f[m] <= 1.0
        assert 0.0 <= res["pooled"][name]["auc"] <= 1.0
    t = res["ttest"]["Attention RN34 + US vs RN34 + US"]
    assert set(t) == set(dse.CV_METRICS)
    assert "Attention RN34 + DS vs Attention RN34 + SS" in res["paired_bootstrap_pooled"]
    assert set(res["heldout_fold_models"]["mean_sd"]) == set(res["mean_sd"])
    # resumable: a second call with the same settings reuses every record (no training)
    again = dse.run_cv(cases, tmp_path, variants=("rn34_us", "att_us"), epochs=1, k=2, extra=extra,
                       heldout=_toy(6, seed=5))
    assert again["runs"]["att_us"][1]["test_p"] == raw["runs"]["att_us"][1]["test_p"]
    # the optional variant is skipped, all folds or none, when the budget cannot hold it
    tight = dse.run_cv(cases, tmp_path, variants=("rn34_us",), optional=("att_ss",), epochs=1, k=2, extra=extra,
                       budget_s=0.0, heldout=_toy(6, seed=5))
    assert "att_ss" not in tight["runs"] and "att_ss" in tight["skipped"]
    md = dse.cv_markdown({**res, "folds": [{"fold": 0, "n_test": 8}, {"fold": 1, "n_test": 8}]})
    assert "paired t-test" in md and "Attention RN34 + DS" in md


def test_ttest_edge_cases(dse):
    assert dse._ttest([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])["p_value"] == 1.0
    r = dse._ttest([0.9, 0.85, 0.8, 0.95, 0.7], [0.8, 0.8, 0.75, 0.9, 0.7])
    from scipy.stats import ttest_rel

    assert r["p_value"] == pytest.approx(ttest_rel([0.9, 0.85, 0.8, 0.95, 0.7], [0.8, 0.8, 0.75, 0.9, 0.7]).pvalue)
    assert dse._ttest([0.9, None], [0.8, 0.7])["p_value"] is None


def test_results_block_keeps_the_earlier_cv_beside_the_current_one(dse, tmp_path, monkeypatch):
    """RESULTS.md block: the current CV (20 epochs) is the main table, the earlier run (CV_EARLIER_JSON, 8 epochs)
    is summarised beside it, and both hand-written readings survive a rerun of ``results`` without text."""
    import copy
    import json

    res_dir = dse.ROOT / "experiments" / "results"
    earlier = json.loads((res_dir / "dual_sampling_cv_8ep.json").read_text())
    assert earlier["protocol"]["epochs"] == 8
    current = copy.deepcopy(earlier)
    current["protocol"]["epochs"] = 20
    current["mean_sd"]["RN34 + US"]["auc"] = {"mean": 0.5, "sd": 0.25}
    current["ttest"]["Attention RN34 + US vs RN34 + US"]["auc"]["p_value"] = 0.0123
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    paths = {"OUT_JSON": tmp_path / "experiments" / "results" / "dual_sampling_eval.json",
             "CV_JSON": tmp_path / "experiments" / "results" / "dual_sampling_cv.json",
             "CV_EARLIER_JSON": tmp_path / "experiments" / "results" / "dual_sampling_cv_8ep.json"}
    paths["OUT_JSON"].write_text((res_dir / "dual_sampling_eval.json").read_text())
    paths["CV_JSON"].write_text(json.dumps(current))
    paths["CV_EARLIER_JSON"].write_text(json.dumps(earlier))
    md = tmp_path / "experiments" / "RESULTS.md"
    md.write_text("# Results\n\n<!-- dual-sampling -->\nold block\n<!-- /dual-sampling -->\n\n## next section\n")
    monkeypatch.setattr(dse, "ROOT", tmp_path)
    for k, v in paths.items():
        monkeypatch.setattr(dse, k, v)

    reading = "Reading of the cross-validation (hand-written, test):\n- twenty epochs"
    reading_8 = "Reading of the earlier cross-validation (hand-written, test):\n- eight epochs"
    dse.write_results("Observations (hand-written, test):\n- obs", reading, reading_8)
    for _ in range(2):  # the second pass keeps the hand-written paragraphs from the file
        text = md.read_text()
        assert text.count("<!-- dual-sampling -->") == 1 and "old block" not in text and "## next section" in text
        main_at = text.index("### 5-fold cross-validation (training cohort; the paper's Sec. IV-C protocol, the "
                             "paper's 20 epochs)")
        earlier_at = text.index("### The earlier 5-fold cross-validation at 8 epochs")
        assert main_at < text.index(reading) < earlier_at < text.index(reading_8) < text.index("<!-- /dual-sampling")
        assert "**20 epochs** per network" in text and "**8 epochs**" not in text
        side = text[earlier_at:]
        assert "| AUC mean ± SD, 20 ep | 8 ep |" in side and "Same data, folds" in side
        assert "| RN34 + US | 0.500 ± 0.250 | 0.894 ± 0.052 |" in side
        assert "(0.012) | -0.062 (0.427) |" in side  # AUC t-test p: 20 epochs, then 8 epochs
        assert "20 epochs, and the earlier 8-epoch one beside it" in text
        dse.write_results()
    ptr = dse._cv_pointer()  # the results JSON's cv entry names both runs
    assert ptr["epochs"] == 20 and ptr["earlier"]["epochs"] == 8
    assert ptr["earlier"]["file"] == "experiments/results/dual_sampling_cv_8ep.json"
    # same schedule in both files: no comparison block
    paths["CV_EARLIER_JSON"].write_text(json.dumps(current))
    dse.write_results()
    assert "### The earlier 5-fold" not in md.read_text()
