"""Dual-sampling attention network (Ouyang et al. 2020): shapes, Eq. 1-5, sampler, pre-processing inverse,
training, checkpoints, the system function."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumoct.errors import PneumoctInputError
from pneumoct.models import build_model
from pneumoct.models.checkpoint import load_checkpoint, save_checkpoint
from pneumoct.models.dual_sampling import (attention_loss, attention_map, dual_sampling_ensemble, ensemble_weight,
                                           total_loss)
from pneumoct.preprocess.volume_dual import DualPrepConfig, prepare_volume, to_study_grid
from pneumoct.train.sampling import size_balanced_groups, size_balanced_order, size_balanced_weights

TINY = {"width": 4, "in_channels": 1, "num_classes": 1}


@pytest.fixture(scope="module")
def phantom():
    from pneumoct.synth.phantom import PhantomConfig, generate_phantom

    return generate_phantom(PhantomConfig(label="covid19", seed=3, matrix=64, n_slices=24))


def test_shapes_and_stride_one_last_stage():
    torch.manual_seed(0)
    net = build_model("dual_sampling_rn34", attention=True, **TINY).eval()
    x = torch.rand(2, 1, 32, 48, 64)
    with torch.no_grad():
        out = net(x)
    assert out["logit"].shape == (2,)
    assert out["features"].shape == (2, 32, 2, 3, 4)          # 8 * width channels, 1/16 in every axis
    assert out["cam"].shape == (2, 1, 2, 3, 4)
    assert out["attention"].shape == (2, 1, 32, 48, 64)        # T(A) upsampled to the input
    assert [len(layer) for layer in net.layers] == [3, 4, 6, 3]  # ResNet-34
    assert net.layers[3][0].conv1.stride == (1, 1, 1) and net.layers[2][0].conv1.stride == (2, 2, 2)
    plain = build_model("dual_sampling_rn34", attention=False, **TINY).eval()
    with torch.no_grad():
        o2 = plain(x)
    assert "attention" not in o2 and o2["cam"].shape == (2, 1, 2, 3, 4)
    with torch.no_grad():
        assert plain(x, return_attention=True)["attention"].shape == (2, 1, 32, 48, 64)


def test_attention_module_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(1, 3, 2, 2, 2, generator=g)
    w = torch.tensor([[0.5, -1.0, 2.0]])
    A, T = attention_map(f, w, (2, 2, 2))            # no upsampling: compare voxel by voxel
    a = np.maximum(np.einsum("c,czyx->zyx", w[0].numpy(), f[0].numpy()), 0)       # Eq. 1
    n = (a - a.min()) / (a.max() - a.min())
    t = 1 / (1 + np.exp(-100 * (n - 0.4)))                                          # Eq. 2
    np.testing.assert_allclose(A[0, 0].numpy(), a, atol=1e-5)
    np.testing.assert_allclose(T[0, 0].numpy(), t, atol=1e-4)
    # Sec. III-B: the 1x1x1 kernel is the FC weight, updated by the BCE loss only (L_ex leaves it alone)
    net = build_model("dual_sampling_rn34", attention=True, **TINY)
    out = net(torch.rand(2, 1, 16, 32, 32))
    attention_loss(out["attention"], torch.ones_like(out["attention"])).sum().backward()
    assert net.fc.weight.grad is None or float(net.fc.weight.grad.abs().sum()) == 0.0
    assert net.stem[0].weight.grad is not None


def test_attention_loss_and_total_loss():
    T = torch.tensor([[1.0, 0.0, 0.5]])
    M = torch.tensor([[1.0, 1.0, 0.0]])
    assert float(attention_loss(T, M)[0]) == pytest.approx(1.25 / 3.5, rel=1e-5)      # Eq. 3
    out = {"logit": torch.tensor([0.0, 0.0]), "attention": torch.stack([T, T])}
    loss, parts = total_loss(out, torch.tensor([1, 0]), torch.stack([M, M]))
    assert parts["l_c"] == pytest.approx(np.log(2), rel=1e-5)
    assert parts["l_ex"] == pytest.approx(1.25 / 3.5, rel=1e-5)  # only the COVID-19 case enters L_ex
    assert float(loss) == pytest.approx(np.log(2) + 0.5 * 1.25 / 3.5, rel=1e-5)        # Eq. 4, lambda 0.5
    _, parts = total_loss(out, torch.tensor([0, 0]), torch.stack([M, M]))
    assert parts["l_ex"] == 0.0                                  # CAP cases: classification loss only


def test_size_balanced_sampler():
    g = size_balanced_groups([1, 1, 0, 0], [0.0299, 0.030, 0.001, 0.0011])
    assert g.tolist() == [0, 1, 2, 3]
    groups = np.array([0] * 2 + [1] * 3 + [2] * 6 + [3] * 4)
    w = size_balanced_weights(groups)
    np.testing.assert_allclose(w, [3 / 2, 1, 1, 6 / 4])       # [N_l^covid/N_s^covid, 1, 1, N_s^cap/N_l^cap]
    order = size_balanced_order(groups, 20000, seed=0)
    freq = np.bincount(groups[order], minlength=4) / len(order)
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.02)
    assert np.array_equal(order, size_balanced_order(groups, 20000, seed=0))     # seeded
    assert size_balanced_weights(np.array([1, 1, 2])).tolist() == [0.0, 1.0, 1.0, 0.0]  # empty: never drawn
    # a class with one populated group keeps it (weight 1), instead of N_small^cap / N_large^cap = 0
    assert size_balanced_weights(np.array([0, 1, 1, 3, 3])).tolist() == [2.0, 1.0, 0.0, 1.0]


def test_ensemble_eq5():
    r = np.array([0.0005, 0.001, 0.01, 0.030, 0.05])
    np.testing.assert_allclose(ensemble_weight(r), [0.35, 0.96, 0.96, 0.96, 0.35])
    p = dual_sampling_ensemble([0.2] * 5, [0.8] * 5, r)
    np.testing.assert_allclose(p, ensemble_weight(r) * 0.2 + (1 - ensemble_weight(r)) * 0.8)


@pytest.mark.parametrize("crop", [False, True])
def test_preprocessing_inverse_maps_back_to_study_grid(phantom, crop):
    hu, lung, les = phantom.study.hu, phantom.lung_mask, phantom.lesion_mask
    cfg = DualPrepConfig(size=(32, 48, 48), factor=2.0, crop_to_lungs=crop)
    x, m, rec = prepare_volume(hu, phantom.study.spacing, lung, cfg, lesion=les)
    assert x.shape == m.shape == (32, 48, 48) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1 and 0 <= m.min() and m.max() <= 1
    assert rec.factor >= 2.0 and all(s <= n for s, n in zip(rec.shape, rec.size))
    back = to_study_grid(m, rec)
    assert back.shape == hu.shape
    # the lesion fraction mapped back overlaps the true lesion (coarse grid: overlap, not identity)
    truth = les > 0
    assert back[truth].mean() > 3 * back[~truth].mean()
    ones = to_study_grid(np.ones(rec.size, np.float32), rec)
    z0, z1, y0, y1, x0, x1 = rec.box
    assert np.allclose(ones[z0:z1, y0:y1, x0:x1], 1.0) and ones.sum() == pytest.approx((z1 - z0) * (y1 - y0) *
                                                                                        (x1 - x0))
    with pytest.raises(PneumoctInputError):
        prepare_volume(hu, phantom.study.spacing, np.zeros_like(lung), cfg)


def _toy_cases(n: int, seed: int):
    """A learnable task: COVID-19 = a bright peripheral blob (with its mask), CAP = a faint central one."""
    from pneumoct.train.task_dual_sampling import PreparedCase

    rng = np.random.default_rng(seed)
    out = []
    zz, yy, xx = np.mgrid[:16, :32, :32]
    for i in range(n):
        covid = i % 2 == 0
        c = (8, rng.integers(6, 10), rng.integers(4, 8)) if covid else (8, 16, 16)
        blob = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 16
        x = 0.2 * rng.random((16, 32, 32)) + (0.7 if covid else 0.3) * blob
        out.append(PreparedCase(f"toy{i}", f"toy{i}", "toy", int(covid), 0.05 if covid else 0.0005,
                                x.astype(np.float16), blob.astype(np.float16)))
    return out


def _tiny_cfg(**over):
    from pneumoct.train.config import parse_config

    raw = {"model": {"name": "dual_sampling_rn34", "kwargs": {"width": 4}}, "task": "dual_sampling",
           "dual": {"size": [16, 32, 32], "sampling": over.pop("sampling", "uniform")},
           "train": {"epochs": 6, "batch_size": 4, "lr": 0.003, "seed": 0, "threads": 1}}
    return parse_config(raw)


def test_training_learns():
    from pneumoct.train.task_dual_sampling import predict, train_network

    cases = _toy_cases(32, seed=0)
    val = _toy_cases(12, seed=1)
    allc = cases + val
    tr, va = np.arange(32), np.arange(32, 44)
    for sampling in ("uniform", "size_balanced"):
        model, res = train_network(_tiny_cfg(sampling=sampling), allc, tr, va)
        losses = [h["train_loss"] for h in res["history"]]
        assert losses[-1] < losses[0]
        assert res["best"]["val_auc"] > 0.8
        p = predict(model, allc, va)
        assert ((p >= 0.5) == np.array([c.label for c in val])).mean() > 0.6


def test_infection_ratio_counts_consolidation():
    from pneumoct.train.volumes import VolumeCase

    lung = np.ones((2, 2, 2), np.uint8)
    les = np.zeros((2, 2, 2), np.uint8)
    les[0, 0, 0], les[1, 1, 1] = 1, 2  # one GGO, one consolidation voxel
    v = VolumeCase("c", np.zeros((2, 2, 2), np.int16), (1.0, 1.0, 1.0), lung, "cap", "test", "c", lesion=les)
    assert v.infection_ratio == pytest.approx(2 / 8)


def test_save_reload_identical(tmp_path):
    torch.manual_seed(0)
    net = build_model("dual_sampling_rn34", attention=True, **TINY).eval()
    save_checkpoint(tmp_path / "ck", net, "dual_sampling_rn34", {**TINY, "attention": True})
    net2, info = load_checkpoint(tmp_path / "ck", expected_name="dual_sampling_rn34")
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        a, b = net(x), net2(x)
    assert torch.equal(a["logit"], b["logit"]) and torch.equal(a["attention"], b["attention"])


def _tiny_weights(tmp_path):
    torch.manual_seed(0)
    for n in ("us", "ss"):
        net = build_model("dual_sampling_rn34", attention=True, **TINY).half()  # bundles store half precision
        save_checkpoint(tmp_path / n, net, "dual_sampling_rn34", {**TINY, "attention": True},
                        {"prep": {"size": [32, 48, 48], "factor": 2.0, "crop_to_lungs": True},
                         "data": {"sources": ["synthetic phantoms"], "synthetic": True}})
    return tmp_path


def test_analyse_returns_valid_output(phantom, tmp_path):
    from pneumoct.volumetric import run_system

    wdir = _tiny_weights(tmp_path)
    out = run_system("dual-sampling", phantom.study, phantom.lung_mask, weights_dir=str(wdir))
    out.check(phantom.study.hu.shape)
    assert set(out.maps) == {"attention_us", "attention_ss"}
    for m in out.maps.values():
        assert m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1 and not m[phantom.lung_mask == 0].any()
    i = out.info
    w = i["ensemble_weight_us"]
    assert out.probabilities["covid19"] == pytest.approx(w * i["p_covid19"]["us"] + (1 - w) * i["p_covid19"]["ss"])
    with pytest.raises(PneumoctInputError):
        run_system("dual-sampling", phantom.study, phantom.lung_mask[:-1], weights_dir=str(wdir))
    with pytest.raises(PneumoctInputError):
        run_system("dual-sampling", phantom.study, phantom.lung_mask, weights_dir=str(tmp_path / "none"))


def test_config_and_train_entry(tmp_path):
    from pneumoct.train.config import load_config
    from pneumoct.train.entry import train_from_config

    from conftest import REPO

    for name in ("dual_sampling_cpu.yaml", "dual_sampling_paper.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.task == "dual_sampling" and cfg.class_names == ["cap", "covid19"]
    with pytest.raises(PneumoctInputError):
        load_config(REPO / "configs" / "dual_sampling_cpu.yaml", ["dual.sampling=random"])
    cfg = load_config(REPO / "configs" / "dual_sampling_cpu.yaml", ["dual.attention=false"])
    assert cfg.model.kwargs["attention"] is False
    m = train_from_config(REPO / "configs" / "dual_sampling_cpu.yaml", tmp_path / "run", progress=False, overrides=[
        "dual.cohort.n_per_class=4", "dual.cohort.matrix=64", "dual.cohort.n_slices=24", "dual.size=[32,48,48]",
        "train.epochs=1", "model.kwargs.width=4", "dual.sampling=size_balanced"])
    assert m["status"] == "done"
    for f in ("DONE", "model_card.md", "best/model.json", "best/fingerprint.json"):
        assert (tmp_path / "run" / f).is_file()
    _, info = load_checkpoint(tmp_path / "run" / "best")
    assert info["meta"]["sampling"] == "size_balanced" and info["meta"]["data"]["synthetic"] is True


def test_binary_metrics_and_given_lesion_mask(phantom, tmp_path):
    from pneumoct.evaluate.classification import binary_metric_fn, binary_metrics, bootstrap_ci
    from pneumoct.models.dual_sampling_system import analyse

    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.6, 0.4, 0.3, 0.7])
    m = binary_metrics(y, p)
    assert (m["accuracy"], m["sensitivity"], m["specificity"]) == pytest.approx((0.6, 2 / 3, 0.5))
    assert m["f1"] == pytest.approx(4 / 6) and m["auc"] == pytest.approx(4 / 6)
    ci = bootstrap_ci(binary_metric_fn("auc"), y, np.stack([1 - p, p], 1), n_boot=50, seed=0)
    assert ci["estimate"] == pytest.approx(4 / 6)
    wdir = _tiny_weights(tmp_path)
    out = analyse(phantom.study, phantom.lung_mask, str(wdir), lesion_mask=phantom.lesion_mask)
    lung = phantom.lung_mask > 0
    truth = np.count_nonzero((phantom.lesion_mask > 0) & lung) / np.count_nonzero(lung)
    assert out.info["infection_ratio"] == pytest.approx(truth)


def test_bundled_weights_small_synthetic_and_loadable():
    from pneumoct.models.dual_sampling_system import load_networks, resolve_weights

    try:
        d = resolve_weights(None)
    except PneumoctInputError:
        pytest.skip("no bundled dual-sampling weights in this checkout")
    assert sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) < 5 * 1024 * 1024
    for f in ("model_card.md", "fingerprint.json"):
        assert (d / f).is_file()
    assert "synthetic phantoms" in (d / "model_card.md").read_text()
    nets = load_networks(d)
    for n in ("us", "ss"):
        model, info = nets[n]
        assert info["meta"]["data"]["synthetic"] is True and info["meta"]["attention"] is True
        assert next(model.parameters()).dtype == torch.float32
    assert nets["us"][1]["meta"]["sampling"] == "uniform" and nets["ss"][1]["meta"]["sampling"] == "size_balanced"


def test_evaluate_command_scores_one_network_on_a_phantom_cohort(tmp_path):
    """`pneumoct evaluate --checkpoint` on one dual-sampling network: COVID-19 vs CAP studies, others left out."""
    import json

    from pneumoct.cli import main
    from pneumoct.synth.writer import synthesize_cohort

    torch.manual_seed(0)
    net = build_model("dual_sampling_rn34", attention=True, **TINY)
    save_checkpoint(tmp_path / "net", net, "dual_sampling_rn34", {**TINY, "attention": True},
                    {"family": "dual_sampling", "prep": {"size": [32, 48, 48], "factor": 2.0, "crop_to_lungs": True}})
    cohort = tmp_path / "cohort"
    synthesize_cohort(cohort, 6, seed=78, labels=("covid19", "cap", "healthy"), matrix=64, n_slices=16,
                      formats=("nifti",))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "net"), "--data", f"phantom_cohort:{cohort}",
                 "--out", str(tmp_path / "ev"), "--bootstrap", "50"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 4 and "2 studies of other classes left out" in m["data"]
    rows = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert rows[0].split(",")[-2:] == ["prob_cap", "prob_covid19"] or "prob_covid19" in rows[0]
