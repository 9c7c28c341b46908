"""Dual-sampling task with real covid-ct-md studies (``dual.real_ctmd``): the config option, the weak infection mask
of a study without voxel masks, the split (real studies train only) and a tiny training run."""
from __future__ import annotations

import numpy as np
import pytest

from pneumoct.errors import PneumoctInputError
from pneumoct.train.task_dual_sampling import (PreparedCase, prepare_cases, split_cases, weak_infection_mask)
from pneumoct.train.volumes import VolumeCase

from conftest import REPO, require_real_data

CFG = REPO / "configs" / "dual_sampling_cpu.yaml"
TINY = ["dual.cohort.n_per_class=2", "dual.cohort.matrix=64", "dual.cohort.n_slices=24", "dual.size=[32,48,48]",
        "train.epochs=1", "model.kwargs.width=4"]


def test_config_option():
    from pneumoct.train.config import load_config

    assert load_config(CFG).dual.real_ctmd == []
    assert load_config(CFG, ["dual.real_ctmd=[covid,cap]"]).dual.real_ctmd == ["covid", "cap"]
    with pytest.raises(PneumoctInputError, match="unknown study 'covid2'"):
        load_config(CFG, ["dual.real_ctmd=[covid2]"])
    with pytest.raises(PneumoctInputError, match="outside the dual-sampling task"):
        load_config(CFG, ["dual.real_ctmd=[normal]"])
    with pytest.raises(PneumoctInputError, match="twice"):
        load_config(CFG, ["dual.real_ctmd=[cap,cap]"])
    with pytest.raises(PneumoctInputError):
        load_config(CFG, ["dual.real_ctmd=cap"])
    with pytest.raises(PneumoctInputError, match="unknown config key"):
        load_config(CFG, ["dual.real_ctmdx=[cap]"])


def _toy_study():
    """6 slices of 8 x 8: right lung (1) in columns 0-3, left lung (2) in columns 4-7 of rows 1-6."""
    lung = np.zeros((6, 8, 8), np.uint8)
    lung[:, 1:7, 0:4], lung[:, 1:7, 4:8] = 1, 2
    sl = np.zeros(6, bool)
    sl[[2, 3]] = True
    thr = np.zeros((6, 8, 8), np.uint8)
    thr[1, 2:4, 1:3] = 1        # a finding on a radiologist-negative slice
    thr[2, 2:5, 1:3] = 1        # right lung, positive slice
    thr[2, 3:5, 5:7] = 2        # left lung, positive slice (consolidation label)
    thr[3, 0, :] = 1            # outside the lungs (row 0) on a positive slice
    thr[3, 4:6, 1:3] = 1
    return lung, sl, thr


def test_weak_mask_positive_slices_inside_lung():
    lung, sl, thr = _toy_study()
    m, method = weak_infection_mask(lung, sl, thr, min_pixels=1)
    assert method.startswith("threshold") and m.dtype == np.uint8 and m.any()
    assert not m[~sl].any()                       # radiologist-negative slices stay empty
    assert not m[lung == 0].any()                 # inside the lungs only
    assert m[2, 3:5, 5:7].all() and m[2, 2:5, 1:3].all() and m[3, 4:6, 1:3].all()
    assert set(np.unique(m)) == {0, 1}
    # lobe labels: slice 2 has only right-lung lobes positive (RLL) -> the left lung is emptied there
    lobes = np.zeros((6, 5), bool)
    lobes[2, 2] = True
    m2, _ = weak_infection_mask(lung, sl, thr, lobes, min_pixels=1)
    assert not m2[2][lung[2] == 2].any() and m2[2, 2:5, 1:3].all()
    assert m2[3].any()                            # slice 3 has no lobe labels: both sides kept


def test_weak_mask_fallback_and_none():
    lung, sl, thr = _toy_study()
    thr[2:4] = 0                                  # the finder found nothing on the positive slices
    m, method = weak_infection_mask(lung, sl, thr, min_pixels=1)
    assert method.startswith("fallback")
    assert (m[sl] == (lung[sl] > 0)).all() and not m[~sl].any()
    lobes = np.zeros((6, 5), bool)
    lobes[[2, 3], 0] = True                       # LLL only: the right lung is not infected on those slices
    m2, _ = weak_infection_mask(lung, sl, thr, lobes, min_pixels=1)
    assert m2[sl].any() and not m2[sl][lung[sl] == 1].any()
    m3, method3 = weak_infection_mask(lung, np.zeros(6, bool), thr, min_pixels=1)
    assert method3 == "none" and not m3.any()
    with pytest.raises(PneumoctInputError):
        weak_infection_mask(lung, sl[:-1], thr)


def _real_like_case(label="covid19"):
    """A 'real' VolumeCase without voxel truth, with a weak mask, built from a phantom's arrays (no real data)."""
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom

    ph = generate_phantom(PhantomConfig(label=label, seed=11, matrix=64, n_slices=24))
    sl = ph.slice_lesion_labels.astype(bool)
    m, method = weak_infection_mask(ph.lung_mask, sl, ph.lesion_mask, min_pixels=1)
    c = VolumeCase("covid-ct-md/test", ph.study.hu.astype(np.int16), tuple(float(v) for v in ph.study.spacing),
                   ph.lung_mask.astype(np.uint8), label, "real covid-ct-md (test stand-in)", "covid-ct-md/test",
                   lesion=None, slice_labels=sl, extra={"dataset": "covid-ct-md", "weak_lesion": m,
                                                        "weak_lesion_method": method, "weak_ratio": 0.02})
    return c


def test_prepare_and_split_real_cases_train_only():
    from pneumoct.train.config import load_config
    from pneumoct.train.task_dual_sampling import prep_config

    cfg = load_config(CFG, TINY)
    c = _real_like_case()
    (p,) = prepare_cases([c], prep_config(cfg))
    assert p.weak and p.ratio == 0.02 and p.mask is not None and p.mask.any() and p.source.startswith("real")
    rng = np.random.default_rng(0)
    ph = [PreparedCase(f"p{i}", f"p{i}", "synthetic phantom", i % 2, 0.01, rng.random((4, 4, 4)).astype(np.float16),
                       None) for i in range(10)]
    for seed in range(5):
        cfg.split.seed = seed
        tr, va = split_cases(ph + [p], cfg)
        assert 10 in tr and 10 not in va and len(tr) + len(va) == 11 and not set(tr) & set(va)
    cfg.split.seed = 0
    tr0, va0 = split_cases(ph, cfg)  # without real cases: the split of before (patient_split on all cases)
    from pneumoct.train.sampling import patient_split

    a, b = patient_split([x.group for x in ph], [x.label for x in ph], cfg.split.val_fraction, 0)
    assert list(tr0) == list(a) and list(va0) == list(b)


def test_tiny_training_with_a_weak_real_case(tmp_path):
    from pneumoct.models.checkpoint import load_checkpoint
    from pneumoct.train.config import load_config
    from pneumoct.train.task_dual_sampling import build_cohort, fit_dual_sampling, prep_config

    cfg = load_config(CFG, TINY)
    prep = prep_config(cfg)
    cases = prepare_cases(build_cohort(cfg.dual.cohort), prep) + prepare_cases([_real_like_case()], prep)
    m = fit_dual_sampling(cfg, tmp_path / "run", progress=False, cases=cases)
    assert m["status"] == "done"
    _, info = load_checkpoint(tmp_path / "run" / "best")
    d = info["meta"]["data"]
    assert d["real_studies"] == ["covid-ct-md/test"] and d["training_data"] == "real+synthetic"
    assert "real studies (training only): covid-ct-md/test" in (tmp_path / "run" / "model_card.md").read_text()


def test_tiny_training_with_real_ctmd_from_config(tmp_path):
    """``pneumoct train`` path: dual.real_ctmd=[cap] reads the real study, builds its weak mask, trains 1 epoch."""
    require_real_data()
    from pneumoct.models.checkpoint import load_checkpoint
    from pneumoct.train.entry import train_from_config

    m = train_from_config(CFG, tmp_path / "run", progress=False, overrides=TINY + ["dual.real_ctmd=[cap]"])
    assert m["status"] == "done"
    _, info = load_checkpoint(tmp_path / "run" / "best")
    d = info["meta"]["data"]
    assert d["real_studies"] == ["covid-ct-md/cap"] and 0 < d["real_weak_ratios"]["covid-ct-md/cap"] < 0.1
    assert any(s.startswith("real covid-ct-md") for s in d["sources"])
    fp = (tmp_path / "run" / "best" / "fingerprint.json").read_text()
    assert "real+synthetic" in fp
