"""Hu et al. multi-scale CAM network and class-balanced focal loss (Eq. (1)); tiny, seeded, CPU-only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumoct.models import build_model, list_models
from pneumoct.models.losses import ClassBalancedFocalLoss, class_weights_from_labels, inverse_frequency_weights
from pneumoct.models.multiscale_cam import MultiScaleCAMNet, recalibrate_batchnorm

torch.set_num_threads(1)


def _net(**kw) -> MultiScaleCAMNet:
    torch.manual_seed(0)
    kw.setdefault("widths", (4, 8, 8, 16, 16))
    return MultiScaleCAMNet(**kw).eval()


# ---------------------------------------------------------------- architecture
def test_registry_builds_paper_and_cpu_configs():
    names = list_models()
    assert "multiscale_cam" in names and "multiscale_cam_cpu" in names
    paper = build_model("multiscale_cam", num_classes=3)
    cpu = build_model("multiscale_cam_cpu", num_classes=3)
    assert paper.widths == (32, 64, 128, 256, 256) and paper.depths == (2, 2, 3, 3, 3)
    assert cpu.widths == (16, 32, 64, 128, 128)
    convs = [m for m in paper.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32] * 2 + [64] * 2 + [128] * 3 + [256] * 3 + [256] * 3
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    assert all(h.kernel_size == (1, 1) for h in paper.heads.values())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in paper.modules()) == 13
    nobn = build_model("multiscale_cam_cpu", batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in nobn.modules())


@pytest.mark.parametrize("in_ch,k,hw", [(1, 3, (64, 64)), (3, 2, (96, 80)), (1, 2, (97, 81))])
def test_output_shapes(in_ch, k, hw):
    net = _net(in_channels=in_ch, num_classes=k)
    x = torch.randn(2, in_ch, *hw)
    with torch.no_grad():
        out = net(x)
    h, w = hw
    assert out["logits"].shape == (2, k)
    assert out["maps"]["conv3"].shape == (2, k, h // 4, w // 4)
    assert out["maps"]["conv4"].shape == (2, k, h // 2 // 2 // 2, w // 2 // 2 // 2)
    assert out["maps"]["conv5"].shape == (2, k, h // 2 // 2 // 2 // 2, w // 2 // 2 // 2 // 2)
    cams = net.cam(x, class_idx=k - 1)
    assert set(cams) == {"conv3", "conv4", "conv5", "joint"}
    for m in cams.values():
        assert m.shape == (2, h, w)
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0 + 1e-6
    assert torch.allclose(cams["joint"], cams["conv3"] * cams["conv4"] * cams["conv5"])


def test_paper_config_forward_96x80():
    torch.manual_seed(0)
    net = build_model("multiscale_cam", in_channels=3, num_classes=2).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 96, 80))
    assert out["logits"].shape == (1, 2) and out["maps"]["conv5"].shape == (1, 2, 6, 5)


@pytest.mark.parametrize("scales", [("conv3",), ("conv4",), ("conv5",), ("conv3", "conv5"),
                                    ("conv3", "conv4", "conv5")])
def test_scale_subsets(scales):
    net = _net(use_scales=scales)
    x = torch.randn(2, 1, 48, 40)
    with torch.no_grad():
        out = net(x)
    assert tuple(out["maps"]) == scales
    gmp_sum = sum(out["maps"][s].amax(dim=(-2, -1)) for s in scales)
    assert torch.allclose(out["logits"], gmp_sum)
    assert len(net.blocks) == max(int(s[-1]) for s in scales)  # only the blocks needed are built
    cams = net.cam(x)
    assert set(cams) == set(scales) | {"joint"} and cams["joint"].shape == (2, 48, 40)


def test_bad_arguments():
    with pytest.raises(ValueError):
        MultiScaleCAMNet(use_scales=())
    with pytest.raises(ValueError):
        MultiScaleCAMNet(use_scales=("conv6",))
    with pytest.raises(ValueError):
        MultiScaleCAMNet(widths=(8, 8, 8))
    with pytest.raises(ValueError):
        _net()(torch.randn(1, 1, 8, 8))  # smaller than 4 poolings allow
    with pytest.raises(ValueError):
        _net()(torch.randn(1, 3, 32, 32))  # wrong channel count


def test_deterministic_given_seed():
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        a, b = _net()(x)["logits"], _net()(x)["logits"]
    assert torch.equal(a, b)


# ---------------------------------------------------------------- loss, Eq. (1)
def test_focal_equals_cross_entropy_gamma0_uniform():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    ce = F.cross_entropy(logits, y)
    assert torch.allclose(ClassBalancedFocalLoss(gamma=0.0)(logits, y), ce, atol=1e-6)
    assert torch.allclose(ClassBalancedFocalLoss([5, 5, 5], gamma=0.0)(logits, y), ce, atol=1e-6)
    assert torch.allclose(ClassBalancedFocalLoss(weights=[1, 1, 1], gamma=0.0)(logits, y), ce, atol=1e-6)


def test_focal_smaller_than_ce_for_well_classified():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, -1.0], [0.2, 0.0, 0.1]])
    y = torch.tensor([0, 1, 2])
    ce = F.cross_entropy(logits, y, reduction="none")
    fl = ClassBalancedFocalLoss(gamma=1.0, reduction="none")(logits, y)
    assert bool((fl < ce).all())
    assert float(fl[0] / ce[0]) < 0.05  # easy example (P_c ~ 0.96) down-weighted hard
    assert float(fl[2] / ce[2]) > 0.6  # misclassified example barely touched
    p = F.softmax(logits, 1)[torch.arange(3), y]
    assert torch.allclose(fl, (1 - p) * ce, atol=1e-6)
    fl2 = ClassBalancedFocalLoss(gamma=2.0, reduction="none")(logits, y)
    assert bool((fl2 < fl).all())


def test_rare_classes_weigh_more():
    labels = [0] * 90 + [1] * 10
    w = class_weights_from_labels(labels, 2)
    assert float(w[1] / w[0]) == pytest.approx(9.0, rel=1e-5)
    assert float(0.9 * w[0] + 0.1 * w[1]) == pytest.approx(1.0, rel=1e-5)  # expected weight 1
    loss = ClassBalancedFocalLoss(weights=w, gamma=1.0, reduction="none")
    # the same confidence in the true class costs more for the rare class
    l0 = loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    l1 = loss(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert float(l1) == pytest.approx(9.0 * float(l0), rel=1e-5)
    assert torch.allclose(ClassBalancedFocalLoss(class_frequencies=[90, 10]).weight, w)
    w3 = inverse_frequency_weights([30, 0, 10])
    assert float(w3[1]) == pytest.approx(float(w3[2]))  # absent class treated as the rarest


def test_binary_logits_forms_agree():
    g = torch.Generator().manual_seed(1)
    s, y = torch.randn(12, generator=g), torch.randint(0, 2, (12,), generator=g)
    single = ClassBalancedFocalLoss(gamma=0.0)(s, y)
    assert torch.allclose(single, F.binary_cross_entropy_with_logits(s, y.float()), atol=1e-6)
    two = torch.stack([torch.zeros_like(s), s], 1)
    lf = ClassBalancedFocalLoss([3, 1], gamma=1.0)
    assert torch.allclose(lf(s[:, None], y), lf(two, y), atol=1e-6)
    with pytest.raises(ValueError):
        ClassBalancedFocalLoss(weights=[1, 1, 1])(two, y)


# ---------------------------------------------------------------- learnable toy
SIZE = 64


def _blobs(n: int, seed: int):
    """class 0: noise only; 1: bright Gaussian blob; 2: dark blob; blob anywhere. Returns x, y, centres (n, 2)."""
    g = np.random.default_rng(seed)
    x = g.normal(0.0, 0.3, (n, 1, SIZE, SIZE)).astype(np.float32)
    y = np.arange(n) % 3
    g.shuffle(y)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ctr = g.uniform(10, SIZE - 10, (n, 2))
    for i in range(n):
        if y[i]:
            blob = np.exp(-((yy - ctr[i, 0]) ** 2 + (xx - ctr[i, 1]) ** 2) / (2 * 3.0 ** 2))
            x[i, 0] += (1.5 if y[i] == 1 else -1.5) * blob
    return torch.from_numpy(x), torch.from_numpy(y).long(), ctr


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y, _ = _blobs(192, seed=0)
    net = build_model("multiscale_cam_cpu", num_classes=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    lossf = ClassBalancedFocalLoss(class_frequencies=torch.bincount(y, minlength=3), gamma=1.0)
    losses = []
    for _ in range(3):
        net.train()
        perm, tot = torch.randperm(len(x)), 0.0
        for i in range(0, len(x), 32):
            b = perm[i:i + 32]
            loss = lossf(net(x[b])["logits"], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(b)
        losses.append(tot / len(x))
    recalibrate_batchnorm(net, [x[i:i + 64] for i in range(0, len(x), 64)])
    return net, losses


def test_training_learns_the_toy(trained):
    net, losses = trained
    assert losses[-1] < 0.5 * losses[0]
    xt, yt, _ = _blobs(60, seed=1)
    with torch.no_grad():
        acc = float((net(xt)["logits"].argmax(1) == yt).float().mean())
    assert acc > 0.8, acc


def test_cam_peak_lands_on_blob(trained):
    net, _ = trained
    xt, yt, ctr = _blobs(60, seed=1)
    pos = (yt == 1).numpy()
    cams = net.cam(xt[pos], class_idx=1)
    rng = np.random.default_rng(2)
    rand = rng.uniform(0, SIZE, (pos.sum(), 2))
    d_rand = np.hypot(*(rand - ctr[pos]).T)
    for scale in ("joint", "conv3"):
        m = cams[scale]
        assert m.shape == (int(pos.sum()), SIZE, SIZE)
        am = m.flatten(1).argmax(1).numpy()
        peak = np.stack([am // SIZE, am % SIZE], 1)
        d = np.hypot(*(peak - ctr[pos]).T)
        assert np.mean(d < 8.0) > 0.7, (scale, d)  # blob sigma 3 px
        assert d.mean() < 0.4 * d_rand.mean(), (scale, d.mean(), d_rand.mean())


def test_local_contrast_norm_box_mean_equals_average_pooling():
    import torch
    import torch.nn.functional as F

    from pneumoct.models.multiscale_cam import LocalContrastNorm

    torch.manual_seed(0)
    for k, shape in [(15, (3, 1, 96, 80)), (5, (2, 2, 40, 40))]:
        x = torch.rand(*shape) * 2 - 0.5
        norm = LocalContrastNorm(k)
        assert torch.allclose(norm._box_mean(x), F.avg_pool2d(x, k, stride=1), atol=1e-5)
        pad = k // 2
        xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        mean = F.avg_pool2d(xp, k, stride=1)
        std = (F.avg_pool2d(xp * xp, k, stride=1) - mean * mean).clamp_min(0).sqrt()
        assert torch.allclose(norm(x), (x - mean) / (std + norm.floor), atol=1e-4)
